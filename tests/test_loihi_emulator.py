"""The Loihi fixed-point emulator: bit-exact against a slow numpy reference, close to the float SNN."""

from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from targets.loihi.emulator import LoihiTarget
from tests.fixed_point_graphs import make_inputs, make_snn
from toolchain.backends import get_target
from toolchain.core.fixed import V_MAX, FixedGraph, FixedSynapse, encode_input
from toolchain.errors import ToolchainError
from toolchain.passes.quantize import quantize

make_target = functools.partial(get_target, "loihi")
torch_target = functools.partial(get_target, "torch")

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "mnist_cnn.onnx"
MNIST = ROOT / "models" / "data" / "mnist"


# ------------------------------------------------------------ numpy reference


def _ref_synapse(layer: FixedSynapse, shape: tuple[int, ...], s: np.ndarray) -> np.ndarray:
    """sum(q * s) for one step, (B, *in_shape) int64 -> (B, *shape) int64, with explicit loops over taps."""
    batch = s.shape[0]
    if layer.pool != (1, 1):
        c, h, w = s.shape[1:]
        ph, pw = layer.pool
        hp, wp = h // ph, w // pw
        s = s[:, :, : hp * ph, : wp * pw].reshape(batch, c, hp, ph, wp, pw).sum((3, 5))
    q = layer.weight.astype(np.int64)
    if layer.kind == "dense":
        return (s.reshape(batch, -1) @ q.T).reshape((batch, *shape))
    top, left, bottom, right = layer.padding
    x = np.pad(s, ((0, 0), (0, 0), (top, bottom), (left, right)))
    c_out, c_in_group, kh, kw = q.shape
    _, ho, wo = shape
    sh, sw = layer.stride
    dh, dw = layer.dilation
    groups = layer.groups
    out_group = c_out // groups
    y = np.zeros((batch, c_out, ho, wo), np.int64)
    for a in range(kh):
        for b in range(kw):
            patch = x[:, :, a * dh : a * dh + sh * (ho - 1) + 1 : sh, b * dw : b * dw + sw * (wo - 1) + 1 : sw]
            for g in range(groups):
                w_tap = q[g * out_group : (g + 1) * out_group, :, a, b]
                p = patch[:, g * c_in_group : (g + 1) * c_in_group]
                y[:, g * out_group : (g + 1) * out_group] += np.einsum("oc,bchw->bohw", w_tap, p)
    return y


def reference(fixed: FixedGraph, x_u: np.ndarray, steps: int) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """Step by step, layer by layer, in numpy int64: spikes (T, B, *shape), readout (T, B, n), overflows."""
    batch = len(x_u)
    state = {layer.name: np.broadcast_to(layer.v0.astype(np.int64), (batch, *layer.shape)).copy() for layer in fixed.layers}
    spikes = {layer.name: np.zeros((steps, batch, *layer.shape), bool) for layer in fixed.if_layers}
    overflows = {layer.name: 0 for layer in fixed.layers}
    readout = np.zeros((steps, batch, fixed.layer(fixed.output).size), np.int64)
    for t in range(steps):
        outputs: dict[str | None, np.ndarray] = {None: x_u.astype(np.int64)}
        for layer in fixed.layers:
            a = np.zeros((batch, *layer.shape), np.int64)
            for syn in layer.synapses:
                a_k = _ref_synapse(syn, layer.shape, outputs[syn.source])
                a += np.left_shift(a_k, syn.weight_exp) if syn.weight_exp >= 0 else np.right_shift(a_k, -syn.weight_exp)
            v = state[layer.name] + a + (layer.bias_mant.astype(np.int64) << layer.bias_exp)
            overflows[layer.name] += int(((v > V_MAX) | (v < -V_MAX)).sum())
            v = np.clip(v, -V_MAX, V_MAX)
            if layer.kind == "if":
                fired = v >= layer.threshold
                v = v - fired * layer.threshold
                spikes[layer.name][t] = fired
                outputs[layer.name] = fired.astype(np.int64)
            else:
                readout[t] = v.reshape(batch, -1)
            state[layer.name] = v
    return spikes, readout, overflows


@pytest.fixture(autouse=True)
def _quiet_calibration(caplog):
    caplog.set_level(logging.ERROR, logger="toolchain.passes.calibrate")


DAG_VARIANTS = ["residual", "concat", "depthwise", "wide", "maxpool", "concat_maxpool", "stem_maxpool"]


