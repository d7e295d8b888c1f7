"""Handlers of the element-wise ops: arithmetic (Add, Sub, Mul, Div, Neg, BatchNormalization) and
activations (Relu, Clip, Max, Min, Floor), lowered through element-wise chains (`patterns`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from toolchain.core import ir
from toolchain.passes.frontend.builder import PSEUDO, Builder, split_operands
from toolchain.passes.frontend.patterns import Clamp, Elementwise, Floor, Scale, Token
from toolchain.passes.frontend.registry import handles


def _scale_shift(b: Builder, index: int, scale: Any, shift: Any) -> None:
    count = (b.channels(index),)
    b.elementwise(
        Scale(np.broadcast_to(scale, count).astype(np.float64), np.broadcast_to(shift, count).astype(np.float64), b.source()),
        index,
    )


def _residual(b: Builder, sources: list[str]) -> None:
    shapes = {b.shape(b.input(i)) for i in range(len(b.node.input)) if b.input(i) and not b.is_const(i)}
    if len(shapes) != 1:
        b.fail(f"adds activations of different shapes {sorted(list(s) for s in shapes)}; broadcasting is not supported")
    b.emit(ir.Add("", sources))


@handles("Add", "Sum")
def add(b: Builder, node: onnx.NodeProto) -> None:
    dynamic, constant = split_operands(b)
    if len(dynamic) == 1 and constant:
        total = sum(b.channel_vector(b.const(i, "addend"), "addend", dynamic[0]) for i in constant)
        _scale_shift(b, dynamic[0], 1.0, total)
    elif len(dynamic) == 1:
        b.alias(b.dyn(dynamic[0]))
    elif not constant:
        _residual(b, [b.dyn(i) for i in dynamic])
    else:
        b.fail("a sum of several activations and a constant is not supported")


@handles("Sub")
def sub(b: Builder, node: onnx.NodeProto) -> None:
    if b.is_const(1):
        _scale_shift(b, 0, 1.0, -b.channel_vector(b.const(1, "subtrahend"), "subtrahend", 0))
    elif b.is_const(0):
        _scale_shift(b, 1, -1.0, b.channel_vector(b.const(0, "minuend"), "minuend", 1))
    else:  # x - y = x + (-1) * y
        count = b.channels(1)
        tokens: list[Token] = [Scale(-np.ones(count), np.zeros(count), b.source())]
        negated = Elementwise(f"{PSEUDO}{node.output[0]}/neg", [b.dyn(1)], tokens=tokens)
        b.nodes.append(negated)
        _residual(b, [b.dyn(0), negated.name])


@handles("Mul")
def mul(b: Builder, node: onnx.NodeProto) -> None:
    dynamic, constant = split_operands(b)
    if len(dynamic) != 1:
        b.fail("a product of two activations is not supported; only multiplication by a constant")
    _scale_shift(b, dynamic[0], b.channel_vector(b.const(constant[0], "factor"), "factor", dynamic[0]), 0.0)


@handles("Div")
def div(b: Builder, node: onnx.NodeProto) -> None:
    if not b.is_const(1):
        b.fail("division by an activation is not supported; only division by a constant")
    divisor = b.channel_vector(b.const(1, "divisor"), "divisor", 0)
    if np.any(divisor == 0):
        b.fail("division by zero")
    _scale_shift(b, 0, 1.0 / divisor, 0.0)


@handles("Neg")
def neg(b: Builder, node: onnx.NodeProto) -> None:
    _scale_shift(b, 0, -1.0, 0.0)


@handles("BatchNormalization")
def batch_norm(b: Builder, node: onnx.NodeProto) -> None:
    if int(b.attr("training_mode", 0)):
        b.fail("training_mode=1 is not supported; export the model in eval mode")
    b.require_unused_outputs(1, "running statistics")
    count = (b.channels(0),)
    gamma, beta, mean, var = (
        np.asarray(b.const(i, w), np.float64).reshape(-1) for i, w in enumerate(("scale", "B", "mean", "var"), 1)
    )
    if any(v.size not in (1, count[0]) for v in (gamma, beta, mean, var)):
        b.fail(f"parameters do not have one value per channel ({count[0]})")
    eps = float(b.attr("epsilon", 1e-5))
    if np.any(var + eps <= 0):
        b.fail("variance + epsilon is not positive")
    scale = gamma / np.sqrt(var + eps)
    _scale_shift(b, 0, scale, beta - mean * scale)


# ------------------------------------------------------------------ activations


def _bound(b: Builder, value: Any, default: float, what: str, index: int = 0) -> np.ndarray:
    """A clip bound as one value per channel; float32's lowest/highest (old Clip defaults) become -inf/inf."""
    vector = b.channel_vector(np.asarray(default if value is None else value, np.float64), what, index)
    vector[vector <= -1e38] = -np.inf
    vector[vector >= 1e38] = np.inf
    return vector


def _clamp(b: Builder, lo: np.ndarray, hi: np.ndarray, index: int = 0) -> None:
    b.elementwise(Clamp(lo, hi, b.source()), index)


@handles("Relu")
def relu(b: Builder, node: onnx.NodeProto) -> None:
    _clamp(b, _bound(b, 0.0, 0.0, "min"), _bound(b, np.inf, np.inf, "max"))


@handles("Clip")
def clip_attributes(b: Builder, node: onnx.NodeProto) -> None:
    """Clip-1 and Clip-6: the bounds are attributes."""
    _clamp(b, _bound(b, b.attr("min"), -np.inf, "min"), _bound(b, b.attr("max"), np.inf, "max"))


@handles("Clip", since=11)
def clip_inputs(b: Builder, node: onnx.NodeProto) -> None:
    """Clip-11 on: the bounds are optional inputs."""
    lo, hi = b.optional_const(1, "min"), b.optional_const(2, "max")
    _clamp(b, _bound(b, lo, -np.inf, "min"), _bound(b, hi, np.inf, "max"))


def _extremum(b: Builder, kind: str) -> None:
    dynamic, constant = split_operands(b)
    if len(dynamic) != 1:
        b.fail(f"{kind} of several activations is not supported; only {kind}(x, constant)")
    index = dynamic[0]
    if not constant:
        b.alias(b.dyn(index))
        return
    values = [_bound(b, b.const(i, "bound"), 0.0, "bound", index) for i in constant]
    if kind == "Max":
        _clamp(b, np.max(values, axis=0), _bound(b, np.inf, np.inf, "max", index), index)
    else:
        _clamp(b, _bound(b, -np.inf, -np.inf, "min", index), np.min(values, axis=0), index)


@handles("Max")
def maximum(b: Builder, node: onnx.NodeProto) -> None:
    _extremum(b, "Max")


@handles("Min")
def minimum(b: Builder, node: onnx.NodeProto) -> None:
    _extremum(b, "Min")


@handles("Floor")
def floor(b: Builder, node: onnx.NodeProto) -> None:
    b.elementwise(Floor(b.source()))
