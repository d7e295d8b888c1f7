"""The one small interface every backend implements, and the registry that finds them."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from toolchain.errors import ToolchainError
from toolchain.ir import Graph


@dataclass
class SimOutput:
    """What one batch run for T steps gives back.

    `readout[t]` is the readout layer's input accumulated over steps 0..t, shape (T, B, classes).
    `spikes[layer][t]` is the number of spikes the layer emitted at step t, summed over the batch.
    """

    readout: np.ndarray
    spikes: dict[str, np.ndarray] = field(default_factory=dict)


class Target(Protocol):
    name: str

    def prepare(self, graph: Graph) -> None:
        """Lower the graph once; later `run` calls stream batches through it."""

    def run(self, x: np.ndarray, steps: int) -> SimOutput:
        """Run a preprocessed batch (B, *input_shape) for `steps` time steps."""


TARGET_MODULES = {
    "torch": "targets.torch.simulator",
    "loihi": "targets.loihi.emulator",
    "lava": "targets.lava.runner",
}


def get_target(name: str, **options: object) -> Target:
    """Instantiate a backend by name; its module exposes `make_target(**options)`."""
    if name not in TARGET_MODULES:
        raise ToolchainError(f"unknown target {name!r}; choose one of {', '.join(TARGET_MODULES)}")
    module = importlib.import_module(TARGET_MODULES[name])
    return module.make_target(**options)


def open_target(name: str, artifact: str | Path | None = None, device: str = "auto") -> Target:
    """A backend ready to `prepare` an artifact's graph: fixed-point targets reuse the
    artifact's saved fixed-point network when the build wrote one, so what runs is
    exactly what was validated."""
    options: dict[str, object] = {"device": device}
    if name in ("loihi", "lava") and artifact is not None:
        from toolchain.quantize import has_fixed, load_fixed

        if has_fixed(artifact):
            options["fixed"] = load_fixed(artifact)
    try:
        return get_target(name, **options)
    except ImportError as exc:
        raise ToolchainError(f"target {name!r} is not available here ({exc})") from None
