"""Static per-layer quantities of an SNN graph: neurons, fan-out per neuron, ANN MACs.

A *population* is a group of neurons whose output goes somewhere: the analog input,
every `IFNeuron` layer, and the non-spiking `Readout`. A population's *synapse chain*
is every node between it and the next populations (conv, linear, pools, flatten,
add, concat, affine): the linear map a spike of it is pushed through.

Fan-out of a neuron = the number of synapses that one spike of it drives: the number
of non-zero entries of its column in the chain's composite connection matrix, i.e.
the distinct neurons of the next populations it is connected to (what a compiler
that folds pooling into the following convolution programs into the chip). It is
structural: every kernel tap counts, whatever the weight's value. Padding is exact
(a neuron near the border drives fewer synapses). Each op's connections are its own kernel
in the interpreter (`core.interpreter.OPS`) run on connection indicators (`connections`),
so the report reads the op semantics from the one place that defines them.

Two exact ways to count it, chosen per chain:

* adjoint: one backward pass of ones through the chain with all-ones weights gives,
  for every source neuron, the number of *paths* to the next populations. That is the
  number of distinct targets whenever no two paths of one neuron can meet again
  (true for conv -> neuron, non-overlapping pool -> conv, flatten -> linear,
  residual blocks with a neuron on each branch);
* separable: where paths can meet in a plain sequence of conv / pool ops (overlapping
  pool -> conv, conv -> pool before the neuron, conv -> conv), channels and space are
  counted apart (each op's pattern is a Kronecker product) and multiplied; space by
  pushing one-hots through a one-channel copy of the chain, binarising after every op;
* one-hot: otherwise (an Add or Concat fed twice by the same source) push one-hot
  inputs for every neuron (in chunks) through the binarised chain and count what
  arrives. Exact and general, but slow for large layers.

The ANN's MACs are counted per synapse op (conv, linear) on one sample; bias adds,
pooling, affine scaling and activations are not counted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from toolchain.core import ir
from toolchain.core.interpreter import OPS, CompiledNode
from toolchain.errors import ToolchainError

NEURON_OPS = ("if", "readout")
CHAIN_OPS = ("conv2d", "linear", "avgpool2d", "maxpool2d", "flatten", "add", "concat", "affine")

# Largest one-hot chunk: sources x largest tensor in the chain, in elements.
_ONE_HOT_BUDGET = 1 << 24


@dataclass
class Population:
    name: str
    kind: str  # "input" | "if" | "readout"
    shape: tuple[int, ...]
    neurons: int
    fanout: np.ndarray | None = None  # synapses driven per spike, per neuron (flattened C*H*W); None for the readout
    drives: list[str] = field(default_factory=list)  # synapse-chain nodes, in graph order
    targets: list[str] = field(default_factory=list)  # populations the chain reaches
    ann_macs: int = 0  # ANN MACs (per sample) of the synapse ops attributed to this population's chain
    fanout_method: str = ""  # "adjoint" | "separable" | "one-hot" | ""
    through_maxpool: bool = False  # the chain passes a spiking max-pool: synops are an upper bound

    @property
    def fanout_total(self) -> int:
        return 0 if self.fanout is None else int(self.fanout.sum())


def op_macs(graph: ir.Graph, node: ir.Node) -> int:
    """The ANN's multiply-accumulates of one node on one sample (conv and linear only)."""
    if isinstance(node, ir.Conv2d):
        c_in_per_group = node.weight.shape[1]
        kh, kw = node.weight.shape[2:]
        return int(math.prod(node.shape)) * int(c_in_per_group) * int(kh) * int(kw)
    if isinstance(node, ir.Linear):
        return int(math.prod(node.shape)) * int(node.weight.shape[1])
    return 0


