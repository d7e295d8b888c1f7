import numpy as np
import pytest
import torch

from targets.torch.simulator import TorchTarget as make_target
from tests.conftest import ROOT, make_ann, shared_data
from toolchain.core import ir
from toolchain.core.interpreter import TorchExecutor, run_ann
from toolchain.errors import ToolchainError
from toolchain.passes.calibrate import (
    V0_MAX_SAMPLES,
    ThresholdSpec,
    activations,
    compute_thresholds,
    optimise_v0,
    v0_samples,
)
from toolchain.passes.convert import ConversionOptions, ann_view, convert, replace_maxpool


def _snn_output(snn: ir.Graph, x: np.ndarray, steps: int) -> np.ndarray:
    target = make_target(device="cpu")
    target.prepare(snn)
    return target.run(x, steps).readout[-1] / steps


@pytest.mark.parametrize("per_channel", [False, True])
def test_snn_rate_approaches_ann_output_at_large_T(inputs, per_channel):
    ann = make_ann(per_channel=per_channel)
    snn = convert(ann, compute_thresholds(ann, ThresholdSpec("ceiling")))
    expected = run_ann(ann, inputs, device="cpu")
    got = _snn_output(snn, inputs, 2048)
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max()


def test_spiking_maxpool_converges_to_the_ann_max(inputs):
    ann = make_ann(pool="max")
    snn = convert(ann, compute_thresholds(ann, ThresholdSpec("ceiling")))
    expected = run_ann(ann, inputs, device="cpu")
    got = _snn_output(snn, inputs, 2048)
    assert np.abs(got - expected).max() < 0.03 * np.abs(expected).max()


def test_maxpool_policies(caplog):
    ann = make_ann(pool="max")
    assert replace_maxpool(ann, "spiking") is ann
    averaged = replace_maxpool(ann, "avg")
    assert isinstance(averaged.node("pool1"), ir.AvgPool2d)
    assert "pool1" in caplog.text
    with pytest.raises(ToolchainError, match="pool1"):
        replace_maxpool(ann, "error")


def test_if_neuron_spike_count_matches_the_closed_form():
    """floor((z*T + v0) / theta) spikes for a constant input z, clipped to [0, T]."""
    theta, steps = 1.0, 16
    z = np.linspace(-0.2, 1.3, 31, dtype=np.float32)
    for v0 in (0.0, 0.5):
        node = ir.IFNeuron("n", ["x"], (31,), threshold=np.array([theta], np.float32), v0=np.array([v0], np.float32))
        graph = ir.Graph("x", (31,), [node, ir.Readout("r", ["n"], (31,))], "r")
        out = TorchExecutor(graph, "cpu").run(torch.as_tensor(z[None]), steps)[-1, 0].numpy()
        expected = np.clip(np.floor((z * steps + v0) / theta), 0, steps) * theta
        np.testing.assert_allclose(out, expected, atol=1e-4)


@pytest.mark.parametrize("percentile", [100.0, 99.9, 99.0])
@pytest.mark.parametrize("per_channel", [False, True])
def test_percentile_thresholds_are_exact(inputs, percentile, per_channel):
    ann = make_ann(ceiling=None)
    spec = ThresholdSpec("max" if percentile == 100 else "percentile", percentile, per_channel)
    batches = [inputs[:20], inputs[20:45], inputs[45:]]
    got = compute_thresholds(ann, spec, batches, len(inputs), "cpu").values["act1"]
    captured = {}
    TorchExecutor(ann, "cpu").run(torch.as_tensor(inputs), 1, lambda n, v: captured.setdefault(n.name, v[-1].numpy()))
    values = captured["act1"]  # (N, C, H, W)
    values = values.transpose(1, 0, 2, 3).reshape(values.shape[1], -1) if per_channel else values.reshape(1, -1)
    k = int(np.floor(values.shape[1] * (100 - percentile) / 100)) + 1
    expected = np.sort(values, axis=1)[:, -k]
    np.testing.assert_allclose(got, np.where(expected > 0, expected, got), rtol=1e-6)


def test_threshold_spec_parsing():
    assert ThresholdSpec.parse("p99.99").percentile == 99.99
    assert ThresholdSpec.parse("max").method == "max"
    for bad in ("p", "p101", "median", "99"):
        with pytest.raises(ToolchainError):
            ThresholdSpec.parse(bad)


def test_ceiling_thresholds_need_ceilings():
    with pytest.raises(ToolchainError, match="no trained ceiling"):
        compute_thresholds(make_ann(ceiling=None), ThresholdSpec("ceiling"))
    with pytest.raises(ToolchainError, match="calib=DATA"):
        compute_thresholds(make_ann(ceiling=None), ThresholdSpec("auto"))


