"""The plain step-by-step SNN simulation: the definition the fast simulator must match.

One time step at a time through the whole graph, every node computing its output for
that step from its inputs' outputs at that step, with its state (membrane potentials,
spiking max-pool counts, the readout's sum) carried to the next step. No batching over
time, no broadcasting of constant inputs, no in-place tricks, no chunking. It shares no
code with the one interpreter (`toolchain.core.interpreter`) on purpose: the tests and
`bench/throughput.py` compare two independent implementations of the same semantics (see
`toolchain.core.ir` and docs/ARCHITECTURE.md), so a bug in one cannot hide in both:

- IF neuron: v += input; spike where v >= theta; v -= theta on a spike; output spike * theta.
- Spiking max-pool: each input's (theta-weighted) count so far is pooled with a max; the
  output is that max's increase at this step.
- Readout: the sum of its input over steps 0..t.

It is slow (T times the per-step Python overhead); use it on small batches.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from toolchain.core import ir
from toolchain.core.target import GraphKind, SimOutput


def _per_channel(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(values), dtype=like.dtype, device=like.device).reshape(-1)
    if t.numel() == 1:
        return t.reshape(())
    return t.reshape((1, -1) + (1,) * (like.ndim - 2))


def _tensor(array: np.ndarray | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    return None if array is None else torch.as_tensor(np.asarray(array), dtype=dtype, device=device)


def _padded(x: torch.Tensor, padding: tuple[int, ...], value: float = 0.0) -> torch.Tensor:
    top, left, bottom, right = padding
    return F.pad(x, (left, right, top, bottom), value=value) if any(padding) else x


class StepSimulator:
    """Holds each stateful node's state between steps; `step` advances the whole graph by one."""

    def __init__(self, graph: ir.Graph, batch: int, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        self.graph = graph
        self.dtype = dtype
        self.device = torch.device(device)
        self.batch = batch
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, int]]:
        """One step with input x (B, *input_shape). Returns the graph output and spikes per IF layer."""
        values = {self.graph.input_name: x}
        spikes: dict[str, int] = {}
        for node in self.graph.nodes:
            args = [values[name] for name in node.inputs]
            values[node.name] = self._node(node, args, spikes)
        return values[self.graph.output], spikes

    def _node(self, node: ir.Node, args: list[torch.Tensor], spikes: dict[str, int]) -> torch.Tensor:
        dt, dev = self.dtype, self.device
        x = args[0]
        if isinstance(node, ir.Conv2d):
            weight = _tensor(node.weight, dt, dev)
            bias = _tensor(node.bias, dt, dev)
            return F.conv2d(_padded(x, node.padding), weight, bias, node.stride, 0, node.dilation, node.groups)
        if isinstance(node, ir.Linear):
            return F.linear(x, _tensor(node.weight, dt, dev), _tensor(node.bias, dt, dev))
        if isinstance(node, ir.AvgPool2d):
            total = F.avg_pool2d(_padded(x, node.padding), node.kernel, node.stride, divisor_override=1)
            if node.uniform_divisor:
                return total / (node.kernel[0] * node.kernel[1])
            return total / torch.as_tensor(node.cell_counts(*x.shape[-2:]), dtype=total.dtype, device=total.device)
        if isinstance(node, ir.MaxPool2d):
            state = self.state.setdefault(node.name, {"count": torch.zeros_like(x), "max": None})
            state["count"] = state["count"] + x
            current = F.max_pool2d(_padded(state["count"], node.padding, float("-inf")), node.kernel, node.stride)
            previous = state["max"] if state["max"] is not None else torch.zeros_like(current)
            state["max"] = current
            return current - previous
        if isinstance(node, ir.Flatten):
            return x.reshape(x.shape[0], -1)
        if isinstance(node, ir.Add):
            total = x
            for other in args[1:]:
                total = total + other
            return total
        if isinstance(node, ir.Concat):
            return torch.cat(args, dim=1)
        if isinstance(node, ir.ScaleShift):
            return x * _per_channel(node.scale, x) + _per_channel(node.shift, x)
        if isinstance(node, ir.IFNeuron):
            theta = _per_channel(node.threshold, x.float())
            if node.name not in self.state:
                self.state[node.name] = {"v": torch.zeros_like(x, dtype=torch.float32) + _per_channel(node.v0, x.float())}
            state = self.state[node.name]
            v = state["v"] + x.float()
            spiked = v >= theta
            state["v"] = v - spiked * theta
            spikes[node.name] = int(spiked.sum())
            return (spiked * theta).to(x.dtype)
        if isinstance(node, ir.Readout):
            previous = self.state.get(node.name, {}).get("sum")
            total = x.float() if previous is None else previous + x.float()
            self.state[node.name] = {"sum": total}
            return total
        if isinstance(node, ir.Relu):
            raise ValueError(f"node {node.name!r}: an ANN activation in an SNN graph; convert the graph first")
        raise ValueError(f"node {node.name!r}: op {node.op!r} not supported by the reference simulator")


@torch.inference_mode()
def simulate(graph: ir.Graph, x: np.ndarray, steps: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> SimOutput:
    """Run a preprocessed batch (B, *input_shape) for `steps` steps, one step at a time."""
    sim = StepSimulator(graph, len(x), dtype, device)
    inputs = torch.as_tensor(np.asarray(x), dtype=dtype, device=sim.device)
    readout = []
    counts: dict[str, list[int]] = {}
    for _ in range(steps):
        out, spikes = sim.step(inputs)
        readout.append(out.float().cpu().numpy())
        for name, n in spikes.items():
            counts.setdefault(name, []).append(n)
    return SimOutput(readout=np.stack(readout), spikes={k: np.asarray(v, np.float64) for k, v in counts.items()})


class StepwiseTarget:
    """The step-by-step simulation behind the `Target` interface (for tests and benchmarks; not in the
    registry: it is a cross-check, not a deployment target)."""

    name: ClassVar[str] = "torch-stepwise"
    graph_kind: ClassVar[GraphKind] = "float"

    def __init__(self, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = device
        self.dtype = dtype
        self.graph: ir.Graph | None = None

    def prepare(self, graph: ir.Graph) -> None:
        self.graph = graph

    def run(self, x: np.ndarray, steps: int) -> SimOutput:
        assert self.graph is not None, "prepare() first"
        return simulate(self.graph, x, steps, self.dtype, self.device)

    def close(self) -> None:
        """Nothing to release."""
