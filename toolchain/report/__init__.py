"""Spike counts, synaptic operations and energy estimates of an SNN run, as Markdown, JSON or HTML.

    from toolchain.report import write_report
    write_report(artifact_dir, evaluation, graph, "html", "report.html", energy_model=None, target="torch")

`build_report` gives the plain dict every format is rendered from; `SpikeMapRecorder`
wraps a target so that synaptic operations are counted neuron by neuron (exactly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from toolchain.core.ir import Graph
from toolchain.errors import ToolchainError
from toolchain.evaluate import Evaluation
from toolchain.report.assemble import build_report, report_steps
from toolchain.report.energy import EnergyModel, load_energy_model
from toolchain.report.record import SpikeMapRecorder

FORMATS = ("md", "json", "html")

__all__ = [
    "FORMATS",
    "EnergyModel",
    "SpikeMapRecorder",
    "build_report",
    "format_from_path",
    "load_energy_model",
    "render_report",
    "report_steps",
    "write_report",
]


def format_from_path(path: str | Path | None, default: str = "md") -> str:
    suffix = Path(path).suffix.lower().lstrip(".") if path is not None else ""
    return {"md": "md", "markdown": "md", "json": "json", "html": "html", "htm": "html"}.get(suffix, default)


def plot_files(out_path: Path) -> dict[str, str]:
    """The PNG file names written beside a Markdown report."""
    from toolchain.report.plots import PLOTS

    return {key: f"{out_path.stem}-{key.replace('_', '-')}.png" for key in PLOTS}


def render_report(report: dict[str, Any], fmt: str, out_path: Path | None = None) -> tuple[str, dict[str, bytes]]:
    """The document text and the extra files (PNG name -> bytes) to write beside it."""
    from toolchain.report import render
    from toolchain.report.plots import render_plots

    if fmt == "json":
        return render.render_json(report), {}
    if fmt == "html":
        return render.render_html(report, render_plots(report)), {}
    if fmt == "md":
        if out_path is None:
            return render.render_markdown(report), {}
        names = plot_files(out_path)
        images = render_plots(report)
        return render.render_markdown(report, names), {names[k]: png for k, png in images.items()}
    raise ToolchainError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def write_report(
    artifact_dir: str | Path | None,
    evaluation: Evaluation,
    graph: Graph,
    fmt: str,
    out_path: str | Path | None,
    energy_model: str | Path | dict[str, Any] | EnergyModel | None = None,
    target: str = "torch",
    wall_seconds: float | None = None,
    spike_maps: dict[str, np.ndarray] | None = None,
    data: str | None = None,
) -> Path | str:
    """Build the report at T = max(evaluation.steps) and write it to `out_path` (atomically).

    Markdown also writes its plots beside the file (`<stem>-accuracy.png`, ...); HTML embeds
    them. With `out_path` None the Markdown or JSON text is returned instead (HTML needs a file).
    """
    from toolchain.fileio import atomic_file

    if fmt not in FORMATS:
        raise ToolchainError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "html" and out_path is None:
        raise ToolchainError("an HTML report is a file: pass -o report.html (or use --format md / json for stdout)")
    report = build_report(
        graph, evaluation, energy_model, target=target, wall_seconds=wall_seconds, spike_maps=spike_maps,
        artifact=artifact_dir, data=data,
    )
    out = None if out_path is None else Path(out_path)
    text, extra = render_report(report, fmt, out)
    if out is None:
        return text
    if out.is_dir():
        raise ToolchainError(f"{out}: is a folder; give the report's file name, e.g. {out / ('report.' + fmt)}")
    written: list[Path] = []  # new files, removed again if the report cannot be completed
    try:
        for path, payload in [*((out.parent / name, png) for name, png in extra.items()), (out, text.encode("utf-8"))]:
            new = not path.exists()
            atomic_file(path, payload)
            if new:
                written.append(path)
    except (OSError, ToolchainError, KeyboardInterrupt) as exc:
        for path in written:
            path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ToolchainError(f"{out}: cannot write the report ({exc.strerror or exc})") from None
        raise
    return out
