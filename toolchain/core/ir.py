"""The graph IR shared by every stage: plain dataclasses holding numpy arrays.

One `Graph` type carries both the ANN (activations are `Relu` nodes, optionally
with a trained ceiling) and the converted SNN (activations are `IFNeuron` nodes,
the output is a `Readout`). Shapes are per sample, channels first, without the
batch dimension.

The on-disk artifact is a directory holding `graph.json` (structure, attributes,
preprocessing, schema version, sha256 of the tensors file) and `tensors.npz`
(every numpy array, keyed `node_name/field`). Loading needs numpy only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from toolchain.errors import ToolchainError

SCHEMA_VERSION = 1
GRAPH_FILE = "graph.json"
TENSORS_FILE = "tensors.npz"

Shape = tuple[int, ...]


@dataclass
class Node:
    """Base of every IR node: a name, the names of its inputs, its output shape."""

    name: str
    inputs: list[str]
    shape: Shape = ()
    op: ClassVar[str] = "node"

    def infer_shape(self, input_shapes: list[Shape]) -> Shape:
        return input_shapes[0]


@dataclass
class Conv2d(Node):
    weight: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, 1, 1), np.float32))
    bias: np.ndarray | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    op: ClassVar[str] = "conv2d"

    def infer_shape(self, input_shapes: list[Shape]) -> Shape:
        _, h, w = input_shapes[0]
        kh, kw = self.weight.shape[2:]
        oh = _window_out(h + self.padding[0] + self.padding[2], kh, self.stride[0], self.dilation[0])
        ow = _window_out(w + self.padding[1] + self.padding[3], kw, self.stride[1], self.dilation[1])
        return (int(self.weight.shape[0]), oh, ow)


@dataclass
class Linear(Node):
    weight: np.ndarray = field(default_factory=lambda: np.zeros((1, 1), np.float32))  # (out, in)
    bias: np.ndarray | None = None
    op: ClassVar[str] = "linear"

    def infer_shape(self, input_shapes: list[Shape]) -> Shape:
        return (int(self.weight.shape[0]),)


@dataclass
class AvgPool2d(Node):
    """Average pooling over zero-padded input. The divisor counts the window's cells inside
    the input, plus its padding cells when `count_include_pad`, except the last
    `uncounted_end` (rows, columns) of the bottom/right padding: the overhang of ONNX
    ceil_mode windows, which the ONNX reference (and torch) never count."""

    kernel: tuple[int, int] = (2, 2)
    stride: tuple[int, int] = (2, 2)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    count_include_pad: bool = True
    uncounted_end: tuple[int, int] = (0, 0)
    op: ClassVar[str] = "avgpool2d"

    def infer_shape(self, input_shapes: list[Shape]) -> Shape:
        return _pool_shape(input_shapes[0], self.kernel, self.stride, self.padding)

    @property
    def uniform_divisor(self) -> bool:
        """Whether every window divides by the kernel's area (otherwise see `cell_counts`)."""
        return not any(self.padding) or (self.count_include_pad and not any(self.uncounted_end))

    def cell_counts(self, height: int, width: int) -> np.ndarray:
        """(out_h, out_w): how many cells each window divides by, for an input of that size."""
        top, left, bottom, right = self.padding
        counted = np.zeros((height + top + bottom, width + left + right), np.float32)
        if self.count_include_pad:
            counted[: counted.shape[0] - self.uncounted_end[0], : counted.shape[1] - self.uncounted_end[1]] = 1
        else:
            counted[top : top + height, left : left + width] = 1
        windows = np.lib.stride_tricks.sliding_window_view(counted, self.kernel)
        return windows[:: self.stride[0], :: self.stride[1]].sum(axis=(-2, -1))


@dataclass
class MaxPool2d(Node):
    """In the SNN, a spiking max-pool: it spikes whenever the highest spike count in its
    window grows, so its count is the max of its inputs' counts (after Rueckauer et al., 2017)."""

    kernel: tuple[int, int] = (2, 2)
    stride: tuple[int, int] = (2, 2)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    op: ClassVar[str] = "maxpool2d"

    def infer_shape(self, input_shapes: list[Shape]) -> Shape:
        return _pool_shape(input_shapes[0], self.kernel, self.stride, self.padding)