@pytest.mark.parametrize("variant", ["basic", "odd", *DAG_VARIANTS])
def test_emulator_is_bit_exact_with_the_numpy_reference(variant):
    snn = make_snn(0, variant)
    fixed = quantize(snn, input_range=(0, 1))
    x = make_inputs(snn, 4)
    steps = 12
    target = make_target(device="cpu", fixed=fixed)
    target.prepare(snn)
    got = target.run_recorded(x, steps)
    spikes, readout, overflows = reference(fixed, encode_input(fixed, x), steps)
    for name, expected in spikes.items():
        assert expected.any(), f"layer {name} never fires: the test would prove little"
        np.testing.assert_array_equal(got.spikes[name], expected, err_msg=name)
    np.testing.assert_array_equal(got.readout, readout)
    assert all(v == 0 for v in overflows.values())


def test_overflow_raises_naming_the_layer_or_saturates_like_the_reference():
    snn = make_snn(1, "basic")
    fixed = quantize(snn, input_range=(0, 1))
    layer = fixed.layer("act2")
    layer.v0 = np.full(layer.shape, -V_MAX + 10, np.int32)  # a membrane one nudge from the bottom
    layer.bias_mant = np.full(layer.shape, -50, np.int16)
    x = make_inputs(snn, 3)
    steps = 6
    raising = make_target(device="cpu", fixed=fixed)
    raising.prepare(fixed)
    with pytest.raises(ToolchainError, match="act2.*overflow"):
        raising.run(x, steps)
    saturating = make_target(device="cpu", fixed=fixed, on_overflow="saturate")
    saturating.prepare(fixed)
    got = saturating.run_recorded(x, steps)
    spikes, readout, overflows = reference(fixed, encode_input(fixed, x), steps)
    assert overflows["act2"] > 0
    assert int(got.overflows["act2"].sum()) == overflows["act2"]
    assert saturating.overflows["act2"] == overflows["act2"]
    for name, expected in spikes.items():
        np.testing.assert_array_equal(got.spikes[name], expected, err_msg=name)
    np.testing.assert_array_equal(got.readout, readout)


def test_fixed_point_predictions_are_close_to_the_float_snn():
    steps = 32
    agreements, errors = [], []
    nets = (("basic", 0), ("basic", 2), ("odd", 0), ("residual", 0), ("concat", 1), ("depthwise", 0), ("maxpool", 0),
            ("concat_maxpool", 0), ("stem_maxpool", 0))  # fmt: skip
    for variant, seed in nets:
        snn = make_snn(seed, variant)
        x = make_inputs(snn, 48)
        floating = torch_target(device="cpu")
        floating.prepare(snn)
        expected = floating.run(x, steps)
        fixed = make_target(device="cpu", input_range=(0, 1))
        fixed.prepare(snn)
        got = fixed.run(x, steps)
        assert set(got.spikes) == set(expected.spikes)
        for name in expected.spikes:  # same activity, to within a few percent
            assert abs(got.spikes[name].sum() - expected.spikes[name].sum()) <= 0.1 * expected.spikes[name].sum() + 10
        agreements.append((got.readout[-1].argmax(1) == expected.readout[-1].argmax(1)).mean())
        errors.append(np.abs(got.readout[-1] - expected.readout[-1]).max() / np.abs(expected.readout[-1]).max())
    assert np.mean(agreements) >= 0.9, agreements
    assert np.mean(errors) < 0.2, errors


def test_target_interface_and_readout_alignment():
    snn = make_snn(0, "basic")
    x = make_inputs(snn, 5)
    target = get_target("loihi", device="cpu", input_range=(0, 1), batch_size=2)
    assert isinstance(target, LoihiTarget) and target.name == "loihi"
    target.prepare(snn)
    long = target.run(x, 10)
    assert long.readout.shape == (10, 5, 5)
    assert set(long.spikes) == {"act1", "act2", "act3"} and long.spikes["act1"].shape == (10,)
    # causal and aligned: the first k steps of a longer run are a k-step run
    short = target.run(x, 4)
    np.testing.assert_array_equal(short.readout, long.readout[:4])
    for name in short.spikes:
        np.testing.assert_array_equal(short.spikes[name], long.spikes[name][:4])
    # batching does not change anything; per-neuron totals add up
    whole = make_target(device="cpu", fixed=target.fixed)
    whole.prepare(snn)
    np.testing.assert_array_equal(whole.run(x, 10).readout, long.readout)
    assert long.neuron_spikes["act2"].sum() == long.spikes["act2"].sum()  # type: ignore[attr-defined]