def populations(graph: ir.Graph) -> list[Population]:
    """The input, every IF layer and the readout, with fan-out and ANN MACs, in graph order."""
    if not graph.is_snn:
        raise ToolchainError("the graph has no IF neurons: reports are made for converted SNN artifacts")
    for node in graph.nodes:
        if node.op not in NEURON_OPS + CHAIN_OPS:
            raise ToolchainError(f"node {node.name!r} ({node.op}): not expected in an SNN graph; cannot count its synapses")
    sources: list[Population] = [
        Population(graph.input_name, "input", tuple(graph.input_shape), int(math.prod(graph.input_shape)))
    ]
    for node in graph.nodes:
        if isinstance(node, ir.IFNeuron):
            sources.append(Population(node.name, "if", tuple(node.shape), int(math.prod(node.shape))))
    assigned: set[str] = set()
    for population in sources:
        chain, targets = _chain(graph, population.name)
        population.drives = [n.name for n in chain]
        population.targets = targets
        population.through_maxpool = any(isinstance(n, ir.MaxPool2d) for n in chain)
        population.fanout, population.fanout_method = fanout(graph, population.name)
        # Each synapse op's MACs go to the first population (in graph order) that drives it.
        for node in chain:
            if node.name not in assigned:
                population.ann_macs += op_macs(graph, node)
                assigned.add(node.name)
    readouts = [
        Population(n.name, "readout", tuple(n.shape), int(math.prod(n.shape))) for n in graph.nodes if isinstance(n, ir.Readout)
    ]
    return sources + readouts


def total_ann_macs(graph: ir.Graph) -> int:
    return sum(op_macs(graph, n) for n in graph.nodes)


def synapse_depth(graph: ir.Graph) -> int:
    """Synaptic stages on the longest path from the input to the output population."""
    depth: dict[str, int] = {graph.input_name: 0}
    for population in [graph.input_name] + [n.name for n in graph.nodes if isinstance(n, ir.IFNeuron)]:
        _, targets = _chain(graph, population)
        for target in targets:
            depth[target] = max(depth.get(target, 0), depth.get(population, 0) + 1)
    return max(depth.values())


# ---------------------------------------------------------------- chains


def _chain(graph: ir.Graph, source: str) -> tuple[list[ir.Node], list[str]]:
    """Nodes reachable from `source` without crossing a population, and the populations reached."""
    reached = {source}
    chain: list[ir.Node] = []
    targets: list[str] = []
    for node in graph.nodes:  # topological order
        if not any(i in reached for i in node.inputs):
            continue
        if node.op in NEURON_OPS:
            targets.append(node.name)
        else:
            chain.append(node)
            reached.add(node.name)
    return chain, targets


def _may_merge_paths(graph: ir.Graph, source: str, chain: list[ir.Node]) -> bool:
    """Could two paths from one source neuron meet at one element? (then paths != targets)."""
    spread = {source: False}  # may one source neuron reach more than one element of this tensor?
    for node in chain:
        live = [i for i in node.inputs if i in spread]
        any_spread = any(spread[i] for i in live)
        if isinstance(node, ir.Add):
            if len(live) > 1:
                return True
            spread[node.name] = any_spread
        elif isinstance(node, ir.Concat):
            spread[node.name] = any_spread or len(live) > 1
        elif isinstance(node, (ir.Flatten, ir.ScaleShift)):
            spread[node.name] = any_spread
        elif isinstance(node, (ir.AvgPool2d, ir.MaxPool2d)):
            fans_in = node.kernel[0] * node.kernel[1] > 1
            if any_spread and fans_in:
                return True
            overlap = node.stride[0] < node.kernel[0] or node.stride[1] < node.kernel[1]
            spread[node.name] = any_spread or overlap
        elif isinstance(node, ir.Conv2d):
            fans_in = int(np.prod(node.weight.shape[1:])) > 1
            if any_spread and fans_in:
                return True
            spread[node.name] = True
        elif isinstance(node, ir.Linear):
            if any_spread and node.weight.shape[1] > 1:
                return True
            spread[node.name] = True
        else:
            return True
    return False


