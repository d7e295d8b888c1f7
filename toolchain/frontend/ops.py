"""One handler per ONNX op type: `HANDLERS[op_type](builder, node)`.

A handler reads its inputs through the `Builder` (constants as numpy arrays, dynamic
tensors as IR node names, shapes per sample without the batch dimension), and emits IR
nodes or element-wise tokens (see `patterns`). It raises through `builder.fail` with a
one-line message when the node is outside what the IR can express.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import onnx

from toolchain import ir
from toolchain.errors import ToolchainError
from toolchain.frontend.layout import TO_CHANNELS_FIRST, TO_CHANNELS_LAST, channels_last_columns, transpose_perm
from toolchain.frontend.patterns import Clamp, Elementwise, Floor, Scale, Token

Shape = tuple[int, ...]
PSEUDO = "\x00"  # name prefix of element-wise pseudo-nodes; they are renamed when lowered


@dataclass
class PendingPad:
    """A Pad node waiting to be absorbed into the padding of the Conv/pool that reads it."""

    source: str  # IR name of the padded tensor
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    value: float
    node: str  # the Pad node's name, for messages


class Builder:
    """State shared by the handlers while the IR is built."""

    def __init__(
        self,
        path: str,
        consts: dict[str, np.ndarray],
        shapes: dict[str, Shape | None],
        batch: int,
        use_counts: dict[str, int],
        graph_output: str,
        reserved: set[str],
    ):
        self.path = path
        self.consts = consts
        self.shapes = shapes
        self.batch = batch
        self.use_counts = use_counts
        self.graph_output = graph_output
        self.values: dict[str, str] = {}  # ONNX tensor name -> IR node name
        self.pads: dict[str, PendingPad] = {}
        # Channels-last detours (see `layout`): ONNX values transposed to (N, H, W, C), and those
        # flattened in (H, W, C) order, each as (IR name of the channels-first value, its (C, H, W)).
        self.channels_last: dict[str, tuple[str, Shape]] = {}
        self.flat_channels_last: dict[str, tuple[str, Shape]] = {}
        self.nodes: list[ir.Node] = []
        self.expected: dict[str, Shape] = {}  # IR node name -> ONNX-inferred shape per sample (the input: its IR shape)
        self.names: set[str] = set(reserved)
        self.node = onnx.NodeProto()
        self.node_name = ""

    # -------------------------------------------------------------- messages

    def fail(self, message: str, node: tuple[str, str] | None = None) -> NoReturn:
        name, op = node if node is not None else (self.node_name, self.node.op_type)
        raise ToolchainError(f"{self.path}: node {name!r} ({op}): {message}")

    def fail_at(self, source: tuple[str, str], message: str) -> NoReturn:
        self.fail(message, source)

    # -------------------------------------------------------------- inputs

    def input(self, index: int) -> str | None:
        node = self.node
        return node.input[index] if index < len(node.input) and node.input[index] else None

    def is_const(self, index: int) -> bool:
        name = self.input(index)
        return name is not None and name in self.consts

    def const(self, index: int, what: str) -> np.ndarray:
        name = self.input(index)
        if name is None:
            self.fail(f"input {index} ({what}) is missing")
        if name not in self.consts:
            self.fail(f"input {index} ({what}, {name!r}) must be a constant (an initializer or foldable subgraph)")
        return self.consts[name]

    def optional_const(self, index: int, what: str) -> np.ndarray | None:
        return None if self.input(index) is None else self.const(index, what)

    def dyn(self, index: int = 0) -> str:
        """The IR name of a dynamic input."""
        name = self.input(index)
        if name is None:
            self.fail(f"input {index} is missing")
        if name in self.pads:
            pad = self.pads[name]
            self.fail(
                f"reads the output of Pad node {pad.node!r}; Pad is supported only directly before Conv, AveragePool or MaxPool"
            )
        if name in self.channels_last or name in self.flat_channels_last:
            self.fail(
                f"reads {name!r}, transposed to channels-last (N, H, W, C); that is supported only when it is "
                "flattened (Flatten/Reshape) straight into a Gemm/MatMul classifier"
            )
        if name not in self.values:
            self.fail(
                f"input {name!r} is a constant where an activation is expected"
                if name in self.consts
                else f"input {name!r} is unknown"
            )
        return self.values[name]

    def dyn_padded(self, index: int = 0) -> tuple[str, tuple[int, int, int, int], float]:
        """A dynamic input, looking through a Pad node: (IR name, extra pads, pad value)."""
        name = self.input(index)
        if name is not None and name in self.pads:
            pad = self.pads[name]
            return pad.source, pad.pads, pad.value
        return self.dyn(index), (0, 0, 0, 0), 0.0

    def shape(self, name: str | None = None) -> Shape:
        """Per-sample shape (no batch dimension) of a tensor, default the node's first input."""
        name = name if name is not None else self.input(0)
        full = self.shapes.get(name or "")
        if full is None:
            self.fail(f"the shape of {name!r} is not static after shape inference")
        if len(full) == 0 or full[0] != self.batch:
            self.fail(f"tensor {name!r} of shape {list(full)} does not keep the batch dimension {self.batch} first")
        return tuple(full[1:])

    def attr(self, name: str, default: Any = None) -> Any:
        for a in self.node.attribute:
            if a.name == name:
                value = onnx.helper.get_attribute_value(a)
                return value.decode() if isinstance(value, bytes) else value
        return default

    def used(self, index: int) -> bool:
        name = self.node.output[index] if index < len(self.node.output) else ""
        return bool(name) and (self.use_counts.get(name, 0) > 0 or name == self.graph_output)

    def require_unused_outputs(self, start: int, what: str) -> None:
        for index in range(start, len(self.node.output)):
            if self.used(index):
                self.fail(f"output {index} ({what}) is used; only the first output is supported")

    # -------------------------------------------------------------- outputs

    def unique(self, base: str) -> str:
        base = base or self.node.op_type
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def emit(self, node: ir.Node, output: int = 0, expect: bool = True) -> str:
        """Append an IR node (named after the ONNX node unless already named) for output `output`."""
        node.name = self.unique(node.name or self.node_name)
        self.nodes.append(node)
        onnx_name = self.node.output[output] if output < len(self.node.output) else ""
        if onnx_name:
            self.values[onnx_name] = node.name
            if expect and self.shapes.get(onnx_name) is not None:
                self.expected[node.name] = self.shape(onnx_name)
        return node.name

    def alias(self, ir_name: str, output: int = 0) -> None:
        self.values[self.node.output[output]] = ir_name

    def elementwise(self, token: Token, index: int = 0) -> None:
        source = self.dyn(index)
        out = self.shape(self.node.output[0])
        before = self.shape(self.input(index))
        if out != before:
            self.fail(f"broadcasting a constant changes the activation's shape from {list(before)} to {list(out)}")
        node = Elementwise(f"{PSEUDO}{self.node.output[0]}", [source], tokens=[token])
        self.nodes.append(node)
        self.values[self.node.output[0]] = node.name
        self.expected[node.name] = out

    def channels(self, index: int = 0) -> int:
        """Channels (features, for flat tensors) of an input."""
        shape = self.shape(self.input(index))
        if not shape:
            self.fail("scalar activations are not supported")
        return int(shape[0])

    def source(self) -> tuple[str, str]:
        return (self.node_name, self.node.op_type)

    def channel_vector(self, value: np.ndarray, what: str, index: int = 0) -> np.ndarray:
        """A constant operand as one float64 value per channel (per feature for flat tensors)."""
        shape = self.shape(self.input(index))
        full = (1, *shape)
        value = np.asarray(value, np.float64)
        try:
            if np.broadcast_shapes(value.shape, full) != full:
                raise ValueError
        except ValueError:
            self.fail(f"{what} of shape {list(value.shape)} does not broadcast to the activation's shape {list(full)}")
        per_sample = np.broadcast_to(value, full)[0]
        if len(shape) == 1:
            return per_sample.copy()
        rows = per_sample.reshape(shape[0], -1)
        if not np.all((rows == rows[:, :1]) | (np.isnan(rows) & np.isnan(rows[:, :1]))):
            self.fail(f"{what} varies over the spatial positions; only per-channel or scalar constants are supported")
        return rows[:, 0].copy()