def test_prepare_accepts_a_prequantised_graph():
    snn = make_snn(0, "basic")
    fixed = quantize(snn, input_range=(0, 1), threshold_bits=8)
    target = make_target(device="cpu")
    target.prepare(fixed)
    assert target.fixed is fixed
    other = make_target(device="cpu", fixed=copy.deepcopy(fixed))
    other.prepare(snn)  # the option wins over quantising the graph again
    x = make_inputs(snn, 3)
    np.testing.assert_array_equal(target.run(x, 6).readout, other.run(x, 6).readout)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_is_bit_exact_with_cpu():
    snn = make_snn(0, "odd")
    fixed = quantize(snn, input_range=(0, 1))
    x = make_inputs(snn, 64)
    results = []
    for device in ("cpu", "cuda"):
        target = make_target(device=device, fixed=fixed)
        target.prepare(fixed)
        results.append(target.run_recorded(x, 16))
    for name in results[0].spikes:
        np.testing.assert_array_equal(results[0].spikes[name], results[1].spikes[name])
    np.testing.assert_array_equal(results[0].readout, results[1].readout)


def test_trained_mnist_cnn_keeps_its_accuracy():
    if not MODEL.exists() or not MNIST.exists():
        pytest.skip("models/mnist_cnn.onnx or the embedded MNIST test split is missing")
    from toolchain.build import BuildOptions, build_snn
    from toolchain.data import load_dataset

    snn = build_snn(BuildOptions(model=MODEL, device="cpu")).snn
    data = load_dataset(MNIST, "test").subset(64)
    x = snn.network_input(data.x)
    steps = 24
    floating = torch_target(device="cpu")
    floating.prepare(snn)
    expected = floating.run(x, steps).readout[-1].argmax(1)
    target = make_target(device="cpu")
    target.prepare(snn)
    got = target.run(x, steps).readout[-1].argmax(1)
    assert (got == expected).mean() >= 0.95
    assert (got == data.y).mean() >= (expected == data.y).mean() - 0.04


# ------------------------------------------------- fast path == int64 path


def _assert_same_recording(fast, exact) -> None:
    assert set(fast.spikes) == set(exact.spikes)
    for name, expected in exact.spikes.items():
        np.testing.assert_array_equal(fast.spikes[name], expected, err_msg=name)
    np.testing.assert_array_equal(fast.readout, exact.readout)
    for name in exact.counts:
        np.testing.assert_array_equal(fast.counts[name], exact.counts[name], err_msg=name)
        np.testing.assert_array_equal(fast.neuron_counts[name], exact.neuron_counts[name], err_msg=name)
    for name in exact.overflows:
        np.testing.assert_array_equal(fast.overflows[name], exact.overflows[name], err_msg=name)


# (quantize options, steps, what the fast path must use somewhere in the net)
FAST_CASES = [
    ({}, 20, {"synapse": "float32", "membrane": "float32", "saturation_checks": False}),
    ({"input_bits": 16}, 12, {"synapse": "float64", "membrane": "float64", "saturation_checks": False}),
    ({"threshold_bits": 16}, 40, {"synapse": "float32", "membrane": "float32", "saturation_checks": True}),
    ({"threshold_bits": 16, "input_bits": 16}, 24, {"synapse": "float64", "membrane": "float64", "saturation_checks": True}),
    ({"threshold_bits": 4, "weight_bits": 3}, 300, {"synapse": "float32", "membrane": "float32", "saturation_checks": False}),
    ({"residual_weights": "on"}, 20, {"membrane": "float32"}),  # two synapses per source, exponents 7 apart
]


@pytest.mark.parametrize("variant", ["basic", "odd", *DAG_VARIANTS])
@pytest.mark.parametrize("options, steps, uses", FAST_CASES)
def test_fast_path_equals_the_int64_path_bit_for_bit(variant, options, steps, uses):
    """Random nets (analog graded input into the first layer, pools, strides, groups, dilation, asymmetric
    padding, folded dense maps), float32/float64 synapses and membranes, with and without saturation."""
    for seed in (0, 1):
        snn = make_snn(seed, variant)
        fixed = quantize(snn, input_range=(0, 1), **options)
        x = make_inputs(snn, 5, seed=seed)
        fast = make_target(device="cpu", fixed=fixed, on_overflow="saturate")
        exact = make_target(device="cpu", fixed=fixed, on_overflow="saturate", arithmetic="int64")
        fast.prepare(fixed)
        exact.prepare(fixed)
        assert exact.emulator.plans is None and fast.emulator.plans is not None
        if seed == 0 and variant not in DAG_VARIANTS:  # the cases were chosen for these two nets
            assert any(uses.items() <= row.items() for row in fast.emulator.describe(steps)), fast.emulator.describe(steps)
        _assert_same_recording(fast.run_recorded(x, steps), exact.run_recorded(x, steps))
        a, b = fast.run(x, steps), exact.run(x, steps)
        np.testing.assert_array_equal(a.readout, b.readout)
        for name in b.spikes:
            np.testing.assert_array_equal(a.spikes[name], b.spikes[name])
            np.testing.assert_array_equal(a.neuron_spikes[name], b.neuron_spikes[name])  # type: ignore[attr-defined]
        assert fast.overflows == exact.overflows


