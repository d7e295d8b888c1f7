"""ONNX frontend: `load_onnx(path) -> toolchain.ir.Graph` (the ANN, BN folded, activations recognised).

Needs numpy and onnx only (no torch). See `loader` for the steps, `ops` for the op
handlers (`SUPPORTED_OPS`), `patterns` for clipped-ReLU / QCFS recognition,
`passes` for affine folding and `layout` for channels-last models.
"""

from toolchain.frontend.loader import load_onnx
from toolchain.frontend.ops import SUPPORTED_OPS

__all__ = ["SUPPORTED_OPS", "load_onnx"]
