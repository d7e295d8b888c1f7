"""The build driver: ONNX file -> ANN graph -> thresholds -> SNN graph (-> fixed point) -> artifact.

Each step is a pass (`toolchain.passes`): a plain function of the previous step's data.
`build` strings them together, quantisation included where the target runs fixed point;
`write_artifact` writes the artifact only once everything has succeeded. The command line
and the benches call these two and repeat none of their steps.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from targets import graph_kind
from toolchain.core import ir
from toolchain.core.fixed import FixedGraph, fixed_files
from toolchain.data import Dataset, load_dataset
from toolchain.errors import ToolchainError, option
from toolchain.evaluate import check_input_shape
from toolchain.passes.calibrate import ThresholdSpec, compute_thresholds, optimise_v0, uses_data
from toolchain.passes.calibrate_latency import calibrate_for_latency, parse_methods
from toolchain.passes.convert import ConversionOptions, convert, replace_maxpool
from toolchain.passes.quantize import quantize, row_ratio_for
from toolchain.report.resources import CHIPS, resources

log = logging.getLogger(__name__)

ANN_FILE = "ann.onnx"
ANN_DATA_FILE = "ann.onnx.data"  # only for an ANN too large for one protobuf (2 GiB)
PROTOBUF_LIMIT = 2**31 - 1
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
    maxpool: str | None = None  # None: "relu" for fixed-point targets (no synapse holds a max), else "spiking"
    steps: int = 32  # the latency budget: T that `calibrate` fits for and the checks after a build run at
    calibrate: str = "auto"  # auto | none | comma list of calibrate_latency.METHODS
    residual_weights: str = "auto"  # fixed point: a second synapse for a synapse's rounding error (quantize)
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
    fixed: FixedGraph | None = None  # the quantised network, for targets that run fixed point


class TargetMismatch(ToolchainError):
    """The converted network has a structure the chosen target cannot run (the quantiser refused it)."""


def maxpool_policy(options: BuildOptions) -> str:
    """The max-pool policy the build uses: the option, else the target's default."""
    if options.maxpool is not None:
        return options.maxpool
    return "relu" if graph_kind(options.target) == "fixed" else "spiking"


def build(options: BuildOptions) -> BuildResult:
    """The whole build: the SNN, and its fixed-point network where `options.target` runs one."""
    if options.residual_weights == "on" and graph_kind(options.target) != "fixed":
        raise ToolchainError(
            f"{option('residual_weights', 'on')} shapes fixed-point synapses: use it with a loihi or lava target, "
            f"not {option('target', options.target)}"
        )
    result = build_snn(options)
    if graph_kind(options.target) == "fixed":
        try:
            result.fixed = quantize(result.snn, residual_weights=options.residual_weights, steps=options.steps)
        except ToolchainError as exc:  # name the user's file: the quantiser only knows the graph's nodes
            raise TargetMismatch(f"{options.model}: {exc}") from None
        result.log["fixed_point"] = result.fixed.report()
        result.log["lava_timing"] = result.fixed.timing()
        result.log["resources"] = {chip: resources(result.fixed, chip) for chip in CHIPS}
    return result


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
    from toolchain.options import check_preprocess_fits
    from toolchain.passes.frontend import load_onnx

    ann = load_onnx(options.model)
    ann.preprocess = apply_preprocess_overrides(ann.preprocess, options.scale, options.mean, options.std)
    check_preprocess_fits(ann.preprocess, ann.input_shape, str(options.model))
    return replace_maxpool(ann, maxpool_policy(options))


def calibration_batches(ann: ir.Graph, data: Dataset, batch_size: int, scale: float | None = None) -> list[np.ndarray]:
    """Preprocessed calibration batches; `scale` is the user's --scale (else float images already
    in [0, 1] are not scaled by the model's 1/255 again)."""
    from toolchain.options import fit_scale_to_data

    check_input_shape(data, ann.input_shape, str(ann.meta.get("source", "the model")))
    preprocess = fit_scale_to_data(ann.preprocess, data, scale)
    return [preprocess.apply(x).reshape((len(x), *ann.input_shape)) for x, _ in data.batches(batch_size)]