def test_fast_path_equals_the_int64_path_on_mnist_cnn():
    if not MODEL.exists() or not MNIST.exists():
        pytest.skip("models/mnist_cnn.onnx or the embedded MNIST test split is missing")
    from toolchain.build import BuildOptions, build_snn
    from toolchain.data import load_dataset

    snn = build_snn(BuildOptions(model=MODEL, device="cpu")).snn
    fixed = quantize(snn)
    data = load_dataset(MNIST, "test").subset(24)
    x = snn.network_input(data.x)
    steps = 32
    fast = make_target(device="cpu", fixed=fixed, batch_size=7)  # uneven batches
    exact = make_target(device="cpu", fixed=fixed, arithmetic="int64")
    fast.prepare(fixed)
    exact.prepare(fixed)
    rows = fast.emulator.describe(steps)
    assert all(row["synapse"] == "float32" and not row["saturation_checks"] for row in rows), rows
    _assert_same_recording(fast.run_recorded(x, steps), exact.run_recorded(x, steps))
    a, b = fast.run(x, steps), exact.run(x, steps)
    np.testing.assert_array_equal(a.readout, b.readout)
    for name in b.spikes:
        np.testing.assert_array_equal(a.neuron_spikes[name], b.neuron_spikes[name])  # type: ignore[attr-defined]


def test_membrane_bound_is_sound():
    """Whenever `_membrane_fits` says T steps are safe, no input sequence within the bounds overflows."""
    from types import SimpleNamespace

    from targets.loihi.emulator import _Bounds, _membrane_fits

    rng = np.random.default_rng(0)
    for _ in range(300):
        theta = int(rng.integers(1, 2**21))
        u_low, u_high = sorted(int(u) for u in rng.integers(-(2**21), 2**21, 2))
        v0 = sorted(int(v) for v in rng.integers(-(2**20), 2**20, 2))
        kind = "if" if rng.random() < 0.8 else "readout"
        layer = SimpleNamespace(kind=kind, threshold=theta if kind == "if" else 0)
        bounds = _Bounds([0], [0], 0, u_low, u_high, v0[0], v0[1])
        sequences = [np.full(64, u_high), np.full(64, u_low), rng.integers(u_low, u_high + 1, 64)]
        sequences.append(np.where(np.arange(64) % 2 == 0, u_high, u_low))
        for start in v0:
            for u in sequences:
                v, first = start, None
                for t, u_t in enumerate(u.tolist()):
                    v += u_t
                    if abs(v) > V_MAX:
                        first = t + 1
                        break
                    if kind == "if" and v >= theta:
                        v -= theta
                if first is not None:
                    assert not _membrane_fits(layer, bounds, first), (theta, u_low, u_high, v0, kind, first)


def test_int64_arithmetic_option_and_graded_input_range():
    snn = make_snn(0, "basic")
    with pytest.raises(ToolchainError, match="arithmetic"):
        make_target(device="cpu", arithmetic="float16")
    target = make_target(device="cpu", input_range=(0, 1))
    target.prepare(snn)
    with pytest.raises(ToolchainError, match="graded input"):
        target.emulator.run_encoded(np.full((1, *snn.input_shape), 256, np.int32), 4)


def test_global_torch_settings_are_restored_after_a_run():
    snn = make_snn(0, "basic")
    target = make_target(device="cpu", input_range=(0, 1), threads=1)
    target.prepare(snn)
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    nnpack, mkldnn = torch._C._get_nnpack_enabled(), torch.backends.mkldnn.fp32_precision
    torch.set_float32_matmul_precision("medium")  # would allow bf16 matmuls inside oneDNN
    matmul, conv = torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.conv.fp32_precision
    try:
        reference = make_target(device="cpu", fixed=target.fixed, arithmetic="int64")
        reference.prepare(snn)
        x = make_inputs(snn, 3)
        np.testing.assert_array_equal(target.run(x, 8).readout, reference.run(x, 8).readout)
        assert torch.get_float32_matmul_precision() == "medium"
        assert (torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.conv.fp32_precision) == (matmul, conv)
    finally:
        torch.set_float32_matmul_precision(precision)
    assert torch.get_num_threads() == threads
    assert torch._C._get_nnpack_enabled() == nnpack and torch.backends.mkldnn.fp32_precision == mkldnn
