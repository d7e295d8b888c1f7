"""The one interpreter of the IR's op semantics: every node type's float meaning, in PyTorch.

Calibration (activations and the v0 fit), the float SNN simulator (`targets/torch`), the
quantiser's float checks (folding a chain's bias, probing a dense synapse) and the ANN
reference run graphs through this module and nowhere else. Adding an IR node means one
kernel in `OPS` here. The independent cross-checks are deliberately *not* built on it:
the step-by-step reference (`targets/torch/stepwise.py`), the emulator's integer path
(`targets/loihi`) and the Lava process models (`targets/lava`) each spell the semantics
out again so that a bug here cannot hide in both sides of a comparison.

The network is feed-forward without delays, so running it layer by layer over all
time steps at once is exactly the step-by-step simulation (the tests hold the two to the
same spikes): every synaptic map is applied to the whole (T, B, ...) stack in one call,
and only the IF recurrence is a loop over T. A tensor that is the same at every step (the
analog input and what is computed from it before the first neuron) is kept with a leading
dimension of 1 and broadcast, so the first layer's convolution runs once, not T times.
The ANN is the same graph with `Relu` nodes active, run for one "step".

What makes it fast (measured in `bench/throughput.py`):

- The IF scan works in place on preallocated buffers: per step one add, one compare,
  one multiply into the output slice and one subtract, no allocation. Large fresh
  tensors cost page faults on CPU; this is several times faster than the naive loop and
  gives bit-identical spikes. `compile=True` replaces it by a `torch.compile`d scan
  (one fused kernel per layer; also bit-identical), falling back to the eager scan with
  a warning when compilation is not available.
- Spike counts come from the comparison masks (exact integer counts, no extra pass
  over float tensors, no host synchronisation until the batch ends).
- Channels-last layout for convolutions and pooling (oneDNN / cuDNN NHWC kernels).
- Optional float16 / bfloat16 synaptic ops on CUDA; membrane potentials, thresholds and
  the readout stay in float32.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from toolchain.core import ir
from toolchain.errors import ToolchainError, option

log = logging.getLogger(__name__)

Observer = Callable[[ir.Node, torch.Tensor], None]

# Synaptic-op precision. "float32" is IEEE float32 also on CUDA (TF32 off: PyTorch lets cuDNN
# use TF32 for convolutions by default); "tf32", "float16" and "bfloat16" are CUDA-only options.
PRECISIONS = {"float32": torch.float32, "tf32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Neuron parameters stay in float32 whatever the precision of the synaptic ops.
FLOAT32_PARAMS = {"threshold", "v0"}


@contextlib.contextmanager
def fp32_mode(enabled: bool = True, allow_tf32: bool = False) -> Iterator[None]:
    """Inside, CUDA convolutions and matmuls in float32 use IEEE float32 (or TF32 when `allow_tf32`).

    Uses the `fp32_precision` settings (PyTorch >= 2.9) where present, else the legacy flags,
    and restores what was there.
    """
    if not enabled or not torch.cuda.is_available():
        yield
        return
    mode = "tf32" if allow_tf32 else "ieee"
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):
        saved = (conv.fp32_precision, matmul.fp32_precision)
        conv.fp32_precision, matmul.fp32_precision = mode, mode
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
        return
    legacy = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = allow_tf32, allow_tf32
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = legacy


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ToolchainError(f"{option('device', repr(device))}: not a torch device (use auto, cpu, cuda, cuda:1 ...)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ToolchainError(f"{option('device', device)}: CUDA is not available on this machine; use {option('device', 'cpu')}")
    return resolved


def _param(array: np.ndarray | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    return None if array is None else torch.as_tensor(np.asarray(array), dtype=dtype, device=device)


def channel_view(values: torch.Tensor, ndim: int) -> torch.Tensor:
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


def _is_channels_last(x: torch.Tensor) -> bool:
    """Whether a (T, B, C, H, W) stack holds each image channels-last."""
    return x.ndim == 5 and x.shape[2] > 1 and x.stride(2) == 1 and x[0].is_contiguous(memory_format=torch.channels_last)


def _empty_steps(like: torch.Tensor, steps: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised (steps, B, ...) stack with the per-image layout of `like` (T or 1, B, ...)."""
    dtype = dtype or like.dtype
    shape = (steps,) + tuple(like.shape[1:])
    if _is_channels_last(like):
        flat = torch.empty((steps * shape[1],) + shape[2:], dtype=dtype, device=like.device, memory_format=torch.channels_last)
        return flat.reshape(shape)
    return torch.empty(shape, dtype=dtype, device=like.device)


