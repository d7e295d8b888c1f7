"""The fixed-point IR: what a Loihi-style chip runs, and its files.

The fixed-point network is a directed acyclic graph of *layers*. A layer is one
neuron population (an `IFNeuron` of the SNN graph, or the final `Readout`) together
with the synapses that feed it, each from one *source* (another population, or the
network input); its dendritic input is their sum. Residual Adds, channel Concats,
grouped convolutions and per-channel affines between populations are folded into
these synapses. `toolchain.passes.quantize` builds it from the float SNN; the
fixed-point backends (`targets/loihi`, `targets/lava`) run it and import only this
module for its types, so the IR lives here and not in the pass that makes it.

Arithmetic (every fixed-point backend implements exactly this)
----------------------------------------------------------------
* **Synapse** (per step, integers): `a_k = sum(q * s)`, then
  `a_k << weight_exp` (or an arithmetic right shift, i.e. floor, when the exponent
  is negative), each synapse k with its own mantissas and exponent; `a = sum_k a_k`.
  An optional non-overlapping *sum*-pooling (`pool`, kernel == stride) is applied to
  the synapse's source first. Convolutions use PyTorch's layout and
  correlation; `padding` is (top, left, bottom, right).
* **Neurons** (24-bit membrane, one threshold per population):
  `v += a + (bias_mant << bias_exp)`; saturate v to +-(2**23 - 1), counting every
  saturation as an overflow; `s = v >= threshold`; `v -= s * threshold`.
  `bias_mant` is 13-bit signed per neuron, `bias_exp` in [0, 7] per population,
  `v0` an integer per neuron.
* **Readout**: the same with no threshold: `acc += a + bias`, saturated at 24
  bits; its float value is `acc * scale`.
* **Input: graded spikes.** The analog, preprocessed input x enters as an
  unsigned `input_bits`-bit graded spike per pixel at every step:
  `x_u = clip(round((x - input_offset_c) / input_step_c), 0, 2**input_bits - 1)`
  per channel (see `encode_input`).
* **Delays.** Every connection adds one time step (Lava semantics), so layer l
  at depth d_l (connections along the longest path from the input) sees at step t
  the input of step t - d_l; `FixedGraph.depth` gives d_l. A synapse from a source
  at depth d_s gets d_l - 1 - d_s further steps of delay (`FixedGraph.delays`), so
  all of a layer's synapses deliver the same input step together. The emulator works
  in *logical* time (step k of every layer belongs to input step k); the Lava runner
  reads layer l at its steps d_l .. d_l + T - 1.

Overflow of the 24-bit membrane is never silent: backends count saturations and,
under the `raise` policy (`OVERFLOW_POLICIES`), refuse to go on.

Saved next to the float artifact as `fixed_graph.json` + `fixed_tensors.npz`
(numpy only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.core.ir import fields_record, node_arrays
from toolchain.errors import ToolchainError, option
from toolchain.fileio import atomic_directory, pack_document, read_document

FIXED_SCHEMA_VERSION = 2  # 2: a layer holds a list of synapses (issue 12)
FIXED_GRAPH_FILE = "fixed_graph.json"
FIXED_TENSORS_FILE = "fixed_tensors.npz"

V_BITS = 24
V_MAX = 2 ** (V_BITS - 1) - 1  # membrane saturates at +-V_MAX (as Lava's LIF clips v)
BIAS_MANT_MAX = 2**12 - 1  # 13-bit signed mantissa
BIAS_EXP_MAX = 7  # 3-bit exponent
WEIGHT_EXP_RANGE = (-8, 7)

Shape = tuple[int, ...]


@dataclass
class FixedSynapse:
    """One incoming connection of a population: integer weights from one source.

    `source` is another population's name, or None for the network input. The float maps
    between the two (convolutions, linear maps, pooling, flatten, per-channel affines,
    the channel placement of a Concat) are folded into it."""

    source: str | None
    kind: str  # "conv" | "dense"
    in_shape: Shape  # shape of the source population (before `pool`)
    weight: np.ndarray  # int8 mantissas: conv (C_out, C_in/groups, kh, kw), dense (out, in after pool+flatten)
    weight_exp: int
    pool: tuple[int, int] = (1, 1)  # non-overlapping sum-pool applied to the source first
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    nodes: list[str] = field(default_factory=list)  # float IR nodes folded into this synapse

    @property
    def pooled_shape(self) -> Shape:
        if self.pool == (1, 1):
            return tuple(self.in_shape)
        c, h, w = self.in_shape
        return (c, h // self.pool[0], w // self.pool[1])


@dataclass
class FixedLayer:
    """One population and the synapses that feed it (their sum is its dendritic input)."""

    name: str  # the IF (or Readout) node of the SNN graph
    kind: str  # "if" | "readout"
    shape: Shape  # shape of this population
    synapses: list[FixedSynapse]
    bias_mant: np.ndarray  # int16, per neuron (shape)
    bias_exp: int
    threshold: int  # IF: the integer threshold; readout: 0
    v0: np.ndarray  # int32, per neuron (shape)
    scale: np.ndarray  # float64 value of one membrane unit (per channel or scalar): theta_c / threshold
    nodes: list[str] = field(default_factory=list)  # float IR nodes folded into this layer's synapses
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    @property
    def sources(self) -> list[str | None]:
        return [s.source for s in self.synapses]

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
    layers: list[FixedLayer]  # topological order: every synapse's source comes earlier
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
        """Steps from the input to each layer in Lava: one per connection along the longest path
        (shorter paths into a merge are delayed to it, see `delays`)."""
        depth: dict[str | None, int] = {None: 0}
        for layer in self.layers:
            depth[layer.name] = 1 + max(depth[s.source] for s in layer.synapses)
        del depth[None]
        return depth  # type: ignore[return-value]

    def delays(self) -> dict[str, list[int]]:
        """Per layer, per synapse: the steps of delay to add beyond the connection's own one, so that
        every synapse of a layer delivers the same logical step at once."""
        depth: dict[str | None, int] = {None: 0, **self.depth}
        return {
            layer.name: [depth[layer.name] - 1 - depth[s.source] for s in layer.synapses] for layer in self.layers
        }

    @property
    def if_layers(self) -> list[FixedLayer]:
        return [layer for layer in self.layers if layer.kind == "if"]

    def report(self) -> list[dict[str, Any]]:
        """Per-layer summary for the build log. `weight_exp` is the largest exponent of the layer's
        synapses (`weight_exps` lists them where there are several); `delays` the extra steps each
        synapse waits in Lava, where any does."""
        delays = self.delays()
        rows = []
        for layer in self.layers:
            row: dict[str, Any] = {
                "layer": layer.name,
                "kind": layer.kind,
                "synapse": _describe_synapses(layer.synapses),
                "nodes": list(layer.nodes),
                "threshold": layer.threshold,
                "weight_exp": max(s.weight_exp for s in layer.synapses),
                "bias_exp": layer.bias_exp,
            }
            if len(layer.synapses) > 1:
                row["weight_exps"] = [s.weight_exp for s in layer.synapses]
            if any(delays[layer.name]):
                row["delays"] = delays[layer.name]
            rows.append({**row, **layer.stats})
        return rows

    def timing(self) -> dict[str, int]:
        """What aligning the paths costs in Lava: steps from the input to the readout, synapses that
        wait for longer paths, and their steps of delay (DelaySparse buffers; no relay neurons)."""
        delays = [d for per_layer in self.delays().values() for d in per_layer]
        return {
            "depth": max(self.depth.values()),
            "delayed_synapses": sum(d > 0 for d in delays),
            "delay_steps": int(sum(delays)),
            "max_delay": max(delays, default=0),
            "relay_neurons": 0,
        }


def _describe_synapses(synapses: list[FixedSynapse]) -> str:
    """"conv+sumpool" for a chain's one synapse; with several, each names its source."""
    names = [f"{s.kind}{'+sumpool' if s.pool != (1, 1) else ''}" for s in synapses]
    if len(synapses) == 1:
        return names[0]
    return " + ".join(f"{name}({s.source or 'input'})" for name, s in zip(names, synapses, strict=True))


