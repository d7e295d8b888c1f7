"""Bit-exact emulator of the fixed-point network in torch: batched, CPU or CUDA.

It does exactly the integer arithmetic of our Lava process models
(`targets.lava.process`, see `toolchain.core.fixed` for the arithmetic):

    synapse:  a_k = sum(q * s) over the (sum-pooled) source, then << weight_exp
              (arithmetic >> when negative, i.e. floor); a = sum of a layer's a_k
    IF:       v += a + (bias_mant << bias_exp); saturate to +-(2**23 - 1), counting overflows;
              s = v >= threshold; v -= s * threshold
    readout:  acc += a + bias, saturated the same way

Time. In Lava every connection adds one step of delay, so layer l (at depth d_l =
`FixedGraph.depth[l]`) processes at Lava step t the input presented at step t - d_l
(shorter paths into a layer are delayed to meet the longest), and the Lava runner resets
each layer to v0 at its own depth. The emulator therefore
works in *logical* time: its step k of layer l is Lava step k + d_l of that sample;
`readout[k]` is the readout accumulated over the first k + 1 steps of input, as in
the float simulator, so `readout[T-1]` reflects exactly T steps of input.

Two arithmetic paths give the same bits:

* "int64" (the reference): synapses in float64 rounded back to int64 (every partial sum is
  an integer below 2**53), integer shifts, int64 membranes checked for saturation at every
  step. Simple and slow.
* "auto" (the default, fast): every layer runs over all T steps of its whole batch at once
  (one sum-pool + conv/matmul call on the (T*B, ...) stack; only the neuron recurrence
  loops over T), on float tensors whose exactness is proven per layer at prepare time:

  - The payloads are non-negative integers (spikes 0/1, input 0..2**input_bits-1, sum-pooled
    over `pool` cells), so every partial sum of `q * s` over any subset of taps lies in
    [-neg_i * P, pos_i * P] (pos_i/neg_i: the sums of the positive/negative mantissas of
    output i, P the largest pooled payload), whatever order the kernel adds in. This holds
    per synapse; each synapse of a layer has its own kernel and proof.
  - The weights are stored pre-multiplied by 2**weight_exp (exact: a power of two), and an
    integer bias may enter the kernel's own accumulation: then every intermediate value is a
    multiple of g = 2**min(weight_exp, 0) of magnitude at most |S|max * 2**weight_exp + |bias|max.
    When that is below 2**24 * g the layer's synapse runs in float32 (below 2**53 * g in
    float64): integers (multiples of g) of that size are exact floats, so products and sums are
    exact. `floor` (for negative exponents) and the bias (when it is not per channel) are exact
    afterwards. The (floored) synapse outputs of a layer are integers summed in float32 when
    the sum of their bounds and the bias stays below 2**24, else in float64 (below 2**53).
    Only kernels that multiply and add are used: oneDNN direct convolutions or
    im2col + GEMM (NNPACK and cuDNN, which may pick Winograd/FFT, are switched off around the
    calls, float32 matmuls run at "highest" precision, and any other backend torch would pick
    is replaced by unfold + matmul).
  - Neurons: from the bounds of the dendritic input u = a + bias and of v0, an interval
    recurrence (`_membrane_fits`) proves per layer and T that no membrane can leave
    +-(2**23 - 1) in T steps; then no saturation can occur, no check is needed and a float32
    membrane (|v| < 2**24) is exact. Otherwise the layer checks and saturates every step, in
    float32 while |u| + 2**23 < 2**24, else in float64.

  Anything outside these bounds falls back to the int64 path. Spikes are float32 0/1
  tensors that feed the next synapse directly; 4-D populations are kept channels-last.

This module spells the integer arithmetic out itself, on purpose, rather than calling the
float interpreter (`toolchain.core.interpreter`): the tests hold its two paths equal bit for
bit and Lava (`targets/lava/process/models.py`) equal to it spike for spike, comparisons that
mean something only between independent implementations.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from toolchain.core.fixed import (
    V_MAX,
    FixedGraph,
    FixedLayer,
    FixedSynapse,
    Lowering,
    as_fixed,
    check_overflow_policy,
    encode_input,
    overflow_error,
    synapse_range,
)
from toolchain.core.target import GraphKind, Recording, SimOutput
from toolchain.errors import ToolchainError

ARITHMETIC = ("auto", "int64")
CHUNK_ELEMENTS = 2**25  # int64 path: float64 elements per synapse call (about 256 MiB)
# Default batch: T x batch x (largest population) elements per activation tensor. About 16 MiB of
# float32 spikes on CPU, so that the per-step slices the neuron loop touches stay in cache.
BATCH_ELEMENTS = {"cpu": 2**22, "cuda": 2**27}
EXACT_BITS = {torch.float32: 24, torch.float64: 53}
# convolution backends that only multiply and add (oneDNN's is its direct algorithm)
EXACT_CONV_BACKENDS = {"Mkldnn", "MkldnnEmpty", "Slow2d", "SlowDilated2d", "CudaDepthwise2d", "Empty"}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ------------------------------------------------------------------ bounds


@dataclass
class _Bounds:
    """Integer bounds of one layer's arithmetic, for any input the encoder or the sources can send."""

    s_max: list[int]  # per synapse: largest |partial sum of q * s| (before the exponent)
    kernel_max: list[int]  # per synapse: largest |intermediate| of its scaled kernel (bias folded into the first), units of g
    sum_max: int  # largest |partial sum| of the synapses' (floored) outputs and the bias
    u_low: int  # smallest dendritic input a + bias of any neuron
    u_high: int  # largest
    v0_low: int
    v0_high: int


