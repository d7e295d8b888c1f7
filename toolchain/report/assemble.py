"""Evaluation + graph + energy model -> one plain, JSON-ready report dict.

Every number any renderer shows is computed here, once; the renderers only format.
All per-layer numbers are means per sample over the evaluated samples, at T steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from toolchain.core import ir
from toolchain.errors import ToolchainError
from toolchain.evaluate import Evaluation
from toolchain.report.counts import populations, synapse_depth, total_ann_macs
from toolchain.report.energy import ESTIMATES, EnergyModel, load_energy_model

SCHEMA = "toolchain-report/1"

LEAVES_OUT = [
    "Memory traffic: fetching weights, membrane potentials and activations from SRAM or DRAM is not counted, "
    "for the ANN nor for the SNN (Horowitz 2014 puts a DRAM access in the nanojoules, hundreds of times a 45 nm MAC).",
    "Static (leakage) power and idle time of the chip or the accelerator.",
    "Off-chip I/O: sending the image to the chip and reading the class back, and any host processor.",
    "Spike routing between tiles (3.0 / 4.0 pJ per E-W / N-S hop): the placement of layers on cores is unknown.",
    "The ANN's bias adds, pooling, activations and normalisation; only conv and linear MACs are counted.",
    "Differences of process and number format: the Loihi figures are pre-silicon estimates for a 14 nm chip, "
    "E_MAC / E_AC are for 45 nm 32-bit float arithmetic; the ratios compare accounting conventions, not measured chips.",
]


def report_steps(steps: int) -> list[int]:
    """1, 2, 4, ... below `steps`, and `steps` itself: the T values of the accuracy curve."""
    if steps < 1:
        raise ToolchainError(f"-T {steps}: time steps must be a positive integer")
    values = [1 << k for k in range(steps.bit_length()) if (1 << k) < steps]
    return values + [steps]


def build_report(
    graph: ir.Graph,
    evaluation: Evaluation,
    energy_model: EnergyModel | str | Path | dict[str, Any] | None = None,
    target: str = "torch",
    wall_seconds: float | None = None,
    spike_maps: dict[str, np.ndarray] | None = None,
    artifact: str | Path | None = None,
    data: str | None = None,
) -> dict[str, Any]:
    """The report at T = max(evaluation.steps).

    `spike_maps` (layer -> spikes per neuron, summed over the samples and all T steps, e.g.
    from `SpikeMapRecorder`) make the synaptic-operation counts exact; without them they are
    estimated from the layer's spikes and its mean fan-out.
    """
    model = load_energy_model(energy_model)
    if evaluation.samples < 1:
        raise ToolchainError("the evaluation ran no samples; nothing to report")
    steps = max(evaluation.steps)
    samples = evaluation.samples
    pops = populations(graph)
    notes: list[str] = []
    layers: list[dict[str, Any]] = []
    missing = [p.name for p in pops if p.kind == "if" and p.name not in evaluation.spikes]
    if missing:
        raise ToolchainError(
            f"target {target!r} recorded no spike counts for layer(s) {', '.join(missing)}; cannot report them"
        )
    for pop in pops:
        row: dict[str, Any] = {
            "name": pop.name,
            "kind": pop.kind,
            "shape": list(pop.shape),
            "neurons": pop.neurons,
            "drives": pop.drives,
            "targets": pop.targets,
            "fanout": None,
            "spikes": None,
            "firing_rate": None,
            "synops": None,
            "synops_bounds": None,
            "synops_method": None,
            "neuron_updates": 0,
            "analog_macs": 0,
            "analog_macs_per_step": 0,
            "ann_macs": pop.ann_macs,
        }
        if pop.fanout is not None:
            row["fanout"] = {
                "mean": float(pop.fanout.mean()) if pop.neurons else 0.0,
                "min": int(pop.fanout.min()) if pop.neurons else 0,
                "max": int(pop.fanout.max()) if pop.neurons else 0,
                "total": pop.fanout_total,
                "method": pop.fanout_method,
            }
        if pop.kind == "input":
            row["analog_macs_per_step"] = pop.ann_macs
            row["analog_macs"] = pop.ann_macs * steps
        elif pop.kind == "if":
            total = float(np.sum(np.asarray(evaluation.spikes[pop.name], np.float64)[:steps]))
            spikes = total / samples
            row["spikes"] = spikes
            row["firing_rate"] = spikes / (pop.neurons * steps) if pop.neurons else 0.0
            row["neuron_updates"] = pop.neurons * steps
            assert pop.fanout is not None
            per_neuron = None if spike_maps is None else spike_maps.get(pop.name)
            if per_neuron is not None:
                per_neuron = np.asarray(per_neuron, np.float64).reshape(-1)
                if per_neuron.size != pop.neurons or not np.isclose(per_neuron.sum(), total, rtol=1e-9, atol=0.5):
                    raise ToolchainError(
                        f"layer {pop.name!r}: the per-neuron spike map ({per_neuron.sum():.0f} spikes, {per_neuron.size} "
                        f"neurons) does not match the evaluation ({total:.0f} spikes, {pop.neurons} neurons)"
                    )
                row["synops"] = float(per_neuron @ pop.fanout.astype(np.float64)) / samples
                row["synops_method"] = "exact"
            else:
                row["synops"] = spikes * row["fanout"]["mean"]
                row["synops_bounds"] = [spikes * row["fanout"]["min"], spikes * row["fanout"]["max"]]
                row["synops_method"] = "mean fan-out"
            if pop.through_maxpool:
                notes.append(
                    f"{pop.name}: its spikes pass a spiking max-pool, which passes on only as many spikes as the most active "
                    "input of each window; its synaptic operations count every spike and are an upper bound."
                )
        else:  # readout: accumulates its input at every step, never spikes
            row["neuron_updates"] = pop.neurons * steps
        row["energy_pj"] = model.estimate(
            steps,
            synops=row["synops"] or 0.0,
            neuron_updates=row["neuron_updates"],
            spikes=row["spikes"] or 0.0,
            analog_macs=row["analog_macs"],
            ann_macs=row["ann_macs"],
        )
        layers.append(row)

    methods = {r["synops_method"] for r in layers if r["synops_method"]}
    if "mean fan-out" in methods:
        notes.append(
            "Synaptic operations are estimated as each layer's spikes x its mean fan-out (the target gave no "
            "per-neuron spike counts); the bounds with the smallest and largest fan-out are in the JSON report."
        )
    totals = _totals(layers, graph, steps)
    accuracy = {
        "ann": evaluation.ann_accuracy(),
        "snn": {str(t): a for t, a in evaluation.snn_accuracy().items()},
        "agreement": {str(t): c / samples for t, c in evaluation.agreement.items()},
        "spikes_per_sample": {str(t): float(sum(evaluation.spikes_per_sample(t).values())) for t in evaluation.steps},
    }
    seconds = evaluation.seconds if wall_seconds is None else float(wall_seconds)
    depth = synapse_depth(graph)
    return {
        "schema": SCHEMA,
        "artifact": None if artifact is None else str(artifact),
        "source_model": graph.meta.get("source"),
        "data": data,
        "target": target,
        "samples": samples,
        "steps": steps,
        "accuracy": accuracy,
        "latency": {
            "time_steps": steps,
            "synaptic_stages": depth,
            "wall_seconds": seconds,
            "wall_seconds_per_sample": seconds / samples,
        },
        "layers": layers,
        "totals": totals,
        "energy_model": model.to_json(),
        "estimates": dict(ESTIMATES),
        "conventions": _conventions(model, steps, methods),
        "notes": notes,
        "leaves_out": list(LEAVES_OUT),
    }


def _totals(layers: list[dict[str, Any]], graph: ir.Graph, steps: int) -> dict[str, Any]:
    def total(key: str) -> float:
        return float(sum(r[key] or 0 for r in layers))

    ann_macs = int(total("ann_macs"))
    if ann_macs != total_ann_macs(graph):  # every synapse op is attributed to exactly one layer
        raise AssertionError(f"MAC attribution lost ops: {ann_macs} != {total_ann_macs(graph)}")
    energy: dict[str, dict[str, float]] = {}
    for row in layers:
        for estimate, parts in row["energy_pj"].items():
            bucket = energy.setdefault(estimate, {})
            for part, value in parts.items():
                bucket[part] = bucket.get(part, 0.0) + value
    snn = {k: energy[k]["total"] for k in ("loihi", "snn_ac")}
    return {
        "neurons": int(sum(r["neurons"] for r in layers if r["kind"] != "input")),
        "spiking_neurons": int(sum(r["neurons"] for r in layers if r["kind"] == "if")),
        "spikes": total("spikes"),
        "firing_rate": total("spikes") / max(1, sum(r["neurons"] for r in layers if r["kind"] == "if")) / steps,
        "synops": total("synops"),
        "neuron_updates": total("neuron_updates"),
        "analog_macs": total("analog_macs"),
        "ann_macs": ann_macs,
        "energy_pj": energy,
        # > 1: the SNN is estimated to spend more energy per sample than the ANN
        "snn_over_ann": {k: (v / energy["ann"]["total"] if energy["ann"]["total"] > 0 else None) for k, v in snn.items()},
    }


def _conventions(model: EnergyModel, steps: int, methods: set[str]) -> list[str]:
    analog = model.conventions["analog_input"]
    update = model.conventions["neuron_update"]
    lines = [
        "All counts are means per sample over the evaluated samples, at T = "
        f"{steps} time steps.",
        "Fan-out of a neuron: the synapses one of its spikes drives, i.e. its distinct connections to the next "
        "neuron layers through the following conv / linear ops with pooling, flatten, add and concat folded in "
        "(structural: every kernel tap counts whatever its weight; padding handled exactly).",
        "Synaptic operations (SynOps): each spike times the fan-out of the neuron that emitted it"
        + (", summed neuron by neuron." if methods == {"exact"} else "."),
        "Firing rate: spikes per neuron per time step. Neuron updates: neurons x T (the readout accumulates at every step).",
        "ANN MACs in a layer's row are those of the synapses that layer drives (the same synapses as its SynOps); "
        "the input row holds the first layer's MACs.",
        "The analog image is fed as a current at every step, so the first layer's MACs run T times in the SNN "
        + (
            "and are charged T times at E_MAC."
            if analog == "every_step"
            else "but are charged once at E_MAC (computed once and held as a constant current)."
        ),
        {
            "active": "Loihi neuron updates are all charged at the active-update figure (an upper bound).",
            "inactive": "Loihi neuron updates are all charged at the inactive-update figure (a lower bound).",
            "spiking": "Loihi neuron updates are charged as active in steps where the neuron spikes, inactive otherwise.",
        }[update],
        "Loihi spike energy: one within-tile spike per emitted spike; no tile hops.",
    ]
    return lines
