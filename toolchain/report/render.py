"""Format a report dict as JSON, Markdown or one self-contained HTML page.

Markdown and HTML are rendered from the same table cells (`tables`), so they show the
same numbers, formatted the same way; JSON carries every number unrounded.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any

from toolchain.report.plots import PLOTS

Table = tuple[list[str], list[list[str]]]
DASH = "–"
ENERGY_UNITS = ((1e9, "mJ"), (1e6, "µJ"), (1e3, "nJ"), (1.0, "pJ"))


# ---------------------------------------------------------------- number formats


def fmt_count(value: float | int | None) -> str:
    """Counts and means of counts: thousands separated, one decimal when not whole."""
    if value is None:
        return DASH
    value = float(value)
    if value.is_integer():
        return f"{int(value):,}"
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:,.2f}"


def fmt_rate(value: float | None) -> str:
    return DASH if value is None else f"{value:.4f}"


def fmt_percent(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.2f} %"


def energy_unit(largest_pj: float) -> tuple[float, str]:
    """The unit in which `largest_pj` reads as a number below 10,000."""
    for scale, unit in ENERGY_UNITS:
        if largest_pj >= 10 * scale:
            return scale, unit
    return 1.0, "pJ"


def fmt_energy(value_pj: float, scale: float) -> str:
    return f"{value_pj / scale:,.3f}"


def fmt_fanout(fanout: dict[str, Any] | None) -> str:
    if fanout is None:
        return DASH
    mean = float(fanout["mean"])
    text = f"{int(mean):,}" if mean.is_integer() else f"{mean:,.1f}"
    if fanout["min"] != fanout["max"]:
        text += f" ({fanout['min']:,}–{fanout['max']:,})"
    return text


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{value:,.1f}×" if value >= 100 else f"{value:.3g}×"


# ---------------------------------------------------------------- tables


def _label(row: dict[str, Any]) -> str:
    suffix = {"input": " (analog input)", "readout": " (readout)"}.get(row["kind"], "")
    return row["name"] + suffix


def _energy_scale(report: dict[str, Any]) -> tuple[float, str]:
    totals = report["totals"]["energy_pj"]
    return energy_unit(max(parts["total"] for parts in totals.values()))


def tables(report: dict[str, Any]) -> dict[str, Table]:
    """Every table of the report as header and rows of already formatted cells."""
    totals = report["totals"]
    acc = report["accuracy"]
    steps = report["steps"]
    scale, unit = _energy_scale(report)

    accuracy_rows = []
    for t, value in acc["snn"].items():
        accuracy_rows.append(
            [t, fmt_percent(value), fmt_percent(acc["ann"]), fmt_percent(acc["agreement"].get(t)),
             fmt_count(acc["spikes_per_sample"].get(t))]
        )
    accuracy = (["T", "SNN accuracy", "ANN accuracy", "agrees with ANN", "spikes / sample"], accuracy_rows)

    layer_rows = []
    for row in report["layers"]:
        layer_rows.append(
            [
                _label(row),
                fmt_count(row["neurons"]),
                fmt_fanout(row["fanout"]),
                "analog" if row["kind"] == "input" else fmt_count(row["spikes"]),
                fmt_rate(row["firing_rate"]),
                fmt_count(row["synops"]),
                fmt_count(row["neuron_updates"]),
                fmt_count(row["analog_macs"]) if row["kind"] == "input" else DASH,
                fmt_count(row["ann_macs"]),
            ]
        )
    layer_rows.append(
        [
            "total",
            fmt_count(totals["neurons"]),
            DASH,
            fmt_count(totals["spikes"]),
            fmt_rate(totals["firing_rate"]),
            fmt_count(totals["synops"]),
            fmt_count(totals["neuron_updates"]),
            fmt_count(totals["analog_macs"]),
            fmt_count(totals["ann_macs"]),
        ]
    )
    layers = (
        [
            "layer",
            "neurons",
            "fan-out per spike (min–max)",
            "spikes",
            "firing rate",
            "SynOps",
            "neuron updates",
            f"first-layer MACs (×{steps})",
            "ANN MACs",
        ],
        layer_rows,
    )

    energy_rows = []
    for row in report["layers"] + [{"name": "total", "kind": "total", "energy_pj": totals["energy_pj"]}]:
        e = row["energy_pj"]
        loihi = e["loihi"]
        energy_rows.append(
            [
                _label(row),
                fmt_energy(loihi["synaptic_ops"], scale),
                fmt_energy(loihi["neuron_updates"], scale),
                fmt_energy(loihi["spikes"], scale),
                fmt_energy(loihi["analog_input_macs"], scale),
                fmt_energy(loihi["total"], scale),
                fmt_energy(e["snn_ac"]["total"], scale),
                fmt_energy(e["ann"]["macs"], scale),
            ]
        )
    energy = (
        [
            "layer",
            f"Loihi: SynOps ({unit})",
            f"Loihi: neuron updates ({unit})",
            f"Loihi: spikes ({unit})",
            f"first-layer MACs ({unit})",
            f"Loihi model total ({unit})",
            f"SNN, E_AC ({unit})",
            f"ANN, E_MAC ({unit})",
        ],
        energy_rows,
    )

    latency = report["latency"]
    e = totals["energy_pj"]
    total_rows = [
        [f"SNN accuracy at T = {steps}", fmt_percent(acc["snn"][str(steps)])],
        ["ANN accuracy", fmt_percent(acc["ann"])],
        ["samples", fmt_count(report["samples"])],
        ["latency (time steps)", fmt_count(latency["time_steps"])],
        ["synaptic stages, input to readout", fmt_count(latency["synaptic_stages"])],
        ["wall time of this run (s)", f"{latency['wall_seconds']:,.3f}"],
        ["wall time per sample (ms)", f"{1e3 * latency['wall_seconds_per_sample']:,.3f}"],
        ["spiking neurons", fmt_count(totals["spiking_neurons"])],
        ["spikes per sample", fmt_count(totals["spikes"])],
        ["mean firing rate (spikes / neuron / step)", fmt_rate(totals["firing_rate"])],
        ["SynOps per sample", fmt_count(totals["synops"])],
        ["neuron updates per sample", fmt_count(totals["neuron_updates"])],
        [f"first-layer (analog) MACs per sample, ×{steps} steps", fmt_count(totals["analog_macs"])],
        ["ANN MACs per sample", fmt_count(totals["ann_macs"])],
        [f"energy per sample, Loihi model ({unit})", fmt_energy(e["loihi"]["total"], scale)],
        [f"energy per sample, SNN with E_AC ({unit})", fmt_energy(e["snn_ac"]["total"], scale)],
        [f"energy per sample, ANN with E_MAC ({unit})", fmt_energy(e["ann"]["total"], scale)],
        ["SNN energy / ANN energy, Loihi model", fmt_ratio(totals["snn_over_ann"]["loihi"])],
        ["SNN energy / ANN energy, E_AC", fmt_ratio(totals["snn_over_ann"]["snn_ac"])],
    ]
    total_table = (["quantity", "value"], total_rows)

    constant_rows = [
        [name, f"{c['value']:g}", c["unit"], c["per"], c["citation"] + (" (overridden)" if c["overridden"] else "")]
        for name, c in report["energy_model"]["constants"].items()
    ]
    constants = (["constant", "value", "unit", "per", "source"], constant_rows)
    return {"totals": total_table, "accuracy": accuracy, "layers": layers, "energy": energy, "constants": constants}


# ---------------------------------------------------------------- JSON


def render_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=1, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------- Markdown


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> list[str]:
    header, rows = table
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _headline(report: dict[str, Any]) -> list[str]:
    steps = report["steps"]
    acc = report["accuracy"]
    ann = acc["ann"]
    latency = report["latency"]
    parts = [
        f"Target **{report['target']}**, {report['samples']:,} samples"
        + (f" of `{report['data']}`" if report.get("data") else "")
        + f", T = {steps} time steps.",
        f"SNN accuracy {fmt_percent(acc['snn'][str(steps)])}"
        + (f" (ANN {fmt_percent(ann)}, agreement {fmt_percent(acc['agreement'].get(str(steps)))})." if ann is not None else "."),
        f"Latency: {steps} time steps to the decision; {latency['synaptic_stages']} synaptic stages from input to readout "
        "(on hardware where every connection adds one step of delay, as in Lava, the class arrives that many steps later). "
        f"Wall time of this run: {latency['wall_seconds']:.2f} s ({1e3 * latency['wall_seconds_per_sample']:.2f} ms per sample, "
        "simulation on this machine, not chip time).",
    ]
    return parts


def _title(report: dict[str, Any]) -> str:
    name = report.get("artifact") or report.get("source_model") or "SNN"
    return f"Spike and energy report: {name}"


def render_markdown(report: dict[str, Any], image_links: dict[str, str] | None = None) -> str:
    """Markdown; `image_links` maps plot keys to PNG file names written beside the file."""
    t = tables(report)
    scale_unit = _energy_scale(report)[1]
    lines = [f"# {_title(report)}", ""]
    lines += [f"- {p}" for p in _headline(report)] + [""]
    lines += ["## Totals (per sample)", ""] + _md_table(t["totals"])
    lines += ["## Accuracy vs time steps", ""] + _md_table(t["accuracy"])
    if image_links:
        lines += [f"![{PLOTS['accuracy']}]({image_links['accuracy']})", ""]
    lines += [f"## Per layer (per sample, T = {report['steps']})", ""] + _md_table(t["layers"])
    if image_links:
        lines += [f"![{PLOTS['firing_rate']}]({image_links['firing_rate']})", ""]
    lines += [f"## Energy per layer (per sample, {scale_unit})", ""] + _md_table(t["energy"])
    if image_links:
        lines += [f"![{PLOTS['energy']}]({image_links['energy']})", ""]
    if not image_links:
        lines += ["(Plots are written beside the Markdown file when it is written with `-o FILE.md`.)", ""]
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    lines += ["## How the numbers are counted", ""] + [f"- {c}" for c in report["conventions"]] + [""]
    model = report["energy_model"]
    lines += [f"## Energy model: {model['name']}", "", "Read from: " + "; ".join(model["sources"]) + ".", ""]
    lines += _md_table(t["constants"])
    lines += ["Estimates: " + "; ".join(f"**{k}** = {v}" for k, v in report["estimates"].items()) + ".", ""]
    lines += ["## What this estimate leaves out", ""] + [f"- {item}" for item in report["leaves_out"]] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; line-height: 1.4; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
td { text-align: right; font-variant-numeric: tabular-nums; }
td:first-child, #constants td { text-align: left; }
th { background: #f3f3f3; }
tr:last-child td { font-weight: 600; }
#totals tr:last-child td, #constants tr:last-child td, #accuracy tr:last-child td { font-weight: normal; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def _html_table(table: Table, table_id: str) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _html_figure(key: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    title = html.escape(PLOTS[key])
    image = f'<img alt="{title}" src="data:image/png;base64,{data}">'
    return f'<figure id="plot-{key}">{image}<figcaption>{title}</figcaption></figure>'


def _html_list(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"


def render_html(report: dict[str, Any], images: dict[str, bytes]) -> str:
    """One self-contained page: CSS inline, plots embedded as base64 PNG."""
    t = tables(report)
    unit = _energy_scale(report)[1]
    model = report["energy_model"]
    headline = [p.replace("**", "").replace("`", "") for p in _headline(report)]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(_title(report))}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(_title(report))}</h1>",
        _html_list(headline),
        "<h2>Totals (per sample)</h2>",
        _html_table(t["totals"], "totals"),
        "<h2>Accuracy vs time steps</h2>",
        _html_table(t["accuracy"], "accuracy"),
        _html_figure("accuracy", images["accuracy"]) if "accuracy" in images else "",
        f"<h2>Per layer (per sample, T = {report['steps']})</h2>",
        _html_table(t["layers"], "layers"),
        _html_figure("firing_rate", images["firing_rate"]) if "firing_rate" in images else "",
        f"<h2>Energy per layer (per sample, {html.escape(unit)})</h2>",
        _html_table(t["energy"], "energy"),
        _html_figure("energy", images["energy"]) if "energy" in images else "",
    ]
    if report["notes"]:
        parts += ["<h2>Notes</h2>", _html_list(report["notes"])]
    parts += ["<h2>How the numbers are counted</h2>", _html_list(report["conventions"])]
    parts += [
        f"<h2>Energy model: {html.escape(model['name'])}</h2>",
        f"<p>Read from: {html.escape('; '.join(model['sources']))}.</p>",
        _html_table(t["constants"], "constants"),
        "<p>Estimates: " + html.escape("; ".join(f"{k} = {v}" for k, v in report["estimates"].items())) + ".</p>",
        "<h2>What this estimate leaves out</h2>",
        _html_list(report["leaves_out"]),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"