def fanout(graph: ir.Graph, source: str) -> tuple[np.ndarray, str]:
    """Synapses driven by one spike of each neuron of `source` (flattened), and the method used."""
    chain, targets = _chain(graph, source)
    if not targets:
        return np.zeros(int(math.prod(graph.shape_of(source))), np.int64), ""
    if not _may_merge_paths(graph, source, chain):
        return fanout_adjoint(graph, source), "adjoint"
    if _is_simple_spatial_chain(graph, source, chain, targets):
        return fanout_separable(graph, source), "separable"
    return fanout_one_hot(graph, source), "one-hot"


def _is_simple_spatial_chain(graph: ir.Graph, source: str, chain: list[ir.Node], targets: list[str]) -> bool:
    """A plain sequence of conv / pool / affine ops on (C, H, W) tensors ending at the next populations."""
    if len(graph.shape_of(source)) != 3 or not chain:
        return False
    previous = source
    for node in chain:
        if not isinstance(node, (ir.Conv2d, ir.AvgPool2d, ir.MaxPool2d, ir.ScaleShift)) or node.inputs != [previous]:
            return False
        previous = node.name
    return all(graph.node(t).inputs == [previous] for t in targets)


def fanout_separable(graph: ir.Graph, source: str) -> np.ndarray:
    """Distinct targets through a plain conv / pool chain, channels and space counted apart.

    Each op's connection pattern is (channel pattern) x (spatial pattern), a Kronecker product
    of non-negative matrices, so the chain's pattern is the product of the channel patterns
    times the product of the spatial patterns, and a column's count is the product of the two
    columns' counts. Space is counted by pushing one-hots through a one-channel copy of the chain.
    """
    chain, targets = _chain(graph, source)
    channels, height, width = graph.shape_of(source)
    pattern = np.eye(channels, dtype=bool)
    for node in chain:
        if isinstance(node, ir.Conv2d):
            c_out, per_group_in = node.weight.shape[:2]
            per_group_out = c_out // node.groups
            groups = np.arange(c_out)[:, None] // per_group_out == np.arange(per_group_in * node.groups)[None, :] // per_group_in
            pattern = (groups.astype(np.int64) @ pattern.astype(np.int64)) > 0
    per_channel = pattern.sum(0).astype(np.int64) * len(targets)
    positions = height * width
    largest = max([positions] + [int(math.prod(n.shape[1:])) for n in chain])
    chunk = max(1, min(positions, _ONE_HOT_BUDGET // largest))
    per_position = np.zeros(positions, np.int64)
    with torch.no_grad():
        for begin in range(0, positions, chunk):
            end = min(positions, begin + chunk)
            x = torch.zeros((end - begin, positions), dtype=torch.float32)
            x[torch.arange(end - begin), torch.arange(begin, end)] = 1.0
            x = x.reshape((end - begin, 1, height, width))
            for node in chain:
                x = (connections(node, [x], one_channel=True) > 0).to(x.dtype)
            per_position[begin:end] = x.flatten(1).sum(1).round().to(torch.int64).numpy()
    return (per_channel[:, None] * per_position[None, :]).reshape(-1)


def fanout_adjoint(graph: ir.Graph, source: str) -> np.ndarray:
    """Paths from each source neuron to the next populations (all-ones weights, one backward pass)."""
    chain, _ = _chain(graph, source)
    x = torch.zeros((1, *graph.shape_of(source)), dtype=torch.float64, requires_grad=True)
    values = _structural_forward(graph, source, chain, x, binarise=False)
    total = _arriving(graph, source, values).sum()
    (grad,) = torch.autograd.grad(total, x, allow_unused=True)
    if grad is None:
        return np.zeros(int(math.prod(graph.shape_of(source))), np.int64)
    return np.rint(grad.detach().numpy().reshape(-1)).astype(np.int64)


def fanout_one_hot(graph: ir.Graph, source: str, chunk: int | None = None) -> np.ndarray:
    """Distinct targets of each source neuron, by pushing one-hots through the binarised chain."""
    chain, _ = _chain(graph, source)
    shape = tuple(graph.shape_of(source))
    count = int(math.prod(shape))
    largest = max([count] + [int(math.prod(n.shape)) for n in chain])
    chunk = chunk or max(1, min(count, _ONE_HOT_BUDGET // largest))
    result = np.zeros(count, np.int64)
    with torch.no_grad():
        for begin in range(0, count, chunk):
            end = min(count, begin + chunk)
            x = torch.zeros((end - begin, count), dtype=torch.float32)
            x[torch.arange(end - begin), torch.arange(begin, end)] = 1.0
            values = _structural_forward(graph, source, chain, x.reshape((end - begin, *shape)), binarise=True)
            result[begin:end] = _arriving(graph, source, values).flatten(1).sum(1).round().to(torch.int64).numpy()
    return result


def _arriving(graph: ir.Graph, source: str, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """Everything that arrives at the next populations, concatenated per sample: (B, total)."""
    parts = []
    for node in graph.nodes:
        if node.op in NEURON_OPS:
            for name in node.inputs:
                if name in values:
                    parts.append(values[name].flatten(1))
    return torch.cat(parts, dim=1)


def _structural_forward(
    graph: ir.Graph, source: str, chain: list[ir.Node], x: torch.Tensor, binarise: bool
) -> dict[str, torch.Tensor]:
    """Run the chain with every connection's weight set to one. `x`: (B, *source shape)."""
    values: dict[str, torch.Tensor] = {source: x}
    batch = x.shape[0]
    for node in chain:
        args = [
            values[i] if i in values else torch.zeros((batch, *graph.shape_of(i)), dtype=x.dtype) for i in node.inputs
        ]
        y = connections(node, args)
        if binarise:
            y = (y > 0).to(x.dtype)
        values[node.name] = y
    return values


def connections(node: ir.Node, args: list[torch.Tensor], one_channel: bool = False) -> torch.Tensor:
    """The node's op with every connection weighing one: how many paths reach each output element.

    The interpreter's own kernel (`core.interpreter.OPS`) runs on connection indicators: a
    conv's weights all one (every tap counts, whatever its value), biases and shifts dropped;
    a pool connects its window's cells, which the average pool's kernel times the window's
    area sums. A Linear connects every input to every output: its product with all ones is a
    row sum, computed without the dense matrix. `args`: the inputs, (B, ...) without a time
    axis. `one_channel`: a conv's spatial pattern alone (its kernel on one channel).
    """
    x = args[0]
    if isinstance(node, ir.Linear):
        return x.sum(-1, keepdim=True).expand(*x.shape[:-1], int(node.weight.shape[0]))
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(node, ir.Conv2d):
        if one_channel:
            node = dataclasses.replace(node, groups=1)
        tensors["weight"] = torch.ones((1, 1, *node.weight.shape[2:]) if one_channel else node.weight.shape, dtype=x.dtype)
    elif isinstance(node, ir.ScaleShift):
        tensors = {"scale": torch.ones(1, dtype=x.dtype), "shift": torch.zeros(1, dtype=x.dtype)}
    elif isinstance(node, (ir.AvgPool2d, ir.MaxPool2d)):
        window = ir.AvgPool2d(node.name, node.inputs, node.shape, kernel=node.kernel, stride=node.stride,
                              padding=node.padding, count_include_pad=True)  # divides every window by its area
        y = OPS["avgpool2d"](CompiledNode(window, {}), [a.unsqueeze(0) for a in args], 1)[0]
        return y * (node.kernel[0] * node.kernel[1])
    return OPS[node.op](CompiledNode(node, tensors), [a.unsqueeze(0) for a in args], 1)[0]
