"""Float SNN IR -> Loihi-style fixed-point IR (`FixedGraph`).

The fixed-point network is a chain (or tree) of *layers*. A layer is one neuron
population (an `IFNeuron` of the SNN graph, or the final `Readout`) together with
the one synapse that feeds it from its *source* (another population, or the
network input). Everything between two populations in the float graph (average
pooling, flatten, linear/conv maps, affine maps, consecutive linear maps) is
folded into that one synapse.

Scheme
------
* **Thresholds.** Dividing a population's membrane by its (per-channel) float
  threshold theta_c makes every threshold 1; the incoming weights are scaled by
  1/theta_c and, because a spike of the source carries theta_src, by theta_src of
  the input channel. The normalised weights `W'` are then scaled by one integer
  threshold `threshold` (Theta) per population: `W' * Theta ~= q * 2**weight_exp`
  with signed mantissas `q` in [-127, 127] (8 bits; -128 is not used so that
  Lava's sign-mode clipping of `2*q` is exact for every sign mode). `weight_exp`
  is chosen so that Theta lands in [2**threshold_bits, 2**(threshold_bits+1)).
  One weight scale per population leaves a channel with a tiny float threshold
  (huge normalised weights) starving the others of bits, so channels whose
  largest normalised weight exceeds `max_row_ratio` times the median channel's
  get their threshold and v0 raised to fit (the next layer compensates exactly;
  reported as `raised_channels` in the layer stats).
* **Synapse arithmetic** (per step, integers): `a = sum(q * s)`, then
  `a << weight_exp` (or an arithmetic right shift, i.e. floor, when the exponent
  is negative; the bias then gets +1/2 unit to cancel the floor's mean error).
  An optional non-overlapping *sum*-pooling (`pool`, kernel ==
  stride) is applied to the source first; its 1/k^2 is folded into `q`.
  Convolutions use PyTorch's layout and correlation; `padding` is
  (top, left, bottom, right).
* **Neurons** (24-bit membrane, one threshold per population):
  `v += a + (bias_mant << bias_exp)`; saturate v to +-(2**23 - 1), counting every
  saturation as an overflow; `s = v >= threshold`; `v -= s * threshold`.
  `bias_mant` is 13-bit signed per neuron, `bias_exp` in [0, 7] per population,
  `v0` an integer per neuron (from the IR's v0, e.g. theta/2).
* **Readout**: the same with no threshold: `acc += a + bias`, saturated at 24
  bits; its float value is `acc * scale`.
* **Input: graded spikes.** The analog, preprocessed input x enters as an
  unsigned `input_bits`-bit graded spike per pixel at every step:
  `x_u = clip(round((x - input_offset_c) / input_step_c), 0, 2**input_bits - 1)`
  per channel (see `encode_input`). The offset's contribution
  `W @ input_offset` is folded into the first layer's bias, so the first
  synapse sees only non-negative payloads. With the default range (raw uint8
  pixels through the graph's `Preprocess`) `x_u` is exactly the raw pixel value.
* **Delays.** Every connection adds one time step (Lava semantics), so layer l
  at depth d_l (its number of connections from the input) sees at step t the
  input of step t - d_l. The float semantics are reproduced exactly by resetting
  each population to v0 at its own depth; `FixedGraph.depth` gives d_l. The
  emulator works in this *logical* time (step k of every layer belongs to input
  step k), so its readout at step T-1 has integrated exactly T steps of input;
  the Lava runner reads layer l at its steps d_l .. d_l + T - 1.
* **Folding.** Between two populations: affines (per channel), at most one
  leading non-overlapping average pool (kept as the sum-pool), then one conv
  ("conv" synapse); any other linear chain (flatten, linear maps, overlapping or
  padded pools, several convs) is probed into a "dense" matrix (up to
  `max_dense_weights` entries). Biases, affine shifts and the input offset are
  probed into a per-neuron bias.

Overflow of the 24-bit membrane is never silent: the quantiser refuses values
that cannot fit (bias, v0, threshold), reports per layer a conservative number
of steps that is guaranteed overflow-free (`safe_steps`), and the emulator and
the Lava models count saturations (the emulator raises by default).

Saved next to the float artifact as `fixed_graph.json` + `fixed_tensors.npz`
(numpy only). Unsupported structures (residual `Add`, `Concat`, spiking
`MaxPool2d`) raise `ToolchainError` naming the node.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolchain import ir
from toolchain.errors import ToolchainError
from toolchain.fileio import atomic_directory, pack_document, read_document

FIXED_SCHEMA_VERSION = 1
FIXED_GRAPH_FILE = "fixed_graph.json"
FIXED_TENSORS_FILE = "fixed_tensors.npz"

V_BITS = 24
V_MAX = 2 ** (V_BITS - 1) - 1  # membrane saturates at +-V_MAX (as Lava's LIF clips v)
BIAS_MANT_MAX = 2**12 - 1  # 13-bit signed mantissa
BIAS_EXP_MAX = 7  # 3-bit exponent
WEIGHT_EXP_RANGE = (-8, 7)

Shape = tuple[int, ...]


@dataclass
class FixedLayer:
    """One population and the synapse that feeds it."""

    name: str  # the IF (or Readout) node of the SNN graph
    kind: str  # "if" | "readout"
    source: str | None  # the source layer's name; None for the network input
    synapse: str  # "conv" | "dense"
    in_shape: Shape  # shape of the source population (before `pool`)
    shape: Shape  # shape of this population
    weight: np.ndarray  # int8 mantissas: conv (C_out, C_in/groups, kh, kw), dense (out, in after pool+flatten)
    weight_exp: int
    bias_mant: np.ndarray  # int16, per neuron (shape)
    bias_exp: int
    threshold: int  # IF: the integer threshold; readout: 0
    v0: np.ndarray  # int32, per neuron (shape)
    scale: np.ndarray  # float64 value of one membrane unit (per channel or scalar): theta_c / threshold
    pool: tuple[int, int] = (1, 1)  # non-overlapping sum-pool applied to the source first
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    nodes: list[str] = field(default_factory=list)  # float IR nodes folded into this layer
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def pooled_shape(self) -> Shape:
        if self.pool == (1, 1):
            return tuple(self.in_shape)
        c, h, w = self.in_shape
        return (c, h // self.pool[0], w // self.pool[1])

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    def bias(self) -> np.ndarray:
        """The per-neuron bias as one int64 array: bias_mant << bias_exp."""
        return self.bias_mant.astype(np.int64) << self.bias_exp


@dataclass
class FixedGraph:
    input_name: str
    input_shape: Shape
    input_bits: int
    input_offset: np.ndarray  # float64, per channel (or scalar)
    input_step: np.ndarray  # float64, per channel (or scalar)
    layers: list[FixedLayer]
    output: str  # the readout layer's name
    v_bits: int = V_BITS
    meta: dict[str, Any] = field(default_factory=dict)

    def layer(self, name: str) -> FixedLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def depth(self) -> dict[str, int]:
        """Number of connections (each one step of delay in Lava) from the input to each layer."""
        depth: dict[str, int] = {}
        for layer in self.layers:
            depth[layer.name] = 1 + (0 if layer.source is None else depth[layer.source])
        return depth

    @property
    def if_layers(self) -> list[FixedLayer]:
        return [layer for layer in self.layers if layer.kind == "if"]

    def report(self) -> list[dict[str, Any]]:
        """Per-layer summary for the build log."""
        return [
            {
                "layer": layer.name,
                "kind": layer.kind,
                "synapse": layer.synapse + ("+sumpool" if layer.pool != (1, 1) else ""),
                "nodes": list(layer.nodes),
                "threshold": layer.threshold,
                "weight_exp": layer.weight_exp,
                "bias_exp": layer.bias_exp,
                **layer.stats,
            }
            for layer in self.layers
        ]


# ----------------------------------------------------------------- helpers


def _per_channel(values: np.ndarray | float, shape: Shape) -> np.ndarray:
    """A scalar or per-channel vector broadcast to a population shape (channels first)."""
    values = np.asarray(values, np.float64).reshape(-1)
    if values.size == 1:
        return np.full(shape, values[0])
    if values.size != shape[0]:
        raise ToolchainError(f"{values.size} per-channel values for a population of shape {shape}")
    return np.broadcast_to(values.reshape((-1,) + (1,) * (len(shape) - 1)), shape).astype(np.float64)


def _channel_scalar_or_vector(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float64).reshape(-1)
    return values[:1] if np.all(values == values[0]) else values


def _pool_shape(shape: Shape, pool: tuple[int, int]) -> Shape:
    if pool == (1, 1):
        return tuple(shape)
    c, h, w = shape
    return (c, h // pool[0], w // pool[1])


def _fail_unsupported(node: ir.Node) -> None:
    if isinstance(node, ir.MaxPool2d):
        raise ToolchainError(
            f"node {node.name!r} is a spiking max-pool, which Loihi synapses cannot express; "
            "rebuild with `--maxpool avg` (average pooling) for the loihi/lava targets"
        )
    if isinstance(node, ir.Add):
        raise ToolchainError(
            f"node {node.name!r} is a residual Add; the loihi/lava targets support only feed-forward chains "
            "(conv/linear/avgpool/flatten between neuron layers); use a model without residual connections "
            "or the torch target"
        )
    if isinstance(node, ir.Concat):
        raise ToolchainError(
            f"node {node.name!r} concatenates branches; the loihi/lava targets support only feed-forward chains; "
            "use the torch target for this model"
        )
    if isinstance(node, ir.Relu):
        raise ToolchainError(f"node {node.name!r} is a ReLU: quantize a converted SNN graph, not the ANN")


@dataclass
class _Chain:
    target: ir.Node
    source: str | None  # IF node name or None (network input)
    nodes: list[ir.Node]


def _chains(graph: ir.Graph) -> list[_Chain]:
    """For every population node, the linear ops between it and its source population."""
    by_name = {n.name: n for n in graph.nodes}
    for n in graph.nodes:
        _fail_unsupported(n)
    readouts = [n for n in graph.nodes if isinstance(n, ir.Readout)]
    if len(readouts) != 1 or readouts[0].name != graph.output:
        raise ToolchainError("the SNN graph must end in exactly one Readout node (its output); convert it first")
    chains: list[_Chain] = []
    used: dict[str, str] = {}
    for node in graph.nodes:
        if not isinstance(node, (ir.IFNeuron, ir.Readout)):
            continue
        if len(node.inputs) != 1:
            raise ToolchainError(f"node {node.name!r} has {len(node.inputs)} inputs; expected one")
        nodes: list[ir.Node] = []
        current = node.inputs[0]
        while current != graph.input_name and not isinstance(by_name[current], ir.IFNeuron):
            op = by_name[current]
            if not isinstance(op, (ir.Conv2d, ir.Linear, ir.AvgPool2d, ir.Flatten, ir.Affine)):
                raise ToolchainError(
                    f"node {op.name!r} ({op.op}) cannot be lowered to a Loihi synapse; "
                    "only conv2d, linear, avgpool2d, flatten and affine may sit between neuron layers"
                )
            if len(op.inputs) != 1:
                raise ToolchainError(f"node {op.name!r} has {len(op.inputs)} inputs; the loihi/lava targets need chains")
            if current in used:
                raise ToolchainError(
                    f"node {op.name!r} feeds both {used[current]!r} and {node.name!r}; the loihi/lava targets "
                    "need each synapse op to feed one neuron layer"
                )
            used[current] = node.name
            nodes.append(op)
            current = op.inputs[0]
        nodes.reverse()
        chains.append(_Chain(node, None if current == graph.input_name else current, nodes))
    return chains


# ------------------------------------------------------ float chain (torch, lazily)


def _apply_chain(nodes: list[ir.Node], x: Any, linear_only: bool) -> Any:
    """Apply the float ops of a chain to a float64 torch batch (N, *shape).

    `linear_only` drops biases and affine shifts (the chain's linear part)."""
    import torch
    import torch.nn.functional as F

    def t(array: np.ndarray | None) -> Any:
        return None if array is None else torch.as_tensor(np.asarray(array, np.float64))

    def pad(y: Any, padding: tuple[int, ...], value: float = 0.0) -> Any:
        top, left, bottom, right = padding
        return F.pad(y, (left, right, top, bottom), value=value)

    def view(values: np.ndarray, ndim: int) -> Any:
        v = t(values)
        return v.reshape(()) if v.numel() == 1 else v.reshape((1, -1) + (1,) * (ndim - 2))

    for n in nodes:
        if isinstance(n, ir.Conv2d):
            bias = None if linear_only else t(n.bias)
            x = F.conv2d(pad(x, n.padding), t(n.weight), bias, n.stride, 0, n.dilation, n.groups)
        elif isinstance(n, ir.Linear):
            x = F.linear(x, t(n.weight), None if linear_only else t(n.bias))
        elif isinstance(n, ir.AvgPool2d):
            y = F.avg_pool2d(pad(x, n.padding), n.kernel, n.stride, 0, count_include_pad=True)
            if not n.uniform_divisor:
                area = n.kernel[0] * n.kernel[1]
                y = y * (area / torch.as_tensor(n.cell_counts(*x.shape[-2:]), dtype=y.dtype, device=y.device))
            x = y
        elif isinstance(n, ir.Flatten):
            x = x.flatten(1)
        elif isinstance(n, ir.Affine):
            x = x * view(n.scale, x.ndim)
            if not linear_only:
                x = x + view(n.shift, x.ndim)
        else:  # pragma: no cover - _chains filters
            raise ToolchainError(f"node {n.name!r}: unexpected op {n.op}")
    return x


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


def _chain_out_shape(nodes: list[ir.Node], in_shape: Shape) -> Shape:
    return tuple(nodes[-1].shape) if nodes else tuple(in_shape)


@dataclass
class _Synapse:
    synapse: str
    weight: np.ndarray  # float64, normalised later
    pool: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


def _split_pool(nodes: list[ir.Node], in_shape: Shape) -> tuple[tuple[int, int], list[ir.Node]]:
    """Take a leading non-overlapping average pool (after any affines) out of the chain as a sum-pool.

    Per-channel affines commute with pooling, so they may sit before it. Returns the pool
    kernel and the rest of the chain (to be applied to the *averaged* pooled input)."""
    for index, n in enumerate(nodes):
        if isinstance(n, ir.Affine):
            continue
        if isinstance(n, ir.AvgPool2d) and len(in_shape) == 3 and tuple(n.kernel) == tuple(n.stride) and not any(n.padding):
            return tuple(n.kernel), nodes[:index] + nodes[index + 1 :]  # type: ignore[return-value]
        break
    return (1, 1), nodes


def _lower_chain(chain: _Chain, in_shape: Shape, max_entries: int) -> _Synapse:
    """The chain's linear part as a conv or dense synapse acting on the sum-pooled source."""
    pool, rest = _split_pool(chain.nodes, in_shape)
    pooled = _pool_shape(in_shape, pool)
    area = pool[0] * pool[1]
    mains = [n for n in rest if not isinstance(n, ir.Affine)]
    if len(pooled) == 3 and len(mains) <= 1 and (not mains or isinstance(mains[0], ir.Conv2d)):
        channels = pooled[0]
        if mains:
            conv: ir.Conv2d = mains[0]  # type: ignore[assignment]
            weight = np.asarray(conv.weight, np.float64).copy()
            stride, padding, dilation, groups = tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups
        else:  # pooling or affine only: a 1x1 depthwise "conv"
            weight = np.ones((channels, 1, 1, 1))
            stride, padding, dilation, groups = (1, 1), (0, 0, 0, 0), (1, 1), channels
        c_out, c_in_group = weight.shape[:2]
        main_index = rest.index(mains[0]) if mains else len(rest)
        for n in rest[:main_index]:  # per-input-channel scale
            scale = np.broadcast_to(np.asarray(n.scale, np.float64).reshape(-1), (channels,))  # type: ignore[attr-defined]
            in_channel = (np.arange(c_out)[:, None] // (c_out // groups)) * c_in_group + np.arange(c_in_group)[None]
            weight *= scale[in_channel][:, :, None, None]
        for n in rest[main_index + 1 :]:  # per-output-channel scale
            scale = np.broadcast_to(np.asarray(n.scale, np.float64).reshape(-1), (c_out,))  # type: ignore[attr-defined]
            weight *= scale[:, None, None, None]
        return _Synapse("conv", weight / area, pool, stride, padding, dilation, groups)  # type: ignore[arg-type]
    matrix = _dense_matrix(rest, pooled, max_entries, chain.target.name)
    return _Synapse("dense", matrix / area, pool)


def _balance_rows(
    normalised: np.ndarray, theta: np.ndarray, shape: Shape, ratio: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raise the thresholds of channels whose normalised weights dwarf the median channel's.

    Returns the rescaled weights, the new per-channel (or scalar) thresholds and the factors."""
    channels = shape[0]
    rows = np.abs(normalised).reshape(normalised.shape[0], -1).max(1)
    peaks = rows.reshape(channels, -1).max(1)  # conv: rows are channels; dense: rows are neurons
    active = peaks[peaks > 0]
    if active.size == 0:
        return normalised, theta, np.ones(1)
    cap = float(np.median(active)) * ratio
    factor = np.maximum(1.0, peaks / cap)
    if factor.max() <= 1.0:
        return normalised, theta, np.ones(1)
    per_row = np.repeat(factor, normalised.shape[0] // channels)
    normalised = normalised / per_row.reshape((-1,) + (1,) * (normalised.ndim - 1))
    return normalised, np.broadcast_to(theta, (channels,)) * factor, factor


def _quantize_weights(normalised: np.ndarray, threshold_bits: int, qmax: int) -> tuple[np.ndarray, int, int]:
    """W' (threshold units) -> (q, weight_exp, Theta) with W' * Theta ~= q * 2**weight_exp."""
    peak = float(np.abs(normalised).max()) if normalised.size else 0.0
    if peak == 0.0:
        return np.zeros(normalised.shape, np.int8), 0, 2**threshold_bits
    exp = math.ceil(math.log2(2**threshold_bits * peak / qmax))
    exp = min(max(exp, WEIGHT_EXP_RANGE[0]), WEIGHT_EXP_RANGE[1])
    theta = math.floor(qmax * 2.0**exp / peak)
    theta = max(1, min(theta, 2 ** (V_BITS - 2)))
    q = np.clip(np.round(normalised * theta / 2.0**exp), -qmax, qmax).astype(np.int8)
    return q, exp, theta


def _quantize_bias(bias_int: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    peak = float(np.abs(bias_int).max()) if bias_int.size else 0.0
    exp = 0 if peak <= BIAS_MANT_MAX else math.ceil(math.log2(peak / BIAS_MANT_MAX))
    if exp > BIAS_EXP_MAX:
        raise ToolchainError(
            f"layer {name!r}: bias of {peak:.0f} membrane units per step does not fit a 13-bit mantissa with "
            f"exponent <= {BIAS_EXP_MAX}; lower threshold_bits (quantize()) or check this layer's thresholds (--threshold)"
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
    max_row_ratio: float | None = 8.0,
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
      those channels' ceilings. None or 0 disables it (pure folding).
    """
    if not 2 <= weight_bits <= 8:
        raise ToolchainError(f"weight_bits={weight_bits}: Loihi weights have 2 to 8 bits")
    if not 1 <= input_bits <= 16:
        raise ToolchainError(f"input_bits={input_bits}: choose 1 to 16 bits of graded input")
    if not 1 <= threshold_bits <= V_BITS - 4:
        raise ToolchainError(f"threshold_bits={threshold_bits}: choose 1 to {V_BITS - 4}")
    if not graph.is_snn:
        raise ToolchainError("the graph has no IF neurons: quantize a converted SNN graph")
    import torch

    qmax = 2 ** (weight_bits - 1) - 1
    chains = _chains(graph)  # refuses unsupported structures first
    lo, hi = _input_range(graph, input_range, calibration)
    input_max = 2**input_bits - 1
    step = (hi - lo) / input_max
    in_theta = {None: step}  # float value of one unit of each source's output, per channel

    layers: list[FixedLayer] = []
    for chain in chains:
        target = chain.target
        is_if = isinstance(target, ir.IFNeuron)
        in_shape = tuple(graph.input_shape) if chain.source is None else tuple(graph.node(chain.source).shape)
        shape = tuple(target.shape)
        src_theta = in_theta[chain.source]
        if is_if:
            theta = np.asarray(target.threshold, np.float64).reshape(-1)  # type: ignore[attr-defined]
            if np.any(theta <= 0):
                raise ToolchainError(f"layer {target.name!r}: thresholds must be positive")
        else:
            theta = np.ones(1)
        syn = _lower_chain(chain, in_shape, max_dense_weights)
        pooled = _pool_shape(in_shape, syn.pool)

        # normalise: source spikes carry theta_src; the target membrane is divided by theta
        if syn.synapse == "conv":
            c_out, c_in_group = syn.weight.shape[:2]
            src = np.broadcast_to(np.asarray(src_theta, np.float64).reshape(-1), (pooled[0],))
            in_channel = (np.arange(c_out)[:, None] // (c_out // syn.groups)) * c_in_group + np.arange(c_in_group)[None]
            dst = np.broadcast_to(theta, (c_out,))
            normalised = syn.weight * (src[in_channel] / dst[:, None])[:, :, None, None]
        else:
            src = _per_channel(src_theta, pooled).reshape(-1)
            dst = _per_channel(theta, shape).reshape(-1)
            normalised = syn.weight * src[None, :] / dst[:, None]
        raised = np.ones(1)
        if is_if and max_row_ratio:
            normalised, theta, raised = _balance_rows(normalised, theta, shape, max_row_ratio)
        q, weight_exp, big_theta = _quantize_weights(normalised, threshold_bits, qmax)

        # bias: the full chain (biases, shifts, the input offset) applied to the base input
        base = _per_channel(lo, in_shape) if chain.source is None else np.zeros(in_shape)
        with torch.inference_mode():
            beta = _apply_chain(chain.nodes, torch.as_tensor(base[None]), False)[0].numpy().reshape(shape)
        theta_full = _per_channel(theta, shape)
        bias_float = beta / theta_full * big_theta
        if weight_exp < 0:  # the synapse floors (arithmetic shift): compensate its mean error of -1/2 unit
            bias_float = bias_float + 0.5
        bias_mant, bias_exp = _quantize_bias(bias_float, target.name)
        if is_if:
            v0 = _per_channel(target.v0, shape) * _per_channel(raised, shape)  # type: ignore[attr-defined]
            v0_float = v0 / theta_full * big_theta
        else:
            v0_float = np.zeros(shape)
        if np.abs(v0_float).max(initial=0) > V_MAX - big_theta:
            raise ToolchainError(f"layer {target.name!r}: initial potential does not fit the 24-bit membrane")
        v0 = np.round(v0_float).astype(np.int32)

        dequant = q.astype(np.float64) * 2.0**weight_exp / big_theta
        bias_eff = (bias_mant.astype(np.float64) * 2.0**bias_exp) / big_theta
        layer = FixedLayer(
            name=target.name,
            kind="if" if is_if else "readout",
            source=chain.source,
            synapse=syn.synapse,
            in_shape=in_shape,
            shape=shape,
            weight=q,
            weight_exp=weight_exp,
            bias_mant=bias_mant,
            bias_exp=bias_exp,
            threshold=big_theta if is_if else 0,
            v0=v0,
            scale=_channel_scalar_or_vector(theta / big_theta),
            pool=syn.pool,
            stride=syn.stride,
            padding=syn.padding,
            dilation=syn.dilation,
            groups=syn.groups,
            nodes=[n.name for n in chain.nodes],
        )
        layer.stats = {
            "weights": int(q.size),
            "weight_rel_l2": round(_rel_l2(dequant, normalised), 6),
            "bias_max_err": round(float(np.abs(bias_eff - bias_float / big_theta).max(initial=0)), 6),
            "v0_max_err": round(float(np.abs(v0 / big_theta - v0_float / big_theta).max(initial=0)), 6),
            "safe_steps": _safe_steps(layer, input_max if chain.source is None else 1),
        }
        if raised.max() > 1:
            layer.stats["raised_channels"] = int((raised > 1).sum())
            layer.stats["max_raise"] = round(float(raised.max()), 3)
        layers.append(layer)
        if is_if:
            in_theta[target.name] = theta
    fixed = FixedGraph(
        input_name=graph.input_name,
        input_shape=tuple(graph.input_shape),
        input_bits=input_bits,
        input_offset=_channel_scalar_or_vector(lo),
        input_step=_channel_scalar_or_vector(step),
        layers=layers,
        output=graph.output,
        meta={
            "threshold_bits": threshold_bits,
            "weight_bits": weight_bits,
            "source": graph.meta.get("source", ""),
        },
    )
    return fixed


def _safe_steps(layer: FixedLayer, payload_max: int) -> int:
    """Steps guaranteed free of membrane overflow for any input (a conservative bound)."""
    q = layer.weight.astype(np.int64)
    area = layer.pool[0] * layer.pool[1]
    axes = tuple(range(1, q.ndim))
    pos = np.clip(q, 0, None).sum(axis=axes) * payload_max * area
    neg = np.clip(-q, 0, None).sum(axis=axes) * payload_max * area
    shift = 2.0**layer.weight_exp
    c = layer.shape[0]
    bias = layer.bias().astype(np.float64).reshape(c, -1) if layer.synapse == "conv" else layer.bias().reshape(-1, 1)
    up = (pos.reshape(-1, 1) * shift + bias).max()
    down = (neg.reshape(-1, 1) * shift - bias).max()
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


# ------------------------------------------------------------ input encoding


def encode_input(fixed: FixedGraph, x: np.ndarray) -> np.ndarray:
    """Preprocessed float input (B, *input_shape) -> unsigned graded spikes, int32."""
    x = np.asarray(x, np.float64)
    if tuple(x.shape[1:]) != tuple(fixed.input_shape):
        raise ToolchainError(f"input of shape {x.shape[1:]}, the network expects {fixed.input_shape}")
    offset = _per_channel(fixed.input_offset, fixed.input_shape)
    step = _per_channel(fixed.input_step, fixed.input_shape)
    top = 2**fixed.input_bits - 1
    return np.clip(np.round((x - offset) / step), 0, top).astype(np.int32)


# ---------------------------------------------------------------- save / load


def _layer_to_json(index: int, layer: FixedLayer) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for f in dataclasses.fields(layer):
        value = getattr(layer, f.name)
        if isinstance(value, np.ndarray):
            record[f.name] = {"tensor": f"{index}/{f.name}"}
        elif isinstance(value, tuple):
            record[f.name] = list(value)
        else:
            record[f.name] = value
    return record


def fixed_files(fixed: FixedGraph) -> dict[str, bytes]:
    """The two files that store a FixedGraph (for `ir.save_graph(..., extra_files=...)`)."""
    tensors: dict[str, np.ndarray] = {"input_offset": fixed.input_offset, "input_step": fixed.input_step}
    for index, layer in enumerate(fixed.layers):
        for f in dataclasses.fields(layer):
            value = getattr(layer, f.name)
            if isinstance(value, np.ndarray):
                tensors[f"{index}/{f.name}"] = value
    document = {
        "schema_version": FIXED_SCHEMA_VERSION,
        "input_name": fixed.input_name,
        "input_shape": list(fixed.input_shape),
        "input_bits": fixed.input_bits,
        "output": fixed.output,
        "v_bits": fixed.v_bits,
        "meta": fixed.meta,
        "layers": [_layer_to_json(i, layer) for i, layer in enumerate(fixed.layers)],
    }
    return pack_document(document, tensors, FIXED_GRAPH_FILE, FIXED_TENSORS_FILE)


def save_fixed(fixed: FixedGraph, directory: str | Path) -> Path:
    """Write a FixedGraph into its own directory (atomically)."""

    return atomic_directory(Path(directory), fixed_files(fixed), FIXED_GRAPH_FILE)


def has_fixed(directory: str | Path) -> bool:
    return (Path(directory) / FIXED_GRAPH_FILE).is_file()


def load_fixed(directory: str | Path) -> FixedGraph:
    """Read a FixedGraph from a directory holding `fixed_graph.json` (a build artifact or `save_fixed`)."""
    document, tensors = read_document(
        Path(directory), FIXED_GRAPH_FILE, FIXED_TENSORS_FILE, FIXED_SCHEMA_VERSION,
        "no fixed-point network; build with --target loihi or lava",
    )
    from toolchain.schema import check_fixed_document

    return check_fixed_document(Path(directory) / FIXED_GRAPH_FILE, document, tensors)  # types, shapes, ranges


def as_fixed(graph: ir.Graph | FixedGraph, preset: FixedGraph | None, options: dict[str, Any]) -> FixedGraph:
    """What a fixed-point target runs: the graph itself if already fixed point, else a
    network quantised at build time (`preset`), else `graph` quantised now with `options`."""
    if isinstance(graph, FixedGraph):
        return graph
    if preset is not None:
        return preset
    return quantize(graph, **options)
