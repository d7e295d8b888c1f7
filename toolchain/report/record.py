"""Per-neuron spike counts, so that synaptic operations are counted exactly.

`SimOutput.spikes` holds one number per layer and step. A neuron's fan-out depends
on where it sits (a neuron at the border of a padded convolution drives fewer
synapses), so `spikes x mean fan-out` is only an estimate. `SpikeMapRecorder` wraps a
target and keeps, for every IF layer, the spikes of each neuron summed over the
samples and the steps of each run: with them the report sums spike x fan-out neuron
by neuron.

The torch target runs as itself, with an observer slipped into its executor. Any other target can
offer the same by returning a `neuron_spikes` mapping (layer -> per-neuron counts,
summed over batch and steps) on its `SimOutput`. A target with a `run_recorded(x, steps)`
method returning per-step, per-neuron spikes (the fixed-point ones) is run a second time
through it (pass `rerun=False` to avoid that). Otherwise the maps are dropped and the
report falls back to the estimate (and says so).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from toolchain.core import ir
from toolchain.core.target import RecordingTarget, SimOutput, Target


class SpikeMapRecorder:
    """A `Target` that runs another one and also records spikes per neuron."""

    def __init__(self, target: Target, rerun: bool = True):
        self.target = target
        self.rerun = rerun
        self.name = target.name
        self.maps: dict[str, np.ndarray] | None = {}
        self.steps: int | None = None

    def prepare(self, graph: ir.Graph) -> None:
        self.target.prepare(graph)

    def run(self, x: np.ndarray, steps: int) -> SimOutput:
        if self.steps is not None and steps != self.steps:
            self.maps = None  # maps over different step counts cannot be combined
        self.steps = steps
        if _is_torch_target(self.target):
            out, maps = _run_torch(self.target, x, steps)
        else:
            out = self.target.run(x, steps)
            maps = out.neuron_spikes
            if maps is None and self.rerun and isinstance(self.target, RecordingTarget) and self.target.records_spikes:
                maps = _recorded_maps(self.target, x, steps, out)
        if maps is None:
            self.maps = None
        elif self.maps is not None:
            for layer, counts in maps.items():
                counts = np.asarray(counts, np.float64).reshape(-1)
                self.maps[layer] = self.maps.get(layer, 0) + counts
        return out


def _recorded_maps(target: Any, x: np.ndarray, steps: int, out: SimOutput) -> dict[str, np.ndarray] | None:
    """Per-neuron counts from a target's `run_recorded(x, steps)`, run a second time.

    Used only when they agree with the counts of the run itself; otherwise there are no maps.
    """
    recording = target.run_recorded(x, steps)
    maps = {name: np.asarray(spikes).sum((0, 1), dtype=np.float64).reshape(-1) for name, spikes in recording.spikes.items()}
    for name, counts in out.spikes.items():
        if name not in maps or maps[name].sum() != float(np.sum(counts)):
            return None
    return maps


def _is_torch_target(target: Any) -> bool:
    try:
        from targets.torch.simulator import TorchTarget
    except ImportError:  # torch missing: then it is not a torch target
        return False
    return isinstance(target, TorchTarget)


def _run_torch(target: Any, x: np.ndarray, steps: int) -> tuple[SimOutput, dict[str, np.ndarray] | None]:
    """`TorchTarget.run` itself, with an observer slipped into its executor to count spikes per neuron.

    The target keeps its own batching and counting; an IF layer's output is non-zero exactly
    where it spikes (spike x threshold, threshold > 0). The maps are kept only when they add up
    to the target's own counts.
    """
    import torch

    executor = target.executor
    assert executor is not None, "prepare() first"
    per_neuron: dict[str, np.ndarray] = {}

    def count(node: ir.Node, value: torch.Tensor) -> None:
        if isinstance(node, ir.IFNeuron):
            fired = (value != 0).sum((0, 1), dtype=torch.int64)
            counts = fired.cpu().numpy().astype(np.float64).reshape(-1)
            per_neuron[node.name] = per_neuron[node.name] + counts if node.name in per_neuron else counts

    original = executor.run

    def observed_run(inputs: Any, run_steps: int, observe: Any = None, **kwargs: Any) -> Any:
        def both(node: ir.Node, value: Any) -> None:
            if observe is not None:
                observe(node, value)
            count(node, value)

        return original(inputs, run_steps, both, **kwargs)

    executor.run = observed_run  # an instance attribute, shadowing the method for this call only
    try:
        out = target.run(x, steps)
    finally:
        del executor.run
    for name, counts in out.spikes.items():
        if name not in per_neuron or per_neuron[name].sum() != float(np.sum(counts)):
            return out, None
    return out, per_neuron