@dataclass
class CompiledNode:
    node: ir.Node
    tensors: dict[str, torch.Tensor]
    channels_last: bool = False  # keep this node's image outputs NHWC


class TorchExecutor:
    """Runs an IR graph on torch tensors; shared by the SNN simulator and the ANN reference.

    `dtype` is the precision of the synaptic ops (weights and activations); the IF
    neurons' thresholds, potentials and the readout are float32 always.
    `channels_last` stores images NHWC for convolutions and pooling (same values up to the
    rounding of the convolutions' sums, which NHWC kernels order differently).
    `compile` uses a `torch.compile`d IF scan (same spikes; falls back to eager).
    """

    def __init__(
        self,
        graph: ir.Graph,
        device: str | torch.device = "auto",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        compile: bool = False,
    ):
        self.graph = graph
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.dtype = dtype
        self.channels_last = channels_last
        self.compile = compile
        self.compiled = [
            CompiledNode(
                n,
                {
                    k: _param(v, self.device, torch.float32 if k in FLOAT32_PARAMS else dtype)
                    for k, v in ir.node_arrays(n).items()
                },
            )
            for n in graph.nodes
        ]
        if channels_last:
            for c in self.compiled:
                if isinstance(c.node, ir.Conv2d):
                    c.tensors["weight"] = c.tensors["weight"].contiguous(memory_format=torch.channels_last)
                    c.channels_last = True
        # Free each intermediate once its last consumer has run.
        self.last_use: dict[str, int] = {}
        for index, n in enumerate(graph.nodes):
            for name in n.inputs:
                self.last_use[name] = index

    def tensor(self, node_name: str, key: str) -> torch.Tensor:
        """A node's parameter as it lives on the device."""
        return next(c.tensors[key] for c in self.compiled if c.node.name == node_name)

    @torch.inference_mode()
    def run(
        self,
        x: torch.Tensor,
        steps: int,
        observe: Observer | None = None,
        counts: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, *input_shape). Returns the output node's value, (T or 1, B, ...).

        When `counts` is a dict, every IF layer's spikes per step (summed over the batch,
        exact int64, on the device) are stored in it under the layer's name.
        """
        x = x.to(self.device, self.dtype)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        values: dict[str, torch.Tensor] = {self.graph.input_name: x.unsqueeze(0)}
        for index, c in enumerate(self.compiled):
            args = [values[name] for name in c.node.inputs]
            if c.node.op == "if":
                layer_counts = None
                if counts is not None:
                    layer_counts = torch.zeros(steps, dtype=torch.int64, device=self.device)
                    counts[c.node.name] = layer_counts
                out = if_scan(args[0], c.tensors["threshold"], c.tensors["v0"], steps, layer_counts, self.compile)
            else:
                out = OPS[c.node.op](c, args, steps)
            values[c.node.name] = out
            if observe is not None:
                observe(c.node, out)
            for name in c.node.inputs:
                if self.last_use.get(name) == index and name != self.graph.output:
                    values.pop(name, None)
        return values[self.graph.output]

    def peak_bytes_per_sample(self, steps: int) -> int:
        """An upper estimate of the memory one sample needs at the peak of a `run` for `steps` steps.

        Follows which values are alive (the run frees each one after its last use), counts
        (T or 1) x the node's elements for each, and adds each op's temporaries.
        """
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        time_varying = {self.graph.input_name: False}
        alive: dict[str, int] = {self.graph.input_name: math.prod(self.graph.input_shape) * itemsize}
        peak = 0
        for index, c in enumerate(self.compiled):
            n = c.node
            varying = n.op in ("if", "readout") or any(time_varying[i] for i in n.inputs)
            time_varying[n.name] = varying
            length = steps if varying else 1
            out_bytes = length * math.prod(n.shape) * (4 if n.op == "readout" else itemsize)
            in_bytes = sum(alive.get(i, 0) for i in n.inputs)
            if n.op == "if":
                temp = 3 * math.prod(n.shape) * 4  # membrane, mask, float32 staging
            elif n.op == "maxpool2d" and varying:
                temp = 3 * in_bytes + 2 * out_bytes  # cumsum, padding, running max
            elif n.op in ("conv2d", "avgpool2d", "flatten", "concat"):
                temp = in_bytes  # asymmetric padding, layout changes, broadcasts
            else:
                temp = 0
            peak = max(peak, sum(alive.values()) + out_bytes + temp)
            alive[n.name] = out_bytes
            for name in n.inputs:
                if self.last_use.get(name) == index and name != self.graph.output:
                    alive.pop(name, None)
        return peak

    def largest_stack_bytes_per_sample(self, steps: int) -> int:
        """The largest single (T, ...) value one sample produces: the working set of the biggest layer."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return max((steps * math.prod(c.node.shape) * itemsize for c in self.compiled), default=0)


