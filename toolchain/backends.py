"""The drivers' door to the backends: find one by name, refuse options it does not take, and
give a fixed-point backend the network it runs (the artifact's saved one, or the float SNN
quantised now). Backends import only the core; the quantise pass is handed to them from here.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

from targets import target_class
from toolchain.core.fixed import has_fixed, load_fixed
from toolchain.core.target import Target, check_options
from toolchain.passes.quantize import quantize

# The keyword arguments of the quantise pass that a fixed-point target takes for a float SNN.
QUANTIZE_OPTIONS = tuple(p for p in inspect.signature(quantize).parameters if p != "graph")


def get_target(name: str, **options: Any) -> Target:
    """A backend by name with its options; unknown options are refused (`ToolchainError`). A
    fixed-point backend also takes the keywords of `quantize`: its `prepare` then accepts the
    float SNN and quantises it with them (unless `fixed`, a network quantised at build time, is given)."""
    cls = target_class(name)
    if cls.graph_kind == "fixed":
        quantize_options = {k: options.pop(k) for k in QUANTIZE_OPTIONS if k in options}
        kept = {k: v for k, v in quantize_options.items() if v is not None}
        options["lower"] = functools.partial(quantize, **kept)
    check_options(cls, options)
    target: Target = cls(**options)
    return target


def open_target(name: str, artifact: str | Path | None = None, device: str = "auto") -> Target:
    """A backend ready to `prepare` an artifact's graph: fixed-point targets reuse the
    artifact's saved fixed-point network when the build wrote one, so what runs is
    exactly what was validated."""
    cls = target_class(name)
    options: dict[str, Any] = {}
    if "device" in inspect.signature(cls).parameters:  # Lava's simulator runs on the host only
        options["device"] = device
    if cls.graph_kind == "fixed" and artifact is not None and has_fixed(artifact):
        options["fixed"] = load_fixed(artifact)
    return get_target(name, **options)