@dataclass
class Flatten(Node):
    op: ClassVar[str] = "flatten"

    def infer_shape(self, input_shapes: list[Shape]) -> Shape:
        return (int(math.prod(input_shapes[0])),)


@dataclass
class Add(Node):
    """Element-wise sum of its inputs (residual connections)."""

    op: ClassVar[str] = "add"


@dataclass
class Concat(Node):
    """Concatenation along channels."""

    op: ClassVar[str] = "concat"

    def infer_shape(self, input_shapes: list[Shape]) -> Shape:
        first = input_shapes[0]
        return (sum(s[0] for s in input_shapes), *first[1:])


@dataclass
class ScaleShift(Node):
    """Per-channel `x * scale + shift` (a batch norm with nothing to fold into): not a W x + b."""

    scale: np.ndarray = field(default_factory=lambda: np.ones(1, np.float32))
    shift: np.ndarray = field(default_factory=lambda: np.zeros(1, np.float32))
    op: ClassVar[str] = "affine"  # the name artifacts already on disk carry


@dataclass
class Relu(Node):
    """ANN activation: `clip(x, 0, ceiling)`; ceiling None is a plain ReLU.

    `levels` > 0 marks a QCFS activation (Bu et al., ICLR 2022):
    `ceiling * clip(floor(x * levels / ceiling + 1/2) / levels, 0, 1)`.
    """

    ceiling: np.ndarray | None = None  # scalar or per channel
    levels: int = 0
    op: ClassVar[str] = "relu"


@dataclass
class IFNeuron(Node):
    """Integrate-and-fire population with reset by subtraction.

    Each step: v += input; spike where v >= threshold; v -= threshold on a spike.
    The output carries `threshold` per spike, so the next layer's weights are the
    ANN's own. `threshold` and `v0` are one value or one per channel.
    """

    threshold: np.ndarray = field(default_factory=lambda: np.ones(1, np.float32))
    v0: np.ndarray = field(default_factory=lambda: np.full(1, 0.5, np.float32))
    op: ClassVar[str] = "if"


@dataclass
class Readout(Node):
    """Non-spiking output layer: accumulates its input; the class is the argmax."""

    op: ClassVar[str] = "readout"


NODE_TYPES: dict[str, type[Node]] = {
    cls.op: cls
    for cls in (Conv2d, Linear, AvgPool2d, MaxPool2d, Flatten, Add, Concat, ScaleShift, Relu, IFNeuron, Readout)
}
SYNAPSE_OPS = ("conv2d", "linear")


@dataclass
class Preprocess:
    """How raw samples become the network's input: `(x * scale - mean) / std` per channel.

    `scale` None means 1/255 for uint8 data and 1 otherwise.
    """

    scale: float | None = None
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    layout: str = "NCHW"

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Raw batch (N, C, H, W) or (N, F) -> float32 network input."""
        scale = self.scale if self.scale is not None else (1 / 255 if x.dtype == np.uint8 else 1.0)
        x = x.astype(np.float32) * np.float32(scale)
        channels = x.shape[1] if x.ndim > 1 else 1
        for key, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise ToolchainError(
                    f"--{key}: {len(values)} values for samples with {channels} channel(s); give one per channel or one for all"
                )
        channel_shape = (1, -1) + (1,) * (x.ndim - 2)
        mean = np.asarray(self.mean, np.float32).reshape(channel_shape)
        std = np.asarray(self.std, np.float32).reshape(channel_shape)
        return (x - mean) / std


@dataclass
class Graph:
    input_name: str
    input_shape: Shape
    nodes: list[Node]
    output: str
    preprocess: Preprocess = field(default_factory=Preprocess)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_snn(self) -> bool:
        return any(isinstance(n, IFNeuron) for n in self.nodes)

    def network_input(self, raw: np.ndarray) -> np.ndarray:
        """Raw samples (N, ...) -> the preprocessed batch the network takes, (N, *input_shape)."""
        return self.preprocess.apply(raw).reshape((len(raw), *self.input_shape))

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def shape_of(self, name: str) -> Shape:
        return self.input_shape if name == self.input_name else self.node(name).shape

    def consumers(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in n.inputs]

    def infer_shapes(self) -> None:
        """Fill every node's `shape` from the input shape, in topological order."""
        shapes: dict[str, Shape] = {self.input_name: tuple(self.input_shape)}
        for n in self.nodes:
            n.shape = tuple(int(d) for d in n.infer_shape([shapes[i] for i in n.inputs]))
            shapes[n.name] = n.shape

    def num_params(self, node: Node) -> int:
        return sum(int(v.size) for v in node_arrays(node).values())


