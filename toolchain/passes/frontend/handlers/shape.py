"""Handlers of the ops that only move or relabel values: Identity, Dropout, Cast, Flatten, Reshape,
Squeeze, Unsqueeze, Transpose, Concat, and the output Softmax."""

from __future__ import annotations

import math

import numpy as np
import onnx

from toolchain.core import ir
from toolchain.passes.frontend.builder import Builder, split_operands
from toolchain.passes.frontend.layout import TO_CHANNELS_FIRST, TO_CHANNELS_LAST, transpose_perm
from toolchain.passes.frontend.registry import handles


@handles("Identity", "Dropout")
def identity(b: Builder, node: onnx.NodeProto) -> None:
    if node.op_type == "Dropout":
        training = b.optional_const(2, "training_mode")
        if training is not None and bool(np.asarray(training).reshape(-1)[0]):
            b.fail("training_mode=True is not supported; export the model in eval mode")
        b.require_unused_outputs(1, "mask")
    b.alias(b.dyn(0))


@handles("Cast")
def cast(b: Builder, node: onnx.NodeProto) -> None:
    target = int(b.attr("to", 0))
    if target not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        b.fail(f"a cast of an activation to {onnx.TensorProto.DataType.Name(target)} is not supported")
    b.alias(b.dyn(0))


@handles("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def reshape(b: Builder, node: onnx.NodeProto) -> None:
    """Shape-only ops: allowed when they keep the sample's shape or flatten it to a vector."""
    name = b.input(0)
    if name is not None and name in b.channels_last and len(b.shape(node.output[0])) == 1:
        source, chw = b.channels_last[name]  # flattened in (H, W, C) order: the classifier's columns follow
        b.flat_channels_last[node.output[0]] = (b.emit(ir.Flatten("", [source])), chw)
        return
    source = b.dyn(0)
    before, after = b.shape(), b.shape(node.output[0])
    if after == before or after == b.expected.get(source):  # e.g. (N, H, W) input -> (N, 1, H, W): the IR's (1, H, W)
        b.alias(source)
    elif len(after) == 1 and after[0] == math.prod(before):
        b.emit(ir.Flatten("", [source]))
    else:
        b.fail(
            f"reshapes a sample from {list(before)} to {list(after)}; only flattening "
            "(N, C, H, W) -> (N, C*H*W) and dropping/adding unit dimensions that leave the sample unchanged are supported"
        )


@handles("Transpose")
def transpose(b: Builder, node: onnx.NodeProto) -> None:
    """Channels-last detours (see `layout`); the Transpose of a channels-last input is dropped by the loader."""
    name, perm = b.input(0), transpose_perm(node)
    if name is not None and name in b.channels_last and perm == TO_CHANNELS_FIRST:
        b.alias(b.channels_last[name][0])  # back to channels-first: the two transposes cancel
        return
    shape = b.shape()
    if perm == list(range(len(shape) + 1)):
        b.alias(b.dyn(0))
        return
    if len(shape) == 3 and perm == TO_CHANNELS_LAST:
        b.channels_last[node.output[0]] = (b.dyn(0), shape)
        return
    b.fail(
        f"perm {perm} is not supported; only the channels-last detours are: (N, H, W, C) -> (N, C, H, W) of the "
        "model's input, and (N, C, H, W) -> (N, H, W, C) flattened straight into a Gemm/MatMul classifier"
    )


@handles("Concat")
def concat(b: Builder, node: onnx.NodeProto) -> None:
    dynamic, constant = split_operands(b)
    if constant:
        b.fail("concatenating an activation with a constant is not supported")
    rank = len(b.shape()) + 1
    axis = int(b.attr("axis", 1))
    if axis % rank != 1:
        b.fail(f"concatenation along axis {axis} is not supported; only along channels (axis 1)")
    b.emit(ir.Concat("", [b.dyn(i) for i in dynamic]))


@handles("Softmax", "LogSoftmax")
def softmax(b: Builder, node: onnx.NodeProto) -> None:
    if node.output[0] != b.graph_output:
        b.fail("is supported only as the model's last op (it is dropped; the argmax is unchanged)")
    b.alias(b.dyn(0))