def test_auto_keeps_reached_ceilings_and_replaces_fixed_ones(inputs):
    """`auto`: a clip ceiling the calibration data reaches is a trained one (the paper's theta); one it
    never reaches (ReLU6's 6, here 1000) gives way to per-channel p99.99; without data, ceilings stay."""
    batches = [inputs[:30], inputs[30:]]
    tight = compute_thresholds(make_ann(ceiling=0.05), ThresholdSpec("auto"), batches, len(inputs), "cpu")
    assert set(tight.source.values()) == {"ceiling"}
    assert all(np.all(v == np.float32(0.05)) for v in tight.values.values())
    loose_ann = make_ann(ceiling=1000.0)
    loose = compute_thresholds(loose_ann, ThresholdSpec("auto"), batches, len(inputs), "cpu")
    per_channel = compute_thresholds(loose_ann, ThresholdSpec("percentile", 99.99, True), batches, len(inputs), "cpu")
    for node in activations(loose_ann):
        assert loose.source[node.name] == "p99.99 per channel (ceiling 1000 not reached)"
        assert loose.values[node.name].shape == (node.shape[0],)
        np.testing.assert_array_equal(loose.values[node.name], per_channel.values[node.name])
    without_data = compute_thresholds(loose_ann, ThresholdSpec("auto"))
    assert set(without_data.source.values()) == {"ceiling"}
    plain = compute_thresholds(make_ann(ceiling=None), ThresholdSpec("auto"), batches, len(inputs), "cpu")
    assert set(plain.source.values()) == {"p99.99 per channel"}


def test_auto_takes_relu6_from_data_even_where_data_reach_6(inputs):
    """ReLU6 is a fixed clip, not a ceiling trained for conversion: with data its thresholds are the
    per-channel p99.99 (at most 6, the clip the ANN keeps) even where activations sit at 6."""
    batches = [inputs[:30], inputs[30:]]
    scaled = [b * 1e4 for b in batches]  # drives every layer to its clip
    relu6 = make_ann(ceiling=6.0)
    thresholds = compute_thresholds(relu6, ThresholdSpec("auto"), scaled, len(inputs), "cpu")
    assert set(thresholds.source.values()) == {"p99.99 per channel (ReLU6: a fixed ceiling, not trained)"}
    assert all(np.all(v <= 6.0) for v in thresholds.values.values())
    trained = compute_thresholds(make_ann(ceiling=5.5), ThresholdSpec("auto"), scaled, len(inputs), "cpu")
    assert set(trained.source.values()) == {"ceiling"}  # reached, and not ReLU6's: a trained ceiling
    assert set(compute_thresholds(relu6, ThresholdSpec("auto")).source.values()) == {"ceiling"}  # no data


def test_v0_modes_and_readout(inputs):
    ann = make_ann()
    thresholds = compute_thresholds(ann, ThresholdSpec("ceiling"))
    zero = convert(ann, thresholds, ConversionOptions(v0="zero"))
    half = convert(ann, thresholds, ConversionOptions(v0="half"))
    assert all(float(n.v0.max()) == 0 for n in zero.nodes if isinstance(n, ir.IFNeuron))
    assert all(np.allclose(n.v0, n.threshold / 2) for n in half.nodes if isinstance(n, ir.IFNeuron))
    assert isinstance(half.node(half.output), ir.Readout)
    assert ann_view(half).output == ann.output


def test_optimal_v0_is_no_worse_than_half_on_its_own_data(inputs):
    ann = make_ann()
    thresholds = compute_thresholds(ann, ThresholdSpec("ceiling"))
    steps = 8
    expected = run_ann(ann, inputs, device="cpu")
    half = convert(ann, thresholds)
    optimal = convert(ann, thresholds)
    fractions = optimise_v0(optimal, ann, inputs, steps, "cpu")
    assert set(fractions) == {"act1", "act2", "act3"}
    err_half = np.mean((_snn_output(half, inputs, steps) - expected) ** 2)
    err_optimal = np.mean((_snn_output(optimal, inputs, steps) - expected) ** 2)
    assert err_optimal <= err_half * 1.05


def test_optimal_v0_closes_most_of_the_low_T_gap_on_a_real_model():
    """Fashion-MNIST VGG-style model with trained ceilings, real images: the fitted potentials
    (per channel, inside [0, theta]) beat theta/2 at the T they were fitted for."""
    from toolchain.build import BuildOptions, build_snn
    from toolchain.data import load_dataset
    from toolchain.onnx_reference import OnnxReference

    data = shared_data("fashion-mnist")
    model = ROOT / "models" / "zoo" / "fmnist_vgg_clip.onnx"
    steps = 8
    test = load_dataset(data, "test").subset(1000)
    options = {"model": model, "calib": data, "calib_size": 512, "v0_steps": steps, "device": "cpu"}
    half = build_snn(BuildOptions(**options, v0="half")).snn
    optimal = build_snn(BuildOptions(**options, v0="optimal")).snn
    for node in optimal.nodes:
        if isinstance(node, ir.IFNeuron):
            assert node.v0.shape == (node.shape[0],)  # one potential per channel
            assert np.all(node.v0 >= 0) and np.all(node.v0 <= node.threshold)
    x = half.network_input(test.x)
    accuracy = {"ann": float(np.mean(OnnxReference(model)(x).argmax(-1) == test.y))}
    for name, snn in (("half", half), ("optimal", optimal)):
        accuracy[name] = float(np.mean(_snn_output(snn, x, steps).argmax(-1) == test.y))
    assert accuracy["optimal"] > accuracy["half"] + 0.01, accuracy
    assert accuracy["optimal"] > accuracy["ann"] - 0.025, accuracy


