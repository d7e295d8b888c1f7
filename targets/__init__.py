"""Backends that run a converted network. Each is one folder implementing `targets.base.Target`."""
