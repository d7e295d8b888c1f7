"""Backends that run a converted network, one folder each, and the registry that names them.

Each backend implements `toolchain.core.target.Target` and imports only the core
(`toolchain.core`, `toolchain.errors`) and its own folder. Adding a target is its folder
plus one entry in `TARGETS`; the command line's `--target` choices come from here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from toolchain.core.target import GraphKind
from toolchain.errors import ToolchainError


@dataclass(frozen=True)
class TargetEntry:
    path: str  # "module:class"
    graph_kind: GraphKind  # what its `prepare` takes; known here so a build need not import the backend


# Importing a backend can be slow (Lava) or fail (Lava off Python 3.10), so the registry names
# them and imports only the one asked for.
TARGETS: dict[str, TargetEntry] = {
    "torch": TargetEntry("targets.torch.simulator:TorchTarget", "float"),
    "loihi": TargetEntry("targets.loihi.emulator:LoihiTarget", "fixed"),
    "lava": TargetEntry("targets.lava.runner:LavaTarget", "fixed"),
}


def entry(name: str) -> TargetEntry:
    if name not in TARGETS:
        raise ToolchainError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


def graph_kind(name: str) -> GraphKind:
    """Whether the target runs the float SNN or its fixed-point network, without importing it."""
    return entry(name).graph_kind


def target_class(name: str) -> Any:
    """The backend class registered under `name` (its module imported now)."""
    module, cls = entry(name).path.split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise ToolchainError(f"target {name!r} is not available here ({exc})") from None
