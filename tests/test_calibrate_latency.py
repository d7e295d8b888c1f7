"""Latency calibration (`--calibrate`, `-T`): thresholds, biases and v0 fitted layer by layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, shared_data
from toolchain.backends import get_target
from toolchain.build import BuildOptions, build, build_snn
from toolchain.core import ir
from toolchain.core.interpreter import TorchExecutor, run_ann
from toolchain.data import load_dataset
from toolchain.errors import ToolchainError
from toolchain.passes.calibrate import ThresholdSpec, compute_thresholds
from toolchain.passes.calibrate_latency import AUTO_METHODS, METHODS, calibrate_for_latency, parse_methods
from toolchain.passes.convert import convert

LENET = ROOT / "models" / "zoo" / "thirdparty_lenet_relu_maxpool_fmnist.onnx"  # plain ReLU, trained elsewhere
GAIN = 0.10  # accuracy the stock ResNet must gain at T=8 (measured: 58.4 % -> 82.5 %, ANN 86.1 %, 1000 images)
CLIPPED = ROOT / "models" / "zoo" / "fmnist_vgg_clip.onnx"  # trained ceilings


def _readout(snn: ir.Graph, x: np.ndarray, steps: int, target: str = "torch", **kwargs: object) -> np.ndarray:
    runner = get_target(target, device="cpu", **kwargs)
    runner.prepare(snn)
    return runner.run(x, steps).readout[-1] / steps


def _residual_ann(seed: int = 0) -> ir.Graph:
    """conv -> relu -> conv (+ the relu's output) -> relu -> flatten -> linear: a plain-ReLU residual block."""
    rng = np.random.default_rng(seed)
    nodes: list[ir.Node] = [
        ir.Conv2d("conv1", ["x"], weight=rng.normal(0, 0.6, (4, 1, 3, 3)).astype(np.float32),
                  bias=rng.uniform(0, 0.2, 4).astype(np.float32), padding=(1, 1, 1, 1)),
        ir.Relu("act1", ["conv1"]),
        ir.Conv2d("conv2", ["act1"], weight=rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), padding=(1, 1, 1, 1)),
        ir.Add("add", ["conv2", "act1"]),
        ir.Relu("act2", ["add"]),
        ir.Flatten("flat", ["act2"]),
        ir.Linear("fc", ["flat"], weight=rng.normal(0, 0.2, (5, 256)).astype(np.float32)),
    ]  # fmt: skip
    graph = ir.Graph("x", (1, 8, 8), nodes, "fc")
    graph.infer_shapes()
    return graph


def test_method_parsing():
    assert parse_methods("auto") == AUTO_METHODS
    assert parse_methods("none") == ()
    assert parse_methods("v0,threshold") == ("threshold", "v0")  # always applied in METHODS order
    assert set(parse_methods(",".join(METHODS))) == set(METHODS)
    for bad in ("", "thresholds", "bias,weights"):
        with pytest.raises(ToolchainError, match="calibrate="):
            parse_methods(bad)


def test_named_methods_need_data():
    with pytest.raises(ToolchainError, match="calib=DATA"):
        build_snn(BuildOptions(model=LENET, calibrate="bias", device="cpu"))


@pytest.mark.parametrize("methods", [("threshold",), ("bias",), ("threshold", "bias"), ("threshold", "bias", "v0")])
def test_the_saved_graph_is_what_was_calibrated(inputs, methods):
    """Corrections land in the graph (thresholds, v0, a residual branch's bias): re-running the
    calibrated SNN alone gives each layer the error the calibration reported, and no layer got worse."""
    ann = _residual_ann()
    thresholds = compute_thresholds(ann, ThresholdSpec("p99.99", per_channel=True), [inputs], len(inputs), "cpu")
    snn = convert(ann, thresholds)
    steps = 6
    report = calibrate_for_latency(snn, ann, inputs, steps, {"act1", "act2"}, methods, "cpu")
    if "bias" in methods:
        assert report.layers["act2"]["bias_placed"]  # through the Add, into conv2
        assert snn.node("conv2").bias is not None and ann.node("conv2").bias is None
    ann_values: dict[str, np.ndarray] = {}
    snn_values: dict[str, np.ndarray] = {}
    x = torch.as_tensor(inputs)
    TorchExecutor(ann, "cpu").run(x, 1, observe=lambda n, v: ann_values.__setitem__(n.name, v[-1].numpy()))
    TorchExecutor(snn, "cpu").run(x, steps, observe=lambda n, v: snn_values.__setitem__(n.name, v.mean(0).numpy()))
    for name in ("act1", "act2"):
        row = report.layers[name]
        error = float(np.mean((snn_values[name] - ann_values[name]) ** 2, axis=(0, 2, 3)).mean())
        assert error == pytest.approx(row["mse_after"], rel=1e-4, abs=1e-7)
        assert row["mse_after"] <= row["mse_before"] * 1.001
    node = snn.node("act2")
    assert isinstance(node, ir.IFNeuron) and node.threshold.shape == node.v0.shape == (4,)