def _shift(values: np.ndarray, exp: int) -> np.ndarray:
    """Integer << exp, or arithmetic >> (floor) for negative exponents."""
    return values << exp if exp >= 0 else values >> -exp


def _bounds(layer: FixedLayer, input_max: int) -> _Bounds:
    bias = layer.bias().reshape(layer.shape)
    b_max = int(np.abs(bias).max(initial=0))
    high, low = bias.copy(), bias.copy()
    s_max, kernel_max, sum_max = [], [], b_max
    for index, syn in enumerate(layer.synapses):
        pos, neg = synapse_range(syn, layer.shape, input_max if syn.source is None else 1)
        e = syn.weight_exp
        peak = int(max(pos.max(initial=0), neg.max(initial=0)))
        s_max.append(peak)
        kernel_max.append(peak * 2 ** max(e, 0) + (b_max * 2 ** max(-e, 0) if index == 0 else 0))
        high = high + _shift(pos, e)
        low = low + _shift(-neg, e)
        sum_max += int(max(np.abs(_shift(pos, e)).max(initial=0), np.abs(_shift(-neg, e)).max(initial=0)))
    v0 = layer.v0.astype(np.int64)
    return _Bounds(s_max, kernel_max, sum_max, int(low.min()), int(high.max()), int(v0.min()), int(v0.max()))


def _membrane_fits(layer: FixedLayer, b: _Bounds, steps: int) -> bool:
    """True when no membrane of the layer can leave [-V_MAX, V_MAX] within `steps` steps.

    Interval recurrence over all neurons and inputs: with v in [m, M] before a step,
    v + u lies in [m + u_low, M + u_high] (the value that is saturated in Lava); after the
    reset by subtraction a neuron that fired is at v + u - theta >= 0, one that did not is
    at v + u < theta, so M' = max(min(theta - 1, M + u_high), M + u_high - theta) and
    m' = min(0, m + u_low). The readout (no reset) moves by u_low..u_high per step.
    """
    if layer.kind != "if":
        high = b.v0_high + max(b.u_high, steps * b.u_high)
        low = b.v0_low + min(b.u_low, steps * b.u_low)
        return high <= V_MAX and low >= -V_MAX
    theta = layer.threshold
    upper, lower = b.v0_high, b.v0_low
    for _ in range(steps):
        high, low = upper + b.u_high, lower + b.u_low
        if high > V_MAX or low < -V_MAX:
            return False
        bounds = (max(min(theta - 1, high), high - theta), min(0, low))
        if bounds == (upper, lower):  # a fixed point: every later step sees the same interval
            return True
        upper, lower = bounds
    return True


# ------------------------------------------------------------------ kernels


