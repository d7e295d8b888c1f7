"""Handlers of the window ops: MaxPool, AveragePool, global pools and spatial reductions, and Pad
(absorbed into the padding of the Conv or pool that reads it)."""

from __future__ import annotations

import numpy as np
import onnx

from toolchain.core import ir
from toolchain.passes.frontend.builder import Builder, PendingPad, add_pads, ints, spatial, window_pads
from toolchain.passes.frontend.registry import handles


def _ceil_extra(b: Builder, size: int, kernel: int, stride: int, begin: int, end: int) -> int:
    """Extra end padding that makes floor-mode pooling produce the ceil-mode output size."""
    span = size + begin + end - kernel
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + begin:
        b.fail(
            "ceil_mode=1 makes the last window start inside the end padding; ONNX shape inference and "
            "onnxruntime disagree on the output size there, so this is not supported (change pads or ceil_mode)"
        )
    return max(0, (out - 1) * stride + kernel - (size + begin + end))


def _pool_geometry(b: Builder) -> tuple[str, tuple[int, int, int, int], float, list[int], list[int], list[int], tuple[int, int]]:
    source, extra, value = b.dyn_padded(0)
    _, h, w = spatial(b, "pooling")
    kernel = ints(b.attr("kernel_shape"), [])
    if len(kernel) != 2:
        b.fail(f"kernel_shape {kernel} is not 2-D")
    strides = ints(b.attr("strides"), [1, 1])
    if any(d != 1 for d in ints(b.attr("dilations"), [1, 1])):
        b.fail("dilated pooling is not supported")
    hw = (h + extra[0] + extra[2], w + extra[1] + extra[3])
    pads = window_pads(b, hw, kernel, strides, [1, 1])
    ceil = (0, 0)
    if int(b.attr("ceil_mode", 0)):
        ceil = (
            _ceil_extra(b, hw[0], kernel[0], strides[0], pads[0], pads[2]),
            _ceil_extra(b, hw[1], kernel[1], strides[1], pads[1], pads[3]),
        )
    return source, extra, value, kernel, strides, pads, ceil


@handles("MaxPool")
def max_pool(b: Builder, node: onnx.NodeProto) -> None:
    source, extra, value, kernel, strides, pads, ceil = _pool_geometry(b)
    b.require_unused_outputs(1, "indices")
    if any(extra) and value != -np.inf:
        b.fail(f"a Pad with value {value:g} before MaxPool is not supported (only -inf padding folds into the pool)")
    padding = add_pads(add_pads(pads, extra), (0, 0, ceil[0], ceil[1]))
    b.emit(ir.MaxPool2d("", [source], kernel=(kernel[0], kernel[1]), stride=(strides[0], strides[1]), padding=padding))


@handles("AveragePool")
def average_pool(b: Builder, node: onnx.NodeProto) -> None:
    source, extra, value, kernel, strides, pads, ceil = _pool_geometry(b)
    include = bool(int(b.attr("count_include_pad", 0)))
    if any(extra):
        if value != 0:
            b.fail(f"a Pad with value {value:g} before AveragePool is not supported (only zero padding)")
        if any(pads) and not include:
            b.fail("a Pad before an AveragePool that has its own pads with count_include_pad=0 is not supported")
        include = True  # the explicit zeros are real elements of the pooled tensor
    # ceil_mode pads the end so that floor-mode windows reach the last output; that overhang is
    # never in the divisor (ONNX reference, torch, onnxruntime 1.32; onnxruntime 1.23 counted it).
    padding = add_pads(add_pads(pads, extra), (0, 0, ceil[0], ceil[1]))
    b.emit(
        ir.AvgPool2d(
            "",
            [source],
            kernel=(kernel[0], kernel[1]),
            stride=(strides[0], strides[1]),
            padding=padding,
            count_include_pad=include,
            uncounted_end=(ceil[0], ceil[1]) if include else (0, 0),
        )
    )


@handles("GlobalAveragePool", "GlobalMaxPool")
def global_pool(b: Builder, node: onnx.NodeProto) -> None:
    source = b.dyn(0)
    _, h, w = spatial(b, "pooling")
    if node.op_type == "GlobalMaxPool":
        b.emit(ir.MaxPool2d("", [source], kernel=(h, w), stride=(h, w), padding=(0, 0, 0, 0)))
    else:
        b.emit(ir.AvgPool2d("", [source], kernel=(h, w), stride=(h, w), padding=(0, 0, 0, 0), count_include_pad=False))


@handles("ReduceMean", "ReduceMax")
def reducespatial(b: Builder, node: onnx.NodeProto) -> None:
    """A mean (max) over the two spatial axes, as in `x.mean(dim=(2, 3))`: global pooling."""
    source = b.dyn(0)
    _, h, w = spatial(b, "reduction")
    axes_value = b.optional_const(1, "axes")  # an input from opset 18, an attribute before
    axes = ints(b.attr("axes"), []) if axes_value is None else [int(a) for a in np.asarray(axes_value).reshape(-1)]
    if sorted(a % 4 for a in axes) != [2, 3]:
        b.fail(f"reduces over axes {axes}; only the two spatial axes (2, 3) are supported (global pooling)")
    window = {"kernel": (h, w), "stride": (h, w), "padding": (0, 0, 0, 0)}
    pool: ir.Node = (
        ir.MaxPool2d("", [source], **window)
        if node.op_type == "ReduceMax"
        else ir.AvgPool2d("", [source], count_include_pad=False, **window)
    )
    if int(b.attr("keepdims", 1)):
        b.emit(pool)
    else:
        b.emit(ir.Flatten("", [b.emit(pool, expect=False)]))


@handles("Pad")
def pad(b: Builder, node: onnx.NodeProto) -> None:
    source = b.dyn(0)
    spatial(b, "padding")
    mode = b.attr("mode", "constant")
    if mode != "constant":
        b.fail(f"mode {mode!r} is not supported; only constant (zero) padding folds into a Conv or pool")
    if len(node.input) > 1:  # opset >= 11
        pads = [int(p) for p in np.asarray(b.const(1, "pads")).reshape(-1)]
        constant = b.optional_const(2, "constant_value")
        value = 0.0 if constant is None else float(np.asarray(constant).reshape(-1)[0])
        axes_value = b.optional_const(3, "axes")
        axes = list(range(4)) if axes_value is None else [int(a) % 4 for a in np.asarray(axes_value).reshape(-1)]
    else:
        pads = ints(b.attr("pads"), [])
        value = float(b.attr("value", 0.0))
        axes = list(range(4))
    if len(pads) != 2 * len(axes):
        b.fail(f"pads {pads} do not match the axes {axes}")
    begin, end = [0] * 4, [0] * 4
    for k, axis in enumerate(axes):
        begin[axis], end[axis] = pads[k], pads[k + len(axes)]
    if begin[:2] != [0, 0] or end[:2] != [0, 0]:
        b.fail("padding the batch or channel dimension is not supported")
    if min(begin + end) < 0:
        b.fail("negative pads (cropping) are not supported")
    b.pads[node.output[0]] = PendingPad(source, (begin[2], begin[3], end[2], end[3]), value, b.node_name)
