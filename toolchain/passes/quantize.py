"""Float SNN IR -> Loihi-style fixed-point IR (`toolchain.core.fixed.FixedGraph`).

Everything between populations in the float graph (average pooling, flatten,
linear/conv maps, per-channel scale-shifts, consecutive linear maps, residual Adds,
channel Concats) is folded into the synapses of a fixed-point layer: the linear map
from each source population (or the input) along each path of the float graph
becomes one synapse, and the layer's dendritic input is their sum. The arithmetic the result means is described
in `toolchain.core.fixed`; this pass chooses its numbers.

Scheme
------
* **Thresholds.** Dividing a population's membrane by its (per-channel) float
  threshold theta_c makes every threshold 1; the incoming weights are scaled by
  1/theta_c and, because a spike of the source carries theta_src, by theta_src of
  the input channel. The normalised weights `W'` are then scaled by one integer
  threshold `threshold` (Theta) per population: `W' * Theta ~= q * 2**weight_exp`
  with signed mantissas `q` in [-127, 127] (8 bits; -128 is not used so that
  Lava's sign-mode clipping of `2*q` is exact for every sign mode). The synapse
  with the largest normalised weight fixes `weight_exp` so that Theta lands in
  [2**threshold_bits, 2**(threshold_bits+1)); every other synapse of the layer
  takes the smallest exponent that fits its own weights at that Theta.
  One weight scale per population leaves a channel with a tiny float threshold
  (huge normalised weights) starving the others of bits, so channels whose
  largest normalised weight exceeds `max_row_ratio` times the median channel's
  get their threshold and v0 raised to fit (the next layer compensates exactly;
  reported as `raised_channels` in the layer stats).
* **Biases.** With a negative weight exponent a synapse floors; the bias then
  gets +1/2 unit per such synapse to cancel the floors' mean error. The input offset's
  contribution `W @ input_offset` is folded into the first layer's bias, so the
  first synapse sees only non-negative payloads. With the default input range
  (raw uint8 pixels through the graph's `Preprocess`) the graded input spike is
  exactly the raw pixel value.
* **Initial potentials.** `v0` an integer per neuron, from the IR's v0 (e.g. theta/2).
* **Delays.** The float semantics are reproduced exactly by resetting each
  population to v0 at its own depth (`FixedGraph.depth`).
* **Folding.** Along one path from a source: scale-shifts (per channel), channel
  placements of Concats, at most one leading non-overlapping average pool (kept as
  the sum-pool), then at most one conv ("conv" synapse; with a Concat on the path its
  groups are expanded and its weights sliced or placed; two convolutions in a row, as
  a max-pool's picked cell and the next conv, compose into one where that is exact);
  synapses from one source with one geometry are merged; any other linear chain
  (flatten, linear maps, overlapping or padded pools, several convs) is probed into a
  "dense" matrix (up to `max_dense_weights` entries). Biases, shifts and the input
  offset are probed into a per-neuron bias by evaluating the float graph between the
  layer and its sources with the sources at their base values. The float ops are
  evaluated by the one interpreter of the op semantics (`toolchain.core.interpreter`)
  in float64.

The quantiser refuses values that cannot fit the 24-bit membrane (bias, v0,
threshold) and reports per layer a conservative number of steps that is guaranteed
overflow-free (`safe_steps`). A spiking `MaxPool2d` (no synapse can express it; convert
with `--maxpool relu` or `avg`) raises `ToolchainError` naming the node.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolchain.core import ir
from toolchain.core.fixed import (
    BIAS_EXP_MAX,
    BIAS_MANT_MAX,
    V_BITS,
    V_MAX,
    WEIGHT_EXP_RANGE,
    FixedGraph,
    FixedLayer,
    FixedSynapse,
    Shape,
    channel_scalar_or_vector,
    per_channel,
    synapse_range,
)
from toolchain.errors import ToolchainError, option

log = logging.getLogger(__name__)


def _pool_shape(shape: Shape, pool: tuple[int, int]) -> Shape:
    if pool == (1, 1):
        return tuple(shape)
    c, h, w = shape
    return (c, h // pool[0], w // pool[1])


def _fail_unsupported(node: ir.Node) -> None:
    if isinstance(node, ir.MaxPool2d):
        raise ToolchainError(
            f"node {node.name!r} is a spiking max-pool, which Loihi synapses cannot express; "
            f"rebuild with `{option('maxpool', 'relu')}` (the max from IF neurons, max(a, b) = b + relu(a - b)) "
            f"or `{option('maxpool', 'avg')}` (average pooling) for the loihi/lava targets"
        )
    if isinstance(node, ir.Relu):
        raise ToolchainError(f"node {node.name!r} is a ReLU: quantize a converted SNN graph, not the ANN")


@dataclass
class _Embed:
    """The channel placement of one Concat input: its channels land at `offset` of `total`."""

    name: str
    offset: int
    total: int
    shape: Shape  # the Concat's output shape
    op: str = "embed"


@dataclass
class _Term:
    """One path from a source population (None: the network input) through linear ops."""

    source: str | None
    ops: list[Any]  # ir nodes and _Embed, nearest the source first


@dataclass
class _Population:
    target: ir.Node
    terms: list[_Term]
    nodes: list[ir.Node]  # every float node between the population and its sources, in graph order


LINEAR_OPS = (ir.Conv2d, ir.Linear, ir.AvgPool2d, ir.Flatten, ir.ScaleShift)


def _populations(graph: ir.Graph) -> list[_Population]:
    """For every population node, the paths of linear ops from each of its sources."""
    by_name = {n.name: n for n in graph.nodes}
    for n in graph.nodes:
        _fail_unsupported(n)
    readouts = [n for n in graph.nodes if isinstance(n, ir.Readout)]
    if len(readouts) != 1 or readouts[0].name != graph.output:
        raise ToolchainError("the SNN graph must end in exactly one Readout node (its output); convert it first")
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    memo: dict[str, list[_Term]] = {}

    def terms(name: str) -> list[_Term]:
        if name == graph.input_name:
            return [_Term(None, [])]
        node = by_name[name]
        if isinstance(node, ir.IFNeuron):
            return [_Term(name, [])]
        if name in memo:
            return memo[name]
        if isinstance(node, LINEAR_OPS):
            result = [_Term(t.source, [*t.ops, node]) for t in terms(node.inputs[0])]
        elif isinstance(node, ir.Add):
            result = [t for i in node.inputs for t in terms(i)]
        elif isinstance(node, ir.Concat):
            result, offset = [], 0
            for index, i in enumerate(node.inputs):
                embed = _Embed(f"{node.name}[{index}]", offset, int(node.shape[0]), tuple(node.shape))
                result += [_Term(t.source, [*t.ops, embed]) for t in terms(i)]
                offset += int(by_name[i].shape[0]) if i != graph.input_name else int(graph.input_shape[0])
        else:
            raise ToolchainError(
                f"node {node.name!r} ({node.op}) cannot be lowered to a Loihi synapse; only conv2d, linear, avgpool2d, "
                "flatten, affine, add and concat may sit between neuron layers"
            )
        memo[name] = result
        return result

    def between(name: str, seen: set[str]) -> None:
        if name == graph.input_name or name in seen or isinstance(by_name[name], ir.IFNeuron):
            return
        seen.add(name)
        for i in by_name[name].inputs:
            between(i, seen)

    populations = []
    for node in graph.nodes:
        if not isinstance(node, (ir.IFNeuron, ir.Readout)):
            continue
        if len(node.inputs) != 1:
            raise ToolchainError(f"node {node.name!r} has {len(node.inputs)} inputs; expected one")
        seen: set[str] = set()
        between(node.inputs[0], seen)
        nodes = sorted((by_name[n] for n in seen), key=lambda n: order[n.name])
        populations.append(_Population(node, terms(node.inputs[0]), nodes))
    return populations


# ------------------------------------------------------ float chain (torch, lazily)


def _apply_chain(nodes: list[Any], x: Any, linear_only: bool) -> Any:
    """Apply the float ops of a path to a float64 torch batch (N, *shape), through the one
    interpreter of the op semantics (one time step).

    `linear_only` drops biases and scale-shift offsets (the chain's linear part)."""
    import torch

    from toolchain.core.interpreter import OPS, CompiledNode

    y = x.unsqueeze(0)  # the interpreter's leading time axis: one step
    for n in nodes:
        if isinstance(n, _Embed):  # zeros around the channels of this Concat input
            placed = y.new_zeros((*y.shape[:2], n.total, *y.shape[3:]))
            placed[:, :, n.offset : n.offset + y.shape[2]] = y
            y = placed
            continue
        tensors = {k: torch.as_tensor(np.asarray(v, np.float64)) for k, v in ir.node_arrays(n).items()}
        if linear_only:
            tensors.pop("bias", None)
            if "shift" in tensors:
                tensors["shift"] = torch.zeros_like(tensors["shift"])
        y = OPS[n.op](CompiledNode(n, tensors), [y], 1)
    return y[0]


def _base_value(graph: ir.Graph, population: _Population, base_input: np.ndarray) -> np.ndarray:
    """The population's float input with every source population silent and the input at
    `base_input` (its lowest value): the constant part of the dendritic input, biases, shifts and the
    input offset included, evaluated along the float graph (so shared ops count once)."""
    import torch

    from toolchain.core.interpreter import OPS, CompiledNode

    values: dict[str, Any] = {graph.input_name: torch.as_tensor(base_input[None, None])}

    def value(name: str) -> Any:
        if name not in values:
            node = graph.node(name)
            if isinstance(node, ir.IFNeuron):
                values[name] = torch.zeros((1, 1, *node.shape), dtype=torch.float64)
            else:
                tensors = {k: torch.as_tensor(np.asarray(v, np.float64)) for k, v in ir.node_arrays(node).items()}
                values[name] = OPS[node.op](CompiledNode(node, tensors), [value(i) for i in node.inputs], 1)
        return values[name]

    with torch.inference_mode():
        return value(population.target.inputs[0])[0, 0].numpy()


def _dense_matrix(nodes: list[ir.Node], in_shape: Shape, max_entries: int, target: str) -> np.ndarray:
    """The chain's linear part as a dense (out, in) float64 matrix, by probing with unit vectors."""
    import torch

    n_in = int(math.prod(in_shape))
    out_shape = _chain_out_shape(nodes, in_shape)
    n_out = int(math.prod(out_shape))
    if n_in * n_out > max_entries:
        raise ToolchainError(
            f"layer {target!r}: the ops {[n.name for n in nodes]} fold into a dense {n_out}x{n_in} synapse, "
            f"over the limit of {max_entries} weights; use average pooling with kernel == stride and no padding "
            "directly before a conv or linear layer"
        )
    columns = []
    chunk = max(1, min(n_in, 2**22 // max(1, n_out)))
    with torch.inference_mode():
        for begin in range(0, n_in, chunk):
            end = min(n_in, begin + chunk)
            eye = torch.zeros((end - begin, n_in), dtype=torch.float64)
            eye[torch.arange(end - begin), torch.arange(begin, end)] = 1.0
            columns.append(_apply_chain(nodes, eye.reshape((end - begin, *in_shape)), True).reshape(end - begin, -1))
    return torch.cat(columns).T.contiguous().numpy()


def _chain_out_shape(nodes: list[Any], in_shape: Shape) -> Shape:
    return tuple(nodes[-1].shape) if nodes else tuple(in_shape)


@dataclass
class _Synapse:
    source: str | None
    synapse: str
    weight: np.ndarray  # float64, normalised later
    in_shape: Shape
    pool: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    nodes: tuple[str, ...] = ()


def _split_pool(nodes: list[Any], in_shape: Shape) -> tuple[tuple[int, int], list[Any]]:
    """Take a leading non-overlapping average pool (after any affines or channel placements) out of
    the path as a sum-pool.

    Per-channel affines and channel placements commute with pooling, so they may sit before it.
    Returns the pool kernel and the rest of the path (to be applied to the *averaged* pooled input)."""
    for index, n in enumerate(nodes):
        if isinstance(n, (ir.ScaleShift, _Embed)):
            continue
        if isinstance(n, ir.AvgPool2d) and len(in_shape) == 3 and tuple(n.kernel) == tuple(n.stride) and not any(n.padding):
            return tuple(n.kernel), nodes[:index] + nodes[index + 1 :]  # type: ignore[return-value]
        break
    return (1, 1), nodes


def _ungroup(weight: np.ndarray, groups: int) -> np.ndarray:
    """A grouped conv's (C_out, C_in/groups, kh, kw) kernel as the equivalent groups=1 kernel."""
    if groups == 1:
        return weight
    c_out, c_in_group = weight.shape[:2]
    full = np.zeros((c_out, c_in_group * groups, *weight.shape[2:]))
    for o in range(c_out):
        g = o // (c_out // groups)
        full[o, g * c_in_group : (g + 1) * c_in_group] = weight[o]
    return full


def _channel_map(ops: list[Any], channels: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Where each of `channels` channels lands through per-channel affines and channel placements,
    and the product of the scales it meets: (index, scale, channels at the end)."""
    index, scale, count = np.arange(channels), np.ones(channels), channels
    for n in ops:
        if isinstance(n, _Embed):
            index, count = index + n.offset, n.total
        else:
            scale = scale * np.broadcast_to(np.asarray(n.scale, np.float64).reshape(-1), (count,))[index]
    return index, scale, count


def _compose(first: ir.Conv2d, second: ir.Conv2d, in_shape: Shape) -> ir.Conv2d | None:
    """Two convolutions in a row as one (linear parts only), where that is exact: None when the
    second one's zero padding would stand for input cells the first one reads (a padded second conv
    after a first whose windows overlap its padding or leave a remainder), or the first one dilates."""
    if tuple(first.dilation) != (1, 1):
        return None
    c_in, h, w = in_shape
    _, h1, w1 = first.shape
    k1h, k1w = first.weight.shape[2:]
    s1h, s1w = first.stride
    t1, l1, b1, r1 = first.padding
    overlapping = k1h - 1 - s1h - t1 >= 0 or k1w - 1 - s1w - l1 >= 0 or s1h * h1 - t1 < h or s1w * w1 - l1 < w
    if any(second.padding) and overlapping:  # without padding the second reads only cells the first computed
        return None
    w1_full = _ungroup(np.asarray(first.weight, np.float64), first.groups)  # (mid, c_in, k1h, k1w)
    w2_full = _ungroup(np.asarray(second.weight, np.float64), second.groups)  # (out, mid, k2h, k2w)
    k2h, k2w = w2_full.shape[2:]
    d2h, d2w = second.dilation
    kh, kw = (k2h - 1) * d2h * s1h + k1h, (k2w - 1) * d2w * s1w + k1w
    kernel = np.zeros((w2_full.shape[0], c_in, kh, kw))
    for u in range(k2h):
        for v in range(k2w):
            tap = np.einsum("om,mcab->ocab", w2_full[:, :, u, v], w1_full)
            kernel[:, :, s1h * d2h * u : s1h * d2h * u + k1h, s1w * d2w * v : s1w * d2w * v + k1w] += tap
    t2, l2, _, _ = second.padding
    top, left = s1h * t2 + t1, s1w * l2 + l1
    stride = (s1h * second.stride[0], s1w * second.stride[1])
    _, h2, w2 = second.shape
    bottom = max(0, stride[0] * (h2 - 1) + kh - top - h)
    right = max(0, stride[1] * (w2 - 1) + kw - left - w)
    fused = ir.Conv2d(
        f"{first.name}+{second.name}", [], tuple(second.shape), weight=kernel, stride=stride, padding=(top, left, bottom, right)
    )
    return fused


def _fuse_convs(ops: list[Any], in_shape: Shape) -> list[Any]:
    """Consecutive convolutions on a path (per-channel affines between them folded into the first's
    output channels) composed into one where exact (`_compose`), so the path stays a conv synapse."""
    ops = list(ops)
    shape = tuple(in_shape)
    index = 0
    while index < len(ops):
        n = ops[index]
        if isinstance(n, ir.Conv2d):
            between = index + 1
            while between < len(ops) and isinstance(ops[between], ir.ScaleShift):
                between += 1
            if between < len(ops) and isinstance(ops[between], ir.Conv2d):
                first = n
                scales = ops[index + 1 : between]
                if scales:
                    weight = np.asarray(n.weight, np.float64).copy()
                    for a in scales:
                        scale = np.broadcast_to(np.asarray(a.scale, np.float64).reshape(-1), (weight.shape[0],))
                        weight *= scale[:, None, None, None]
                    first = ir.Conv2d(
                        n.name,
                        n.inputs,
                        n.shape,
                        weight=weight,
                        stride=n.stride,
                        padding=n.padding,
                        dilation=n.dilation,
                        groups=n.groups,
                    )
                fused = _compose(first, ops[between], shape)
                if fused is not None:
                    ops[index : between + 1] = [fused]
                    continue
        shape = tuple(n.shape) if not isinstance(n, _Embed) else n.shape
        index += 1
    return ops


def _merge_synapses(synapses: list[_Synapse]) -> list[_Synapse]:
    """Synapses from one source with one geometry (the two cells of a max-pool's a - b, two paths
    through the same shortcut) as one, their float weights summed: fewer connections, one rounding."""
    merged: dict[tuple[Any, ...], _Synapse] = {}
    for syn in synapses:
        key = (
            syn.source,
            syn.synapse,
            syn.in_shape,
            syn.pool,
            syn.stride,
            syn.padding,
            syn.dilation,
            syn.groups,
            syn.weight.shape,
        )
        if key in merged:
            first = merged[key]
            merged[key] = _Synapse(
                first.source,
                first.synapse,
                first.weight + syn.weight,
                first.in_shape,
                first.pool,
                first.stride,
                first.padding,
                first.dilation,
                first.groups,
                first.nodes + syn.nodes,
            )
        else:
            merged[key] = syn
    return list(merged.values())


def _lower_term(term: _Term, in_shape: Shape, max_entries: int, target: str) -> _Synapse:
    """The path's linear part as a conv or dense synapse acting on the sum-pooled source."""
    pool, rest = _split_pool(term.ops, in_shape)
    rest = _fuse_convs(rest, _pool_shape(in_shape, pool))
    pooled = _pool_shape(in_shape, pool)
    area = pool[0] * pool[1]
    names = tuple(n.name for n in term.ops if not isinstance(n, _Embed))
    mains = [n for n in rest if not isinstance(n, (ir.ScaleShift, _Embed))]
    if len(pooled) == 3 and len(mains) <= 1 and (not mains or isinstance(mains[0], ir.Conv2d)):
        channels = pooled[0]
        stride, padding, dilation = (1, 1), (0, 0, 0, 0), (1, 1)
        if mains:
            conv: ir.Conv2d = mains[0]  # type: ignore[assignment]
            weight = np.asarray(conv.weight, np.float64).copy()
            stride, padding, dilation, groups = tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups
        if not any(isinstance(n, _Embed) for n in rest):
            if not mains:  # pooling or affine only: a 1x1 depthwise "conv"
                weight, groups = np.ones((channels, 1, 1, 1)), channels
            c_out, c_in_group = weight.shape[:2]
            main_index = rest.index(mains[0]) if mains else len(rest)
            for n in rest[:main_index]:  # per-input-channel scale
                scale = np.broadcast_to(np.asarray(n.scale, np.float64).reshape(-1), (channels,))
                in_channel = (np.arange(c_out)[:, None] // (c_out // groups)) * c_in_group + np.arange(c_in_group)[None]
                weight *= scale[in_channel][:, :, None, None]
            for n in rest[main_index + 1 :]:  # per-output-channel scale
                scale = np.broadcast_to(np.asarray(n.scale, np.float64).reshape(-1), (c_out,))
                weight *= scale[:, None, None, None]
        else:  # a Concat on the path: slice the kernel's input channels, place its output channels
            main_index = rest.index(mains[0]) if mains else -1
            if mains:
                index, scale, _ = _channel_map(rest[:main_index], channels)
                weight = _ungroup(weight, groups)[:, index] * scale[None, :, None, None]
            else:
                weight = np.eye(channels)[:, :, None, None]
            out_index, out_scale, out_channels = _channel_map(rest[main_index + 1 :], weight.shape[0])
            placed = np.zeros((out_channels, *weight.shape[1:]))
            placed[out_index] = weight * out_scale[:, None, None, None]
            weight, groups = placed, 1
        return _Synapse(term.source, "conv", weight / area, in_shape, pool, stride, padding, dilation, groups, names)  # type: ignore[arg-type]
    matrix = _dense_matrix(rest, pooled, max_entries, target)
    return _Synapse(term.source, "dense", matrix / area, in_shape, pool, nodes=names)


RESIDUAL_POLICIES = ("auto", "on", "off")
# "auto" adds a residual synapse where one mantissa step is more than this fraction of the target's
# threshold: the largest weight then exceeds ~2 thresholds per spike, and 8 bits leave the small ones
# (most of them) too coarse. Stock networks with batch norm after a ReLU or beside a concatenation hit
# this (steps of 1/50 to 0.9 threshold measured); the models trained here stay below 1/150.
RESIDUAL_STEP = 1 / 64
# "auto" also adds one where some output row of a synapse is held with more than this relative (L2)
# rounding error, i.e. fewer than about 4 of its 8 bits: a row far below the synapse's largest weights
# (with one exponent per synapse) is rounded to a few levels or to zero. A frozen patch-whitening stem
# hits this (rows scaled by 1/sqrt of eigenvalues spread over 1000x; measured on the width-64 CIFAR-10
# zoo model, ad hoc on 1000 test images: worst row 100 % error, fixed point 5 points below float at T=16, 0.2 with the
# residual); every other layer of the zoo and the stock models measured stays below 3.5 %.
RESIDUAL_ROW_ERROR = 1 / 16
MAX_ROW_RATIO = 8.0  # the bound on a channel's weight peak against the median channel's, 8-bit weights alone
# With residual synapses a channel far below the population's largest keeps about 7 more bits, so the
# bound can be looser: raising a channel's threshold costs it spikes (a coarser rate), which the plain
# MobileNet of bench/deploy_dag.py (batch norm after ReLU, thresholds 0.3..7.5 in one layer) felt most.
# Measured there at T=32, float / fixed SNN on 1,000 test images: bound 8: 59.0 / 58.9 %, 16: 70.3 / 69.7,
# 32: 78.1 / 78.0, 64: 84.5 / 84.4, 128: 84.7 / 83.8, none: 84.2 / 83.9 (torch target, unbounded: 84.2).
# No zoo model and not the MNIST demo has a channel beyond 8, so they quantise the same under either.
RESIDUAL_ROW_RATIO = 64.0


def row_ratio_for(residual_weights: str) -> float:
    """quantize()'s default row-balancing bound for a residual-weights policy."""
    return MAX_ROW_RATIO if residual_weights == "off" else RESIDUAL_ROW_RATIO


def row_raise(peaks: np.ndarray, ratio: float) -> np.ndarray:
    """Per channel, the factor (>= 1) by which row balancing raises its threshold.

    `peaks`: each channel's largest normalised weight (threshold units). A channel above
    `ratio` times the median active channel's is brought down to that cap."""
    peaks = np.asarray(peaks, np.float64)
    active = peaks[peaks > 0]
    if active.size == 0:
        return np.ones(peaks.shape)
    return np.maximum(1.0, peaks / (float(np.median(active)) * ratio))


def _row_peaks(normalised: list[np.ndarray], channels: int) -> np.ndarray:
    peaks = np.zeros(channels)
    for w in normalised:  # conv: rows are channels; dense: rows are neurons
        rows = np.abs(w).reshape(w.shape[0], -1).max(1, initial=0)
        peaks = np.maximum(peaks, rows.reshape(channels, -1).max(1))
    return peaks


def _balance_rows(
    normalised: list[np.ndarray], theta: np.ndarray, shape: Shape, ratio: float
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Raise the thresholds of channels whose normalised weights dwarf the median channel's.

    Returns the rescaled weights, the new per-channel (or scalar) thresholds and the factors."""
    channels = shape[0]
    factor = row_raise(_row_peaks(normalised, channels), ratio)
    if factor.max() <= 1.0:
        return normalised, theta, np.ones(1)
    rescaled = []
    for w in normalised:
        per_row = np.repeat(factor, w.shape[0] // channels)
        rescaled.append(w / per_row.reshape((-1,) + (1,) * (w.ndim - 1)))
    return rescaled, np.broadcast_to(theta, (channels,)) * factor, factor


def populations(graph: ir.Graph) -> list[_Population]:
    """The populations `quantize` will build (ToolchainError for a structure it refuses), for
    `unit_threshold_peaks` calls on one graph whose weights do not change between them."""
    return _populations(graph)


def unit_threshold_peaks(
    graph: ir.Graph, layer: str, max_dense_weights: int = 2**25, known: list[_Population] | None = None
) -> np.ndarray:
    """Per channel of IF layer `layer`, its largest normalised incoming weight were its threshold 1.

    With threshold theta the peak is this / theta, which row balancing bounds (`row_raise`):
    a calibration that lowers thresholds can ask the bound first, so that the fixed-point
    network keeps the thresholds it chose. Sources count at their thresholds in `graph` now,
    the input at the step of its default range (raw uint8 through the graph's preprocessing).
    `known`: `populations(graph)`, computed once by a caller that asks for every layer."""
    population = next(p for p in (known if known is not None else _populations(graph)) if p.target.name == layer)
    lo, hi = _input_range(graph, None, None)
    shape = tuple(population.target.shape)
    normalised = []
    for term in population.terms:
        if term.source is None:
            in_shape, src_theta = tuple(graph.input_shape), (hi - lo) / 255
        else:
            source = graph.node(term.source)
            in_shape, src_theta = tuple(source.shape), np.asarray(source.threshold, np.float64).reshape(-1)  # type: ignore[attr-defined]
        syn = _lower_term(term, in_shape, max_dense_weights, layer)
        normalised.append(_normalise(syn, src_theta, np.ones(1), shape))
    return _row_peaks(normalised, shape[0])


# A weight too large for one 8-bit mantissa at the largest exponent (a source spike worth over
# 127 * 2**7 membrane units, e.g. batch norm after a ReLU scaling a threshold of ~1 to hundreds) would
# cap the target's integer threshold far below 2**threshold_bits, and with it the resolution of its
# bias and v0 (one unit per step accumulates over T). Instead up to this many synapses with the same
# source and geometry carry it: Loihi sums them in the dendrite, so together they are one wider weight.
# The plain MobileNet of bench/deploy_dag.py had two pointwise thresholds capped at 97 and 262 this
# way, and its fixed-point SNN lost about a point that the float SNN kept; 16 parts brought both to
# 2**10 (fewer left part of the loss). The parts cost synaptic memory, which `resources` counts.
MAX_WIDE_PARTS = 16


def _smallest_exponent(peak: float, qmax: int) -> int:
    """The smallest weight exponent at which `peak` (membrane units) fits qmax mantissa steps, in range."""
    return min(max(math.ceil(math.log2(peak / qmax)), WEIGHT_EXP_RANGE[0]), WEIGHT_EXP_RANGE[1])


def _threshold_for(peak: float, threshold_bits: int, qmax: int, max_parts: int) -> tuple[int, int]:
    """(Theta, exponent) for the synapse with the largest normalised weight `peak` (threshold units):
    Theta in [2**b, 2**(b+1)) with that weight at most qmax * 2**exponent (or `max_parts` times that
    at the largest exponent, when one mantissa cannot hold it)."""
    if peak == 0.0:
        return 2**threshold_bits, 0
    low, high = WEIGHT_EXP_RANGE
    exp = math.ceil(math.log2(2**threshold_bits * peak / qmax))
    parts = min(max_parts, math.ceil(2**threshold_bits * peak / (qmax * 2.0**high))) if exp > high else 1
    exp = min(max(exp, low), high)
    theta = math.floor(parts * qmax * 2.0**exp / peak)
    return max(1, min(theta, 2 ** (V_BITS - 2))), exp


def _mantissas(scaled: np.ndarray, qmax: int) -> list[np.ndarray]:
    """`scaled` (in units of one mantissa step) rounded, as one mantissa or, where it exceeds qmax,
    as the fewest that sum to it (shares as equal as rounding allows)."""
    rounded = np.round(scaled)
    count = max(1, math.ceil(float(np.abs(rounded).max(initial=0)) / qmax))
    parts = []
    for left in range(count, 0, -1):
        q = np.clip(np.round(rounded / left), -qmax, qmax)
        parts.append(q.astype(np.int8))
        rounded = rounded - q
    return parts


def _quantize_synapses(
    normalised: list[np.ndarray], threshold_bits: int, qmax: int, max_parts: int
) -> tuple[list[list[np.ndarray]], list[int], int]:
    """Every synapse of a layer at one integer threshold: the one with the largest weight chooses
    Theta (as for a single synapse), each other one the smallest exponent its weights fit in.
    Returns per synapse its mantissas (one, or several at the largest exponent: `MAX_WIDE_PARTS`),
    its exponent, and Theta."""
    peaks = [float(np.abs(w).max()) if w.size else 0.0 for w in normalised]
    top = int(np.argmax(peaks))
    theta, exp_top = _threshold_for(peaks[top], threshold_bits, qmax, max_parts)
    mantissas, exps = [], []
    for index, (w, peak) in enumerate(zip(normalised, peaks, strict=True)):
        if index == top:
            exp = exp_top
        elif peak == 0.0:
            exp = 0
        else:
            exp = _smallest_exponent(theta * peak, qmax)
        scaled = w * theta / 2.0**exp
        if exp == WEIGHT_EXP_RANGE[1]:  # only here can a weight exceed one mantissa
            mantissas.append(_mantissas(scaled, qmax))
        else:  # below it the exponent was chosen to fit (clip: float rounding at the edge)
            mantissas.append([np.clip(np.round(scaled), -qmax, qmax).astype(np.int8)])
        exps.append(exp)
    return mantissas, exps, theta


def _residual_mantissas(
    normalised: list[np.ndarray], mantissas: list[list[np.ndarray]], exps: list[int], theta: int, qmax: int, chosen: list[bool]
) -> list[tuple[np.ndarray, int] | None]:
    """Each `chosen` synapse's rounding error as one more mantissa of the same shape: W' * Theta ~=
    sum(q) * 2**e + r * 2**e_r, with e_r the smallest exponent that holds the error (about e - 7).

    Loihi sums every synapse into the dendrite, so the pair acts as one wider weight; both
    take the same path, so they need the same delay. None where none is needed."""
    residuals: list[tuple[np.ndarray, int] | None] = []
    for w, qs, e, wanted in zip(normalised, mantissas, exps, chosen, strict=True):
        error = w * theta - sum(q.astype(np.float64) for q in qs) * 2.0**e
        peak = float(np.abs(error).max(initial=0)) if wanted else 0.0
        residual = None
        if peak > 0:
            exp_r = _smallest_exponent(peak, qmax)
            q_r = np.clip(np.round(error / 2.0**exp_r), -qmax, qmax).astype(np.int8)
            if np.any(q_r):
                residual = (q_r, exp_r)
        residuals.append(residual)
    return residuals


def _worst_row_error(weight: np.ndarray, theta: int, parts: list[tuple[np.ndarray, int]]) -> float:
    """The largest relative (L2) error of one output row of `weight` (threshold units) held as the sum
    of mantissa parts q * 2**e at the integer threshold `theta`; rows of zeros are left out."""
    exact = (weight * theta).reshape(len(weight), -1)
    held = sum((q.astype(np.float64).reshape(exact.shape) * 2.0**e for q, e in parts), np.zeros_like(exact))
    norms = np.linalg.norm(exact, axis=1)
    rows = norms > 0
    return float((np.linalg.norm(exact - held, axis=1)[rows] / norms[rows]).max(initial=0.0))


def _one_synapse_per_mantissa(
    synapses: list[_Synapse],
    mantissas: list[list[np.ndarray]],
    exps: list[int],
    residuals: list[tuple[np.ndarray, int] | None],
    theta: int,
) -> tuple[list[_Synapse], list[np.ndarray], list[int], np.ndarray]:
    """The layer's synapses as the chip holds them, one per mantissa: each synapse's (wide) mantissas
    first, in order, then the residual ones, so that a layer with neither keeps its synapses as
    they were. Also the dequantised weights (threshold units), per synapse, flattened."""
    out = [syn for syn, parts in zip(synapses, mantissas, strict=True) for _ in parts]
    out += [syn for syn, r in zip(synapses, residuals, strict=True) if r is not None]
    qs = [q for parts in mantissas for q in parts] + [r[0] for r in residuals if r is not None]
    out_exps = [e for parts, e in zip(mantissas, exps, strict=True) for _ in parts] + [r[1] for r in residuals if r is not None]
    dequant = []
    for parts, e, r in zip(mantissas, exps, residuals, strict=True):
        value = sum(q.astype(np.float64) for q in parts) * 2.0**e
        if r is not None:
            value = value + r[0].astype(np.float64) * 2.0 ** r[1]
        dequant.append((value / theta).reshape(-1))
    return out, qs, out_exps, np.concatenate(dequant)


def _quantize_bias(bias_int: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    peak = float(np.abs(bias_int).max()) if bias_int.size else 0.0
    exp = 0 if peak <= BIAS_MANT_MAX else math.ceil(math.log2(peak / BIAS_MANT_MAX))
    if exp > BIAS_EXP_MAX:
        raise ToolchainError(
            f"layer {name!r}: bias of {peak:.0f} membrane units per step does not fit a 13-bit mantissa with "
            f"exponent <= {BIAS_EXP_MAX}; quantise with a smaller threshold_bits or check the thresholds of this layer"
        )
    mant = np.clip(np.round(bias_int / 2.0**exp), -BIAS_MANT_MAX, BIAS_MANT_MAX).astype(np.int16)
    return mant, exp


def _rel_l2(approx: np.ndarray, exact: np.ndarray) -> float:
    norm = float(np.linalg.norm(exact))
    return float(np.linalg.norm(approx - exact) / norm) if norm > 0 else 0.0


def _input_range(
    graph: ir.Graph, input_range: tuple[Any, Any] | None, calibration: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    channels = graph.input_shape[0]
    if input_range is not None:
        lo, hi = (np.broadcast_to(np.asarray(v, np.float64).reshape(-1), (channels,)) for v in input_range)
    elif calibration is not None:
        x = np.asarray(calibration, np.float64).reshape((-1, *graph.input_shape))
        axes = (0,) + tuple(range(2, x.ndim))
        lo, hi = x.min(axis=axes), x.max(axis=axes)
    else:  # raw uint8 samples through the graph's preprocessing
        p = graph.preprocess
        mean = np.broadcast_to(np.asarray(p.mean, np.float64).reshape(-1), (channels,))
        std = np.broadcast_to(np.asarray(p.std, np.float64).reshape(-1), (channels,))
        scale = 1 / 255 if p.scale is None else p.scale  # None: 1/255 for uint8 data
        a, b = (0.0 * scale - mean) / std, (255.0 * scale - mean) / std
        lo, hi = np.minimum(a, b), np.maximum(a, b)
    hi = np.maximum(hi, lo + 1e-12)
    return np.asarray(lo, np.float64), np.asarray(hi, np.float64)


# ------------------------------------------------------------------ quantize


def quantize(
    graph: ir.Graph,
    *,
    threshold_bits: int = 10,
    weight_bits: int = 8,
    input_bits: int = 8,
    input_range: tuple[Any, Any] | None = None,
    calibration: np.ndarray | None = None,
    max_dense_weights: int = 2**25,
    max_row_ratio: float | str | None = "auto",
    residual_weights: str = "auto",
    steps: int | None = None,
) -> FixedGraph:
    """Quantise a converted float SNN graph to the fixed-point IR.

    threshold_bits: each population's integer threshold lies in [2**b, 2**(b+1)); larger values give
      finer biases and initial potentials but less membrane headroom (24 bits) before overflow.
    weight_bits: signed weight mantissa bits (<= 8).
    input_bits: bits of the unsigned graded input spikes.
    input_range: (low, high) of the preprocessed input, scalars or per channel. Default: from
      `calibration` (preprocessed samples) if given, else raw uint8 pixels through `graph.preprocess`.
    max_row_ratio: one threshold per population means one weight scale for all its channels; a channel
      with a tiny float threshold (rarely active in calibration) has huge normalised weights and would
      leave the others only a few bits. Channels whose largest normalised weight exceeds this many
      times the median channel's get their threshold (and v0) raised until it does not; the next layer
      compensates exactly (spikes carry the raised threshold). The float SNN then differs only in
      those channels' ceilings. None or 0 disables it (pure folding); "auto" is
      `row_ratio_for(residual_weights)`: 8 with 8-bit weights alone, 64 where residual synapses may
      hold the rounding error.
    residual_weights: "on" gives every synapse a second one from the same source with the same
      geometry that holds its rounding error, 2**(weight_bits-1) times finer (`_residual_mantissas`):
      about 15-bit weights from 8-bit synapses, for twice the synaptic memory and no more neurons.
      "auto" does so for the synapses whose mantissa step exceeds RESIDUAL_STEP of the target's
      threshold (a largest weight of more than about 2 thresholds per spike), or one of whose output rows
      8 bits hold with more than RESIDUAL_ROW_ERROR relative error; "off" never.
    steps: the T the network will run. A population whose overflow-free bound (`_safe_steps`) is
      shorter takes fewer threshold bits until it is not (down to 1), recorded as its
      `threshold_bits` stat. None keeps threshold_bits everywhere.
    """
    if residual_weights not in RESIDUAL_POLICIES:
        raise ToolchainError(f"{option('residual_weights', residual_weights)}: use one of {', '.join(RESIDUAL_POLICIES)}")
    if not 2 <= weight_bits <= 8:
        raise ToolchainError(f"weight_bits={weight_bits}: Loihi weights have 2 to 8 bits")
    if not 1 <= input_bits <= 16:
        raise ToolchainError(f"input_bits={input_bits}: choose 1 to 16 bits of graded input")
    if not 1 <= threshold_bits <= V_BITS - 4:
        raise ToolchainError(f"threshold_bits={threshold_bits}: choose 1 to {V_BITS - 4}")
    if not graph.is_snn:
        raise ToolchainError("the graph has no IF neurons: quantize a converted SNN graph")

    if max_row_ratio == "auto":
        max_row_ratio = row_ratio_for(residual_weights)
    qmax = 2 ** (weight_bits - 1) - 1
    row_error_bound = RESIDUAL_ROW_ERROR * 127 / qmax  # the same bits lost at any weight width
    populations = _populations(graph)  # refuses unsupported structures first
    lo, hi = _input_range(graph, input_range, calibration)
    input_max = 2**input_bits - 1
    step = (hi - lo) / input_max
    in_theta = {None: step}  # float value of one unit of each source's output, per channel
    base_input = per_channel(lo, tuple(graph.input_shape))

    layers: list[FixedLayer] = []
    for population in populations:
        target = population.target
        is_if = isinstance(target, ir.IFNeuron)
        shape = tuple(target.shape)
        if is_if:
            theta = np.asarray(target.threshold, np.float64).reshape(-1)  # type: ignore[attr-defined]
            if np.any(theta <= 0):
                raise ToolchainError(f"layer {target.name!r}: thresholds must be positive")
        else:
            theta = np.ones(1)
        synapses = []
        for term in population.terms:
            in_shape = tuple(graph.input_shape) if term.source is None else tuple(graph.node(term.source).shape)
            synapses.append(_lower_term(term, in_shape, max_dense_weights, target.name))
        synapses = _merge_synapses(synapses)
        normalised = [_normalise(syn, in_theta[syn.source], theta, shape) for syn in synapses]
        raised = np.ones(1)
        if is_if and max_row_ratio:
            normalised, theta, raised = _balance_rows(normalised, theta, shape, max_row_ratio)
        # Rows left beyond the 8-bit bound (by the looser one that residual synapses allow) leave the
        # other channels a few bits: their residual synapses are what the looser bound relies on.
        unbalanced = bool(is_if and row_raise(_row_peaks(normalised, shape[0]), MAX_ROW_RATIO).max() > 1.0)
        lowered = synapses
        # A long -T needs membrane headroom: each bit less of threshold doubles the steps
        # proven free of overflow (weights, bias and v0 shrink with it; the mantissas do not).
        for bits in range(threshold_bits, 0, -1):
            mantissas, main_exps, big_theta = _quantize_synapses(normalised, bits, qmax, MAX_WIDE_PARTS)
            coarse = [
                residual_weights == "on"
                or (
                    residual_weights == "auto"
                    and (
                        unbalanced
                        or 2.0**e > RESIDUAL_STEP * big_theta
                        or _worst_row_error(w, big_theta, [(q, e) for q in parts]) > row_error_bound
                    )
                )
                for w, parts, e in zip(normalised, mantissas, main_exps, strict=True)
            ]
            residuals = _residual_mantissas(normalised, mantissas, main_exps, big_theta, qmax, coarse)
            synapses, qs, weight_exps, dequant = _one_synapse_per_mantissa(lowered, mantissas, main_exps, residuals, big_theta)

            # bias: the float graph (biases, shifts, the input offset) with its sources at their base values
            beta = _base_value(graph, population, base_input).reshape(shape)
            theta_full = per_channel(theta, shape)
            bias_float = beta / theta_full * big_theta
            floors = sum(e < 0 for e in weight_exps)
            if floors:  # these synapses floor (arithmetic shift): compensate their mean error of -1/2 unit each
                bias_float = bias_float + 0.5 * floors
            bias_mant, bias_exp = _quantize_bias(bias_float, target.name)
            if is_if:
                v0 = per_channel(target.v0, shape) * per_channel(raised, shape)  # type: ignore[attr-defined]
                v0_float = v0 / theta_full * big_theta
            else:
                v0_float = np.zeros(shape)
            if np.abs(v0_float).max(initial=0) > V_MAX - big_theta:
                raise ToolchainError(f"layer {target.name!r}: initial potential does not fit the 24-bit membrane")
            v0 = np.round(v0_float).astype(np.int32)

            bias_eff = (bias_mant.astype(np.float64) * 2.0**bias_exp) / big_theta
            layer = FixedLayer(
                name=target.name,
                kind="if" if is_if else "readout",
                shape=shape,
                synapses=[
                    FixedSynapse(
                        source=syn.source,
                        kind=syn.synapse,
                        in_shape=syn.in_shape,
                        weight=q,
                        weight_exp=e,
                        pool=syn.pool,
                        stride=syn.stride,
                        padding=syn.padding,
                        dilation=syn.dilation,
                        groups=syn.groups,
                        nodes=list(syn.nodes),
                    )
                    for syn, q, e in zip(synapses, qs, weight_exps, strict=True)
                ],
                bias_mant=bias_mant,
                bias_exp=bias_exp,
                threshold=big_theta if is_if else 0,
                v0=v0,
                scale=channel_scalar_or_vector(theta / big_theta),
                nodes=[n.name for n in population.nodes],
            )
            layer.stats = {
                "weights": int(sum(q.size for q in qs)),
                "weight_rel_l2": round(_rel_l2(dequant, np.concatenate([w.reshape(-1) for w in normalised])), 6),
                "weight_row_rel_max": round(
                    max(
                        (
                            _worst_row_error(w, big_theta, [(q, e) for q in parts] + ([residual] if residual else []))
                            for w, parts, e, residual in zip(normalised, mantissas, main_exps, residuals, strict=True)
                        ),
                        default=0.0,
                    ),
                    6,
                ),
                "bias_max_err": round(float(np.abs(bias_eff - bias_float / big_theta).max(initial=0)), 6),
                "v0_max_err": round(float(np.abs(v0 / big_theta - v0_float / big_theta).max(initial=0)), 6),
                "safe_steps": _safe_steps(layer, input_max),
            }
            if any(r is not None for r in residuals):
                layer.stats["residual_synapses"] = sum(r is not None for r in residuals)
            if any(len(parts) > 1 for parts in mantissas):
                layer.stats["wide_synapses"] = sum(len(parts) - 1 for parts in mantissas)
            if raised.max() > 1:
                layer.stats["raised_channels"] = int((raised > 1).sum())
                layer.stats["max_raise"] = round(float(raised.max()), 3)
            if steps is None or layer.stats["safe_steps"] >= steps or bits == 1:
                break
        if bits < threshold_bits:
            layer.stats["threshold_bits"] = bits
        if layer.stats["weight_row_rel_max"] > row_error_bound:
            log.warning(
                "layer %s: its fixed-point weights hold some output channel with %.0f %% error (%s); its "
                "fixed-point SNN may fall short of the float one: compare them with %s",
                target.name,
                100 * layer.stats["weight_row_rel_max"],
                "residual synapses are off" if residual_weights == "off" else "even with a residual synapse",
                option("validate"),
            )
        layers.append(layer)
        if is_if:
            in_theta[target.name] = theta
    fixed = FixedGraph(
        input_name=graph.input_name,
        input_shape=tuple(graph.input_shape),
        input_bits=input_bits,
        input_offset=channel_scalar_or_vector(lo),
        input_step=channel_scalar_or_vector(step),
        layers=layers,
        output=graph.output,
        meta={
            "threshold_bits": threshold_bits,
            "weight_bits": weight_bits,
            "source": graph.meta.get("source", ""),
        },
    )
    return fixed


def _normalise(syn: _Synapse, src_theta: np.ndarray, theta: np.ndarray, shape: Shape) -> np.ndarray:
    """The synapse's weights in threshold units: source spikes carry theta_src, the target membrane
    is divided by its theta."""
    pooled = _pool_shape(syn.in_shape, syn.pool)
    if syn.synapse == "conv":
        c_out, c_in_group = syn.weight.shape[:2]
        src = np.broadcast_to(np.asarray(src_theta, np.float64).reshape(-1), (pooled[0],))
        in_channel = (np.arange(c_out)[:, None] // (c_out // syn.groups)) * c_in_group + np.arange(c_in_group)[None]
        dst = np.broadcast_to(theta, (c_out,))
        return syn.weight * (src[in_channel] / dst[:, None])[:, :, None, None]
    src = per_channel(src_theta, pooled).reshape(-1)
    dst = per_channel(theta, shape).reshape(-1)
    return syn.weight * src[None, :] / dst[:, None]


def _safe_steps(layer: FixedLayer, input_max: int) -> int:
    """Steps guaranteed free of membrane overflow for any input (a conservative bound)."""
    up = np.zeros(layer.shape)
    down = np.zeros(layer.shape)
    for syn in layer.synapses:
        pos, neg = synapse_range(syn, layer.shape, input_max if syn.source is None else 1)
        shift = 2.0**syn.weight_exp
        up = up + pos * shift
        down = down + neg * shift
    bias = layer.bias().astype(np.float64).reshape(layer.shape)
    up = float((up + bias).max())
    down = float((down - bias).max())
    v0 = float(np.abs(layer.v0).max(initial=0))
    if layer.kind == "if":
        headroom = V_MAX - v0 - layer.threshold - max(up, 0)
        growth = max(up - layer.threshold, down, 0)
    else:
        headroom = V_MAX - v0
        growth = max(up, down, 0)
    if headroom <= 0:
        return 0
    return int(min(headroom // growth, 2**31 - 1)) if growth > 0 else 2**31 - 1