@contextlib.contextmanager
def _exact_kernels(device: torch.device) -> Iterator[None]:
    """Float kernels that only multiply and add, at full float32 precision."""
    precision = torch.get_float32_matmul_precision()
    per_op = {}  # oneDNN's per-op precision overrides the backend's
    for op in ("conv", "matmul"):
        settings = getattr(torch.backends.mkldnn, op, None)
        if hasattr(settings, "fp32_precision"):
            per_op[op] = settings.fp32_precision
    torch.set_float32_matmul_precision("highest")
    try:
        mkldnn = torch.backends.mkldnn.set_flags(None, None, None, "ieee")
    except TypeError:  # pragma: no cover - a torch without oneDNN fp32_precision (nor its bf16/tf32 modes)
        mkldnn = None
    for op in per_op:
        getattr(torch.backends.mkldnn, op).fp32_precision = "ieee"
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.backends.nnpack.flags(enabled=False))
            if device.type == "cuda":
                stack.enter_context(torch.backends.cudnn.flags(enabled=False))
            yield
    finally:
        torch.set_float32_matmul_precision(precision)
        if mkldnn is not None:
            torch.backends.mkldnn.set_flags(None, None, None, mkldnn[3])
        for op, value in per_op.items():
            getattr(torch.backends.mkldnn, op).fp32_precision = value


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """torch's CPU threads set to `count` for a while (None: leave them)."""
    if count is None or count == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _conv_backend(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, syn: FixedSynapse, padding: tuple) -> str:
    """The backend torch will pick (a private query; where it is missing, trust `_exact_kernels`' flags)."""
    try:
        backend = torch._C._select_conv_backend(
            x, w, bias, list(syn.stride), list(padding), list(syn.dilation), False, [0, 0], syn.groups, None
        )
    except (AttributeError, TypeError, RuntimeError):  # pragma: no cover - another torch
        return "Mkldnn"
    return str(backend).rsplit(".", 1)[-1]


