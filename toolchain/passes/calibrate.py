"""Thresholds and initial potentials for the IF neurons that replace the ANN's activations.

Thresholds (`--threshold`):
  ceiling  the trained activation ceiling of a clipped ReLU (theta = lambda, Bu et al. 2022)
  max      the largest activation seen on the calibration set
  pXX.XX   a high percentile of the activations on the calibration set (robust to outliers)
  auto     the trained ceiling where the ANN has one, else p99.99 of each channel: a clipped
           ReLU's ceiling counts as trained when calibration data reaches it (at least
           0.01 % of the layer's activations sit at it); a fixed one that is never reached,
           and ReLU6's 6 always, is replaced by the channels' p99.99. QCFS ceilings are always kept.

Percentiles are exact and memory-bounded: for each layer we keep only the top-k values
seen so far, where k is the number of values above the percentile in the whole set.

Initial potentials (`--v0`): `zero`, `half` (theta/2, the paper's optimum under a uniform
error assumption) or `optimal`, fitted to the ANN on calibration data at a chosen T: a
per-layer fraction of theta, then a per-channel correction of the mean gap between the
SNN's output (rate x theta) and the ANN's activation (see `optimise_v0`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from toolchain.core import ir
from toolchain.core.interpreter import OPS, CompiledNode, TorchExecutor, channel_view
from toolchain.errors import ToolchainError, option

log = logging.getLogger(__name__)

V0_GRID = np.round(np.linspace(0.0, 1.0, 21), 3)
V0_MAX_SAMPLES = 512  # calibration samples the optimal-v0 fit uses at most
V0_MEMORY_BUDGET = 2 << 30  # bytes its stacks may take; fewer samples for big models


@dataclass
class ThresholdSpec:
    method: str  # "auto" | "ceiling" | "max" | "percentile"
    percentile: float = 99.99
    per_channel: bool = False

    @classmethod
    def parse(cls, text: str, per_channel: bool = False) -> ThresholdSpec:
        if text in ("auto", "ceiling", "max"):
            return cls(text, per_channel=per_channel)
        match = re.fullmatch(r"p(\d{1,2}(?:\.\d+)?|100)", text)
        if not match or not 0 < float(match.group(1)) <= 100:
            raise ToolchainError(f"{option('threshold', repr(text))}: use auto, ceiling, max or pXX.XX (for example p99.99)")
        return cls("percentile", float(match.group(1)), per_channel)

    def describe(self) -> str:
        return f"p{self.percentile:g}" if self.method == "percentile" else self.method


@dataclass
class Thresholds:
    values: dict[str, np.ndarray]  # activation node name -> theta, shape (1,) or (C,)
    source: dict[str, str] = field(default_factory=dict)  # node name -> how it was obtained
    silent_channels: dict[str, int] = field(default_factory=dict)  # never active on the calibration data


def activations(graph: ir.Graph) -> list[ir.Relu]:
    return [n for n in graph.nodes if isinstance(n, ir.Relu)]


# `auto` takes per-channel percentiles where there is no trained ceiling: one threshold per layer
# leaves the many channels of a batch-normalised network whose activations stay far below the
# layer's largest ones spiking in steps of theta/T, i.e. rarely or never at low T
# (bench/own_models.py: a ResNet-style model at 9 % vs 84 % at T=8, v0 = theta/2).
AUTO_PERCENTILE = 99.99


# ReLU6 (MobileNet, torchvision) clips at exactly 6: a fixed activation, not a ceiling trained for
# conversion, and far too coarse a threshold at low T where its data reach it (a stock MobileNet's
# last layer: theta 6 left uncalibrated, 7 points below its ANN at T=8). With data, its thresholds
# come from the data like a plain ReLU's (the ANN keeps the clip).
RELU6_CEILING = 6.0


def _ceiling_is_kept(node: ir.Relu) -> bool:
    """QCFS ceilings and per-channel ceilings are trained by construction; a scalar clip is tested on data."""
    return node.ceiling is not None and (node.levels > 0 or np.asarray(node.ceiling).size > 1)


def uses_data(graph: ir.Graph, spec: ThresholdSpec) -> bool:
    """Whether the thresholds use calibration data when it is given."""
    if spec.method == "ceiling":
        return False
    if spec.method == "auto":
        return not all(_ceiling_is_kept(n) for n in activations(graph))
    return True


def compute_thresholds(
    graph: ir.Graph,
    spec: ThresholdSpec,
    batches: Iterable[np.ndarray] | None = None,
    num_samples: int = 0,
    device: str = "auto",
) -> Thresholds:
    """theta for every `Relu` of the ANN graph; `batches` are preprocessed calibration inputs."""
    if spec.method == "auto":
        return _auto_thresholds(graph, batches, num_samples, device)
    result = Thresholds({})
    data_layers: list[ir.Relu] = []
    for node in activations(graph):
        if spec.method == "ceiling":
            if node.ceiling is None:
                raise ToolchainError(
                    f"node {node.name!r} (Relu) has no trained ceiling, so {option('threshold', 'ceiling')} cannot apply; "
                    f"use {option('threshold', 'auto, max or p99.99')} with {option('calib', 'DATA')}"
                )
            result.values[node.name] = np.asarray(node.ceiling, np.float32).reshape(-1)
            result.source[node.name] = "ceiling"
        else:
            data_layers.append(node)
    if data_layers:
        _require_data(data_layers, batches, f"{option('threshold', spec.describe())} takes thresholds from data")
        assert batches is not None
        percentile = 100.0 if spec.method == "max" else spec.percentile
        stats = _percentile_thresholds(graph, data_layers, batches, num_samples, percentile, spec.per_channel, device)
        label = "max" if percentile >= 100 else f"p{percentile:g}"
        for node in data_layers:
            result.values[node.name] = stats[node.name]
            result.source[node.name] = label + (" per channel" if spec.per_channel else "")
    return _checked(result)


def _auto_thresholds(
    graph: ir.Graph, batches: Iterable[np.ndarray] | None, num_samples: int, device: str
) -> Thresholds:
    """`--threshold auto`: trained ceilings where calibration data confirms them, else p99.99 per channel."""
    clipped = [n for n in activations(graph) if n.ceiling is not None]
    plain = [n for n in activations(graph) if n.ceiling is None]
    if plain:
        _require_data(plain, batches, "they have no trained ceiling")
    batches = list(batches) if batches is not None else None
    unreached: set[str] = set()  # scalar clip ceilings no calibration activation reaches
    scalar_clips = [n for n in clipped if not _ceiling_is_kept(n)]
    relu6 = {n.name for n in scalar_clips if float(np.asarray(n.ceiling).max()) == RELU6_CEILING} if batches else set()
    testable = [n for n in scalar_clips if n.name not in relu6]  # ReLU6 takes data thresholds whatever it reaches
    if batches is not None and testable:
        layer_stats = _percentile_thresholds(graph, testable, batches, num_samples, AUTO_PERCENTILE, False, device)
        for node in testable:
            if float(layer_stats[node.name].max()) < float(np.asarray(node.ceiling).max()) * (1 - 1e-6):
                unreached.add(node.name)
    unreached |= relu6
    data_layers = plain + [n for n in clipped if n.name in unreached]
    stats: dict[str, np.ndarray] = {}
    if data_layers:
        assert batches is not None
        stats = _percentile_thresholds(graph, data_layers, batches, num_samples, AUTO_PERCENTILE, True, device)
    result = Thresholds({})
    for node in activations(graph):
        if node.name not in stats:
            result.values[node.name] = np.asarray(node.ceiling, np.float32).reshape(-1)
            result.source[node.name] = "ceiling"
            continue
        result.values[node.name] = stats[node.name]
        result.source[node.name] = f"p{AUTO_PERCENTILE:g} per channel"
        if node.name in relu6:
            result.source[node.name] += " (ReLU6: a fixed ceiling, not trained)"
        elif node.name in unreached:
            result.source[node.name] += f" (ceiling {float(np.asarray(node.ceiling).max()):.4g} not reached)"
    return _checked(result)


def _require_data(layers: list[ir.Relu], batches: Iterable[np.ndarray] | None, why: str) -> None:
    if batches is None:
        names = ", ".join(n.name for n in layers[:3])
        raise ToolchainError(f"activations {names}: {why}, so thresholds need calibration data; pass {option('calib', 'DATA')}")


def _checked(result: Thresholds) -> Thresholds:
    """Refuses non-finite thresholds; a channel never active on the calibration data gets the layer's largest."""
    for name, theta in result.values.items():
        if not np.all(np.isfinite(theta)):
            raise ToolchainError(f"node {name!r}: calibration produced a non-finite threshold; check the data")
        if np.any(theta <= 0):
            # A channel that never activates on the calibration set never needs to fire. Common with
            # per-channel thresholds (dead ReLU channels), so said in the layer's source, not as a warning.
            top = float(theta.max()) if theta.max() > 0 else 1.0
            result.silent_channels[name] = int((theta <= 0).sum())
            result.values[name] = np.where(theta > 0, theta, top).astype(np.float32)
    return result


