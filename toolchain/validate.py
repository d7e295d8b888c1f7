"""Lava against the emulator, spike for spike: the check behind `toolchain build --validate`.

Two independent implementations of the fixed-point arithmetic (`toolchain.core.fixed`): the
emulator (`targets/loihi`) and the Lava process models (`targets/lava`). They are compared on
every IF layer's spikes at every step and on the readout accumulators.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolchain.backends import get_target
from toolchain.core import ir
from toolchain.core.fixed import FixedGraph, as_fixed
from toolchain.passes.quantize import quantize


@dataclass
class ValidationReport:
    samples: int
    steps: int
    layers: list[str]
    mismatch: dict[str, Any] | None  # first difference: layer, sample, step (logical), neuron, lava, emulator
    readout_equal: bool
    overflows_lava: dict[str, int]
    overflows_emulator: dict[str, int]
    lava_seconds_per_sample: float
    lava_build_seconds: float
    lava_startup_seconds: float  # wall time of the first sample: compiling, starting the runtime, running it
    emulator_seconds: float
    spikes_compared: int

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok, "summary": self.summary()}

    @property
    def ok(self) -> bool:
        return self.mismatch is None and self.readout_equal

    def summary(self) -> str:
        if self.ok:
            return (
                f"lava == emulator: {self.spikes_compared} spike slots in {len(self.layers)} layers, "
                f"{self.samples} samples x {self.steps} steps, identical; readout identical"
            )
        if self.mismatch is None:
            return "spikes identical but the readout accumulators differ"
        m = self.mismatch
        return (
            f"first difference in layer {m['layer']!r}, sample {m['sample']}, step {m['step']}, neuron {m['neuron']}: "
            f"lava {m['lava']} vs emulator {m['emulator']}"
        )


def validate(graph: ir.Graph | FixedGraph, x_batch: np.ndarray, steps: int, **options: object) -> ValidationReport:
    """Run the samples through Lava (fixed_pt) and the emulator; compare every IF layer's spikes at
    every step and the readout accumulators. `options` go to `quantize` (when `graph` is a float SNN)."""
    fixed = as_fixed(graph, None, functools.partial(quantize, **options), "lava")
    emulator = get_target("loihi", device="cpu", on_overflow="saturate")
    emulator.prepare(fixed)
    started = time.perf_counter()
    expected = emulator.run_recorded(x_batch, steps)
    emulator_seconds = time.perf_counter() - started
    lava = get_target("lava", record=True, on_overflow="saturate")
    lava.prepare(fixed)
    try:
        got = lava.run_recorded(x_batch, steps)
    finally:
        lava.close()
    order = [layer.name for layer in fixed.if_layers]
    mismatch = first_mismatch(order, got.spikes, expected.spikes)
    return ValidationReport(
        samples=len(x_batch),
        steps=steps,
        layers=order,
        mismatch=mismatch,
        readout_equal=bool(np.array_equal(got.readout, expected.readout)),
        overflows_lava={k: int(v.sum()) for k, v in got.overflows.items()},
        overflows_emulator={k: int(v.sum()) for k, v in expected.overflows.items()},
        lava_seconds_per_sample=float(lava.seconds_per_sample or 0.0),
        lava_build_seconds=float(lava.build_seconds or 0.0),
        lava_startup_seconds=float(lava.startup_seconds or 0.0),
        emulator_seconds=emulator_seconds,
        spikes_compared=int(sum(v.size for v in expected.spikes.values())),
    )


def first_mismatch(order: list[str], got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """Earliest (sample, step) first, then the layer order, then the neuron index."""
    best: tuple[int, int, int, int] | None = None
    for index, name in enumerate(order):
        a = got[name].reshape(got[name].shape[0], got[name].shape[1], -1)
        b = expected[name].reshape(a.shape)
        diff = np.argwhere(a != b)  # (step, sample, neuron)
        if len(diff):
            step, sample, neuron = (int(v) for v in diff[np.lexsort((diff[:, 2], diff[:, 0], diff[:, 1]))[0]])
            key = (sample, step, index, neuron)
            best = key if best is None or key < best else best
    if best is None:
        return None
    sample, step, index, neuron = best
    name = order[index]
    return {
        "layer": name,
        "sample": sample,
        "step": step,
        "neuron": neuron,
        "lava": int(got[name].reshape(got[name].shape[0], got[name].shape[1], -1)[step, sample, neuron]),
        "emulator": int(expected[name].reshape(expected[name].shape[0], expected[name].shape[1], -1)[step, sample, neuron]),
    }
