"""ONNX frontend: `load_onnx(path) -> toolchain.core.ir.Graph` (the ANN, BN folded, activations recognised).

Needs numpy and onnx only (no torch). See `loader` for the steps, `registry` and `handlers/`
(one file per op family: synapses, element-wise, pooling, shape) for the op handlers
(`SUPPORTED_OPS`), `builder` for the state they share, `patterns` for clipped-ReLU / QCFS
recognition, `simplify` for scale-shift folding and pruning, `folding` for constant folding
and `layout` for channels-last models.
"""

from toolchain.passes.frontend.loader import load_onnx
from toolchain.passes.frontend.registry import supported_ops

SUPPORTED_OPS: tuple[str, ...] = supported_ops()  # every op type some opset has a handler for

__all__ = ["SUPPORTED_OPS", "load_onnx"]