class _TopK:
    """Running top-k of a layer's activations (per channel or whole layer)."""

    def __init__(self, k: int):
        self.k = max(1, k)
        self.best: torch.Tensor | None = None

    def update(self, values: torch.Tensor) -> None:  # values: (groups, n)
        if self.best is not None:
            values = torch.cat([self.best, values], dim=1)
        k = min(self.k, values.shape[1])
        self.best = torch.topk(values, k, dim=1, sorted=False).values

    def smallest(self) -> torch.Tensor:
        assert self.best is not None
        return self.best.min(dim=1).values


def _percentile_thresholds(
    graph: ir.Graph,
    layers: list[ir.Relu],
    batches: Iterable[np.ndarray],
    num_samples: int,
    percentile: float,
    per_channel: bool,
    device: str,
) -> dict[str, np.ndarray]:
    executor = TorchExecutor(graph, device)
    tops: dict[str, _TopK] = {}
    for node in layers:
        per_group = num_samples * math.prod(node.shape) // (node.shape[0] if per_channel else 1)
        tops[node.name] = _TopK(math.floor(per_group * (100.0 - percentile) / 100.0) + 1)
    wanted = {n.name for n in layers}

    def observe(node: ir.Node, value: torch.Tensor) -> None:
        if node.name in wanted:
            x = value[-1]  # (B, C, ...) or (B, F)
            grouped = x.transpose(0, 1).reshape(x.shape[1], -1) if per_channel else x.reshape(1, -1)
            tops[node.name].update(grouped.float())

    for batch in batches:
        executor.run(torch.as_tensor(batch), steps=1, observe=observe)
    return {name: top.smallest().cpu().numpy().astype(np.float32) for name, top in tops.items()}