Handler = Callable[[Builder, onnx.NodeProto], None]
HANDLERS: dict[str, Handler] = {}


def handles(*op_types: str) -> Callable[[Handler], Handler]:
    def register(function: Handler) -> Handler:
        for op_type in op_types:
            HANDLERS[op_type] = function
        return function

    return register


# ------------------------------------------------------------------ geometry


def _ints(value: Any, default: list[int]) -> list[int]:
    return [int(v) for v in value] if value is not None else list(default)


def _window_pads(b: Builder, hw: tuple[int, int], kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """[top, left, bottom, right] from `pads` or `auto_pad`."""
    auto_pad = b.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for d in range(2):
            out = -(-hw[d] // strides[d])
            total = max(0, (out - 1) * strides[d] + (kernel[d] - 1) * dilations[d] + 1 - hw[d])
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            pads[d], pads[d + 2] = begin, total - begin
        return pads
    if auto_pad == "VALID":
        return [0, 0, 0, 0]
    if auto_pad != "NOTSET":
        b.fail(f"auto_pad {auto_pad!r} is not supported")
    pads = _ints(b.attr("pads"), [0, 0, 0, 0])
    if len(pads) != 4:
        b.fail(f"pads {pads} do not describe a 2-D window")
    if any(p < 0 for p in pads):
        b.fail(f"negative pads {pads} are not supported")
    return pads


def _spatial(b: Builder, what: str) -> Shape:
    shape = b.shape()
    if len(shape) != 3:
        b.fail(f"only 2-D {what} on (N, C, H, W) tensors is supported (input shape per sample {list(shape)})")
    return shape


def _add_pads(a: list[int] | tuple[int, ...], c: tuple[int, ...]) -> tuple[int, int, int, int]:
    return (a[0] + c[0], a[1] + c[1], a[2] + c[2], a[3] + c[3])


# ------------------------------------------------------------------ synapses


@handles("Conv")
def conv(b: Builder, node: onnx.NodeProto) -> None:
    source, extra, value = b.dyn_padded(0)
    _, h, w = _spatial(b, "convolution")
    weight = np.asarray(b.const(1, "weight"), np.float32)
    if weight.ndim != 4:
        b.fail(f"only 2-D convolution is supported (weight shape {list(weight.shape)})")
    bias = b.optional_const(2, "bias")
    if extra != (0, 0, 0, 0) and value != 0:
        b.fail(f"a Pad with value {value:g} before a convolution is not supported (only zero padding)")
    kernel = [int(k) for k in weight.shape[2:]]
    if b.attr("kernel_shape") is not None and _ints(b.attr("kernel_shape"), []) != kernel:
        b.fail(f"kernel_shape {b.attr('kernel_shape')} disagrees with the weight shape {list(weight.shape)}")
    strides = _ints(b.attr("strides"), [1, 1])
    dilations = _ints(b.attr("dilations"), [1, 1])
    pads = _window_pads(b, (h + extra[0] + extra[2], w + extra[1] + extra[3]), kernel, strides, dilations)
    b.emit(
        ir.Conv2d(
            "",
            [source],
            weight=weight.copy(),
            bias=None if bias is None else np.asarray(bias, np.float32).reshape(-1).copy(),
            stride=(strides[0], strides[1]),
            padding=_add_pads(pads, extra),
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


# ------------------------------------------------------------------ element-wise arithmetic


def _split_operands(b: Builder) -> tuple[list[int], list[int]]:
    present = [i for i in range(len(b.node.input)) if b.input(i) is not None]
    return [i for i in present if not b.is_const(i)], [i for i in present if b.is_const(i)]


def _affine(b: Builder, index: int, scale: Any, shift: Any) -> None:
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
    dynamic, constant = _split_operands(b)
    if len(dynamic) == 1 and constant:
        total = sum(b.channel_vector(b.const(i, "addend"), "addend", dynamic[0]) for i in constant)
        _affine(b, dynamic[0], 1.0, total)
    elif len(dynamic) == 1:
        b.alias(b.dyn(dynamic[0]))
    elif not constant:
        _residual(b, [b.dyn(i) for i in dynamic])
    else:
        b.fail("a sum of several activations and a constant is not supported")


@handles("Sub")
def sub(b: Builder, node: onnx.NodeProto) -> None:
    if b.is_const(1):
        _affine(b, 0, 1.0, -b.channel_vector(b.const(1, "subtrahend"), "subtrahend", 0))
    elif b.is_const(0):
        _affine(b, 1, -1.0, b.channel_vector(b.const(0, "minuend"), "minuend", 1))
    else:  # x - y = x + (-1) * y
        count = b.channels(1)
        tokens: list[Token] = [Scale(-np.ones(count), np.zeros(count), b.source())]
        negated = Elementwise(f"{PSEUDO}{node.output[0]}/neg", [b.dyn(1)], tokens=tokens)
        b.nodes.append(negated)
        _residual(b, [b.dyn(0), negated.name])


@handles("Mul")
def mul(b: Builder, node: onnx.NodeProto) -> None:
    dynamic, constant = _split_operands(b)
    if len(dynamic) != 1:
        b.fail("a product of two activations is not supported; only multiplication by a constant")
    _affine(b, dynamic[0], b.channel_vector(b.const(constant[0], "factor"), "factor", dynamic[0]), 0.0)


@handles("Div")
def div(b: Builder, node: onnx.NodeProto) -> None:
    if not b.is_const(1):
        b.fail("division by an activation is not supported; only division by a constant")
    divisor = b.channel_vector(b.const(1, "divisor"), "divisor", 0)
    if np.any(divisor == 0):
        b.fail("division by zero")
    _affine(b, 0, 1.0 / divisor, 0.0)


@handles("Neg")
def neg(b: Builder, node: onnx.NodeProto) -> None:
    _affine(b, 0, -1.0, 0.0)


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
    _affine(b, 0, scale, beta - mean * scale)


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
def clip(b: Builder, node: onnx.NodeProto) -> None:
    if len(node.input) > 1:  # opset >= 11: bounds are inputs
        lo, hi = b.optional_const(1, "min"), b.optional_const(2, "max")
    else:
        lo, hi = b.attr("min"), b.attr("max")
    _clamp(b, _bound(b, lo, -np.inf, "min"), _bound(b, hi, np.inf, "max"))


def _extremum(b: Builder, kind: str) -> None:
    dynamic, constant = _split_operands(b)
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


# ------------------------------------------------------------------ pooling


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
    _, h, w = _spatial(b, "pooling")
    kernel = _ints(b.attr("kernel_shape"), [])
    if len(kernel) != 2:
        b.fail(f"kernel_shape {kernel} is not 2-D")
    strides = _ints(b.attr("strides"), [1, 1])
    if any(d != 1 for d in _ints(b.attr("dilations"), [1, 1])):
        b.fail("dilated pooling is not supported")
    hw = (h + extra[0] + extra[2], w + extra[1] + extra[3])
    pads = _window_pads(b, hw, kernel, strides, [1, 1])
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
    padding = _add_pads(_add_pads(pads, extra), (0, 0, ceil[0], ceil[1]))
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
    padding = _add_pads(_add_pads(pads, extra), (0, 0, ceil[0], ceil[1]))
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
    _, h, w = _spatial(b, "pooling")
    if node.op_type == "GlobalMaxPool":
        b.emit(ir.MaxPool2d("", [source], kernel=(h, w), stride=(h, w), padding=(0, 0, 0, 0)))
    else:
        b.emit(ir.AvgPool2d("", [source], kernel=(h, w), stride=(h, w), padding=(0, 0, 0, 0), count_include_pad=False))


@handles("ReduceMean", "ReduceMax")
def reduce_spatial(b: Builder, node: onnx.NodeProto) -> None:
    """A mean (max) over the two spatial axes, as in `x.mean(dim=(2, 3))`: global pooling."""
    source = b.dyn(0)
    _, h, w = _spatial(b, "reduction")
    axes_value = b.optional_const(1, "axes")  # an input from opset 18, an attribute before
    axes = _ints(b.attr("axes"), []) if axes_value is None else [int(a) for a in np.asarray(axes_value).reshape(-1)]
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
    _spatial(b, "padding")
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
        pads = _ints(b.attr("pads"), [])
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


# ------------------------------------------------------------------ shape-only ops


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
    dynamic, constant = _split_operands(b)
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


SUPPORTED_OPS: tuple[str, ...] = tuple(sorted(HANDLERS))
"""Op types with a handler; any op whose inputs are all constants is folded besides these."""
