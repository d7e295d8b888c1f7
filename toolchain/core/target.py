"""The interface every backend implements (`targets/*`), and what a run gives back.

A backend runs one kind of graph (`graph_kind`): the float SNN (`toolchain.core.ir.Graph`)
or the fixed-point network (`toolchain.core.fixed.FixedGraph`). Drivers find backends by
name in the registry (`targets/__init__.py`) and never import a backend's module themselves.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np

from toolchain.errors import ToolchainError

GraphKind = Literal["float", "fixed"]


@dataclass
class SimOutput:
    """What one batch run for T steps gives back.

    `readout[t]` is the readout layer's input accumulated over steps 0..t, shape (T, B, classes).
    `spikes[layer][t]` is the number of spikes the layer emitted at step t, summed over the batch.
    `neuron_spikes[layer]`, where a backend offers it, is each neuron's spikes summed over the
    batch and the steps (for exact synaptic-operation counts).
    """

    readout: np.ndarray
    spikes: dict[str, np.ndarray] = field(default_factory=dict)
    neuron_spikes: dict[str, np.ndarray] | None = None


@dataclass
class Recording:
    """Everything one batch run produced, in logical time (step k of each layer)."""

    spikes: dict[str, np.ndarray]  # IF layer -> (T, B, *shape) bool
    readout: np.ndarray  # (T, B, classes) int64 accumulator
    # layer -> saturation counts: per step (T,) from the emulator, one total (1,) from Lava
    overflows: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # IF layer -> (T,) spikes summed over batch
    neuron_counts: dict[str, np.ndarray] = field(default_factory=dict)  # IF layer -> (n,) summed over T and batch


class Target(Protocol):
    """A backend. `prepare` lowers a graph of `graph_kind` once; later `run` calls stream batches
    through it; `close` releases what it holds (a runtime, processes); calling it twice is harmless."""

    name: ClassVar[str]
    graph_kind: ClassVar[GraphKind]

    def prepare(self, graph: Any) -> None: ...

    def run(self, x: np.ndarray, steps: int) -> SimOutput:
        """Run a preprocessed batch (B, *input_shape) for `steps` time steps."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class RecordingTarget(Target, Protocol):
    """A backend that can also give every IF layer's spikes per step per neuron (the fixed-point ones).
    `records_spikes` says whether its recordings hold them (Lava's only when built with record=True)."""

    records_spikes: bool

    def run_recorded(self, x: np.ndarray, steps: int) -> Recording: ...


def check_options(target: type, options: dict[str, Any]) -> None:
    """Refuse options a backend's constructor does not take, naming the ones it does."""
    accepted = [p for p in inspect.signature(target).parameters if p not in ("self",)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ToolchainError(
            f"target {target.name!r} has no option {', '.join(map(repr, unknown))}; it takes {', '.join(accepted) or 'none'}"
        )


def check_graph_kind(target: Target, graph: Any, expected: type) -> None:
    """A backend given the other kind of graph says which one it runs."""
    if not isinstance(graph, expected):
        raise ToolchainError(f"the {target.name} target runs a {expected.__name__}, not a {type(graph).__name__}")