# ---------------------------------------------------------------- initial potential


def optimise_v0(
    snn: ir.Graph,
    ann: ir.Graph,
    x: np.ndarray,
    steps: int,
    device: str = "auto",
    rounds: int = 2,
    memory_budget: int = V0_MEMORY_BUDGET,
) -> dict[str, float]:
    """Initial potentials fitted to the ANN at `steps` time steps, layer by layer.

    For each IF layer, in order (each sees the spikes of the layers before it with their
    chosen v0, so errors that accumulate through depth are accounted for):

    1. the one fraction of theta (grid 0, 0.05, ..., 1) that minimises the mean squared
       gap between the SNN's output per step (rate x theta) and the ANN's activation;
    2. a per-channel correction of that gap's mean, `rounds` times: raising v0 by d raises a
       channel's spike count by about d / theta, so its mean output over `steps` steps by
       d / steps; v0 moves by steps x (ANN mean - SNN mean), kept within [0, theta].
       (Li et al., ICML 2021, correct the same bias through the layer's bias instead.)

    Every step holds all samples' T-step stacks of a layer at once: `x` is cut to the
    samples that fit in `memory_budget` bytes, recorded as `snn.meta["conversion"]["v0_samples"]`.
    The graph's IFNeuron nodes are updated in place. Returns node name -> the mean of the
    chosen v0 / theta over the layer's channels.
    """
    snn_exec = TorchExecutor(snn, device)
    x = x[: v0_samples(snn_exec, steps, len(x), memory_budget)]
    snn.meta.setdefault("conversion", {})["v0_samples"] = len(x)
    ann_values: dict[str, torch.Tensor] = {}
    ann_exec = TorchExecutor(ann, device)

    def keep(node: ir.Node, value: torch.Tensor) -> None:
        if isinstance(node, ir.Relu):
            ann_values[node.name] = value[-1]

    xt = torch.as_tensor(x)
    ann_exec.run(xt, steps=1, observe=keep)

    chosen: dict[str, float] = {}
    values: dict[str, torch.Tensor] = {snn.input_name: xt.to(snn_exec.device).unsqueeze(0)}
    with torch.inference_mode():
        for index, compiled in enumerate(snn_exec.compiled):
            node = compiled.node
            args = [values[name] for name in node.inputs]
            if isinstance(node, ir.IFNeuron) and node.name in ann_values:
                theta = compiled.tensors["threshold"]
                activation = ann_values.pop(node.name)
                target = torch.minimum(activation, channel_view(theta, activation.ndim))
                fraction = _search_fraction(compiled, args, steps, target)
                v0 = _correct_channel_means(compiled, args, steps, target, theta * fraction, rounds)
                node.v0 = v0.cpu().numpy().astype(np.float32)
                chosen[node.name] = float(np.mean(node.v0 / np.broadcast_to(node.threshold, node.v0.shape)))
            values[node.name] = OPS[node.op](compiled, args, steps)
            for name in node.inputs:  # free each stack after its last use, as a run does
                if snn_exec.last_use.get(name) == index:
                    values.pop(name, None)
    return chosen


