"""The build stage chain: ONNX file -> ANN graph -> thresholds -> SNN graph -> artifact.

Each step is a plain function of the previous step's data; `build` strings them
together and writes the artifact only once everything has succeeded.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolchain import ir
from toolchain.calibrate import ThresholdSpec, compute_thresholds, needs_data, optimise_v0
from toolchain.convert import ConversionOptions, convert, replace_maxpool
from toolchain.data import Dataset, load_dataset
from toolchain.errors import ToolchainError
from toolchain.evaluate import check_input_shape

log = logging.getLogger(__name__)

ANN_FILE = "ann.onnx"
BUILD_LOG_FILE = "build.json"


@dataclass
class BuildOptions:
    model: Path
    out: Path | None = None
    target: str = "torch"
    calib: Path | None = None
    calib_split: str = "train"
    calib_size: int = 1000
    threshold: str = "auto"
    per_channel: bool = False
    v0: str = "half"
    v0_steps: int = 16
    maxpool: str = "spiking"
    steps: int = 32
    scale: float | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    device: str = "auto"
    batch_size: int = 128


@dataclass
class BuildResult:
    ann: ir.Graph
    snn: ir.Graph
    log: dict[str, Any] = field(default_factory=dict)
    calibration_data: Dataset | None = None


def apply_preprocess_overrides(
    preprocess: ir.Preprocess, scale: float | None, mean: list[float] | None, std: list[float] | None
) -> ir.Preprocess:
    return ir.Preprocess(
        scale=preprocess.scale if scale is None else scale,
        mean=preprocess.mean if mean is None else list(mean),
        std=preprocess.std if std is None else list(std),
        layout=preprocess.layout,
    )


def load_ann(options: BuildOptions) -> ir.Graph:
    from toolchain.frontend import load_onnx

    ann = load_onnx(options.model)
    ann.preprocess = apply_preprocess_overrides(ann.preprocess, options.scale, options.mean, options.std)
    return replace_maxpool(ann, options.maxpool)


def calibration_batches(ann: ir.Graph, data: Dataset, batch_size: int) -> list[np.ndarray]:
    check_input_shape(data, ann.input_shape, str(ann.meta.get("source", "the model")))
    return [ann.network_input(x) for x, _ in data.batches(batch_size)]


def build_snn(options: BuildOptions) -> BuildResult:
    started = time.perf_counter()
    ann = load_ann(options)
    spec = ThresholdSpec.parse(options.threshold, options.per_channel)
    data: Dataset | None = None
    if options.calib is not None and (needs_data(ann, spec) or options.v0 == "optimal"):
        data = _calibration_subset(load_dataset(options.calib, options.calib_split), options.calib_size)
    elif options.v0 == "optimal":
        raise ToolchainError("--v0 optimal searches initial potentials on data: pass --calib DATA")
    batches = calibration_batches(ann, data, options.batch_size) if data is not None else None
    thresholds = compute_thresholds(ann, spec, batches, len(data) if data is not None else 0, options.device)
    snn = convert(ann, thresholds, ConversionOptions(v0=options.v0, maxpool=options.maxpool))
    chosen: dict[str, float] = {}
    if options.v0 == "optimal":
        assert batches is not None
        x = np.concatenate(batches)
        chosen = optimise_v0(snn, ann, x, options.v0_steps, options.device)
    snn.meta["conversion"].update(
        {"threshold": spec.describe(), "per_channel": spec.per_channel, "v0_fraction": chosen, "v0_steps": options.v0_steps}
    )
    build_log = {
        "model": str(options.model),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "calibration_samples": len(data) if data is not None else 0,
        "layers": [
            {
                "name": n.name,
                "threshold_min": float(n.threshold.min()),
                "threshold_max": float(n.threshold.max()),
                "v0_fraction": float(np.mean(n.v0 / n.threshold)),
                "source": thresholds.source.get(n.name, ""),
            }
            for n in snn.nodes
            if isinstance(n, ir.IFNeuron)
        ],
        "seconds": round(time.perf_counter() - started, 3),
    }
    return BuildResult(ann, snn, build_log, data)


def _calibration_subset(data: Dataset, size: int) -> Dataset:
    """An evenly spread subset, so that a sorted dataset still gives every class."""
    if size <= 0 or size >= len(data):
        return data
    index = np.linspace(0, len(data) - 1, size).astype(np.int64)
    return Dataset(data.x[index], data.y[index], data.source)


def write_artifact(result: BuildResult, options: BuildOptions, extra_files: dict[str, bytes] | None = None) -> Path:
    if options.out is None:
        raise ToolchainError("no output folder given: pass -o OUT")
    files = {ANN_FILE: Path(options.model).read_bytes(), BUILD_LOG_FILE: json.dumps(result.log, indent=1).encode()}
    files.update(extra_files or {})
    return ir.save_graph(result.snn, options.out, files)
