"""Will it fit? The Loihi resources a fixed-point network needs, per population and in cores.

Counted exactly from the integer weights (no dense matrix is built): neurons (compartments),
synapses (the non-zero (source neuron, target neuron) pairs of every synapse, a sum-pool's
cells each their own synapse), the largest fan-in of a neuron and fan-out of a source
neuron, and an estimate of synaptic memory.

Cores under published per-core limits:

* Loihi 1 (Davies et al., "Loihi: a neuromorphic manycore processor with on-chip learning",
  IEEE Micro 38(1), 2018): 128 cores per chip, each 1,024 compartments, 4,096 input axons,
  4,096 output axons and 128 KiB of synaptic memory.
* Loihi 2 (Intel Labs, "Taking Neuromorphic Computing to the Next Level with Loihi 2",
  technology brief, 2021): 128 cores per chip, up to 1 million neurons and 120 million
  synapses per chip, 192 KiB of memory per core shared by neuron state and synapses. The
  brief gives no per-core axon limits; 8,192 neurons per core is the chip total over its cores.

A population is split over enough cores that each core's share of neurons, synaptic memory
and input axons fits. Input axons are the distinct source neurons a core's neurons hear,
estimated with the neurons packed channels innermost (all channels of a pixel on one core):
a conv synapse's tile of p x p pixels hears the (p s + (k - 1) d)^2 source pixels under it,
all of its input channels; a dense synapse at most the core's neurons times their fan-in; and
never more than the source has. Synaptic memory is an
estimate: `SYNAPSE_BITS` per synapse (an 8-bit weight and about 8 bits of sparse index; the
real encoding depends on the compiler's choice of dense, sparse or shared formats).
Convolutional weight sharing, which Loihi 2 can exploit, is not assumed; output axons
(one per destination core of each neuron) depend on the placement and are not checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolchain.core.fixed import FixedGraph, FixedLayer, FixedSynapse

SYNAPSE_BITS = 16


@dataclass(frozen=True)
class Chip:
    name: str
    cores: int
    neurons_per_core: int
    input_axons_per_core: int | None
    output_axons_per_core: int | None
    synapse_bytes_per_core: int
    neurons_per_chip: int
    synapses_per_chip: int
    source: str


CHIPS = {
    "loihi1": Chip("Loihi 1", 128, 1024, 4096, 4096, 128 * 1024, 131_072, 130_000_000,
                   "Davies et al., IEEE Micro 38(1), 2018"),
    "loihi2": Chip("Loihi 2", 128, 8192, None, None, 192 * 1024, 1_000_000, 120_000_000,
                   "Intel Labs, Loihi 2 technology brief, 2021"),
}


def _fan(syn: FixedSynapse, layer: FixedLayer) -> tuple[np.ndarray, np.ndarray]:
    """(fan-in per target neuron, fan-out per source neuron) of one synapse: counts of non-zero weights."""
    import torch
    import torch.nn.functional as F

    mask = (syn.weight != 0).astype(np.float64)
    pooled = syn.pooled_shape
    area = syn.pool[0] * syn.pool[1]
    x = torch.ones((1, *pooled), dtype=torch.float64, requires_grad=True)
    if syn.kind == "conv":
        top, left, bottom, right = syn.padding
        y = F.conv2d(F.pad(x, (left, right, top, bottom)), torch.as_tensor(mask), None, syn.stride, 0,
                     syn.dilation, syn.groups)
    else:
        y = x.reshape(1, -1) @ torch.as_tensor(mask).T
    y.sum().backward()
    fan_in = y.detach().numpy().reshape(-1) * area
    fan_out = x.grad.numpy()  # type: ignore[union-attr]
    if syn.pool != (1, 1):  # every source neuron of a pool cell reaches what the cell reaches
        c, h, w = syn.in_shape
        full = np.zeros((c, h, w))
        ph, pw = syn.pool
        cell = np.repeat(np.repeat(fan_out.reshape(pooled), ph, axis=1), pw, axis=2)
        full[:, : cell.shape[1], : cell.shape[2]] = cell
        fan_out = full
    return fan_in, fan_out.reshape(-1)


def _input_axons(layer: FixedLayer, neurons: int, max_fan_in: int) -> int:
    """The distinct source neurons that `neurons` of the layer, packed channels innermost, hear (an estimate)."""
    total = 0
    for syn in layer.synapses:
        source = int(math.prod(syn.in_shape))
        if syn.kind == "conv" and len(layer.shape) == 3:
            pixels = math.ceil(neurons / layer.shape[0])
            side = math.isqrt(pixels - 1) + 1  # a square tile holding them
            kh, kw = syn.weight.shape[2:]
            rows = min(syn.pooled_shape[1], side * syn.stride[0] + (kh - 1) * syn.dilation[0])
            cols = min(syn.pooled_shape[2], side * syn.stride[1] + (kw - 1) * syn.dilation[1])
            heard = syn.pooled_shape[0] * rows * cols * syn.pool[0] * syn.pool[1]
        else:
            heard = neurons * max_fan_in
        total += min(source, heard)
    return total


def resources(fixed: FixedGraph, chip: str = "loihi1") -> dict[str, Any]:
    """Per population and in total: neurons, synapses, memory, fan-in/out and cores on `chip`, with
    warnings where a population or the network exceeds a core or the chip."""
    spec = CHIPS[chip]
    fan_out: dict[str | None, np.ndarray] = {}
    rows = []
    for layer in fixed.layers:
        fan_in = np.zeros(layer.size)
        for syn in layer.synapses:
            syn_in, syn_out = _fan(syn, layer)
            fan_in += syn_in
            fan_out[syn.source] = fan_out.get(syn.source, 0) + syn_out
        synapses = int(fan_in.sum())
        memory = synapses * SYNAPSE_BITS // 8
        max_fan_in = int(fan_in.max(initial=0))
        cores = max(1, math.ceil(layer.size / spec.neurons_per_core), math.ceil(memory / spec.synapse_bytes_per_core))
        if spec.input_axons_per_core is not None:
            limit = spec.input_axons_per_core
            while cores < layer.size and _input_axons(layer, math.ceil(layer.size / cores), max_fan_in) > limit:
                cores += 1
        rows.append({"layer": layer.name, "neurons": layer.size, "synapses": synapses, "synapse_bytes": memory,
                     "max_fan_in": max_fan_in, "cores": cores})
    for row in rows:
        out = fan_out.get(row["layer"])
        row["max_fan_out"] = int(out.max(initial=0)) if out is not None else 0
    warnings = []
    for row in rows:
        if spec.input_axons_per_core is not None and row["max_fan_in"] > spec.input_axons_per_core:
            warnings.append(f"layer {row['layer']!r}: a neuron hears {row['max_fan_in']} inputs, more than the "
                            f"{spec.input_axons_per_core} input axons of a {spec.name} core")
        if row["cores"] > spec.cores:
            warnings.append(f"layer {row['layer']!r} needs {row['cores']} cores, more than a {spec.name} chip's {spec.cores}")
    total = {
        "neurons": sum(r["neurons"] for r in rows),
        "synapses": sum(r["synapses"] for r in rows),
        "synapse_bytes": sum(r["synapse_bytes"] for r in rows),
        "cores": sum(r["cores"] for r in rows),
        "input_fan_out": int(fan_out[None].max(initial=0)) if None in fan_out else 0,
    }
    chips = max(math.ceil(total["cores"] / spec.cores), math.ceil(total["neurons"] / spec.neurons_per_chip),
                math.ceil(total["synapses"] / spec.synapses_per_chip))
    total["chips"] = chips
    if chips > 1:
        warnings.append(f"the network needs {chips} {spec.name} chips ({total['cores']} cores, {total['neurons']} neurons, "
                        f"{total['synapses']} synapses; one chip: {spec.cores} cores, {spec.neurons_per_chip} neurons, "
                        f"{spec.synapses_per_chip} synapses)")
    return {"chip": spec.name, "source": spec.source, "synapse_bits": SYNAPSE_BITS, "layers": rows, "total": total,
            "warnings": warnings}


def resource_lines(report: dict[str, Any]) -> list[str]:
    """The report as the lines the CLI prints."""
    total = report["total"]
    lines = [f"{report['chip']} resources ({report['source']}; memory at {report['synapse_bits']} bits per synapse):"]
    for row in report["layers"]:
        lines.append(
            f"  {row['layer']:<28} {row['neurons']:>8} neurons {row['synapses']:>10} synapses "
            f"{row['synapse_bytes'] / 1024:>9.1f} KiB  fan-in {row['max_fan_in']:>5}  fan-out {row['max_fan_out']:>5}"
            f"  {row['cores']:>4} cores"
        )
    lines.append(f"  total: {total['neurons']} neurons, {total['synapses']} synapses, "
                 f"{total['synapse_bytes'] / 1024:.1f} KiB, {total['cores']} cores, {total['chips']} chip(s)")
    lines += [f"  warning: {w}" for w in report["warnings"]]
    return lines


def fit_lines(build_log: dict[str, Any]) -> list[str]:
    """What a fixed-point build prints after its layers: Lava's path alignment, then the resources
    (every Loihi 1 population; Loihi 2 in one line)."""
    timing = build_log["lava_timing"]
    lines = [
        f"lava timing: depth {timing['depth']} steps; {timing['delayed_synapses']} synapses delayed to meet longer paths "
        f"({timing['delay_steps']} steps in all, at most {timing['max_delay']}), {timing['relay_neurons']} relay neurons"
    ]
    lines += resource_lines(build_log["resources"]["loihi1"])
    loihi2 = build_log["resources"]["loihi2"]
    total = loihi2["total"]
    lines.append(f"{loihi2['chip']} ({loihi2['source']}): {total['cores']} cores, {total['chips']} chip(s)")
    lines += [f"  warning: {w}" for w in loihi2["warnings"]]
    return lines