def synapse_range(syn: FixedSynapse, shape: Shape, payload_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron of a population of `shape`: the largest positive and negative sums of q * s one
    synapse can deliver in a step (before its exponent), for payloads of at most `payload_max`."""
    q = syn.weight.astype(np.int64)
    area = syn.pool[0] * syn.pool[1]
    axes = tuple(range(1, q.ndim))
    pos = np.clip(q, 0, None).sum(axis=axes) * payload_max * area
    neg = np.clip(-q, 0, None).sum(axis=axes) * payload_max * area
    if syn.kind == "conv":  # per channel -> per neuron
        view = (-1,) + (1,) * (len(shape) - 1)
        return np.broadcast_to(pos.reshape(view), shape), np.broadcast_to(neg.reshape(view), shape)
    return pos.reshape(shape), neg.reshape(shape)



# What a fixed-point backend does when a membrane leaves the 24 bits: refuse ("raise", naming the
# layer) or saturate and count, as the hardware does. One list for every backend.
OVERFLOW_POLICIES = ("raise", "saturate")


def check_overflow_policy(on_overflow: str) -> None:
    if on_overflow not in OVERFLOW_POLICIES:
        raise ToolchainError(f"on_overflow={on_overflow!r}: choose {' or '.join(OVERFLOW_POLICIES)}")


def overflow_error(layer: str, count: int, where: str) -> ToolchainError:
    """The error a backend raises under the "raise" policy (the advice names options of `quantize` and the targets)."""
    return ToolchainError(
        f"layer {layer!r}: the 24-bit membrane overflowed {count} times{where}; quantise with a smaller "
        "threshold_bits, run fewer steps, or run with on_overflow='saturate'"
    )

# ----------------------------------------------------------------- helpers


def per_channel(values: np.ndarray | float, shape: Shape) -> np.ndarray:
    """A scalar or per-channel vector broadcast to a population shape (channels first)."""
    values = np.asarray(values, np.float64).reshape(-1)
    if values.size == 1:
        return np.full(shape, values[0])
    if values.size != shape[0]:
        raise ToolchainError(f"{values.size} per-channel values for a population of shape {shape}")
    return np.broadcast_to(values.reshape((-1,) + (1,) * (len(shape) - 1)), shape).astype(np.float64)


def channel_scalar_or_vector(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float64).reshape(-1)
    return values[:1] if np.all(values == values[0]) else values


# ------------------------------------------------------------ input encoding


def encode_input(fixed: FixedGraph, x: np.ndarray) -> np.ndarray:
    """Preprocessed float input (B, *input_shape) -> unsigned graded spikes, int32."""
    x = np.asarray(x, np.float64)
    if tuple(x.shape[1:]) != tuple(fixed.input_shape):
        raise ToolchainError(f"input of shape {x.shape[1:]}, the network expects {fixed.input_shape}")
    offset = per_channel(fixed.input_offset, fixed.input_shape)
    step = per_channel(fixed.input_step, fixed.input_shape)
    top = 2**fixed.input_bits - 1
    return np.clip(np.round((x - offset) / step), 0, top).astype(np.int32)


# ---------------------------------------------------------------- save / load


def fixed_files(fixed: FixedGraph) -> dict[str, bytes]:
    """The two files that store a FixedGraph (for `ir.save_graph(..., extra_files=...)`).

    Schema 2: each layer record holds its population's fields and a list `synapses` of
    synapse records (tensors keyed `layer/synapse/field`). Schema 1 had one synapse's fields
    in the layer record itself."""
    tensors: dict[str, np.ndarray] = {"input_offset": fixed.input_offset, "input_step": fixed.input_step}
    layers = []
    for index, layer in enumerate(fixed.layers):
        record = {k: v for k, v in fields_record(layer, str(index)).items() if k != "synapses"}
        tensors.update({f"{index}/{name}": value for name, value in node_arrays(layer).items()})
        record["synapses"] = []
        for k, synapse in enumerate(layer.synapses):
            record["synapses"].append(fields_record(synapse, f"{index}/{k}"))
            tensors.update({f"{index}/{k}/{name}": value for name, value in node_arrays(synapse).items()})
        layers.append(record)
    document = {
        "schema_version": FIXED_SCHEMA_VERSION,
        "input_name": fixed.input_name,
        "input_shape": list(fixed.input_shape),
        "input_bits": fixed.input_bits,
        "output": fixed.output,
        "v_bits": fixed.v_bits,
        "meta": fixed.meta,
        "layers": layers,
    }
    return pack_document(document, tensors, FIXED_GRAPH_FILE, FIXED_TENSORS_FILE)


def save_fixed(fixed: FixedGraph, directory: str | Path) -> Path:
    """Write a FixedGraph into its own directory (atomically)."""

    return atomic_directory(Path(directory), fixed_files(fixed), FIXED_GRAPH_FILE)


def has_fixed(directory: str | Path) -> bool:
    return (Path(directory) / FIXED_GRAPH_FILE).is_file()


def load_fixed(directory: str | Path) -> FixedGraph:
    """Read a FixedGraph from a directory holding `fixed_graph.json` (a build artifact or `save_fixed`)."""
    from toolchain.core.schema import check_fixed_document

    document, tensors = read_document(
        Path(directory), FIXED_GRAPH_FILE, FIXED_TENSORS_FILE, FIXED_SCHEMA_VERSION,
        f"no fixed-point network; build with {option('target', 'loihi or lava')}",
    )
    return check_fixed_document(Path(directory) / FIXED_GRAPH_FILE, document, tensors)  # types, shapes, ranges


# How a driver turns a float SNN into a FixedGraph for a backend (the quantise pass, with its options):
# handed to the fixed-point backends so that they run the pass without importing it.
Lowering = Callable[[Any], "FixedGraph"]


def as_fixed(graph: Any, preset: FixedGraph | None, lower: Lowering | None, target: str) -> FixedGraph:
    """What a fixed-point target runs: the graph itself if already fixed point, else a
    network quantised at build time (`preset`), else `graph` lowered now by `lower`."""
    if isinstance(graph, FixedGraph):
        return graph
    if preset is not None:
        return preset
    if lower is None:
        raise ToolchainError(
            f"the {target} target runs a fixed-point graph (FixedGraph), not a {type(graph).__name__}; "
            "quantise the SNN first (toolchain.passes.quantize.quantize)"
        )
    return lower(graph)
