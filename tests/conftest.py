"""Shared fixtures: small hand-built graphs and paths to the real data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from toolchain.core import ir

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
EMBEDDED_MNIST = ROOT / "models" / "data" / "mnist"
DEFAULT_MODEL = ROOT / "models" / "mnist_cnn.onnx"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real dataset {path} not present (see ../shared/data/README.md)")
    return path


def make_ann(seed: int = 0, ceiling: float | None = 1.5, pool: str = "avg", per_channel: bool = False) -> ir.Graph:
    """conv(3x3) -> clip -> pool -> conv -> clip -> flatten -> linear -> clip -> linear, on (1, 8, 8)."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    def top(channels: int) -> np.ndarray | None:
        if ceiling is None:
            return None
        if per_channel:
            return rng.uniform(0.5 * ceiling, 1.5 * ceiling, channels).astype(np.float32)
        return np.array([ceiling], np.float32)

    pool_node: ir.Node = (
        ir.AvgPool2d("pool1", ["act1"]) if pool == "avg" else ir.MaxPool2d("pool1", ["act1"])
    )
    nodes: list[ir.Node] = [
        ir.Conv2d("conv1", ["x"], weight=w(4, 1, 3, 3), bias=rng.uniform(0, 0.2, 4).astype(np.float32), padding=(1, 1, 1, 1)),
        ir.Relu("act1", ["conv1"], ceiling=top(4)),
        pool_node,
        ir.Conv2d("conv2", ["pool1"], weight=w(6, 4, 3, 3), bias=np.zeros(6, np.float32)),
        ir.Relu("act2", ["conv2"], ceiling=top(6)),
        ir.Flatten("flat", ["act2"]),
        ir.Linear("fc1", ["flat"], weight=w(16, 24), bias=rng.uniform(0, 0.1, 16).astype(np.float32)),
        ir.Relu("act3", ["fc1"], ceiling=top(16)),
        ir.Linear("fc2", ["act3"], weight=w(5, 16), bias=np.zeros(5, np.float32)),
    ]
    graph = ir.Graph("x", (1, 8, 8), nodes, "fc2")
    graph.infer_shapes()
    return graph


@pytest.fixture
def ann_graph() -> ir.Graph:
    return make_ann()


@pytest.fixture
def inputs() -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 1, (64, 1, 8, 8)).astype(np.float32)
