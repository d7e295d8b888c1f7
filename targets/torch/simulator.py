"""Float simulation of the IR in PyTorch, batched, CPU or CUDA.

The network is feed-forward without delays, so running it layer by layer over all
time steps at once is exactly the step-by-step simulation: every synaptic map is
applied to the whole (T, B, ...) stack in one call, and only the IF recurrence is
a loop over T. A tensor that is the same at every step (the analog input and what
is computed from it before the first neuron) is kept with a leading dimension of
1 and broadcast, so the first layer's convolution runs once, not T times.

The same executor runs the ANN (`Relu` nodes active, one "step") for calibration
and for checking the frontend against onnxruntime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from targets.base import SimOutput
from toolchain import ir

Observer = Callable[[ir.Node, torch.Tensor], None]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _param(array: np.ndarray | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    return None if array is None else torch.as_tensor(np.asarray(array), dtype=dtype, device=device)


def _channel_view(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel (or scalar) vector shaped to broadcast over (B, C, ...)."""
    if values.numel() == 1:
        return values.reshape(())
    return values.reshape((1, -1) + (1,) * (ndim - 2))


def _merge(x: torch.Tensor) -> torch.Tensor:
    return x.reshape((-1,) + x.shape[2:])


def _split(y: torch.Tensor, steps: int) -> torch.Tensor:
    return y.reshape((steps, -1) + y.shape[1:])


def _pad(x: torch.Tensor, padding: tuple[int, ...], value: float = 0.0) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """Symmetric padding goes to the op itself; asymmetric padding is applied here."""
    top, left, bottom, right = padding
    if top == bottom and left == right:
        return x, (top, left)
    return F.pad(x, (left, right, top, bottom), value=value), None


@dataclass
class CompiledNode:
    node: ir.Node
    tensors: dict[str, torch.Tensor]


class TorchExecutor:
    """Runs an IR graph on torch tensors; shared by the SNN simulator and the ANN reference."""

    def __init__(self, graph: ir.Graph, device: str | torch.device = "auto", dtype: torch.dtype = torch.float32):
        self.graph = graph
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.dtype = dtype
        self.compiled = [
            CompiledNode(n, {k: _param(v, self.device, dtype) for k, v in ir._arrays(n).items()})
            for n in graph.nodes
        ]
        # Free each intermediate once its last consumer has run.
        self.last_use: dict[str, int] = {}
        for index, n in enumerate(graph.nodes):
            for name in n.inputs:
                self.last_use[name] = index

    def tensor(self, node_name: str, key: str) -> torch.Tensor:
        """A node's parameter as it lives on the device."""
        return next(c.tensors[key] for c in self.compiled if c.node.name == node_name)

    @torch.inference_mode()
    def run(self, x: torch.Tensor, steps: int, observe: Observer | None = None) -> torch.Tensor:
        """x: (B, *input_shape). Returns the output node's value, (T or 1, B, ...)."""
        values: dict[str, torch.Tensor] = {self.graph.input_name: x.to(self.device, self.dtype).unsqueeze(0)}
        for index, c in enumerate(self.compiled):
            args = [values[name] for name in c.node.inputs]
            out = OPS[c.node.op](c, args, steps)
            values[c.node.name] = out
            if observe is not None:
                observe(c.node, out)
            for name in c.node.inputs:
                if self.last_use.get(name) == index and name != self.graph.output:
                    values.pop(name, None)
        return values[self.graph.output]


# ------------------------------------------------------------------ op kernels
# Each takes the compiled node, its input values (leading dim T or 1) and T.


def _conv2d(c: CompiledNode, args: list[torch.Tensor], steps: int) -> torch.Tensor:
    n: ir.Conv2d = c.node  # type: ignore[assignment]
    x = args[0]
    padded, symmetric = _pad(_merge(x), n.padding)
    y = F.conv2d(padded, c.tensors["weight"], c.tensors.get("bias"), n.stride, symmetric or 0, n.dilation, n.groups)
    return _split(y, x.shape[0])


def _linear(c: CompiledNode, args: list[torch.Tensor], steps: int) -> torch.Tensor:
    return F.linear(args[0], c.tensors["weight"], c.tensors.get("bias"))


def _avgpool2d(c: CompiledNode, args: list[torch.Tensor], steps: int) -> torch.Tensor:
    n: ir.AvgPool2d = c.node  # type: ignore[assignment]
    x = args[0]
    if n.count_include_pad:
        padded, symmetric = _pad(_merge(x), n.padding)
        y = F.avg_pool2d(padded, n.kernel, n.stride, symmetric or 0, count_include_pad=True)
    else:
        padded, symmetric = _pad(_merge(x), n.padding)
        ones = torch.ones_like(_merge(x)[:1, :1])
        ones, _ = _pad(ones, n.padding)
        pad = symmetric or 0
        y = F.avg_pool2d(padded, n.kernel, n.stride, pad, count_include_pad=True)
        y = y / F.avg_pool2d(ones, n.kernel, n.stride, pad, count_include_pad=True)
    return _split(y, x.shape[0])