# ------------------------------------------------------------------ the IF scan


def _if_scan_eager(
    x: torch.Tensor, threshold: torch.Tensor, v0: torch.Tensor, steps: int, counts: torch.Tensor | None
) -> torch.Tensor:
    ndim = x.ndim - 1
    theta = channel_view(threshold, ndim)
    constant = x.shape[0] == 1
    out = _empty_steps(x, steps)
    # v = v0 + x[0] is the first step's v = (0 + v0) + x[0]; float32 whatever the input precision.
    v = x[0].to(torch.float32) + channel_view(v0, ndim)
    staging = None if out.dtype == torch.float32 else torch.empty_like(v)
    # Spikes per step are summed as floats (much faster than count_nonzero on CPU), exact while
    # the partial sums stay below 2**24; above that, in float64.
    sum_dtype = torch.float64 if v.numel() >= 1 << 24 else torch.float32
    sums = None if counts is None else torch.empty(steps, dtype=sum_dtype, device=v.device)
    all_dims = tuple(range(v.ndim))
    for t in range(steps):
        if t:
            v.add_(x[0] if constant else x[t])
        emitted = out[t] if staging is None else staging
        torch.ge(v, theta, out=emitted)  # 1.0 where it spikes, else 0.0
        if sums is not None:
            torch.sum(emitted, dim=all_dims, dtype=sums.dtype, out=sums[t])
        emitted.mul_(theta)  # spike * theta: exactly theta or 0
        v.sub_(emitted)
        if staging is not None:
            out[t].copy_(staging)
    if counts is not None and sums is not None:
        counts.copy_(sums.round())
    return out


