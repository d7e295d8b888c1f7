"""ANN graph + thresholds -> SNN graph.

Every `Relu` becomes an `IFNeuron` with reset by subtraction whose threshold is the
calibrated theta and whose initial potential is 0, theta/2 or a searched fraction of
theta. The last layer does not spike: a `Readout` accumulates it over time. Max pooling
becomes a spiking max-pool (the float default), a tree of IF neurons that a chip's
synapses can run (`relu`, the fixed-point default), an average pool (changes the ANN;
warned about), or an error, as the user chooses.

The `relu` max-pool uses max(a, b) = b + relu(a - b), exact in the ANN: each window's cells
are picked out of the source population by one-hot depthwise convolutions, and pairs are
reduced by IF neurons fed with a - b (threshold and v0 those of the source channel, so that
relu(a - b) <= a never clips), the partial max b + r staying a linear expression that the
next synapse folds in. A k-cell window costs k - 1 IF neurons per output, in ceil(log2 k)
layers; only conversion error is added.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from toolchain.core import ir
from toolchain.errors import ToolchainError, option
from toolchain.passes.calibrate import Thresholds

log = logging.getLogger(__name__)

MAXPOOL_POLICIES = ("spiking", "relu", "avg", "error")
V0_MODES = ("zero", "half", "optimal")


@dataclass
class ConversionOptions:
    v0: str = "half"  # zero | half | optimal (optimal starts from half; calibrate.optimise_v0 refines it)
    maxpool: str = "spiking"


def replace_maxpool(graph: ir.Graph, policy: str) -> ir.Graph:
    """Apply the max-pool policy to an ANN graph (returns a new graph when anything changes)."""
    if policy not in MAXPOOL_POLICIES:
        raise ToolchainError(f"maxpool={policy!r}: choose one of {', '.join(MAXPOOL_POLICIES)}")
    pools = [n for n in graph.nodes if isinstance(n, ir.MaxPool2d)]
    if not pools:
        return graph
    if policy == "spiking":  # keeps the ANN's max-pool (convert builds the SNN's)
        return pool_after_activation(graph)
    if policy == "relu":  # max-pools over spikes stay (convert builds their trees); others become ANN trees
        return relu_trees_over_currents(pool_after_activation(graph))
    if policy == "error":
        raise ToolchainError(
            f"node {pools[0].name!r} (MaxPool): max pooling refused by {option('maxpool', 'error')}; "
            f"use {option('maxpool', 'spiking')} (spiking max-pool), relu (IF neurons, runs on the chip) or avg "
            "(average pooling, changes the ANN)"
        )
    graph = copy.deepcopy(graph)
    for index, node in enumerate(graph.nodes):
        if isinstance(node, ir.MaxPool2d):
            log.warning("node %s (MaxPool): replaced by average pooling, which changes the ANN's function", node.name)
            graph.nodes[index] = ir.AvgPool2d(
                node.name, node.inputs, node.shape, node.kernel, node.stride, node.padding, count_include_pad=False
            )
    return graph


def pool_after_activation(graph: ir.Graph) -> ir.Graph:
    """Each max-pool whose only consumer is an activation moved after it (the activation then reads the
    pool's input; any other reader of that input is unchanged).

    `F.relu(F.max_pool2d(conv(x), 2))` (PyTorch's MNIST example and many like it) pools currents,
    which no spiking max-pool can compare; every activation here is monotone (ReLU, a clip, QCFS's
    staircase), so it commutes with max and the ANN is unchanged, while the pool now sees spikes.
    The activation keeps its name (its threshold is reported under it), the pool its own."""
    nodes = list(graph.nodes)
    output = graph.output
    changed = False
    for pool_name in [n.name for n in nodes if isinstance(n, ir.MaxPool2d)]:
        pool = next(n for n in nodes if n.name == pool_name)  # by name: an earlier move may have copied it
        after = [n for n in nodes if pool.name in n.inputs]
        if len(after) != 1 or not isinstance(after[0], ir.Relu) or pool.name == output:
            continue
        if pool.inputs[0] == graph.input_name:  # an IF layer needs a synapse before it
            continue
        if _activation_parts({n.name: n for n in nodes}, pool.inputs[0]) is not None:  # it pools spikes already
            continue
        act = after[0]
        moved_act = copy.deepcopy(act)
        moved_act.inputs = list(pool.inputs)
        moved_pool = copy.deepcopy(pool)
        moved_pool.inputs = [act.name]
        rest = []
        for node in nodes:
            if node.name == act.name:
                continue
            if node.name == pool.name:
                rest += [moved_act, moved_pool]
                continue
            if act.name in node.inputs:
                node = copy.deepcopy(node)
                node.inputs = [pool.name if name == act.name else name for name in node.inputs]
            rest.append(node)
        nodes = rest
        output = pool.name if output == act.name else output
        changed = True
    if not changed:
        return graph
    moved = ir.Graph(graph.input_name, graph.input_shape, nodes, output, graph.preprocess, graph.meta)
    moved.infer_shapes()
    return moved


def convert(ann: ir.Graph, thresholds: Thresholds, options: ConversionOptions | None = None) -> ir.Graph:
    """Build the SNN graph. `ann` must already have its max-pool policy applied."""
    options = options or ConversionOptions()
    if options.v0 not in V0_MODES:
        raise ToolchainError(f"v0={options.v0!r}: choose one of {', '.join(V0_MODES)}")
    if ann.is_snn:
        raise ToolchainError("the graph is already an SNN")
    if options.maxpool not in MAXPOOL_POLICIES:
        raise ToolchainError(f"maxpool={options.maxpool!r}: choose one of {', '.join(MAXPOOL_POLICIES)}")
    fraction = 0.0 if options.v0 == "zero" else 0.5
    nodes: list[ir.Node] = []
    for node in ann.nodes:
        if isinstance(node, ir.Relu):
            if node.name not in thresholds.values:
                raise ToolchainError(f"node {node.name!r} (Relu): no threshold was computed for it")
            theta = np.asarray(thresholds.values[node.name], np.float32).reshape(-1)
            nodes.append(ir.IFNeuron(node.name, list(node.inputs), node.shape, threshold=theta, v0=theta * fraction))
        elif isinstance(node, ir.MaxPool2d) and options.maxpool == "relu":
            theta = spike_thresholds({n.name: n for n in nodes}, node.inputs[0])
            if theta is None:
                raise ToolchainError(
                    f"node {node.name!r} (MaxPool): {option('maxpool', 'relu')} builds a padded max-pool only over spikes "
                    f"(a ReLU, or a channel Concat of ReLUs, directly before it); use {option('maxpool', 'avg')} "
                    f"(average pooling, changes the ANN) or {option('maxpool', 'spiking')} (float targets only) for this model"
                )
            def spiking(name: str, inputs: list[str], shape: ir.Shape, theta: np.ndarray = theta) -> ir.Node:
                return ir.IFNeuron(name, inputs, shape, threshold=theta, v0=theta * fraction)

            nodes.extend(relu_maxpool(node, len(theta), spiking))
        else:
            nodes.append(copy.deepcopy(node))
    readout = ir.Readout(f"{ann.output}/readout", [ann.output], ann.shape_of(ann.output))
    nodes.append(readout)
    meta = dict(ann.meta)
    meta["conversion"] = {
        "v0": options.v0,
        "maxpool": options.maxpool,
        "threshold_source": dict(thresholds.source),
    }
    return ir.Graph(ann.input_name, ann.input_shape, nodes, readout.name, copy.deepcopy(ann.preprocess), meta)


def _activation_parts(nodes: dict[str, ir.Node], name: str) -> list[ir.Node] | None:
    """The activations (IF layers, or ANN ReLUs) whose outputs value `name` is: one, or the parts of a
    channel Concat of such (Inception, SqueezeNet and DenseNet blocks end so); None if it is not."""
    node = nodes.get(name)
    if isinstance(node, (ir.IFNeuron, ir.Relu)):
        return [node]
    if isinstance(node, ir.Concat):
        parts = [_activation_parts(nodes, part) for part in node.inputs]
        return None if any(p is None for p in parts) else [n for p in parts for n in p]  # type: ignore[union-attr]
    return None


def spike_thresholds(nodes: dict[str, ir.Node], name: str) -> np.ndarray | None:
    """Per-channel thresholds (C,) of value `name` if it is spikes (IF layers' outputs), else None."""
    parts = _activation_parts(nodes, name)
    if parts is None or not all(isinstance(n, ir.IFNeuron) for n in parts):
        return None
    return np.concatenate(
        [np.broadcast_to(np.asarray(n.threshold, np.float32).reshape(-1), (int(n.shape[0]),)) for n in parts]  # type: ignore[attr-defined]
    )


def relu_trees_over_currents(graph: ir.Graph) -> ir.Graph:
    """Each max-pool over a value that is not spikes (a conv or batch norm with no ReLU before it, as
    in a stem `max_pool2d(conv(x))`) rewritten in the ANN as its ReLU tree, max(a, b) = b + relu(a - b):
    exact, and its ReLUs then get thresholds from data and calibration like any other.
    Padded pools are left (their padding is -inf, a one-hot conv's is 0): convert refuses them by name."""
    nodes = {n.name: n for n in graph.nodes}
    rewritten: list[ir.Node] = []
    for node in graph.nodes:
        if isinstance(node, ir.MaxPool2d) and _activation_parts(nodes, node.inputs[0]) is None and not any(node.padding):
            rewritten.extend(relu_maxpool(node, int(node.shape[0]), ir.Relu))
        else:
            rewritten.append(node)
    if len(rewritten) == len(graph.nodes):
        return graph
    return ir.Graph(graph.input_name, graph.input_shape, rewritten, graph.output, graph.preprocess, graph.meta)


def relu_maxpool(pool: ir.MaxPool2d, channels: int, activation: Callable[[str, list[str], ir.Shape], ir.Node]) -> list[ir.Node]:
    """The max-pool as `activation` nodes (IF neurons over spikes, or ANN ReLUs) and linear ops:
    max(a, b) = b + relu(a - b).

    The last node keeps the pool's name (and shape), so its consumers are unchanged."""
    kh, kw = pool.kernel
    made: list[ir.Node] = []
    partial: list[str] = []
    for a in range(kh):
        for b in range(kw):
            one_hot = np.zeros((channels, 1, kh, kw), np.float32)
            one_hot[:, 0, a, b] = 1
            cell = ir.Conv2d(
                f"{pool.name}/cell{a}_{b}", [pool.inputs[0]], pool.shape, weight=one_hot,
                stride=tuple(pool.stride), padding=tuple(pool.padding), groups=channels,
            )
            made.append(cell)
            partial.append(cell.name)
    level = 0
    while len(partial) > 1:
        merged = []
        for index in range(0, len(partial) - 1, 2):
            first, second = partial[index], partial[index + 1]
            tag = f"{pool.name}/max{level}_{index // 2}"
            last = len(partial) == 2
            made += [
                ir.ScaleShift(f"{tag}/neg", [second], pool.shape, scale=-np.ones(channels, np.float32),
                              shift=np.zeros(channels, np.float32)),
                ir.Add(f"{tag}/diff", [first, f"{tag}/neg"], pool.shape),
                activation(f"{tag}/relu", [f"{tag}/diff"], pool.shape),
                ir.Add(pool.name if last else tag, [second, f"{tag}/relu"], pool.shape),
            ]
            merged.append(made[-1].name)
        if len(partial) % 2:
            merged.append(partial[-1])
        partial = merged
        level += 1
    if partial[0] != pool.name:  # a 1-cell window: the cell itself
        made.append(ir.Add(pool.name, [partial[0]], pool.shape))
    return made


def ann_view(snn: ir.Graph) -> ir.Graph:
    """The ANN that an SNN approximates: IF neurons back to clip(x, 0, theta), no readout.

    Used to compare layer activations and to run the ANN when the ONNX file is not at hand.
    """
    nodes: list[ir.Node] = []
    for node in snn.nodes:
        if isinstance(node, ir.IFNeuron):
            nodes.append(ir.Relu(node.name, list(node.inputs), node.shape, ceiling=node.threshold))
        elif not isinstance(node, ir.Readout):
            nodes.append(node)
    output = snn.node(snn.output).inputs[0] if isinstance(snn.node(snn.output), ir.Readout) else snn.output
    return ir.Graph(snn.input_name, snn.input_shape, nodes, output, snn.preprocess, snn.meta)
