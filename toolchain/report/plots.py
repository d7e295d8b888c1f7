"""The report's plots as PNG bytes (matplotlib's Agg canvas; no pyplot, no display needed)."""

from __future__ import annotations

import io
from typing import Any

PLOTS = {
    "accuracy": "Accuracy vs time steps",
    "firing_rate": "Firing rate per layer",
    "energy": "Energy per layer",
}


def _figure(width: float = 6.4, height: float = 3.6) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _short(name: str, length: int = 18) -> str:
    return name if len(name) <= length else "…" + name[-(length - 1) :]


def accuracy_png(report: dict[str, Any]) -> bytes:
    figure = _figure()
    axes = figure.add_subplot()
    snn = report["accuracy"]["snn"]
    steps = [int(t) for t in snn]
    axes.plot(steps, [100 * snn[str(t)] for t in steps], "o-", label=f"SNN ({report['target']})")
    ann = report["accuracy"]["ann"]
    if ann is not None:
        axes.axhline(100 * ann, color="black", linestyle="--", label=f"ANN {100 * ann:.2f} %")
    axes.set_xscale("log", base=2)
    axes.set_xticks(steps, [str(t) for t in steps])
    axes.set_xlabel("time steps T")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"Accuracy vs T ({report['samples']} samples)")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    return _png(figure)


def firing_rate_png(report: dict[str, Any]) -> bytes:
    rows = [r for r in report["layers"] if r["kind"] == "if"]
    figure = _figure(6.4, 3.2 + 0.05 * len(rows))
    axes = figure.add_subplot()
    names = [_short(r["name"]) for r in rows]
    axes.bar(range(len(rows)), [r["firing_rate"] for r in rows], color="tab:orange")
    axes.set_xticks(range(len(rows)), names, rotation=45 if len(rows) > 4 else 0, ha="right" if len(rows) > 4 else "center")
    axes.set_ylabel("spikes per neuron per step")
    axes.set_title(f"Firing rate per layer (T = {report['steps']})")
    axes.grid(True, axis="y", alpha=0.3)
    return _png(figure)


def energy_png(report: dict[str, Any]) -> bytes:
    rows = report["layers"]
    figure = _figure(7.2, 4.2)
    axes = figure.add_subplot()
    width = 0.27
    positive = []
    for index, (key, label) in enumerate(report["estimates"].items()):
        values = [r["energy_pj"][key]["total"] / 1e3 for r in rows]
        positive += [v for v in values if v > 0]
        shown = [v if v > 0 else float("nan") for v in values]  # zero has no place on a log axis
        axes.bar([i + (index - 1) * width for i in range(len(rows))], shown, width, label=label)
    rotate = len(rows) > 4
    axes.set_xticks(range(len(rows)), [_short(r["name"]) for r in rows], rotation=30 if rotate else 0,
                    ha="right" if rotate else "center")
    if positive:
        axes.set_yscale("log")
        axes.set_ylim(min(positive) / 3, max(positive) * 3)
    axes.set_ylabel("nJ per sample (log scale)")
    axes.set_title(f"Energy per layer (T = {report['steps']})")
    axes.grid(True, axis="y", alpha=0.3)
    figure.legend(loc="outside lower center", ncol=3, fontsize="small")
    return _png(figure)


def render_plots(report: dict[str, Any]) -> dict[str, bytes]:
    """Every plot, keyed as in `PLOTS`."""
    return {"accuracy": accuracy_png(report), "firing_rate": firing_rate_png(report), "energy": energy_png(report)}