def test_v0_fit_takes_as_many_samples_as_its_memory_budget_allows(inputs):
    ann = make_ann()
    snn = convert(ann, compute_thresholds(ann, ThresholdSpec("ceiling")))
    executor = TorchExecutor(snn, "cpu")
    per_sample = executor.peak_bytes_per_sample(8) + executor.largest_stack_bytes_per_sample(8)
    assert v0_samples(executor, 8, 1000, memory_budget=100 * per_sample) == 100
    assert v0_samples(executor, 8, 1000, memory_budget=1) == 16  # never fewer than 16
    assert v0_samples(executor, 8, 1000) == V0_MAX_SAMPLES
    assert v0_samples(executor, 8, 40) == 40
    optimise_v0(snn, ann, inputs, 8, "cpu", memory_budget=5 * per_sample)
    assert snn.meta["conversion"]["v0_samples"] == min(len(inputs), 16)


def test_a_max_pool_before_its_relu_is_moved_after_it_and_lowers_to_fixed_point(tmp_path):
    """`F.relu(F.max_pool2d(conv(x), 2))` (PyTorch's MNIST example): the pool compares currents, which
    no spiking max-pool can; ReLU commutes with max, so the pass moves the pool after it: the ANN is
    unchanged (onnxruntime's output), and the fixed-point build runs it with IF-neuron max trees."""
    import warnings

    from toolchain.build import BuildOptions, build, load_ann
    from toolchain.onnx_reference import OnnxReference

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 4, 3)
            self.conv2 = torch.nn.Conv2d(4, 6, 3)
            self.fc = torch.nn.Linear(6 * 2 * 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.nn.functional.relu(torch.nn.functional.max_pool2d(self.conv1(x), 2))
            x = torch.nn.functional.relu(torch.nn.functional.max_pool2d(self.conv2(x), 2))
            return torch.nn.functional.log_softmax(self.fc(x.flatten(1)), dim=1)

    torch.manual_seed(0)
    model = tmp_path / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(Net().eval(), (torch.zeros(1, 1, 14, 14),), str(model), dynamo=False)
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.integers(0, 256, (64, 1, 14, 14)).astype(np.uint8), y=rng.integers(0, 3, 64))
    options = BuildOptions(model=model, target="loihi", calib=data, device="cpu", steps=16)
    ann = load_ann(options)
    order = [type(n).__name__ for n in ann.nodes if isinstance(n, (ir.Relu, ir.MaxPool2d))]
    assert order == ["Relu", "MaxPool2d", "Relu", "MaxPool2d"], order
    x = ann.network_input(np.load(data)["x"][:8])
    logits = torch.log_softmax(torch.as_tensor(run_ann(ann, x)), dim=1).numpy()  # the frontend drops LogSoftmax
    np.testing.assert_allclose(logits, OnnxReference(model)(x), atol=1e-4)
    result = build(options)
    assert result.fixed is not None and result.snn.meta["conversion"]["maxpool"] == "relu"
    assert any(n.name.endswith("/relu") for n in result.snn.nodes if isinstance(n, ir.IFNeuron))  # the max trees


def test_a_max_pool_over_currents_becomes_an_exact_relu_tree_in_the_ann():
    """--maxpool relu over a value that is not spikes (a stem conv, no ReLU before the pool): the ANN
    pass writes the pool as max(a, b) = b + relu(a - b), so the ANN computes the same function and its
    ReLUs take thresholds from data; a padded pool over currents is refused by name (-inf padding)."""
    from tests.fixed_point_graphs import make_ann as make_fixed_point_ann
    from tests.fixed_point_graphs import make_inputs

    ann = make_fixed_point_ann(0, "stem_maxpool")
    tree = replace_maxpool(ann, "relu")
    assert not any(isinstance(n, ir.MaxPool2d) for n in tree.nodes)
    assert sum(isinstance(n, ir.Relu) for n in tree.nodes) == sum(isinstance(n, ir.Relu) for n in ann.nodes) + 3
    x = make_inputs(ann, 16) - 0.5  # currents of both signs into the pool
    np.testing.assert_allclose(run_ann(tree, x), run_ann(ann, x), atol=1e-5)
    padded = make_fixed_point_ann(0, "stem_maxpool")
    pool = padded.node("pool1")
    pool.kernel, pool.stride, pool.padding = (3, 3), (2, 2), (1, 1, 1, 1)
    padded.infer_shapes()
    kept = replace_maxpool(padded, "relu")
    assert any(isinstance(n, ir.MaxPool2d) for n in kept.nodes)
    thresholds = compute_thresholds(kept, ThresholdSpec("percentile", 99.9, per_channel=True), [x], len(x), "cpu")
    with pytest.raises(ToolchainError, match="pool1.*padded max-pool only over spikes"):
        convert(kept, thresholds, ConversionOptions(maxpool="relu"))
