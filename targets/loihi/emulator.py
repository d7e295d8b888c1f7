"""Bit-exact emulator of the fixed-point network in torch: batched, CPU or CUDA.

It does exactly the integer arithmetic of our Lava process models
(`targets.lava.process`, see `toolchain.quantize` for the scheme):

    synapse:  a = sum(q * s) over the (sum-pooled) source, then << weight_exp
              (arithmetic >> when negative, i.e. floor)
    IF:       v += a + (bias_mant << bias_exp); saturate to +-(2**23 - 1), counting overflows;
              s = v >= threshold; v -= s * threshold
    readout:  acc += a + bias, saturated the same way

Linear maps run on the whole (T x batch) stack at once in float64 and are rounded
back to int64: every partial sum is an integer below 2**53, so the result is exact
whatever algorithm the backend picks (and rounding removes the tiny errors of
Winograd/FFT convolutions). Only the neuron recurrence loops over T, in int64.

Time. In Lava every connection adds one step of delay, so layer l (at depth d_l =
`FixedGraph.depth[l]`) processes at Lava step t the input presented at step t - d_l,
and the Lava runner resets each layer to v0 at its own depth. The emulator therefore
works in *logical* time: its step k of layer l is Lava step k + d_l of that sample;
`readout[k]` is the readout accumulated over the first k + 1 steps of input, as in
the float simulator, so `readout[T-1]` reflects exactly T steps of input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from targets.base import SimOutput
from toolchain import ir
from toolchain.errors import ToolchainError
from toolchain.quantize import V_MAX, FixedGraph, FixedLayer, encode_input, quantize

QUANTIZE_OPTIONS = ("threshold_bits", "weight_bits", "input_bits", "input_range", "calibration", "max_dense_weights")
CHUNK_ELEMENTS = 2**25  # float64 elements per synapse call (about 256 MiB)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Recording:
    """Everything one batch run produced, in logical time (step k of each layer)."""

    spikes: dict[str, np.ndarray]  # IF layer -> (T, B, *shape) bool
    readout: np.ndarray  # (T, B, classes) int64 accumulator
    # layer -> saturation counts: per step (T,) from the emulator, one total (1,) from Lava
    overflows: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # IF layer -> (T,) spikes summed over batch
    neuron_counts: dict[str, np.ndarray] = field(default_factory=dict)  # IF layer -> (n,) summed over T and batch


@dataclass
class _Compiled:
    layer: FixedLayer
    weight: torch.Tensor  # float32 or float64 (whichever is exact for this layer)
    bias: torch.Tensor  # int32 or int64, (*shape)
    v0: torch.Tensor  # like bias
    state_dtype: torch.dtype


def _input_bound(layer: FixedLayer, payload_max: int) -> int:
    """Largest |sum(q * s)| any output of the layer can see (before the exponent)."""
    q = np.abs(layer.weight.astype(np.int64))
    per_output = q.reshape(q.shape[0], -1).sum(1).max(initial=0)
    return int(per_output) * payload_max * layer.pool[0] * layer.pool[1]


def _compile(layer: FixedLayer, payload_max: int, device: torch.device) -> _Compiled:
    bound = _input_bound(layer, payload_max)
    # float32 sums of integers are exact below 2**24; on CPU the convolution and matmul kernels only
    # multiply and add, so take float32 there when the bound allows (rounding absorbs nothing else).
    exact32 = device.type == "cpu" and bound < 2**22
    weight_dtype = torch.float32 if exact32 else torch.float64
    u_bound = (bound << max(layer.weight_exp, 0)) + int(np.abs(layer.bias()).max(initial=0))
    state_dtype = torch.int32 if u_bound < 2**30 else torch.int64
    return _Compiled(
        layer,
        torch.as_tensor(layer.weight.astype(np.float64), device=device).to(weight_dtype),
        torch.as_tensor(layer.bias(), device=device).to(state_dtype),
        torch.as_tensor(layer.v0.astype(np.int64), device=device).to(state_dtype),
        state_dtype,
    )


class Emulator:
    """Runs a FixedGraph on integer torch tensors."""

    def __init__(self, fixed: FixedGraph, device: str | torch.device = "auto"):
        self.fixed = fixed
        self.device = resolve_device(device)
        input_max = 2**fixed.input_bits - 1
        self.compiled = [_compile(layer, input_max if layer.source is None else 1, self.device) for layer in fixed.layers]
        self.last_use: dict[str | None, int] = {}
        for index, layer in enumerate(fixed.layers):
            self.last_use[layer.source] = index

    # --------------------------------------------------------------- synapses

    def _synapse_chunk(self, c: _Compiled, x: torch.Tensor) -> torch.Tensor:
        layer = c.layer
        if layer.pool != (1, 1):
            x = F.avg_pool2d(x, layer.pool, layer.pool, divisor_override=1)
        if layer.synapse == "conv":
            top, left, bottom, right = layer.padding
            x = F.pad(x, (left, right, top, bottom))
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                y = F.conv2d(x, c.weight, None, layer.stride, 0, layer.dilation, layer.groups)
        else:
            y = x.flatten(1) @ c.weight.T
        y = torch.round(y).to(c.state_dtype)
        if layer.weight_exp >= 0:
            return y << layer.weight_exp
        return y >> -layer.weight_exp

    def synapse(self, c: _Compiled, source: torch.Tensor) -> torch.Tensor:
        """(L, B, *in_shape) payloads -> (L, B, *shape) dendritic input plus bias (integers)."""
        steps, batch = source.shape[:2]
        flat = source.reshape((steps * batch, *source.shape[2:]))
        per_item = max(int(np.prod(c.layer.in_shape)), c.layer.size)
        chunk = max(1, CHUNK_ELEMENTS // per_item)
        parts = [self._synapse_chunk(c, flat[i : i + chunk].to(c.weight.dtype)) for i in range(0, flat.shape[0], chunk)]
        return torch.cat(parts).reshape((steps, batch, *c.layer.shape)).add_(c.bias)

    # ---------------------------------------------------------------- neurons

    @staticmethod
    def _saturate(v: torch.Tensor, overflow: list[int], t: int) -> None:
        low, high = torch.aminmax(v)
        if int(high) > V_MAX or int(low) < -V_MAX:
            overflow[t] += int(((v > V_MAX) | (v < -V_MAX)).sum())
            v.clamp_(-V_MAX, V_MAX)

    @classmethod
    def _if_loop(cls, c: _Compiled, u: torch.Tensor, steps: int) -> tuple[torch.Tensor, np.ndarray]:
        theta = c.layer.threshold
        batch = u.shape[1]
        v = c.v0.expand((batch, *c.v0.shape)).clone()
        out = torch.empty((steps, *v.shape), dtype=torch.bool, device=v.device)
        overflow = [0] * steps
        constant = u.shape[0] == 1
        for t in range(steps):
            v += u[0 if constant else t]
            cls._saturate(v, overflow, t)
            spiked = torch.ge(v, theta, out=out[t])
            v.sub_(spiked.to(v.dtype).mul_(theta))
        return out, np.asarray(overflow, np.int64)

    @classmethod
    def _readout_loop(cls, c: _Compiled, u: torch.Tensor, steps: int) -> tuple[torch.Tensor, np.ndarray]:
        batch = u.shape[1]
        acc = c.v0.expand((batch, *c.v0.shape)).to(torch.int64).clone()
        out = torch.empty((steps, *acc.shape), dtype=torch.int64, device=acc.device)
        overflow = [0] * steps
        for t in range(steps):
            acc += u[0 if u.shape[0] == 1 else t]
            cls._saturate(acc, overflow, t)
            out[t] = acc
        return out, np.asarray(overflow, np.int64)

    # -------------------------------------------------------------------- run

    @torch.inference_mode()
    def run_encoded(self, x_u: np.ndarray, steps: int, keep_spikes: bool = False) -> Recording:
        """Graded input spikes (B, *input_shape) -> a Recording in logical time."""
        values: dict[str | None, torch.Tensor] = {None: torch.as_tensor(np.asarray(x_u), device=self.device).unsqueeze(0)}
        spikes: dict[str, np.ndarray] = {}
        overflows: dict[str, np.ndarray] = {}
        counts: dict[str, torch.Tensor] = {}
        neuron_counts: dict[str, torch.Tensor] = {}
        readout: torch.Tensor | None = None
        for index, c in enumerate(self.compiled):
            layer = c.layer
            u = self.synapse(c, values[layer.source])
            if self.last_use.get(layer.source) == index:
                values.pop(layer.source, None)
            if layer.kind == "if":
                out, overflow = self._if_loop(c, u, steps)
                values[layer.name] = out
                counts[layer.name] = out.flatten(1).sum(1)
                neuron_counts[layer.name] = out.sum((0, 1), dtype=torch.int64).reshape(-1)
                if keep_spikes:
                    spikes[layer.name] = out.cpu().numpy()
            else:
                readout, overflow = self._readout_loop(c, u, steps)
            overflows[layer.name] = overflow
        assert readout is not None
        return Recording(
            spikes,
            readout.cpu().numpy(),
            overflows,
            {k: v.cpu().numpy() for k, v in counts.items()},
            {k: v.cpu().numpy() for k, v in neuron_counts.items()},
        )


class LoihiTarget:
    """Fixed-point emulation; implements `targets.base.Target`.

    Options: `device` ("auto", "cpu", "cuda"); `fixed` (a pre-quantised FixedGraph, used instead of
    quantising the graph given to `prepare`); `on_overflow` ("raise" or "saturate": membrane overflow raises
    a ToolchainError naming the layer, or is saturated and counted in `self.overflows`); `batch_size`;
    and the keyword arguments of `toolchain.quantize.quantize` (threshold_bits, weight_bits, input_bits,
    input_range, calibration, max_dense_weights).
    """

    name = "loihi"

    def __init__(
        self,
        device: str = "auto",
        fixed: FixedGraph | None = None,
        on_overflow: str = "raise",
        batch_size: int = 256,
        **options: object,
    ):
        if on_overflow not in ("raise", "saturate"):
            raise ToolchainError(f"on_overflow={on_overflow!r}: choose raise or saturate")
        self.device = resolve_device(device)
        self.fixed_option = fixed
        self.fixed = fixed
        self.on_overflow = on_overflow
        self.batch_size = max(1, int(batch_size))
        self.quantize_options = {k: v for k, v in options.items() if k in QUANTIZE_OPTIONS and v is not None}
        self.emulator: Emulator | None = None
        self.overflows: dict[str, int] = {}

    def prepare(self, graph: ir.Graph | FixedGraph) -> None:
        if isinstance(graph, FixedGraph):
            self.fixed = graph
        elif self.fixed_option is not None:
            self.fixed = self.fixed_option
        else:
            self.fixed = quantize(graph, **self.quantize_options)  # type: ignore[arg-type]
        self.emulator = Emulator(self.fixed, self.device)
        self.overflows = {layer.name: 0 for layer in self.fixed.layers}

    def record(self, x: np.ndarray, steps: int) -> Recording:
        """Every layer's spikes per step per neuron (logical time), the readout accumulator, overflows."""
        assert self.emulator is not None and self.fixed is not None, "prepare() first"
        recording = self.emulator.run_encoded(encode_input(self.fixed, x), steps, keep_spikes=True)
        self._check_overflow(recording.overflows)
        return recording

    def run(self, x: np.ndarray, steps: int) -> SimOutput:
        assert self.emulator is not None and self.fixed is not None, "prepare() first"
        readouts: list[np.ndarray] = []
        spikes: dict[str, np.ndarray] = {}
        per_neuron: dict[str, np.ndarray] = {}
        readout_layer = self.fixed.layer(self.fixed.output)
        for begin in range(0, len(x), self.batch_size):
            recording = self.emulator.run_encoded(encode_input(self.fixed, x[begin : begin + self.batch_size]), steps)
            self._check_overflow(recording.overflows)
            readouts.append(recording.readout)
            for name, count in recording.counts.items():
                spikes[name] = spikes.get(name, 0) + count.astype(np.float64)
            for name, count in recording.neuron_counts.items():
                per_neuron[name] = per_neuron.get(name, 0) + count.astype(np.float64)
        readout = np.concatenate(readouts, axis=1).astype(np.float64) * _scale(readout_layer)
        out = SimOutput(readout=readout.astype(np.float32), spikes=spikes)
        out.neuron_spikes = per_neuron  # type: ignore[attr-defined]  # per-neuron totals, for exact SynOps
        return out

    def _check_overflow(self, overflows: dict[str, np.ndarray]) -> None:
        for name, per_step in overflows.items():
            total = int(per_step.sum())
            self.overflows[name] = self.overflows.get(name, 0) + total
            if total and self.on_overflow == "raise":
                first = int(np.flatnonzero(per_step)[0])
                raise ToolchainError(
                    f"layer {name!r}: the 24-bit membrane overflowed {total} times (first at step {first}); "
                    "quantise with fewer --threshold-bits, run fewer steps, or pass on_overflow='saturate'"
                )


def _scale(layer: FixedLayer) -> np.ndarray:
    scale = np.asarray(layer.scale, np.float64).reshape(-1)
    return scale if scale.size > 1 else scale[0]


def make_target(**options: object) -> LoihiTarget:
    return LoihiTarget(**options)  # type: ignore[arg-type]