def _scan_steps(x: torch.Tensor, theta: torch.Tensor, v: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The IF recurrence written plainly, for torch.compile to fuse into one kernel."""
    constant = x.shape[0] == 1
    outs = []
    masks = []
    for t in range(steps):
        if t:
            v = v + (x[0] if constant else x[t])
        mask = v >= theta
        emitted = mask * theta
        v = v - emitted
        outs.append(emitted)
        masks.append(mask.flatten().sum())
    return torch.stack(outs), torch.stack(masks)


_compiled_scan: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
_compile_failed = False


def _if_scan_compiled(
    x: torch.Tensor, threshold: torch.Tensor, v0: torch.Tensor, steps: int, counts: torch.Tensor | None
) -> torch.Tensor | None:
    """The fused scan, or None when torch.compile is not available here (after one warning)."""
    global _compiled_scan, _compile_failed
    if _compile_failed:
        return None
    ndim = x.ndim - 1
    theta = channel_view(threshold, ndim)
    try:
        if _compiled_scan is None:
            # One specialisation per layer shape and T: allow more than dynamo's default few.
            limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 256))
            _compiled_scan = torch.compile(_scan_steps, dynamic=False)
        v = x[0].to(torch.float32) + channel_view(v0, ndim)
        out, step_counts = _compiled_scan(x, theta, v, steps)
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: use the eager scan
        _compile_failed = True
        log.warning("torch.compile is not usable here (%s); using the eager IF scan", str(exc).splitlines()[0][:200])
        return None
    if counts is not None:
        counts.copy_(step_counts)
    return out.to(x.dtype)


def if_scan(
    x: torch.Tensor,
    threshold: torch.Tensor,
    v0: torch.Tensor,
    steps: int,
    counts: torch.Tensor | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """IF neurons with reset by subtraction over `steps` steps.

    x: input current, (T or 1, B, ...); threshold, v0: one value or one per channel.
    Returns spike * threshold, (steps, B, ...). With `counts` (int64, (steps,)), stores
    the number of spikes at each step, summed over everything else.
    """
    if compile:
        out = _if_scan_compiled(x, threshold, v0, steps, counts)
        if out is not None:
            return out
    return _if_scan_eager(x, threshold, v0, steps, counts)


# ------------------------------------------------------------------ op kernels
# Each takes the compiled node, its input values (leading dim T or 1) and T.


def _conv2d(c: CompiledNode, args: list[torch.Tensor], steps: int) -> torch.Tensor:
    n: ir.Conv2d = c.node  # type: ignore[assignment]
    x = args[0]
    padded, symmetric = _pad(_merge(x), n.padding)
    y = F.conv2d(padded, c.tensors["weight"], c.tensors.get("bias"), n.stride, symmetric or 0, n.dilation, n.groups)
    if c.channels_last and y.shape[1] > 1:
        # With one input channel the backends pick NCHW; the layers after want NHWC.
        y = y.contiguous(memory_format=torch.channels_last)
    return _split(y, x.shape[0])


def _linear(c: CompiledNode, args: list[torch.Tensor], steps: int) -> torch.Tensor:
    return F.linear(args[0], c.tensors["weight"], c.tensors.get("bias"))


def _avgpool2d(c: CompiledNode, args: list[torch.Tensor], steps: int) -> torch.Tensor:
    n: ir.AvgPool2d = c.node  # type: ignore[assignment]
    x = args[0]
    if n.kernel == (2, 2) and n.stride == (2, 2) and not any(n.padding) and not _is_channels_last(x):
        return _avgpool_2x2(x)
    padded, symmetric = _pad(_merge(x), n.padding)
    pad = symmetric or 0
    if n.uniform_divisor:
        y = F.avg_pool2d(padded, n.kernel, n.stride, pad, count_include_pad=True)
    elif symmetric is not None and not n.count_include_pad:
        y = F.avg_pool2d(padded, n.kernel, n.stride, pad, count_include_pad=False)
    else:  # asymmetric padding not counted, or a ceil_mode overhang: a divisor per window
        total = F.avg_pool2d(padded, n.kernel, n.stride, pad, divisor_override=1)
        y = total / torch.as_tensor(n.cell_counts(*x.shape[-2:]), dtype=total.dtype, device=total.device)
    return _split(y, x.shape[0])


def _avgpool_2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2, stride 2 average pooling of NCHW images from four strided views: the same sums in the
    same order as torch's kernel (bit-identical), several times faster on CPU for NCHW."""
    h, w = (x.shape[-2] // 2) * 2, (x.shape[-1] // 2) * 2
    x = x[..., :h, :w]
    total = x[..., 0::2, 0::2] + x[..., 0::2, 1::2]
    total += x[..., 1::2, 0::2]
    total += x[..., 1::2, 1::2]
    return total.div_(4)


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
    counts, _ = _pad(_merge(torch.cumsum(x, dim=0, dtype=torch.float32)), n.padding, value=float("-inf"))
    running_max = _split(F.max_pool2d(counts, n.kernel, n.stride, symmetric or 0), x.shape[0])
    return torch.diff(running_max, dim=0, prepend=torch.zeros_like(running_max[:1])).to(x.dtype)


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
    return x * channel_view(c.tensors["scale"], ndim) + channel_view(c.tensors["shift"], ndim)


def _relu(c: CompiledNode, args: list[torch.Tensor], steps: int) -> torch.Tensor:
    n: ir.Relu = c.node  # type: ignore[assignment]
    x = args[0]
    ceiling = c.tensors.get("ceiling")
    if ceiling is None:
        return torch.relu(x)
    top = channel_view(ceiling, x.ndim - 1)
    if n.levels > 0:
        return top * torch.clamp(torch.floor(x * n.levels / top + 0.5) / n.levels, 0, 1)
    return torch.minimum(torch.relu(x), top)


def _if_neuron(c: CompiledNode, args: list[torch.Tensor], steps: int) -> torch.Tensor:
    return if_scan(args[0], c.tensors["threshold"], c.tensors["v0"], steps)


def _readout(c: CompiledNode, args: list[torch.Tensor], steps: int) -> torch.Tensor:
    x = args[0]
    return torch.cumsum(x.expand((steps,) + x.shape[1:]), dim=0, dtype=torch.float32)


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


def run_ann(graph: ir.Graph, x: np.ndarray, device: str = "auto") -> np.ndarray:
    """The ANN's output for a preprocessed batch (graph with `Relu` activations)."""
    out = TorchExecutor(graph, device).run(torch.as_tensor(x), steps=1)
    return out[-1].float().cpu().numpy()
