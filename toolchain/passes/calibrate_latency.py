"""Post-training calibration of an SNN for the latency it will run at (`--calibrate`, `-T`).

Networks trained with plain ReLU and batch norm have no activation ceilings, so their
thresholds come from data (a high percentile per channel) and v0 = theta/2. At low T the
SNN then lags the ANN: a percentile threshold is far too coarse a quantisation step
(theta/T) for most activations, and the rate's errors shift every layer's mean, which the
next layers amplify. This pass fits the SNN to its ANN at the build's T, layer by layer
in topological order, each layer on the SNN's own inputs (the spikes of the layers before
it as already calibrated), so that errors of earlier layers are corrected, not compounded:

  threshold  per channel, the theta among `THRESHOLD_SCALES` x the data threshold that
             minimises the mean squared error of the T-step output (rate x theta, v0 =
             theta/2) against the ANN's activation. Channels are independent neurons, so
             one scan per candidate scale evaluates every channel at once.
  bias       per channel, the mean gap between the ANN's activation and the SNN's T-step
             output is added to the layer's input current, `BIAS_ROUNDS` times (Li et al.,
             ICML 2021, "light" calibration). It is folded into the bias of the synapse that
             feeds the layer (conv, linear, batch-norm shift; through a residual Add into a
             branch's synapse), so the IR, the fixed-point mapping and Lava are unchanged;
             also applied to the readout's synapse (the logits' mean per class).
  v0         the per-layer fraction of theta and its per-channel mean correction of
             `calibrate.optimise_v0`, on the same layer-by-layer inputs.
  weight     each conv / linear synapse fed by spikes, into a calibrated layer or the readout,
             refit by ridge regression: weights and bias such that its output on the SNN's
             T-step input rates is closest to the ANN's output of the same synapse (Li et al.'s
             "advanced" calibration, solved in closed form). Fitted on 3/4 of the samples and
             kept per weight group only where it lowers the error on the other 1/4, so that it
             does not overfit. It runs before the layer's threshold and v0 fit, which then see
             the corrected current.

The IF layers of a `--maxpool relu` tree have no ANN counterpart: they take the calibrated
thresholds of the spikes they compare (the conversion's rule, kept after calibration).

Per-step corrections (FTBC, ECCV 2024) are not offered: a Loihi neuron has one constant
bias, so a bias that changes with the step would need extra input neurons per layer.

Everything fitted is an ordinary threshold, v0 or bias, so it lowers to fixed point like
any other model. Layers whose thresholds are trained ceilings (clipped ReLU, QCFS) are
left as they are by `auto`: their ceilings already are the quantisation the ANN learnt.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from toolchain.core import ir
from toolchain.core.interpreter import OPS, CompiledNode, TorchExecutor, channel_view, if_scan
from toolchain.errors import ToolchainError, option
from toolchain.passes.calibrate import V0_MEMORY_BUDGET, _correct_channel_means, _search_fraction, v0_samples
from toolchain.passes.convert import spike_thresholds
from toolchain.passes.quantize import populations, row_raise, unit_threshold_peaks

log = logging.getLogger(__name__)

METHODS = ("weight", "threshold", "bias", "v0")
# Measured on stock Fashion-MNIST ResNet-, VGG- and DenseNet-style models (bench/stock_models.py):
# thresholds with v0 beat thresholds with bias corrections at T=8 (84.7 against 82.5 % on the
# ResNet, ANN 86.1) and at its neighbours; a bias fitted at T shifts every step, a v0 only the start.
# The weight refit before them closes more (ad hoc, first 2000 test images, SNN - ANN in points:
# stock CIFAR-10 ResNet at T=16 -1.85 -> -0.80, T=32 -1.05 -> -0.35; Fashion-MNIST ResNet at T=8
# -2.0 -> -1.3, T=32 -0.95 -> -0.35); bench/results/stock_models*.md has the measured tables.
AUTO_METHODS = ("weight", "threshold", "v0")
# Candidate thresholds as fractions of the data threshold (p99.99 per channel): low T wants a
# finer step theta/T than the rare largest activations allow, at the price of clipping them.
# A coarse geometric grid for all channels at once, then a finer one around each channel's best.
THRESHOLD_SCALES = np.round(np.geomspace(0.1, 1.0, 11), 4).tolist() + [1.25]
THRESHOLD_REFINE = [10 ** (k / 30) for k in (-2, -1, 1, 2)]  # thirds of the coarse grid's ratio 10^0.1
# The fit holds every sample's T-step stacks of one layer: it takes at most this many
# sample-steps (512 samples at T=16, 128 at T=64), and at most what the memory budget allows.
SAMPLE_STEPS = 512 * 16
MIN_SAMPLES = 16  # fewer make the per-channel statistics noise
BIAS_ROUNDS = 3
HOLDOUT = 0.25  # of the calibration samples, to check a weight refit on images it was not fitted to
REFIT_CHUNK = 32  # samples at a time into the normal equations
RIDGE = 1e-3  # of the mean input power: pulls a weight refit towards the trained weights
BIASED = (ir.Conv2d, ir.Linear, ir.ScaleShift)  # synapses whose bias can take a correction


def parse_methods(text: str) -> tuple[str, ...]:
    """`auto`, `none`, or a comma-separated subset of METHODS (applied in METHODS order)."""
    if text == "auto":
        return AUTO_METHODS
    if text == "none":
        return ()
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        raise ToolchainError(f"{option('calibrate', text)}: use auto, none, or a comma-separated list of {', '.join(METHODS)}")
    return tuple(m for m in METHODS if m in chosen)


@dataclass
class LatencyCalibration:
    steps: int
    methods: tuple[str, ...]
    samples: int
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time: on a busy machine the wall time mostly waits
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    synapses: dict[str, dict[str, Any]] = field(default_factory=dict)  # the weight refit's, by synapse

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "methods": list(self.methods),
            "samples": self.samples,
            "seconds": round(self.seconds, 2),
            "cpu_seconds": round(self.cpu_seconds, 2),
            "layers": self.layers,
            "synapses": self.synapses,
        }


def calibrate_for_latency(
    snn: ir.Graph,
    ann: ir.Graph,
    x: np.ndarray,
    steps: int,
    layers: set[str],
    methods: tuple[str, ...],
    device: str = "auto",
    memory_budget: int = V0_MEMORY_BUDGET,
    row_ratio: float | None = None,
) -> LatencyCalibration:
    """Fits thresholds, input biases and/or v0 of the IF layers named in `layers` to the ANN at `steps`.

    `snn` is `convert(ann, ...)`: the same nodes in the same order plus the readout. Its
    nodes are updated in place (IFNeuron threshold / v0; the bias of the synapse feeding a
    calibrated layer). `x`: preprocessed calibration inputs, cut to what fits `memory_budget`.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    snn_exec = TorchExecutor(snn, device)
    ann_exec = TorchExecutor(ann, snn_exec.device)
    per_sample = snn_exec.peak_bytes_per_sample(steps) + snn_exec.largest_stack_bytes_per_sample(steps)
    if MIN_SAMPLES * per_sample > memory_budget:  # the fit holds every step of a layer for its samples
        raise ToolchainError(
            f"{option('steps', steps)}: calibrating for {steps} steps needs {MIN_SAMPLES * per_sample / 2**30:.1f} GiB "
            f"for {MIN_SAMPLES} samples (budget {memory_budget / 2**30:.0f} GiB); build for fewer steps, or pass "
            f"{option('calibrate', 'none')}"
        )
    x = x[: max(MIN_SAMPLES, min(v0_samples(snn_exec, steps, len(x), memory_budget), SAMPLE_STEPS // steps))]
    report = LatencyCalibration(steps, methods, len(x))
    ann_by_name = {c.node.name: c for c in ann_exec.compiled}
    xt = torch.as_tensor(x).to(snn_exec.device)
    snn_values: dict[str, torch.Tensor] = {snn.input_name: xt.unsqueeze(0)}
    ann_values: dict[str, torch.Tensor] = {ann.input_name: xt.unsqueeze(0)}
    ann_last_use = ann_exec.last_use
    ann_index = {c.node.name: i for i, c in enumerate(ann_exec.compiled)}
    fixed_populations = _fixed_populations(snn) if row_ratio else None  # one structure for every layer's peaks
    refit = _refit_synapses(snn, layers) if "weight" in methods else set()
    with torch.inference_mode():
        for index, compiled in enumerate(snn_exec.compiled):
            node = compiled.node
            args = [snn_values[name] for name in node.inputs]
            target = None
            if node.name in ann_by_name:
                ann_compiled = ann_by_name[node.name]
                ann_args = [ann_values[name] for name in ann_compiled.node.inputs]
                ann_values[node.name] = OPS[ann_compiled.node.op](ann_compiled, ann_args, 1)
                target = ann_values[node.name]
                for name in ann_compiled.node.inputs:
                    if ann_last_use.get(name) == ann_index[node.name]:
                        ann_values.pop(name, None)
            if node.name in refit and target is not None and args[0].shape[0] > 1:  # fed by spikes
                _refit_synapse(compiled, args[0].mean(dim=0), target[0], report)
            if isinstance(node, ir.IFNeuron) and node.name not in ann_by_name:
                _follow_compared_spikes(snn, compiled)
            if isinstance(node, ir.IFNeuron) and node.name in layers and target is not None:
                args = [_calibrate_layer(snn, compiled, args[0], target[0], steps, methods, report, row_ratio,
                                         fixed_populations)]  # fmt: skip
            elif isinstance(node, ir.Readout) and "bias" in methods and layers:
                ann_logits = ann_values[node.inputs[0]][0]
                if _correct_readout(snn, node, args[0], ann_logits, report):
                    args = [args[0] + channel_view(_readout_offsets(args[0], ann_logits), args[0].ndim - 1)]
            snn_values[node.name] = OPS[node.op](compiled, args, steps)
            for name in node.inputs:
                if snn_exec.last_use.get(name) == index:
                    snn_values.pop(name, None)
    report.seconds = time.perf_counter() - started
    report.cpu_seconds = time.process_time() - cpu_started
    return report


def _other_dims(value: torch.Tensor) -> list[int]:
    """All dims but the channel's, for a (B, C, ...) value."""
    return [0] + list(range(2, value.ndim))


def _output_mean(
    current: torch.Tensor, theta: torch.Tensor, v0: torch.Tensor, offset: torch.Tensor | None, steps: int
) -> torch.Tensor:
    """The IF layer's output averaged over `steps` (B, C, ...), with `offset` (C,) added to its input current."""
    if offset is not None:
        current = current + channel_view(offset, current.ndim - 1)
    return if_scan(current, theta, v0, steps).mean(dim=0)


def _calibrate_layer(
    snn: ir.Graph,
    compiled: CompiledNode,
    current: torch.Tensor,
    target: torch.Tensor,
    steps: int,
    methods: tuple[str, ...],
    report: LatencyCalibration,
    row_ratio: float | None = None,
    fixed_populations: list | None = None,
) -> torch.Tensor:
    """Calibrates one IF layer; returns its (possibly offset) input current for the run to go on with."""
    node: ir.IFNeuron = compiled.node  # type: ignore[assignment]
    channels = target.shape[1]
    dims = _other_dims(target)
    base = compiled.tensors["threshold"].expand(channels).clone()
    fraction = (compiled.tensors["v0"].expand(channels) / base).clone()
    theta = base
    row: dict[str, Any] = {}

    def error(out: torch.Tensor) -> torch.Tensor:
        return ((out - target) ** 2).mean(dim=dims)

    peaks = unit_threshold_peaks(snn, node.name, known=fixed_populations) if fixed_populations is not None else None

    def feasible(trial: torch.Tensor) -> torch.Tensor:
        """`trial` as the fixed-point mapping will hold it (channels far below the others raised)."""
        if peaks is None:
            return trial
        factor = row_raise(peaks / trial.cpu().numpy().astype(np.float64), row_ratio)  # type: ignore[arg-type]
        return trial * torch.as_tensor(factor, dtype=trial.dtype, device=trial.device)

    row["mse_before"] = float(error(_output_mean(current, theta, theta * fraction, None, steps)).mean())
    synapse = _bias_synapse(snn, node) if "bias" in methods else None
    if "threshold" in methods:
        # With a bias correction to follow, each candidate is judged after one round of it: a
        # lower threshold's rate error is largely a mean shift that the bias then removes.
        best_error = torch.full((channels,), math.inf, device=base.device)
        best_scale = torch.ones(channels, device=base.device)
        coarse = [torch.full_like(best_scale, scale) for scale in THRESHOLD_SCALES]
        for trials in (coarse, None):
            if trials is None:  # the finer grid around each channel's best coarse scale
                trials = [best_scale * factor for factor in THRESHOLD_REFINE]
            for scale in trials:
                trial = feasible(base * scale)
                out = _output_mean(current, trial, trial * fraction, None, steps)
                if synapse is not None:
                    out = _output_mean(current, trial, trial * fraction, (target - out).mean(dim=dims), steps)
                err = error(out)
                better = err < best_error - 1e-12
                best_error = torch.where(better, err, best_error)
                best_scale = torch.where(better, scale, best_scale)
        theta = feasible(base * best_scale)
        row["threshold_scale_mean"] = round(float(best_scale.mean()), 4)
    offset = None
    if "bias" in methods:
        row["bias_placed"] = synapse is not None
    if synapse is not None:
        offset = torch.zeros(channels, device=base.device)
        for _ in range(BIAS_ROUNDS):
            out = _output_mean(current, theta, theta * fraction, offset, steps)
            offset = offset + (target - out).mean(dim=dims)
        _add_bias(synapse, offset.cpu().numpy().astype(np.float32))
        row["bias_abs_mean"] = round(float(offset.abs().mean()), 6)
    if offset is not None:
        current = current + channel_view(offset, current.ndim - 1)
    compiled.tensors["threshold"] = theta
    compiled.tensors["v0"] = theta * fraction
    if "v0" in methods:
        clipped = torch.minimum(target, channel_view(theta, target.ndim))
        chosen = _search_fraction(compiled, [current], steps, clipped)
        _correct_channel_means(compiled, [current], steps, clipped, theta * chosen, rounds=2)
        row["v0_fraction_mean"] = round(float((compiled.tensors["v0"] / theta).mean()), 4)
    node.threshold = compiled.tensors["threshold"].cpu().numpy().astype(np.float32)
    node.v0 = compiled.tensors["v0"].expand(channels).cpu().numpy().astype(np.float32)
    row["mse_after"] = float(
        error(_output_mean(current, compiled.tensors["threshold"], compiled.tensors["v0"], None, steps)).mean()
    )
    report.layers[node.name] = row
    return current


def _follow_compared_spikes(snn: ir.Graph, compiled: CompiledNode) -> None:
    """An IF layer with no ANN counterpart is one of a max-pool tree's (`convert.relu_maxpool`): its
    threshold is that of the spikes it compares, so that relu(a - b) <= a never clips. Calibration may
    have lowered the source's threshold since conversion: the tree follows, else it would quantise the
    differences more coarsely than the source quantises its values."""
    nodes = {n.name: n for n in snn.nodes}
    stack, seen = list(compiled.node.inputs), set()
    while stack:  # up through the tree's cells (one-hot convs), negations and sums to the first spikes
        name = stack.pop()
        if name in seen or name not in nodes:
            continue
        seen.add(name)
        theta = spike_thresholds(nodes, name)
        if theta is not None:
            break
        if isinstance(nodes[name], (ir.Conv2d, ir.Add, ir.ScaleShift)):
            stack.extend(nodes[name].inputs)
    else:
        return
    node: ir.IFNeuron = compiled.node  # type: ignore[assignment]
    old = compiled.tensors["threshold"].expand(len(theta))
    fraction = compiled.tensors["v0"].expand(len(theta)) / old
    compiled.tensors["threshold"] = torch.as_tensor(theta, dtype=old.dtype, device=old.device)
    compiled.tensors["v0"] = compiled.tensors["threshold"] * fraction
    node.threshold = theta.astype(np.float32)
    node.v0 = compiled.tensors["v0"].cpu().numpy().astype(np.float32)


def _neurons_beside(snn: ir.Graph, name: str, downstream: bool) -> list[ir.Node]:
    """The IF layers and readouts nearest to node `name` down- or upstream, through the synapses,
    pooling and merges between them."""
    found: list[ir.Node] = []
    stack, seen = [name], {name}
    while stack:
        current = stack.pop()
        following = [c.name for c in snn.consumers(current)] if downstream else list(snn.node(current).inputs)
        for other in following:
            if other in seen or other == snn.input_name:
                continue
            seen.add(other)
            node = snn.node(other)
            if isinstance(node, (ir.IFNeuron, ir.Readout)):
                found.append(node)
            else:
                stack.append(other)
    return found


def _refit_synapses(snn: ir.Graph, layers: set[str]) -> set[str]:
    """The conv and linear synapses the weight refit may change: those feeding a calibrated IF layer,
    and the readout's synapse where a calibrated layer feeds it (trained ceilings keep their weights)."""
    chosen = set()
    for node in snn.nodes:
        if not isinstance(node, (ir.Conv2d, ir.Linear)):
            continue
        after = _neurons_beside(snn, node.name, downstream=True)
        feeds_layer = any(n.name in layers for n in after if isinstance(n, ir.IFNeuron))
        feeds_readout = any(isinstance(n, ir.Readout) for n in after)
        if feeds_layer or (feeds_readout and any(n.name in layers for n in _neurons_beside(snn, node.name, False))):
            chosen.add(node.name)
    return chosen


def _group_channels(node: ir.Node, value: torch.Tensor, group: int) -> torch.Tensor:
    """The channels of (B, C, H, W) `value` that weight group `group` of conv `node` reads or writes."""
    per_group = value.shape[1] // node.groups
    return value[:, group * per_group : (group + 1) * per_group]


def _synapse_features(node: ir.Node, rates: torch.Tensor, group: int) -> torch.Tensor:
    """(rows, inputs) of one weight group: the input rates each output value sums, for a least-squares fit."""
    if isinstance(node, ir.Linear):
        return rates.reshape(-1, rates.shape[-1])
    top, left, bottom, right = node.padding
    x = torch.nn.functional.pad(_group_channels(node, rates, group), (left, right, top, bottom))
    columns = torch.nn.functional.unfold(x, node.weight.shape[2:], dilation=node.dilation, stride=node.stride)
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])


def _synapse_targets(node: ir.Node, target: torch.Tensor, group: int) -> torch.Tensor:
    """(rows, outputs) of one weight group: the ANN's output values, row for row with `_synapse_features`."""
    if isinstance(node, ir.Linear):
        return target.reshape(-1, target.shape[-1])
    y = _group_channels(node, target, group)
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


def _refit_synapse(compiled: CompiledNode, rates: torch.Tensor, target: torch.Tensor, report: LatencyCalibration) -> None:
    """Li et al.'s weight calibration as ridge regression: the synapse's weights and bias refit so that
    its output on the SNN's T-step input rates is closest to the ANN's output of the same synapse.

    Fitted on the first `1 - HOLDOUT` of the samples; a group's refit is kept only where it lowers
    the squared error on the rest (images it was not fitted to), so that it does not overfit.
    """
    node = compiled.node
    weight = compiled.tensors["weight"].float()
    bias = compiled.tensors.get("bias")
    new_bias = torch.zeros(weight.shape[0], device=weight.device) if bias is None else bias.float().clone()
    new_weight = weight.clone()
    groups = node.groups if isinstance(node, ir.Conv2d) else 1
    outputs = weight.shape[0] // groups
    split = max(1, int(len(rates) * (1 - HOLDOUT)))

    def chunks(start: int, stop: int, group: int):  # (features + a ones column, targets) in float64
        for first in range(start, stop, REFIT_CHUNK):
            last = min(stop, first + REFIT_CHUNK)
            x = _synapse_features(node, rates[first:last], group)
            x = torch.nn.functional.pad(x, (0, 1), value=1.0).double()
            yield x, _synapse_targets(node, target[first:last], group).double()

    errors = [0.0, 0.0]
    for group in range(groups):
        rows = slice(group * outputs, (group + 1) * outputs)
        old = torch.cat([weight[rows].reshape(outputs, -1), new_bias[rows, None]], dim=1).double()  # (out, in + 1)
        gram = torch.zeros(old.shape[1], old.shape[1], dtype=torch.float64, device=old.device)
        cross = torch.zeros(old.shape[1], outputs, dtype=torch.float64, device=old.device)
        for x, y in chunks(0, split, group):
            gram += x.T @ x
            cross += x.T @ y
        ridge = RIDGE * float(gram.diagonal().mean()) + 1e-12
        fitted = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype, device=gram.device),
                                    cross + ridge * old.T).T  # fmt: skip
        held = [0.0, 0.0]
        for x, y in chunks(split, len(rates), group):
            held[0] += float(((x @ old.T - y) ** 2).sum())
            held[1] += float(((x @ fitted.T - y) ** 2).sum())
        errors[0] += held[0]
        errors[1] += min(held)
        if held[1] < held[0]:
            new_weight[rows] = fitted[:, :-1].reshape(weight[rows].shape).float()
            new_bias[rows] = fitted[:, -1].float()
    report.synapses[node.name] = {"heldout_error_ratio": round(errors[1] / max(errors[0], 1e-30), 4)}
    compiled.tensors["weight"] = new_weight.to(compiled.tensors["weight"].dtype)
    compiled.tensors["bias"] = new_bias
    node.weight = new_weight.cpu().numpy().astype(np.float32)
    node.bias = new_bias.cpu().numpy().astype(np.float32)


