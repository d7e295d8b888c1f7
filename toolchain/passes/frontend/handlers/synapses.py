"""Handlers of the ops that become synapses: Conv, Gemm, MatMul."""

from __future__ import annotations

import numpy as np
import onnx

from toolchain.core import ir
from toolchain.passes.frontend.builder import Builder, add_pads, ints, spatial, window_pads
from toolchain.passes.frontend.layout import channels_last_columns
from toolchain.passes.frontend.registry import handles


@handles("Conv")
def conv(b: Builder, node: onnx.NodeProto) -> None:
    source, extra, value = b.dyn_padded(0)
    _, h, w = spatial(b, "convolution")
    weight = np.asarray(b.const(1, "weight"), np.float32)
    if weight.ndim != 4:
        b.fail(f"only 2-D convolution is supported (weight shape {list(weight.shape)})")
    bias = b.optional_const(2, "bias")
    if extra != (0, 0, 0, 0) and value != 0:
        b.fail(f"a Pad with value {value:g} before a convolution is not supported (only zero padding)")
    kernel = [int(k) for k in weight.shape[2:]]
    if b.attr("kernel_shape") is not None and ints(b.attr("kernel_shape"), []) != kernel:
        b.fail(f"kernel_shape {b.attr('kernel_shape')} disagrees with the weight shape {list(weight.shape)}")
    strides = ints(b.attr("strides"), [1, 1])
    dilations = ints(b.attr("dilations"), [1, 1])
    pads = window_pads(b, (h + extra[0] + extra[2], w + extra[1] + extra[3]), kernel, strides, dilations)
    b.emit(
        ir.Conv2d(
            "",
            [source],
            weight=weight.copy(),
            bias=None if bias is None else np.asarray(bias, np.float32).reshape(-1).copy(),
            stride=(strides[0], strides[1]),
            padding=add_pads(pads, extra),
            dilation=(dilations[0], dilations[1]),
            groups=int(b.attr("group", 1)),
        )
    )


def _linear_bias(b: Builder, value: np.ndarray | None, outputs: int, factor: float) -> np.ndarray | None:
    if value is None:
        return None
    value = np.asarray(value, np.float64)
    try:
        full = np.broadcast_to(value, (1, outputs)) if value.ndim < 2 or value.shape[0] == 1 else None
    except ValueError:
        full = None
    if full is None:
        b.fail(f"bias of shape {list(value.shape)} is not one value per output ({outputs})")
    return (factor * full[0]).astype(np.float32)


def _flat_input(b: Builder, weight: np.ndarray) -> tuple[str, np.ndarray]:
    """The (N, features) input and the (out, features) weight, its columns in the IR's (C, H, W)
    flatten order where the model flattened channels-last."""
    name = b.input(0)
    if name is not None and name in b.flat_channels_last:
        source, chw = b.flat_channels_last[name]
        return source, channels_last_columns(weight, chw)
    source = b.dyn(0)
    if len(b.shape()) != 1:
        b.fail(f"expects a (N, features) input, got per-sample shape {list(b.shape())}; flatten first")
    return source, weight


@handles("Gemm")
def gemm(b: Builder, node: onnx.NodeProto) -> None:
    if b.is_const(0):
        b.fail("a constant first operand (A) with an activation as B is not supported")
    if int(b.attr("transA", 0)):
        b.fail("transA=1 would transpose the batch dimension; not supported")
    matrix = np.asarray(b.const(1, "B"), np.float64)
    alpha, beta = float(b.attr("alpha", 1.0)), float(b.attr("beta", 1.0))
    source, weight = _flat_input(b, alpha * (matrix if int(b.attr("transB", 0)) else matrix.T))
    bias = _linear_bias(b, b.optional_const(2, "C"), weight.shape[0], beta)
    b.emit(ir.Linear("", [source], weight=weight.astype(np.float32), bias=bias))


@handles("MatMul")
def matmul(b: Builder, node: onnx.NodeProto) -> None:
    if b.is_const(0):
        b.fail("a constant first operand with an activation as the second is not supported")
    matrix = np.asarray(b.const(1, "weight"), np.float32)
    if matrix.ndim != 2:
        b.fail(f"only a 2-D constant weight is supported (shape {list(matrix.shape)})")
    source, weight = _flat_input(b, matrix.T)
    b.emit(ir.Linear("", [source], weight=np.ascontiguousarray(weight, np.float32), bias=None))