def _conv_by_gemm(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, syn: FixedSynapse, shape: tuple[int, ...], padding: tuple
) -> torch.Tensor:
    """Convolution as unfold + batched matmul (only multiplies and adds)."""
    n = x.shape[0]
    c_out, c_in_group, kh, kw = w.shape
    groups = syn.groups
    _, h_out, w_out = shape
    cols = F.unfold(x, (kh, kw), syn.dilation, padding, syn.stride).view(n, groups, c_in_group * kh * kw, -1)
    y = (w.reshape(groups, c_out // groups, -1).unsqueeze(0) @ cols).reshape(n, c_out, h_out, w_out)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y.contiguous(memory_format=torch.channels_last)


def _sum_pool(x: torch.Tensor, pool: tuple[int, int]) -> torch.Tensor:
    """Non-overlapping sum-pool (kernel == stride, remainders dropped) by strided adds: exact."""
    ph, pw = pool
    h, w = x.shape[-2] // ph * ph, x.shape[-1] // pw * pw
    if pw > 1:
        x = sum((x[..., :h, b:w:pw] for b in range(1, pw)), x[..., :h, 0:w:pw])
    if ph > 1:
        x = sum((x[..., a:h:ph, :] for a in range(1, ph)), x[..., 0:h:ph, :])
    return x


def _empty(lead: tuple[int, ...], shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised (*lead, *shape) tensor; 3-D population shapes are laid out channels-last."""
    if len(shape) == 3:
        c, h, w = shape
        return torch.empty((*lead, h, w, c), dtype=dtype, device=device).movedim(-1, -3)
    return torch.empty((*lead, *shape), dtype=dtype, device=device)


def _memory_order(x: torch.Tensor) -> torch.Tensor:
    """A (T, B, *shape) tensor from `_empty` viewed as (T, B, n) in its memory order."""
    if x.dim() == 5:
        x = x.movedim(-3, -1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _memory_index(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Positions in memory order of the neurons in CHW order."""
    order = np.argsort(_hwc_order(shape)) if len(shape) == 3 else np.arange(int(np.prod(shape)))
    return torch.as_tensor(order, device=device)


def _layout(values: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-neuron array as a tensor in the populations' memory layout."""
    tensor = torch.as_tensor(np.asarray(values, np.float64))
    out = _empty((), tuple(tensor.shape), dtype, device)
    return out.copy_(tensor)


def _hwc_order(shape: tuple[int, ...]) -> np.ndarray:
    """Indices that reorder a CHW-flattened vector into the channels-last memory order."""
    if len(shape) != 3:
        return np.arange(int(np.prod(shape)))
    return np.arange(int(np.prod(shape))).reshape(shape).transpose(1, 2, 0).reshape(-1)


# ------------------------------------------------------------------ plans


@dataclass
class _SynapsePlan:
    """How the fast path runs one synapse."""

    synapse: FixedSynapse
    dtype: torch.dtype  # its arithmetic (float32 or float64)
    weight: torch.Tensor  # q * 2**weight_exp; conv: channels-last; dense: (in, out), rows/columns in memory order
    kernel_bias: torch.Tensor | None  # the layer's bias inside this kernel (per channel conv, per row dense) or None
    floor: bool  # weight_exp < 0


@dataclass
class _Plan:
    """How the fast path runs one layer."""

    layer: FixedLayer
    bounds: _Bounds
    synapses: list[_SynapsePlan]
    dtype: torch.dtype  # the dendritic sum's arithmetic (float32 or float64)
    bias: torch.Tensor | None  # per-neuron bias added after the kernels (when not folded), population layout
    v0: torch.Tensor  # float64, population layout
    states: dict[int, tuple[torch.dtype, bool]] = field(default_factory=dict)

    def state_dtype(self, steps: int) -> tuple[torch.dtype, bool]:
        """Membrane dtype and whether saturation must be checked for a run of `steps` steps."""
        if steps not in self.states:
            b = self.bounds
            u_max = max(abs(b.u_low), abs(b.u_high))
            if _membrane_fits(self.layer, b, steps) and u_max < 2**24:  # |v| <= V_MAX < 2**24 at every step
                self.states[steps] = (self.dtype, False)
            elif self.dtype == torch.float32 and u_max + V_MAX < 2**24:  # saturated v plus u stays exact
                self.states[steps] = (torch.float32, True)
            else:
                self.states[steps] = (torch.float64, True)
        return self.states[steps]


def _exact_dtype(bound: int) -> torch.dtype | None:
    return next((d for d, bits in EXACT_BITS.items() if bound < 2**bits), None)


def _plan(layer: FixedLayer, input_max: int, device: torch.device) -> _Plan | None:
    """The fast path for a layer, or None when its bounds exceed float64's exact range."""
    bounds = _bounds(layer, input_max)
    dtypes = [_exact_dtype(k) for k in bounds.kernel_max]
    u_max = max(abs(bounds.u_low), abs(bounds.u_high))
    if None in dtypes or u_max + V_MAX >= 2**53 or bounds.sum_max >= 2**53:
        return None
    dtype = torch.float32 if all(d == torch.float32 for d in dtypes) and bounds.sum_max < 2**24 else torch.float64
    bias = layer.bias().reshape(layer.shape).astype(np.float64)
    plans: list[_SynapsePlan] = []
    folded = False
    for index, syn in enumerate(layer.synapses):
        syn_dtype: torch.dtype = dtypes[index]  # type: ignore[assignment]
        q = syn.weight.astype(np.float64) * 2.0**syn.weight_exp
        kernel_bias: np.ndarray | None = None
        if syn.kind == "conv":
            weight = torch.as_tensor(q).to(device, syn_dtype).contiguous(memory_format=torch.channels_last)
            per_channel = bias.reshape(bias.shape[0], -1)
            if index == 0 and np.all(per_channel == per_channel[:, :1]):
                kernel_bias = per_channel[:, 0]
        else:
            rows = _hwc_order(tuple(layer.shape))
            cols = _hwc_order(tuple(syn.pooled_shape))
            weight = torch.as_tensor(np.ascontiguousarray(q.reshape(layer.size, -1)[rows][:, cols].T)).to(device, syn_dtype)
            if index == 0:
                kernel_bias = bias.reshape(-1)[rows]
        folded = folded or kernel_bias is not None
        plans.append(
            _SynapsePlan(
                syn,
                syn_dtype,
                weight,
                None if kernel_bias is None else torch.as_tensor(kernel_bias).to(device, syn_dtype),
                syn.weight_exp < 0,
            )
        )
    return _Plan(
        layer=layer,
        bounds=bounds,
        synapses=plans,
        dtype=dtype,
        bias=None if folded else _layout(bias, dtype, device),
        v0=_layout(layer.v0, torch.float64, device),
    )


# ------------------------------------------------------------ int64 path


@dataclass
class _Compiled:
    layer: FixedLayer
    weights: list[torch.Tensor]  # float64 mantissas, per synapse
    bias: torch.Tensor  # int64, (*shape)
    v0: torch.Tensor  # int64, (*shape)


def _compile(layer: FixedLayer, device: torch.device) -> _Compiled:
    return _Compiled(
        layer,
        [torch.as_tensor(syn.weight.astype(np.float64), device=device) for syn in layer.synapses],
        torch.as_tensor(layer.bias(), device=device),
        torch.as_tensor(layer.v0.astype(np.int64), device=device),
    )


def _add_steps(total: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """Sum of (L, B, ...) tensors whose L is 1 (constant input) or T."""
    if total is None:
        return y
    if total.shape == y.shape:
        return total.add_(y)
    return total + y


class Emulator:
    """Runs a FixedGraph on torch tensors, bit-exact with the integer semantics.

    `arithmetic`: "auto" (the fast float path wherever its exactness is proven, see the module
    docstring) or "int64" (the integer reference path for every layer). `threads`: torch's CPU threads
    during a run (None: leave torch's setting). The default 1 is the faster choice on a few shared
    cores: the neuron loops are thousands of small elementwise ops, and OpenMP's fork/join per op
    costs more than it gains (and stalls for a whole time slice whenever a core is busy elsewhere);
    for more throughput run several processes (`toolchain eval --distributed`).
    """

    def __init__(
        self,
        fixed: FixedGraph,
        device: str | torch.device = "auto",
        arithmetic: str = "auto",
        threads: int | None = 1,
    ):
        if arithmetic not in ARITHMETIC:
            raise ToolchainError(f"arithmetic={arithmetic!r}: choose one of {', '.join(ARITHMETIC)}")
        self.fixed = fixed
        self.device = resolve_device(device)
        self.threads = threads if self.device.type == "cpu" else None
        self.input_max = 2**fixed.input_bits - 1
        self.last_use: dict[str | None, int] = {}
        for index, layer in enumerate(fixed.layers):
            for source in layer.sources:
                self.last_use[source] = index
        self.plans: list[_Plan] | None = None
        self.fallback: str | None = "arithmetic='int64'" if arithmetic == "int64" else None
        if arithmetic == "auto":
            plans = [_plan(layer, self.input_max, self.device) for layer in fixed.layers]
            missing = [layer.name for layer, p in zip(fixed.layers, plans, strict=True) if p is None]
            if missing:
                self.fallback = f"layers {missing} exceed float64's exact range"
            else:
                self.plans = plans  # type: ignore[assignment]
        self.compiled = [_compile(layer, self.device) for layer in fixed.layers] if self.plans is None else []

    def describe(self, steps: int) -> list[dict[str, object]]:
        """Per layer: the arithmetic a run of `steps` steps uses, and the bounds behind it."""
        if self.plans is None:
            return [{"layer": layer.name, "path": "int64", "why": self.fallback} for layer in self.fixed.layers]
        rows = []
        for p in self.plans:
            state, checked = p.state_dtype(steps)
            rows.append(
                {
                    "layer": p.layer.name,
                    "synapse": "+".join(str(sp.dtype).replace("torch.", "") for sp in p.synapses),
                    "membrane": str(state).replace("torch.", ""),
                    "saturation_checks": checked,
                    "kernel_max": p.bounds.kernel_max,
                    "u_range": (p.bounds.u_low, p.bounds.u_high),
                }
            )
        return rows

    def batch_size(self, steps: int) -> int:
        """A batch that keeps each (T, batch, population) tensor near BATCH_ELEMENTS elements."""
        largest = max(
            max(layer.size, *(int(math.prod(syn.in_shape)) for syn in layer.synapses)) for layer in self.fixed.layers
        )
        budget = BATCH_ELEMENTS.get(self.device.type, BATCH_ELEMENTS["cuda"])
        return int(min(max(1, budget // (max(1, steps) * largest)), 4096))

    @torch.inference_mode()
    def run_encoded(self, x_u: np.ndarray, steps: int, keep_spikes: bool = False) -> Recording:
        """Graded input spikes (B, *input_shape) -> a Recording in logical time."""
        x = torch.as_tensor(np.asarray(x_u), device=self.device)
        if x.numel() and (int(x.min()) < 0 or int(x.max()) > self.input_max):
            raise ToolchainError(f"graded input outside 0..{self.input_max}: encode it with toolchain.core.fixed.encode_input")
        with _threads(self.threads):
            if self.plans is None:
                return self._run_int64(x, steps, keep_spikes)
            with _exact_kernels(self.device):
                return self._run_fast(x, steps, keep_spikes)

    # --------------------------------------------------------- fast path

    def _synapse(self, sp: _SynapsePlan, layer: FixedLayer, source: torch.Tensor) -> torch.Tensor:
        """(L, B, *in_shape) payloads -> (L, B, *shape) kernel output y = S * 2**e (+ bias when folded)."""
        syn = sp.synapse
        steps, batch = source.shape[:2]
        x = source.reshape((steps * batch, *source.shape[2:])).to(sp.dtype)
        if syn.pool != (1, 1):
            x = _sum_pool(x, syn.pool)
        if syn.kind == "conv":
            x = x.contiguous(memory_format=torch.channels_last)
            top, left, bottom, right = syn.padding
            if (top, left) == (bottom, right):
                padding: tuple[int, int] = (top, left)
            else:
                x, padding = F.pad(x, (left, right, top, bottom)).contiguous(memory_format=torch.channels_last), (0, 0)
            if _conv_backend(x, sp.weight, sp.kernel_bias, syn, padding) in EXACT_CONV_BACKENDS:
                y = F.conv2d(x, sp.weight, sp.kernel_bias, syn.stride, padding, syn.dilation, syn.groups)
            else:  # pragma: no cover - a backend that may not only multiply and add
                y = _conv_by_gemm(x, sp.weight, sp.kernel_bias, syn, layer.shape, padding)
            y = y.contiguous(memory_format=torch.channels_last)
        else:
            if x.dim() == 4:  # channels-last memory order, matching the weight's rows
                x = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
            x = x.reshape(x.shape[0], -1)
            y = torch.addmm(sp.kernel_bias, x, sp.weight) if sp.kernel_bias is not None else x @ sp.weight
            if len(layer.shape) == 3:
                c, h, w = layer.shape
                y = y.view(-1, h, w, c).permute(0, 3, 1, 2)
        return y.view((steps, batch, *layer.shape))

    def _dendrite(self, p: _Plan, values: dict[str | None, torch.Tensor]) -> torch.Tensor:
        """The dendritic input u = sum_k floor(y_k) + bias, (L, B, *shape) in the layer's dtype; L is 1
        when every synapse comes from the (constant) input, else T."""
        u: torch.Tensor | None = None
        for index, sp in enumerate(p.synapses):
            y = self._synapse(sp, p.layer, values[sp.synapse.source]).to(p.dtype)
            if index == 0 and p.bias is not None:  # an integer: floor(y + b) = floor(y) + b
                y.add_(p.bias)
            if sp.floor:
                y.floor_()
            u = _add_steps(u, y)
        assert u is not None
        return u

    @staticmethod
    def _saturate(v: torch.Tensor, overflow: list[int], t: int) -> None:
        low, high = torch.aminmax(v)
        if float(high) > V_MAX or float(low) < -V_MAX:
            overflow[t] += int(((v > V_MAX) | (v < -V_MAX)).sum())
            v.clamp_(-V_MAX, V_MAX)

    def _if_fast(self, p: _Plan, u: torch.Tensor, steps: int) -> tuple[torch.Tensor, np.ndarray]:
        """IF recurrence over T; returns float32 0/1 spikes (T, B, *shape) and overflows per step."""
        state, checked = p.state_dtype(steps)
        theta = float(p.layer.threshold)
        batch = u.shape[1]
        v = _empty((batch,), p.layer.shape, state, self.device).copy_(p.v0)
        spikes = _empty((steps, batch), p.layer.shape, torch.float32, self.device)
        overflow = [0] * steps
        constant = u.shape[0] == 1
        for t in range(steps):
            v.add_(u[0] if constant else u[t])
            if checked:
                self._saturate(v, overflow, t)
            s_t = torch.ge(v, theta, out=spikes[t])
            v.sub_(s_t, alpha=theta)
        return spikes, np.asarray(overflow, np.int64)

    def _readout_fast(self, p: _Plan, u: torch.Tensor, steps: int) -> tuple[torch.Tensor, np.ndarray]:
        state, checked = p.state_dtype(steps)
        u = u.to(state)
        overflow = [0] * steps
        if not checked:  # every partial sum is an accumulator value, |acc| <= V_MAX: exact
            acc = torch.cumsum(u.expand((steps, *u.shape[1:])), 0, dtype=state).add_(p.v0.to(state))
            return acc.to(torch.int64), np.asarray(overflow, np.int64)
        out = torch.empty((steps, *u.shape[1:]), dtype=torch.int64, device=self.device)
        acc = p.v0.to(state).expand(u.shape[1:]).clone()
        for t in range(steps):
            acc += u[0 if u.shape[0] == 1 else t]
            self._saturate(acc, overflow, t)
            out[t] = acc
        return out, np.asarray(overflow, np.int64)

    def _run_fast(self, x: torch.Tensor, steps: int, keep_spikes: bool) -> Recording:
        assert self.plans is not None
        values: dict[str | None, torch.Tensor] = {None: x.unsqueeze(0)}
        spikes: dict[str, np.ndarray] = {}
        overflows: dict[str, np.ndarray] = {}
        counts: dict[str, np.ndarray] = {}
        neuron_counts: dict[str, np.ndarray] = {}
        readout: torch.Tensor | None = None
        batch = x.shape[0]
        for index, p in enumerate(self.plans):
            layer = p.layer
            u = self._dendrite(p, values)
            self._release(values, layer, index)
            if layer.kind == "if":
                out, overflow = self._if_fast(p, u, steps)
                del u
                values[layer.name] = out
                memory = _memory_order(out)  # (T, B, n) in memory order: fast reductions
                # float32 sums of 0/1 are exact below 2**24
                per_step = torch.float32 if batch * layer.size < 2**24 else torch.float64
                counts[layer.name] = memory.sum((1, 2), dtype=per_step).to(torch.int64).cpu().numpy()
                per_neuron = torch.float32 if batch * steps < 2**24 else torch.float64
                totals = memory.sum((0, 1), dtype=per_neuron)[_memory_index(layer.shape, self.device)]
                neuron_counts[layer.name] = totals.to(torch.int64).cpu().numpy()
                if keep_spikes:
                    spikes[layer.name] = np.ascontiguousarray(out.to(torch.bool).cpu().numpy())
            else:
                readout, overflow = self._readout_fast(p, u, steps)
            overflows[layer.name] = overflow
        assert readout is not None
        return Recording(spikes, np.ascontiguousarray(readout.cpu().numpy()), overflows, counts, neuron_counts)

    # --------------------------------------------------------- int64 path

    def _release(self, values: dict[str | None, torch.Tensor], layer: FixedLayer, index: int) -> None:
        """Drop the sources whose last consumer is the layer at `index`."""
        for source in layer.sources:
            if self.last_use.get(source) == index:
                values.pop(source, None)

    @staticmethod
    def _synapse_chunk(syn: FixedSynapse, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if syn.pool != (1, 1):
            x = F.avg_pool2d(x, syn.pool, syn.pool, divisor_override=1)
        if syn.kind == "conv":
            top, left, bottom, right = syn.padding
            x = F.pad(x, (left, right, top, bottom))
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                y = F.conv2d(x, weight, None, syn.stride, 0, syn.dilation, syn.groups)
        else:
            y = x.flatten(1) @ weight.T
        y = torch.round(y).to(torch.int64)
        if syn.weight_exp >= 0:
            return y << syn.weight_exp
        return y >> -syn.weight_exp

    def synapse(self, c: _Compiled, values: dict[str | None, torch.Tensor]) -> torch.Tensor:
        """int64 path: the sources' (L, B, *in_shape) payloads -> (L, B, *shape) dendritic input plus bias."""
        total: torch.Tensor | None = None
        for syn, weight in zip(c.layer.synapses, c.weights, strict=True):
            source = values[syn.source]
            steps, batch = source.shape[:2]
            flat = source.reshape((steps * batch, *source.shape[2:]))
            per_item = max(int(np.prod(syn.in_shape)), c.layer.size)
            chunk = max(1, CHUNK_ELEMENTS // per_item)
            parts = [
                self._synapse_chunk(syn, weight, flat[i : i + chunk].to(torch.float64)) for i in range(0, flat.shape[0], chunk)
            ]
            total = _add_steps(total, torch.cat(parts).reshape((steps, batch, *c.layer.shape)))
        assert total is not None
        return total + c.bias

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
        acc = c.v0.expand((batch, *c.v0.shape)).clone()
        out = torch.empty((steps, *acc.shape), dtype=torch.int64, device=acc.device)
        overflow = [0] * steps
        for t in range(steps):
            acc += u[0 if u.shape[0] == 1 else t]
            cls._saturate(acc, overflow, t)
            out[t] = acc
        return out, np.asarray(overflow, np.int64)

    def _run_int64(self, x: torch.Tensor, steps: int, keep_spikes: bool) -> Recording:
        values: dict[str | None, torch.Tensor] = {None: x.unsqueeze(0)}
        spikes: dict[str, np.ndarray] = {}
        overflows: dict[str, np.ndarray] = {}
        counts: dict[str, torch.Tensor] = {}
        neuron_counts: dict[str, torch.Tensor] = {}
        readout: torch.Tensor | None = None
        for index, c in enumerate(self.compiled):
            layer = c.layer
            u = self.synapse(c, values)
            self._release(values, layer, index)
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
    """Fixed-point emulation; implements `toolchain.core.target.Target`.

    Runs a `FixedGraph` (`graph_kind` "fixed"): the one given to `prepare`, else `fixed` (a network
    quantised at build time), else the float SNN given to `prepare` lowered by `lower` (the quantise
    pass, which `toolchain.backends.get_target` hands over with its options; backends do not import
    passes). Options: `device` ("auto", "cpu", "cuda"); `on_overflow` ("raise" or
    "saturate": membrane overflow raises a ToolchainError naming the layer, or is saturated and counted
    in `self.overflows`); `batch_size` (None: sized per T to keep the activations cache-friendly, see
    `Emulator.batch_size`); `arithmetic` ("auto": the fast float path where proven exact; "int64": the
    integer reference path; same bits); `threads` (torch's CPU threads during a run, default 1; see
    `Emulator`).
    """

    name: ClassVar[str] = "loihi"
    graph_kind: ClassVar[GraphKind] = "fixed"

    def __init__(
        self,
        device: str = "auto",
        fixed: FixedGraph | None = None,
        lower: Lowering | None = None,
        on_overflow: str = "raise",
        batch_size: int | None = None,
        arithmetic: str = "auto",
        threads: int | None = 1,
    ):
        check_overflow_policy(on_overflow)
        if arithmetic not in ARITHMETIC:
            raise ToolchainError(f"arithmetic={arithmetic!r}: choose one of {', '.join(ARITHMETIC)}")
        self.device = resolve_device(device)
        self.preset = fixed
        self.lower = lower
        self.fixed = fixed
        self.records_spikes = True
        self.on_overflow = on_overflow
        self.batch_size = None if batch_size is None else max(1, int(batch_size))
        self.arithmetic = arithmetic
        self.threads = threads
        self.emulator: Emulator | None = None
        self.overflows: dict[str, int] = {}

    def prepare(self, graph: Any) -> None:
        self.fixed = as_fixed(graph, self.preset, self.lower, self.name)
        self.emulator = Emulator(self.fixed, self.device, self.arithmetic, self.threads)
        self.overflows = {layer.name: 0 for layer in self.fixed.layers}

    def run_recorded(self, x: np.ndarray, steps: int) -> Recording:
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
        batch_size = self.batch_size or self.emulator.batch_size(steps)
        with _threads(self.emulator.threads):  # once for all batches
            for begin in range(0, len(x), batch_size):
                recording = self.emulator.run_encoded(encode_input(self.fixed, x[begin : begin + batch_size]), steps)
                self._check_overflow(recording.overflows)
                readouts.append(recording.readout)
                for name, count in recording.counts.items():
                    spikes[name] = spikes.get(name, 0) + count.astype(np.float64)
                for name, count in recording.neuron_counts.items():
                    per_neuron[name] = per_neuron.get(name, 0) + count.astype(np.float64)
        readout = np.concatenate(readouts, axis=1).astype(np.float64) * _scale(readout_layer)
        # per-neuron totals, for exact synaptic-operation counts
        return SimOutput(readout=readout.astype(np.float32), spikes=spikes, neuron_spikes=per_neuron)

    def close(self) -> None:
        """Nothing to release: the emulator holds only tensors."""

    def _check_overflow(self, overflows: dict[str, np.ndarray]) -> None:
        for name, per_step in overflows.items():
            total = int(per_step.sum())
            self.overflows[name] = self.overflows.get(name, 0) + total
            if total and self.on_overflow == "raise":
                first = int(np.flatnonzero(per_step)[0])
                raise overflow_error(name, total, f" (first at step {first})")


def _scale(layer: FixedLayer) -> np.ndarray:
    scale = np.asarray(layer.scale, np.float64).reshape(-1)
    return scale if scale.size > 1 else scale[0]
