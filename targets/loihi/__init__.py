"""Bit-exact integer emulator of the Loihi-style fixed-point network (`toolchain.core.fixed`)."""