def _window_out(size: int, kernel: int, stride: int, dilation: int = 1) -> int:
    return (size - dilation * (kernel - 1) - 1) // stride + 1


def _pool_shape(shape: Shape, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, ...]) -> Shape:
    c, h, w = shape
    return (
        c,
        _window_out(h + padding[0] + padding[2], kernel[0], stride[0]),
        _window_out(w + padding[1] + padding[3], kernel[1], stride[1]),
    )


def node_arrays(node: Any) -> dict[str, np.ndarray]:
    """A node's (or any dataclass's) array fields by name, in field order."""
    return {
        f.name: getattr(node, f.name)
        for f in dataclasses.fields(node)
        if isinstance(getattr(node, f.name), np.ndarray)
    }


# ---------------------------------------------------------------- artifact I/O


def fields_record(item: Any, tensor_prefix: str) -> dict[str, Any]:
    """A dataclass's fields as a JSON record: arrays become references `{"tensor": "PREFIX/field"}`
    into the tensor file, tuples lists. Serves graph nodes here and the fixed-point IR's layers."""
    record: dict[str, Any] = {}
    for f in dataclasses.fields(item):
        value = getattr(item, f.name)
        if isinstance(value, np.ndarray):
            record[f.name] = {"tensor": f"{tensor_prefix}/{f.name}"}
        elif isinstance(value, tuple):
            record[f.name] = list(value)
        else:
            record[f.name] = value
    return record


def _node_to_json(node: Node) -> dict[str, Any]:
    return {"op": node.op, **fields_record(node, node.name)}


def graph_to_json(graph: Graph) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "input_name": graph.input_name,
        "input_shape": list(graph.input_shape),
        "output": graph.output,
        "preprocess": dataclasses.asdict(graph.preprocess),
        "meta": graph.meta,
        "nodes": [_node_to_json(n) for n in graph.nodes],
    }


def graph_tensors(graph: Graph) -> dict[str, np.ndarray]:
    return {f"{n.name}/{k}": v for n in graph.nodes for k, v in node_arrays(n).items()}


def save_graph(graph: Graph, directory: str | Path, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write the artifact atomically: into a temporary sibling, then renamed into place."""
    from toolchain.fileio import atomic_directory

    return atomic_directory(Path(directory), {**graph_files(graph), **(extra_files or {})}, GRAPH_FILE)


def graph_files(graph: Graph) -> dict[str, bytes]:
    """The two files that store a Graph: graph.json and tensors.npz."""
    from toolchain.fileio import pack_document

    return pack_document(graph_to_json(graph), graph_tensors(graph), GRAPH_FILE, TENSORS_FILE)


def load_graph(directory: str | Path) -> Graph:
    from toolchain.core.schema import check_graph_document
    from toolchain.fileio import read_document

    document, tensors = read_document(
        Path(directory), GRAPH_FILE, TENSORS_FILE, SCHEMA_VERSION, "not a toolchain artifact; run `toolchain build` first"
    )
    return check_graph_document(Path(directory) / GRAPH_FILE, document, tensors)  # types, shapes, ranges
