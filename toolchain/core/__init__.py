"""The core: the structures every layer shares, importing nothing above them.

- `ir`: the float graph IR (ANN and SNN) and its artifact files.
- `fixed`: the fixed-point IR (layers, bit widths, input encoding) and its files.
- `interpreter`: the one interpreter of the op semantics in PyTorch.
- `target`: the interface every backend implements and what a run gives back.

Core modules import only each other, `toolchain.errors` and `toolchain.fileio`
(tests/test_layering.py holds that).
"""
