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


@pytest.mark.parametrize("groups, stride, padding", [(1, (1, 1), (1, 1, 1, 1)), (2, (2, 1), (0, 1, 2, 0))])
def test_weight_refit_recovers_the_synapse_that_made_its_targets(groups, stride, padding):
    """Targets made by a conv (grouped, strided, asymmetrically padded) from the rates: the refit,
    started from other weights, solves back to that conv's weights and bias."""
    from toolchain.core.interpreter import OPS, CompiledNode
    from toolchain.passes.calibrate_latency import LatencyCalibration, _refit_synapse

    rng = np.random.default_rng(0)
    true = ir.Conv2d("conv", ["x"], weight=rng.normal(0, 0.5, (4, 4 // groups, 3, 3)).astype(np.float32),
                     bias=rng.normal(0, 0.1, 4).astype(np.float32), stride=stride, padding=padding, groups=groups)  # fmt: skip
    rates = torch.as_tensor(rng.uniform(0, 1, (64, 4, 7, 7)), dtype=torch.float32)
    executor = TorchExecutor(ir.Graph("x", (4, 7, 7), [true], "conv"), "cpu")

    target = OPS["conv2d"](executor.compiled[0], [rates.unsqueeze(0)], 1)[0]
    start = ir.Conv2d("conv", ["x"], weight=(true.weight * 0.5).astype(np.float32), stride=stride, padding=padding,
                      groups=groups)  # fmt: skip
    compiled = CompiledNode(start, {"weight": torch.as_tensor(start.weight)})
    report = LatencyCalibration(8, ("weight",), 64)
    _refit_synapse(compiled, rates, target, report)
    # (up to the ridge's pull towards the starting weights, half the true ones)
    assert np.allclose(start.weight, true.weight, atol=0.01) and np.allclose(start.bias, true.bias, atol=0.01)
    assert report.synapses["conv"]["heldout_error_ratio"] < 1e-3


def test_weight_refit_generalises_to_images_it_was_not_fitted_on():
    """`weight` refits the stock ResNet's spike-fed synapses (its readout's too) on calibration images;
    on test images the SNN's logits come closer to the ANN's than with thresholds and v0 alone, the
    ANN is untouched, and the stem (fed by the image, not by spikes) keeps its weights."""
    data = shared_data("fashion-mnist")
    test = load_dataset(data, "test").subset(300)
    steps = 8
    options = {"model": STOCK_RESNET, "calib": data, "calib_size": 256, "steps": steps, "device": "cpu"}
    without = build_snn(BuildOptions(**options, calibrate="threshold,v0"))
    refit = build_snn(BuildOptions(**options, calibrate="weight,threshold,v0"))
    synapses = refit.log["latency_calibration"]["synapses"]
    convs = [n for n in refit.snn.nodes if isinstance(n, (ir.Conv2d, ir.Linear))]
    assert set(synapses) == {n.name for n in convs[1:]}, synapses  # all but the stem
    assert all(0 < row["heldout_error_ratio"] <= 1 for row in synapses.values())
    assert np.array_equal(convs[0].weight, next(n for n in without.snn.nodes if n.name == convs[0].name).weight)
    for a, b in zip(without.ann.nodes, refit.ann.nodes, strict=True):
        for key, value in ir.node_arrays(a).items():
            assert (value is None and ir.node_arrays(b)[key] is None) or np.array_equal(value, ir.node_arrays(b)[key])
    x = refit.snn.network_input(test.x)
    ann = run_ann(refit.ann, x, "cpu")
    error = {name: float(np.mean((_readout(r.snn, x, steps) - ann) ** 2)) for name, r in (("without", without), ("refit", refit))}
    assert error["refit"] < error["without"], error


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


def test_max_pool_trees_follow_the_calibrated_thresholds_of_the_spikes_they_compare():
    """`--maxpool relu` builds each pool as IF neurons over the source's spikes, with the source's
    thresholds. Calibration lowers those thresholds; the tree's IF layers (which have no ANN
    counterpart to fit) must take the lowered ones, or they quantise differences more coarsely."""
    data = shared_data("fashion-mnist")
    result = build_snn(BuildOptions(model=LENET, calib=data, calib_size=128, steps=8, device="cpu", maxpool="relu"))
    snn, ann_names = result.snn, {n.name for n in result.ann.nodes}
    fitted = result.log["latency_calibration"]["layers"]
    trees = [n for n in snn.nodes if isinstance(n, ir.IFNeuron) and n.name not in ann_names]
    assert trees
    for tree in trees:
        pool = tree.name.split("/max")[0]
        source = snn.node(snn.node(f"{pool}/cell0_0").inputs[0])
        assert fitted[source.name]["threshold_scale_mean"] < 1  # the source's thresholds were lowered at T=8
        np.testing.assert_array_equal(tree.threshold, source.threshold)
        np.testing.assert_allclose(tree.v0, tree.threshold / 2, rtol=1e-6)
