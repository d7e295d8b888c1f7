"""Real Lava networks (CPU simulator, fixed_pt) against the bit-exact emulator, spike for spike."""

from __future__ import annotations

import copy
import functools
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.fixed_point_graphs import make_inputs, make_snn
from toolchain.core.fixed import V_MAX
from toolchain.errors import ToolchainError
from toolchain.passes.quantize import quantize

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "mnist_cnn.onnx"
MNIST = ROOT / "models" / "data" / "mnist"


def _lava_missing() -> str | None:
    try:
        import targets.lava  # noqa: F401
    except ToolchainError as exc:
        return str(exc)
    return None


LAVA_MISSING = _lava_missing()


def needs_lava(test):
    """Marks a test `lava` and skips it, saying why, where Lava cannot run."""
    skip = pytest.mark.skipif(LAVA_MISSING is not None, reason=f"Lava unavailable: {LAVA_MISSING}")
    return pytest.mark.lava(skip(test))


@pytest.fixture(autouse=True)
def _quiet_calibration(caplog):
    caplog.set_level(logging.ERROR, logger="toolchain.passes.calibrate")


def test_importing_the_lava_target_without_lava_fails_with_one_clear_line():
    code = (
        "import sys; sys.modules['lava'] = None\n"
        "from toolchain.errors import ToolchainError\n"
        "try:\n    import targets.lava\nexcept ToolchainError as exc:\n    print(exc)\nelse:\n    print('imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "pip install lava-nc==0.10.0" in lines[0] and "3.10" in lines[0], out


@pytest.mark.parametrize(
    "variant, samples, steps",
    [("basic", 3, 12), ("odd", 2, 10), ("residual", 2, 10), ("concat", 2, 10), ("depthwise", 2, 10), ("wide", 2, 10)]
    + [("maxpool", 2, 10), ("concat_maxpool", 2, 10), ("stem_maxpool", 2, 10)],
)
@needs_lava
def test_lava_is_spike_exact_with_the_emulator(variant, samples, steps):
    from toolchain.validate import validate

    snn = make_snn(0, variant)
    report = validate(snn, make_inputs(snn, samples), steps, input_range=(0, 1))
    assert report.ok, report.summary()
    assert report.layers == [n.name for n in snn.nodes if n.op == "if"]
    assert report.spikes_compared > 0 and "identical" in report.summary()


@pytest.mark.parametrize("variant", ["basic", "concat"])
@needs_lava
def test_residual_weight_synapses_are_spike_exact(variant):
    """`--residual-weights`: every synapse and its rounding-error twin are two Lava connections into one
    dendrite, with one delay."""
    from toolchain.validate import validate

    snn = make_snn(0, variant)
    fixed = quantize(snn, input_range=(0, 1), residual_weights="on")
    assert any(len(layer.synapses) > len({s.source for s in layer.synapses}) for layer in fixed.layers)
    report = validate(fixed, make_inputs(snn, 2), 10)
    assert report.ok, report.summary()


@needs_lava
def test_per_channel_initial_potentials_are_spike_exact():
    """`--v0 optimal` gives one v0 per channel under a shared threshold: Lava's initial voltages."""
    from toolchain.validate import validate

    snn = make_snn(0, "basic")
    rng = np.random.default_rng(1)
    fractions = {}
    for node in snn.nodes:
        if node.op == "if":
            fractions[node.name] = rng.uniform(0.0, 1.0, node.shape[0]).astype(np.float32)
            node.v0 = fractions[node.name] * np.broadcast_to(node.threshold, fractions[node.name].shape)
    fixed = quantize(snn, input_range=(0, 1))
    for name, fraction in fractions.items():
        layer = fixed.layer(name)
        per_channel = np.asarray(layer.v0).reshape(len(fraction), -1)
        assert np.all(per_channel == per_channel[:, :1])  # one value per channel, every neuron of it
        assert np.abs(per_channel[:, 0] - fraction * float(layer.threshold)).max() <= 1
    report = validate(fixed, make_inputs(snn, 2), 10)
    assert report.ok, report.summary()


@needs_lava
def test_lava_target_streams_samples_through_one_network():
    from toolchain.backends import get_target

    emulator_target = functools.partial(get_target, "loihi")

    snn = make_snn(1, "basic")
    fixed = quantize(snn, input_range=(0, 1))
    x = make_inputs(snn, 4)
    steps = 8
    emulator = emulator_target(device="cpu", fixed=fixed)
    emulator.prepare(snn)
    expected = emulator.run(x, steps)
    target = get_target("lava", fixed=fixed)
    assert target.name == "lava"
    target.prepare(snn)
    try:
        first = target.run(x[:2], steps)
        network = target.network
        second = target.run(x[2:], steps)
        assert target.network is network  # built once, later samples stream through it
    finally:
        target.close()
    readout = np.concatenate([first.readout, second.readout], axis=1)
    np.testing.assert_array_equal(readout, expected.readout)  # aligned: step T-1 holds T steps of input
    for name, counts in expected.spikes.items():
        np.testing.assert_array_equal(first.spikes[name] + second.spikes[name], counts)
    assert target.seconds_per_sample is not None and target.seconds_per_sample > 0


@needs_lava
def test_first_difference_is_located_and_overflow_saturates_identically():
    from targets.lava.runner import LavaTarget
    from toolchain.backends import get_target
    from toolchain.validate import first_mismatch

    emulator_target = functools.partial(get_target, "loihi")

    snn = make_snn(2, "basic")
    fixed = quantize(snn, input_range=(0, 1))
    squeezed = fixed.layer("act3")  # one membrane next to the 24-bit floor: it overflows, in both
    squeezed.v0 = squeezed.v0.copy()
    squeezed.v0[0] = -V_MAX + 5
    tampered = copy.deepcopy(fixed)
    tampered.layer("act2").threshold += tampered.layer("act2").threshold // 5
    x = make_inputs(snn, 2)
    steps = 8
    emulator = emulator_target(device="cpu", fixed=fixed, on_overflow="saturate")
    emulator.prepare(fixed)
    expected = emulator.run_recorded(x, steps)
    lava = LavaTarget(fixed=tampered, record=True, on_overflow="saturate")
    lava.prepare(tampered)
    try:
        got = lava.run_recorded(x, steps)
    finally:
        lava.close()
    order = [layer.name for layer in fixed.if_layers]
    mismatch = first_mismatch(order, got.spikes, expected.spikes)
    assert mismatch is not None and mismatch["layer"] == "act2" and mismatch["sample"] == 0
    np.testing.assert_array_equal(got.spikes["act1"], expected.spikes["act1"])
    assert int(got.overflows["act3"].sum()) == int(expected.overflows["act3"].sum()) > 0
    assert first_mismatch(order, expected.spikes, expected.spikes) is None


@needs_lava
def test_floating_point_models_run_the_same_network():
    from targets.lava.runner import LavaTarget
    from toolchain.backends import get_target

    emulator_target = functools.partial(get_target, "loihi")

    snn = make_snn(0, "basic")
    fixed = quantize(snn, input_range=(0, 1))
    x = make_inputs(snn, 2)
    emulator = emulator_target(device="cpu", fixed=fixed)
    emulator.prepare(fixed)
    expected = emulator.run(x, 10)
    with LavaTarget(fixed=fixed, tag="floating_pt") as target:
        target.prepare(fixed)
        got = target.run(x, 10)
    # no flooring of the negative weight exponents in float: close, not identical
    assert np.abs(got.readout - expected.readout).max() <= 0.1 * np.abs(expected.readout).max()


@needs_lava
def test_trained_mnist_cnn_is_spike_exact_in_lava():
    if not MODEL.exists() or not MNIST.exists():
        pytest.skip("models/mnist_cnn.onnx or the embedded MNIST test split is missing")
    from toolchain.build import BuildOptions, build_snn
    from toolchain.data import load_dataset
    from toolchain.validate import validate

    snn = build_snn(BuildOptions(model=MODEL, device="cpu")).snn
    data = load_dataset(MNIST, "test").subset(2)
    x = snn.network_input(data.x)
    report = validate(snn, x, 12)
    assert report.ok, report.summary()


@needs_lava
def test_resources_count_the_synapses_lava_builds():
    """The resource report's synapse counts are the non-zeros of the connection matrices given to Lava."""
    from targets.lava.runner import connection_matrix
    from toolchain.report.resources import resources

    for variant in ("odd", "residual", "concat", "maxpool"):
        fixed = quantize(make_snn(0, variant), input_range=(0, 1))
        report = resources(fixed, "loihi1")
        for layer, row in zip(fixed.layers, report["layers"], strict=True):
            matrices = [connection_matrix(syn, layer) for syn in layer.synapses]
            assert row["synapses"] == sum(m.nnz for m in matrices), (variant, layer.name)
            assert row["max_fan_in"] == int(sum(np.asarray((m != 0).sum(1)).reshape(-1) for m in matrices).max())
        assert report["total"]["chips"] == 1 and not report["warnings"]


@needs_lava
def test_a_torch_model_with_every_branch_kind_builds_for_lava_and_validates(tmp_path):
    """From torch.onnx.export to Lava: F.relu residual Add, torch.cat, a depthwise conv, BN after a ReLU
    and a max-pool of a concatenation, through `build` (target lava: --maxpool relu by default), spike for spike."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from toolchain.build import BuildOptions, build
    from toolchain.validate import validate

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(12 * 6 * 6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = F.relu(self.conv1(x))
            b = F.relu(self.conv2(a) + a)
            c = self.bn(F.relu(self.dw(torch.cat([a, b], 1))))
            return self.fc(torch.flatten(F.max_pool2d(torch.cat([F.relu(c), a], 1), 2), 1))  # a pooled concat

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 2.0)
    model = tmp_path / "net.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, (torch.zeros(1, 1, 12, 12),), str(model), dynamo=False)
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.integers(0, 256, (64, 1, 12, 12)).astype(np.uint8), y=rng.integers(0, 3, 64))
    result = build(BuildOptions(model=model, target="lava", calib=data, device="cpu"))
    fixed = result.fixed
    assert fixed is not None and result.snn.meta["conversion"]["maxpool"] == "relu"
    assert max(len(layer.synapses) for layer in fixed.layers) > 1 and result.log["lava_timing"]["delayed_synapses"] > 0
    assert result.log["resources"]["loihi1"]["total"]["neurons"] == sum(layer.size for layer in fixed.layers)
    x = result.snn.network_input(np.load(data)["x"][:2])
    report = validate(fixed, x, 12)
    assert report.ok, report.summary()