def _fixed_populations(snn: ir.Graph) -> list | None:
    try:
        return populations(snn)
    except ToolchainError:  # a structure the fixed-point mapping refuses: quantize() will say so
        return None


def _readout_offsets(spikes_in: torch.Tensor, ann_logits: torch.Tensor) -> torch.Tensor:
    return (ann_logits - spikes_in.mean(dim=0)).mean(dim=_other_dims(ann_logits))


def _correct_readout(
    snn: ir.Graph, readout: ir.Node, logits: torch.Tensor, ann_logits: torch.Tensor, report: LatencyCalibration
) -> bool:
    synapse = _bias_synapse(snn, readout)
    if synapse is not None:
        offset = _readout_offsets(logits, ann_logits).cpu().numpy().astype(np.float32)
        _add_bias(synapse, offset)
        report.layers[readout.name] = {"bias_placed": True, "bias_abs_mean": round(float(np.abs(offset).mean()), 6)}
    else:
        report.layers[readout.name] = {"bias_placed": False}
    return synapse is not None


def _bias_synapse(snn: ir.Graph, node: ir.Node) -> ir.Node | None:
    """The synapse whose bias can take a correction of `node`'s input, or None.

    The producer of the input must feed only `node` (else the others would see the shift
    too). Through a residual Add, the first branch that is such a synapse takes it.
    """
    if len(snn.consumers(node.inputs[0])) != 1:
        return None
    producer: ir.Node | None = snn.node(node.inputs[0])
    if isinstance(producer, ir.Add):
        branches = [snn.node(name) for name in producer.inputs]
        producer = next((b for b in branches if isinstance(b, BIASED) and len(snn.consumers(b.name)) == 1), None)
    return producer if isinstance(producer, BIASED) else None


def _add_bias(synapse: ir.Node, offset: np.ndarray) -> None:
    if isinstance(synapse, (ir.Conv2d, ir.Linear)):
        bias = np.zeros(offset.shape, np.float32) if synapse.bias is None else synapse.bias
        synapse.bias = (bias + offset).astype(np.float32)
    elif isinstance(synapse, ir.ScaleShift):
        synapse.shift = (np.broadcast_to(synapse.shift, offset.shape) + offset).astype(np.float32)