def test_auto_leaves_trained_ceilings_alone():
    """A model trained for conversion builds exactly as without calibration (so at least as well at every T)."""
    data = shared_data("fashion-mnist")
    options = {"model": CLIPPED, "calib": data, "calib_size": 128, "steps": 8, "device": "cpu"}
    plain = build_snn(BuildOptions(**options, calibrate="none")).snn
    auto = build_snn(BuildOptions(**options)).snn
    assert "calibration" not in auto.meta["conversion"]
    for a, b in zip(plain.nodes, auto.nodes, strict=True):
        for key, value in ir.node_arrays(a).items():
            other = ir.node_arrays(b)[key]
            assert (value is None and other is None) or np.array_equal(value, other), (a.name, key)


STOCK_RESNET = ROOT / "models" / "zoo" / "stock_resnet_fmnist.onnx"  # plain ReLU + BN, residual, not ours


def _accuracy(snn: ir.Graph, x: np.ndarray, y: np.ndarray, steps: int, target: str = "torch", **kwargs: object) -> float:
    return float(np.mean(_readout(snn, x, steps, target, **kwargs).argmax(-1) == y))


def test_calibration_closes_the_low_T_gap_of_a_stock_residual_network():
    """A plain-ReLU ResNet-style model trained elsewhere, built with `--calib DATA -T 8` and nothing
    else, against the same build without calibration: far closer to its ANN at T=8."""
    data = shared_data("fashion-mnist")
    test = load_dataset(data, "test").subset(500)
    steps = 8
    options = {"model": STOCK_RESNET, "calib": data, "calib_size": 256, "steps": steps, "device": "cpu"}
    plain = build_snn(BuildOptions(**options, calibrate="none"))
    auto = build_snn(BuildOptions(**options))
    x = plain.snn.network_input(test.x)
    ann = float(np.mean(run_ann(plain.ann, x, "cpu").argmax(-1) == test.y))
    accuracy = {"none": _accuracy(plain.snn, x, test.y, steps), "auto": _accuracy(auto.snn, x, test.y, steps)}
    assert accuracy["auto"] > accuracy["none"] + GAIN, (ann, accuracy)
    calibrated = auto.log["latency_calibration"]["layers"]
    assert all("v0_fraction_mean" in row and "threshold_scale_mean" in row for row in calibrated.values())
    assert all(row["mse_after"] < row["mse_before"] for row in calibrated.values())
    biased = build_snn(BuildOptions(**options, calibrate="threshold,bias")).log["latency_calibration"]["layers"]
    assert all(row["bias_placed"] for row in biased.values())  # every layer's bias has a synapse, residual ones too


def test_fixed_point_keeps_what_the_calibration_fitted():
    """Calibrated thresholds, potentials and biases lower to fixed point like any others: the
    emulator agrees with the float SNN on a calibrated third-party LeNet (average pools) about as
    often as on the uncalibrated one."""
    data = shared_data("fashion-mnist")
    test = load_dataset(data, "test").subset(500)
    steps = 8
    options = {"model": LENET, "calib": data, "calib_size": 256, "steps": steps, "device": "cpu", "maxpool": "avg",
               "target": "loihi"}  # fmt: skip
    agreement = {}
    for name in ("none", "auto"):
        result = build(BuildOptions(**options, calibrate=name))
        assert result.fixed is not None
        x = result.snn.network_input(test.x)
        floating = _readout(result.snn, x, steps).argmax(-1)
        fixed = _readout(result.snn, x, steps, "loihi", fixed=result.fixed).argmax(-1)
        agreement[name] = float(np.mean(floating == fixed))
    assert agreement["auto"] >= agreement["none"] - 0.02, agreement