def _maxpool2d(c: CompiledNode, args: list[torch.Tensor], steps: int) -> torch.Tensor:
    n: ir.MaxPool2d = c.node  # type: ignore[assignment]
    x = args[0]
    padded, symmetric = _pad(_merge(x), n.padding, value=float("-inf"))
    if x.shape[0] == 1:  # constant over time (ANN, or pooling the analog input): a plain max
        return _split(F.max_pool2d(padded, n.kernel, n.stride, symmetric or 0), 1)
    # Spiking max-pool: emit a spike whenever the highest spike count in the window grows,
    # so the output count is always the max of the input counts (Rueckauer et al. 2017
    # gate on the leading input instead; near-equal inputs firing in turn then make that
    # gate over- or under-count by a whole rate, while this stays within one spike).
    counts, _ = _pad(_merge(torch.cumsum(x, dim=0)), n.padding, value=float("-inf"))
    running_max = _split(F.max_pool2d(counts, n.kernel, n.stride, symmetric or 0), x.shape[0])
    return torch.diff(running_max, dim=0, prepend=torch.zeros_like(running_max[:1]))


def _flatten(c: CompiledNode, args: list[torch.Tensor], steps: int) -> torch.Tensor:
    return args[0].flatten(2)


def _add(c: CompiledNode, args: list[torch.Tensor], steps: int) -> torch.Tensor:
    total = args[0]
    for a in args[1:]:
        total = total + a
    return total


def _concat(c: CompiledNode, args: list[torch.Tensor], steps: int) -> torch.Tensor:
    length = max(a.shape[0] for a in args)
    return torch.cat([a.expand((length,) + a.shape[1:]) for a in args], dim=2)


def _affine(c: CompiledNode, args: list[torch.Tensor], steps: int) -> torch.Tensor:
    x = args[0]
    ndim = x.ndim - 1
    return x * _channel_view(c.tensors["scale"], ndim) + _channel_view(c.tensors["shift"], ndim)


def _relu(c: CompiledNode, args: list[torch.Tensor], steps: int) -> torch.Tensor:
    n: ir.Relu = c.node  # type: ignore[assignment]
    x = args[0]
    ceiling = c.tensors.get("ceiling")
    if ceiling is None:
        return torch.relu(x)
    top = _channel_view(ceiling, x.ndim - 1)
    if n.levels > 0:
        return top * torch.clamp(torch.floor(x * n.levels / top + 0.5) / n.levels, 0, 1)
    return torch.minimum(torch.relu(x), top)


def _if_neuron(c: CompiledNode, args: list[torch.Tensor], steps: int) -> torch.Tensor:
    x = args[0]
    threshold = _channel_view(c.tensors["threshold"], x.ndim - 1)
    v = torch.zeros_like(x[0]) + _channel_view(c.tensors["v0"], x.ndim - 1)
    out = torch.empty((steps,) + x.shape[1:], dtype=x.dtype, device=x.device)
    constant = x.shape[0] == 1
    for t in range(steps):
        v = v + (x[0] if constant else x[t])
        spiked = v >= threshold
        out[t] = spiked
        v = v - spiked * threshold
    return out * threshold


def _readout(c: CompiledNode, args: list[torch.Tensor], steps: int) -> torch.Tensor:
    x = args[0]
    return torch.cumsum(x.expand((steps,) + x.shape[1:]), dim=0)


OPS: dict[str, Callable[[CompiledNode, list[torch.Tensor], int], torch.Tensor]] = {
    "conv2d": _conv2d,
    "linear": _linear,
    "avgpool2d": _avgpool2d,
    "maxpool2d": _maxpool2d,
    "flatten": _flatten,
    "add": _add,
    "concat": _concat,
    "affine": _affine,
    "relu": _relu,
    "if": _if_neuron,
    "readout": _readout,
}


# ------------------------------------------------------------------ the target


class TorchTarget:
    """Float SNN simulation; implements `targets.base.Target`."""

    name = "torch"

    def __init__(self, device: str = "auto", **_: object):
        self.device_name = device
        self.executor: TorchExecutor | None = None

    def prepare(self, graph: ir.Graph) -> None:
        self.executor = TorchExecutor(graph, self.device_name)

    def run(self, x: np.ndarray, steps: int) -> SimOutput:
        executor = self.executor
        assert executor is not None, "prepare() first"
        spikes: dict[str, torch.Tensor] = {}

        def count(node: ir.Node, value: torch.Tensor) -> None:
            if isinstance(node, ir.IFNeuron):
                threshold = _channel_view(executor.tensor(node.name, "threshold"), value.ndim - 1)
                spikes[node.name] = (value / threshold).flatten(1).sum(1).round()

        readout = executor.run(torch.as_tensor(x), steps, count)
        return SimOutput(
            readout=readout.float().cpu().numpy(),
            spikes={k: v.double().cpu().numpy() for k, v in spikes.items()},
        )


def make_target(device: str = "auto", **options: object) -> TorchTarget:
    return TorchTarget(device=device, **options)


def run_ann(graph: ir.Graph, x: np.ndarray, device: str = "auto") -> np.ndarray:
    """The ANN's output for a preprocessed batch (graph with `Relu` activations)."""
    out = TorchExecutor(graph, device).run(torch.as_tensor(x), steps=1)
    return out[-1].float().cpu().numpy()