def build_snn(options: BuildOptions) -> BuildResult:
    started = time.perf_counter()
    ann = load_ann(options)
    spec = ThresholdSpec.parse(options.threshold, options.per_channel)
    methods = parse_methods(options.calibrate)
    data: Dataset | None = None
    explicit = options.calibrate not in ("auto", "none")
    if explicit and options.calib is None:
        raise ToolchainError(
            f"{option('calibrate', options.calibrate)} fits the SNN to the ANN on data: pass {option('calib', 'DATA')}"
        )
    if options.calib is not None and (uses_data(ann, spec) or options.v0 == "optimal" or explicit):
        data = _calibration_subset(load_dataset(options.calib, options.calib_split), options.calib_size)
    elif options.v0 == "optimal":
        raise ToolchainError(f"{option('v0', 'optimal')} searches initial potentials on data: pass {option('calib', 'DATA')}")
    batches = calibration_batches(ann, data, options.batch_size, options.scale) if data is not None else None
    thresholds = compute_thresholds(ann, spec, batches, len(data) if data is not None else 0, options.device)
    snn = convert(ann, thresholds, ConversionOptions(v0=options.v0, maxpool=maxpool_policy(options)))
    calibration = None
    # `auto` calibrates the layers whose thresholds came from data; named methods, every layer.
    layers = {name for name, source in thresholds.source.items() if explicit or source != "ceiling"}
    if methods and layers and batches is not None:
        calibration = calibrate_for_latency(
            snn,
            ann,
            np.concatenate(batches),
            options.steps,
            layers,
            methods,
            options.device,
            row_ratio=row_ratio_for(options.residual_weights) if graph_kind(options.target) == "fixed" else None,
        )
        snn.meta["conversion"]["calibration"] = calibration.summary()
    chosen: dict[str, float] = {}
    if options.v0 == "optimal":
        assert batches is not None
        x = np.concatenate(batches)
        chosen = optimise_v0(snn, ann, x, options.v0_steps, options.device)
    snn.meta["conversion"].update(
        {"threshold": spec.describe(), "per_channel": spec.per_channel, "v0_fraction": chosen, "v0_steps": options.v0_steps}
    )
    if data is not None and data.classes is not None:  # class folder names, for eval to check
        snn.meta["classes"] = list(data.classes)
    build_log = {
        "model": str(options.model),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "calibration_samples": len(data) if data is not None else 0,
        "latency_calibration": calibration.summary() if calibration is not None else None,
        "layers": [
            {
                "name": n.name,
                "threshold_min": float(n.threshold.min()),
                "threshold_max": float(n.threshold.max()),
                "v0_fraction": float(np.mean(n.v0 / n.threshold)),
                "source": thresholds.source.get(n.name, ""),
                "silent_channels": thresholds.silent_channels.get(n.name, 0),
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
    return Dataset(data.x[index], data.y[index], data.source, data.classes)


def check_test_data(test: Dataset, result: BuildResult, model: Path) -> None:
    """The build's --data against the built network (shape, labels against its outputs), before
    anything is written; class folder names are kept in the artifact for `eval` to check."""
    from toolchain.data import check_class_names, check_labels

    graph = result.snn
    check_input_shape(test, graph.input_shape, str(model))
    check_labels(test, int(np.prod(graph.shape_of(graph.output))), str(model))
    check_class_names(test, graph.meta.get("classes"), str(model))  # those of the calibration data
    if test.classes is not None:
        graph.meta["classes"] = list(test.classes)


def write_artifact(result: BuildResult, options: BuildOptions, extra_files: dict[str, bytes] | None = None) -> Path:
    if options.out is None:
        raise ToolchainError("no output folder given: pass -o OUT")
    return ir.save_graph(result.snn, options.out, artifact_files(result, options, extra_files))


def artifact_files(result: BuildResult, options: BuildOptions, extra_files: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """Every file of the artifact but the graph's own two (`ir.graph_files`) and the manifest."""
    files = {**ann_files(Path(options.model)), BUILD_LOG_FILE: json.dumps(result.log, indent=1).encode()}
    if result.fixed is not None:
        files.update(fixed_files(result.fixed))
    files.update(extra_files or {})
    return files


def ann_files(model: Path, limit: int = PROTOBUF_LIMIT) -> dict[str, bytes]:
    """The ANN's ONNX file for the artifact, self-contained: weights that the exporter kept in
    external data files (torch's dynamo exporter does by default) are embedded, or, past the
    2 GiB protobuf limit, written beside it as `ann.onnx.data`."""
    import onnx
    from onnx import external_data_helper

    raw = model.read_bytes()
    proto = onnx.load_model_from_string(raw)
    # Initializers are where exporters put external data (public API; the frontend reads no subgraphs).
    if not any(external_data_helper.uses_external_data(t) for t in proto.graph.initializer):
        return {ANN_FILE: raw}
    try:
        external_data_helper.load_external_data_for_model(proto, str(model.parent))
    except Exception as exc:  # noqa: BLE001 - the frontend read the same files a moment ago
        raise ToolchainError(f"{model}: cannot read its external data ({exc})") from None
    if proto.ByteSize() < limit:
        return {ANN_FILE: proto.SerializeToString()}
    tensors = [t for t in proto.graph.initializer if t.HasField("raw_data")]
    data = bytearray()
    for tensor in tensors:  # what onnx.save_model does, into memory
        data.extend(b"\0" * (-len(data) % 4096))
        external_data_helper.set_external_data(tensor, ANN_DATA_FILE, len(data), len(tensor.raw_data))
        data.extend(tensor.raw_data)
        tensor.ClearField("raw_data")
    return {ANN_FILE: proto.SerializeToString(), ANN_DATA_FILE: bytes(data)}
