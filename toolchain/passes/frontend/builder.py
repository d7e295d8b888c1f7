"""The state the ONNX op handlers share while the IR is built, and their geometry helpers.

A handler reads its inputs through the `Builder` (constants as numpy arrays, dynamic
tensors as IR node names, shapes per sample without the batch dimension), and emits IR
nodes or element-wise tokens (see `patterns`). It raises through `builder.fail` with a
one-line message when the node is outside what the IR can express.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import onnx

from toolchain.core import ir
from toolchain.errors import ToolchainError
from toolchain.passes.frontend.patterns import Elementwise, Token

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


# ------------------------------------------------------------------ geometry (convolutions and windows)


def ints(value: Any, default: list[int]) -> list[int]:
    return [int(v) for v in value] if value is not None else list(default)


def window_pads(b: Builder, hw: tuple[int, int], kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
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
    pads = ints(b.attr("pads"), [0, 0, 0, 0])
    if len(pads) != 4:
        b.fail(f"pads {pads} do not describe a 2-D window")
    if any(p < 0 for p in pads):
        b.fail(f"negative pads {pads} are not supported")
    return pads


def spatial(b: Builder, what: str) -> Shape:
    shape = b.shape()
    if len(shape) != 3:
        b.fail(f"only 2-D {what} on (N, C, H, W) tensors is supported (input shape per sample {list(shape)})")
    return shape


def add_pads(a: list[int] | tuple[int, ...], c: tuple[int, ...]) -> tuple[int, int, int, int]:
    return (a[0] + c[0], a[1] + c[1], a[2] + c[2], a[3] + c[3])


def split_operands(b: Builder) -> tuple[list[int], list[int]]:
    """The indices of the dynamic and of the constant inputs that are present."""
    present = [i for i in range(len(b.node.input)) if b.input(i) is not None]
    return [i for i in present if not b.is_const(i)], [i for i in present if b.is_const(i)]
