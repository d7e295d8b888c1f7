"""`toolchain inspect`: one row per layer of an artifact."""

from __future__ import annotations

from typing import Any

import numpy as np

from toolchain.core import ir


def inspect_rows(graph: ir.Graph) -> list[dict[str, Any]]:
    rows = []
    for node in graph.nodes:
        row: dict[str, Any] = {
            "name": node.name,
            "op": node.op,
            "inputs": list(node.inputs),
            "shape": list(node.shape),
            "params": graph.num_params(node),
        }
        if isinstance(node, ir.IFNeuron):
            row["threshold"] = [float(node.threshold.min()), float(node.threshold.max())]
            row["v0"] = [float(node.v0.min()), float(node.v0.max())]
        elif isinstance(node, ir.Relu) and node.ceiling is not None:
            row["threshold"] = [float(np.min(node.ceiling)), float(np.max(node.ceiling))]
        rows.append(row)
    return rows


def _range(values: list[float] | None) -> str:
    if values is None:
        return "-"
    low, high = values
    return f"{low:.4g}" if np.isclose(low, high) else f"{low:.4g}..{high:.4g}"


def format_rows(graph: ir.Graph, rows: list[dict[str, Any]]) -> str:
    kind = "SNN" if graph.is_snn else "ANN"
    pre = graph.preprocess
    lines = [
        f"{kind} graph, input {graph.input_name} {tuple(graph.input_shape)}, output {graph.output}",
        f"preprocess: scale {pre.scale if pre.scale is not None else '1/255 for uint8'}, mean {pre.mean}, std {pre.std}",
        f"{'name':<30} {'op':<10} {'output shape':<16} {'threshold':<18} {'v0':<18} {'params':>9}",
    ]
    for row in rows:
        lines.append(
            f"{row['name'][:30]:<30} {row['op']:<10} {str(tuple(row['shape'])):<16} "
            f"{_range(row.get('threshold')):<18} {_range(row.get('v0')):<18} {row['params']:>9}"
        )
    lines.append(f"total parameters: {sum(r['params'] for r in rows)}")
    return "\n".join(lines)
