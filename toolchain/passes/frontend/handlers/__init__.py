"""The ONNX op handlers, one file per family; importing this package registers them all
(`toolchain.passes.frontend.registry`)."""

from toolchain.passes.frontend.handlers import elementwise, pooling, shape, synapses

__all__ = ["elementwise", "pooling", "shape", "synapses"]