def v0_samples(executor: TorchExecutor, steps: int, available: int, memory_budget: int = V0_MEMORY_BUDGET) -> int:
    """How many samples the v0 fit runs on: at most V0_MAX_SAMPLES, as many as fit the budget
    (a run's peak plus one more layer stack for the search's trial outputs), at least 16."""
    per_sample = executor.peak_bytes_per_sample(steps) + executor.largest_stack_bytes_per_sample(steps)
    return max(1, min(available, V0_MAX_SAMPLES, max(16, memory_budget // max(1, per_sample))))


def _search_fraction(compiled: CompiledNode, args: list[torch.Tensor], steps: int, target: torch.Tensor) -> float:
    theta = compiled.tensors["threshold"]
    best, best_error = 0.5, math.inf
    for fraction in V0_GRID:
        compiled.tensors["v0"] = theta * float(fraction)
        rate = OPS["if"](compiled, args, steps).mean(dim=0)
        error = float(torch.mean((rate - target) ** 2))
        if error < best_error - 1e-12:
            best, best_error = float(fraction), error
    return best


def _correct_channel_means(
    compiled: CompiledNode, args: list[torch.Tensor], steps: int, target: torch.Tensor, v0: torch.Tensor, rounds: int
) -> torch.Tensor:
    """Per-channel v0 (C,) after `rounds` mean corrections; left in `compiled.tensors["v0"]`."""
    channels = target.shape[1]
    theta = compiled.tensors["threshold"].expand(channels)
    v0 = v0.expand(channels).clone()
    other_dims = [0] + list(range(2, target.ndim))
    target_mean = target.mean(dim=other_dims)
    compiled.tensors["v0"] = v0
    for _ in range(rounds):
        rate_mean = OPS["if"](compiled, args, steps).mean(dim=0).mean(dim=other_dims)
        v0 = torch.minimum(torch.clamp(v0 + steps * (target_mean - rate_mean), min=0.0), theta)
        compiled.tensors["v0"] = v0
    return v0
