"""The energy model: per-operation constants with units and citations, and the estimates.

The defaults live in `energy_default.json` beside this file. A user file (JSON, or TOML
read with tomllib/tomli) overrides any subset of them:

    {"name": "my chip", "constants": {"loihi_synaptic_op": 20.0,
                                      "mac": {"value": 0.2, "unit": "pJ", "citation": "..."}},
     "conventions": {"analog_input": "once"}}

A constant given as a bare number keeps the default unit (pJ) and is marked as
overridden, with the user's file as its citation unless a citation is given.

Three estimates per layer, all per sample:

* `ann`: the ANN's MACs x E_MAC (Horowitz 2014, 45 nm);
* `snn_ac`: the SNN's synaptic operations x E_AC, plus the analog first layer's MACs x E_MAC
  (the usual ANN-vs-SNN convention of the conversion literature);
* `loihi`: synaptic ops x 23.6 pJ + neuron updates x 81 (active) or 52 pJ (inactive)
  + spikes x 1.7 pJ within a tile (Davies et al. 2018), plus the analog first layer's MACs
  x E_MAC (Loihi has no multiplier; that layer is charged as 45 nm MACs).
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolchain.errors import ToolchainError

DEFAULT_FILE = Path(__file__).with_name("energy_default.json")
UNITS_IN_PJ = {"fJ": 1e-3, "pJ": 1.0, "nJ": 1e3, "uJ": 1e6, "µJ": 1e6, "mJ": 1e9, "J": 1e12}
CONVENTIONS = {
    # how often the analog first layer's MACs are charged: at every step (the image is fed as a
    # current at every step and recomputed) or once (computed once, held as a constant current)
    "analog_input": ("every_step", "once"),
    # which Loihi neuron-update figure is charged: all updates active (upper bound), all inactive
    # (lower bound), or active only in the steps where the neuron spikes
    "neuron_update": ("active", "inactive", "spiking"),
}
ESTIMATES = {
    "loihi": "Loihi per-op model",
    "snn_ac": "SNN, synaptic ops as accumulates (E_AC)",
    "ann": "ANN, MACs (E_MAC)",
}


@dataclass
class Constant:
    value: float  # as given
    unit: str
    per: str
    citation: str
    overridden: bool = False

    @property
    def pj(self) -> float:
        return self.value * UNITS_IN_PJ[self.unit]

    def to_json(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "unit": self.unit,
            "value_pj": self.pj,
            "per": self.per,
            "citation": self.citation,
            "overridden": self.overridden,
        }


@dataclass
class EnergyModel:
    name: str
    constants: dict[str, Constant]
    conventions: dict[str, str]
    sources: list[str] = field(default_factory=list)

    def pj(self, key: str) -> float:
        return self.constants[key].pj

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sources": list(self.sources),
            "constants": {k: c.to_json() for k, c in self.constants.items()},
            "conventions": dict(self.conventions),
        }

    # ------------------------------------------------------------ estimates

    def estimate(
        self, steps: int, synops: float, neuron_updates: float, spikes: float, analog_macs: float, ann_macs: float
    ) -> dict[str, dict[str, float]]:
        """Energy in pJ per sample for one layer (or the totals), by estimate and component.

        `analog_macs` are the MACs of the analog first layer over all `steps` (fed every step).
        """
        analog = analog_macs * self.pj("mac")
        if self.conventions["analog_input"] == "once":
            analog /= max(1, steps)
        update_rule = self.conventions["neuron_update"]
        if update_rule == "active":
            updates = neuron_updates * self.pj("loihi_neuron_update_active")
        elif update_rule == "inactive":
            updates = neuron_updates * self.pj("loihi_neuron_update_inactive")
        else:
            active = min(spikes, neuron_updates)
            updates = active * self.pj("loihi_neuron_update_active")
            updates += (neuron_updates - active) * self.pj("loihi_neuron_update_inactive")
        loihi = {
            "synaptic_ops": synops * self.pj("loihi_synaptic_op"),
            "neuron_updates": updates,
            "spikes": spikes * self.pj("loihi_spike_within_tile"),
            "analog_input_macs": analog,
        }
        snn_ac = {"synaptic_ops": synops * self.pj("ac"), "analog_input_macs": analog}
        ann = {"macs": ann_macs * self.pj("mac")}
        result = {"loihi": loihi, "snn_ac": snn_ac, "ann": ann}
        for parts in result.values():
            parts["total"] = sum(parts.values())
        return result


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ToolchainError(f"{path}: no such energy-model file")
    text = path.read_bytes()
    if path.suffix.lower() == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            try:
                import tomli as tomllib
            except ImportError:
                raise ToolchainError(f"{path}: reading TOML on Python 3.10 needs the tomli package; or give JSON") from None
        try:
            return tomllib.loads(text.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ToolchainError(f"{path}: not valid TOML ({exc})") from None
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ToolchainError(f"{path}: not valid JSON ({exc}); give a .json or .toml energy model") from None
    if not isinstance(document, dict):
        raise ToolchainError(f"{path}: an energy model is a JSON object with 'constants' (and optionally 'conventions')")
    return document


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ToolchainError(f"{where}: expected a number, got {value!r}")
    if not value >= 0 or value == float("inf"):
        raise ToolchainError(f"{where}: energies must be finite and non-negative, got {value!r}")
    return float(value)


def _merge(model: EnergyModel, document: dict[str, Any], source: str, is_default: bool) -> None:
    unknown = set(document) - {"name", "constants", "conventions", "description", "schema"}
    if unknown:
        raise ToolchainError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; expected name, constants, conventions")
    if "name" in document:
        model.name = str(document["name"])
    constants = document.get("constants", {})
    if not isinstance(constants, dict):
        raise ToolchainError(f"{source}: 'constants' must be a table of name -> number or {{value, unit, citation}}")
    for key, spec in constants.items():
        where = f"{source}: constants.{key}"
        if key not in model.constants and not is_default:
            raise ToolchainError(f"{where}: unknown constant; known: {', '.join(model.constants)}")
        old = model.constants.get(key)
        if isinstance(spec, dict):
            extra = set(spec) - {"value", "unit", "per", "citation"}
            if extra or "value" not in spec:
                raise ToolchainError(f"{where}: give value (and optionally unit, per, citation); got keys {sorted(spec)}")
            unit = str(spec.get("unit", old.unit if old else "pJ"))
            value = _number(spec["value"], where)
            per = str(spec.get("per", old.per if old else ""))
            citation = str(spec.get("citation", "" if is_default else f"user value from {source}"))
        else:
            value = _number(spec, where)
            unit = old.unit if old else "pJ"
            per = old.per if old else ""
            citation = "" if is_default else f"user value from {source}"
        if unit not in UNITS_IN_PJ:
            raise ToolchainError(f"{where}: unit {unit!r} not understood; use one of {', '.join(UNITS_IN_PJ)}")
        if not citation:
            raise ToolchainError(f"{where}: every default constant needs a citation")
        model.constants[key] = Constant(value, unit, per, citation, overridden=not is_default)
    conventions = document.get("conventions", {})
    if not isinstance(conventions, dict):
        raise ToolchainError(f"{source}: 'conventions' must be a table")
    for key, value in conventions.items():
        if key not in CONVENTIONS:
            raise ToolchainError(f"{source}: conventions.{key}: unknown; known: {', '.join(CONVENTIONS)}")
        if value not in CONVENTIONS[key]:
            raise ToolchainError(f"{source}: conventions.{key} = {value!r}; choose one of {', '.join(CONVENTIONS[key])}")
        model.conventions[key] = value
    model.sources.append(source)


def load_energy_model(override: str | Path | dict[str, Any] | EnergyModel | None = None) -> EnergyModel:
    """The default model, with `override` (a file, or an already parsed dict) applied on top."""
    if isinstance(override, EnergyModel):
        return copy.deepcopy(override)
    model = EnergyModel(name="", constants={}, conventions={})
    _merge(model, json.loads(DEFAULT_FILE.read_text()), f"default ({DEFAULT_FILE.name})", is_default=True)
    missing = set(CONVENTIONS) - set(model.conventions)
    if missing:
        raise ToolchainError(f"{DEFAULT_FILE}: conventions {sorted(missing)} missing")
    if isinstance(override, dict):
        _merge(model, override, "energy model given in code", is_default=False)
    elif override is not None:
        path = Path(override)
        _merge(model, _read_file(path), str(path), is_default=False)
    return model
