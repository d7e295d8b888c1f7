"""SNN IR -> fixed-point IR: threshold folding, overflow checks, artifact round trip, unsupported graphs."""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_ann as make_shared_ann
from tests.fixed_point_graphs import make_inputs, make_snn
from toolchain.backends import get_target
from toolchain.core import ir
from toolchain.core.fixed import (
    FIXED_TENSORS_FILE,
    V_MAX,
    FixedGraph,
    encode_input,
    fixed_files,
    load_fixed,
    save_fixed,
)
from toolchain.errors import ToolchainError
from toolchain.passes.calibrate import ThresholdSpec, compute_thresholds
from toolchain.passes.convert import convert
from toolchain.passes.quantize import RESIDUAL_ROW_ERROR, quantize, unit_threshold_peaks

make_target = functools.partial(get_target, "loihi")
torch_target = functools.partial(get_target, "torch")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _quiet_calibration(caplog):
    caplog.set_level(logging.ERROR, logger="toolchain.passes.calibrate")


def _dequantised(layer) -> np.ndarray:
    (syn,) = layer.synapses
    return syn.weight.astype(np.float64) * 2.0**syn.weight_exp / layer.threshold


def test_per_channel_thresholds_fold_into_the_weights():
    snn = make_snn(0, "basic", per_channel=True)
    fixed = quantize(snn, input_range=(0, 1), max_row_ratio=None)
    theta = {n.name: np.asarray(n.threshold, np.float64) for n in snn.nodes if isinstance(n, ir.IFNeuron)}
    assert all(np.ptp(t) > 0 for t in theta.values()), "per-channel thresholds expected"
    for layer in fixed.if_layers:
        assert isinstance(layer.threshold, int) and 2**10 <= layer.threshold < 2**11  # one integer per population
    # conv2 sees act1 through a 2x2 average pool: w * theta_act1[in] / theta_act2[out] / 4, within half an LSB
    layer = fixed.layer("act2")
    (syn,) = layer.synapses
    assert syn.pool == (2, 2) and syn.kind == "conv" and syn.source == "act1"
    conv2 = snn.node("conv2").weight.astype(np.float64)
    expected = conv2 * theta["act1"][None, :, None, None] / theta["act2"][:, None, None, None] / 4
    lsb = 2.0**syn.weight_exp / layer.threshold
    assert np.abs(_dequantised(layer) - expected).max() <= 0.5 * lsb + 1e-12
    # the first layer: the input's step (1/255 of the range) plays the source threshold
    layer = fixed.layer("act1")
    expected = snn.node("conv1").weight.astype(np.float64) / 255 / theta["act1"][:, None, None, None]
    assert np.abs(_dequantised(layer) - expected).max() <= 0.5 * 2.0 ** layer.synapses[0].weight_exp / layer.threshold + 1e-12
    # v0 = theta / 2 in every channel becomes half the integer threshold
    assert np.abs(fixed.layer("act3").v0 - fixed.layer("act3").threshold / 2).max() <= 0.5
    # readout: float value = accumulator * scale
    readout = fixed.layer(fixed.output)
    assert readout.kind == "readout" and readout.threshold == 0


def test_channels_with_tiny_thresholds_are_raised_and_compensated():
    snn = make_snn(0, "basic", per_channel=True)
    act1 = snn.node("act1")
    act1.threshold = act1.threshold.copy()
    act1.threshold[2] /= 200.0  # a channel that hardly ever fired in calibration
    act1.v0 = act1.threshold / 2
    fixed = quantize(snn, input_range=(0, 1), residual_weights="off")  # 8-bit weights alone: bound 8
    layer = fixed.layer("act1")
    assert layer.stats["raised_channels"] == 1 and layer.stats["max_raise"] > 1
    raised = layer.scale * layer.threshold  # the float thresholds actually used
    assert raised[2] > act1.threshold[2] * 1.5
    np.testing.assert_allclose(np.delete(raised, 2), np.delete(act1.threshold, 2), rtol=1e-6)
    # the next layer takes the raised threshold of its source channel
    act2 = fixed.layer("act2")
    theta2 = act2.scale * act2.threshold
    conv2 = snn.node("conv2").weight.astype(np.float64)
    expected = conv2 * raised[None, :, None, None] / theta2[:, None, None, None] / 4
    assert np.abs(_dequantised(act2) - expected).max() <= 0.5 * 2.0 ** act2.synapses[0].weight_exp / act2.threshold + 1e-12
    # the other channels keep their resolution: without balancing they would be left a few levels
    plain = quantize(snn, input_range=(0, 1), max_row_ratio=None, residual_weights="off").layer("act1")
    others = [c for c in range(4) if c != 2]
    assert np.abs(layer.synapses[0].weight[others]).max() > 2 * np.abs(plain.synapses[0].weight[others]).max()


def test_the_row_bound_is_looser_where_residual_synapses_hold_the_rounding_error():
    """A channel whose weights are 20x the median channel's (in threshold units) is raised with
    8-bit weights alone (bound 8), but kept, with its spikes, where residual synapses may carry
    the others' precision (bound 64)."""
    snn = make_snn(0, "basic", per_channel=True)
    act1 = snn.node("act1")
    act1.threshold = act1.threshold.copy()
    peaks = unit_threshold_peaks(snn, "act1") / act1.threshold  # each channel's largest weight / its threshold
    median = np.median(np.append(np.delete(peaks, 2), np.inf))  # the median once channel 2 is the largest
    act1.threshold[2] /= 20.0 * median / peaks[2]
    act1.v0 = act1.threshold / 2
    alone = quantize(snn, input_range=(0, 1), residual_weights="off").layer("act1")
    paired = quantize(snn, input_range=(0, 1), residual_weights="auto").layer("act1")
    assert alone.stats["raised_channels"] == 1
    assert paired.stats.get("raised_channels", 0) == 0
    np.testing.assert_allclose(paired.scale * paired.threshold, act1.threshold, rtol=1e-6)
    # an explicit bound still wins over the policy's
    assert (
        quantize(snn, input_range=(0, 1), residual_weights="auto", max_row_ratio=8.0).layer("act1").stats["raised_channels"] == 1
    )


def test_a_population_whose_rows_exceed_the_8_bit_bound_gets_residual_synapses():
    """The looser row bound (64) relies on residual synapses: `auto` adds them to a population left
    with a channel beyond the 8-bit bound, even where its mantissa step is small against the threshold
    (without them a plain-torch MobileNet's first layer cost its fixed-point SNN tens of points)."""
    snn = make_snn(0, "basic", per_channel=True)
    act1 = snn.node("act1")
    act1.threshold = act1.threshold.copy()
    peaks = unit_threshold_peaks(snn, "act1") / act1.threshold
    median = np.median(np.append(np.delete(peaks, 2), np.inf))
    act1.threshold[2] /= 20.0 * median / peaks[2]  # channel 2's weights 20x the median channel's
    act1.v0 = act1.threshold / 2
    auto = quantize(snn, input_range=(0, 1)).layer("act1")
    off = quantize(snn, input_range=(0, 1), residual_weights="off", max_row_ratio=64.0).layer("act1")
    assert auto.stats.get("raised_channels", 0) == 0 and auto.stats["residual_synapses"] == 1
    assert auto.stats["weight_rel_l2"] < off.stats["weight_rel_l2"] / 20
    # models without such a channel keep one synapse per source
    assert "residual_synapses" not in quantize(make_snn(0, "basic"), input_range=(0, 1)).layer("act1").stats


def test_a_synapse_row_far_below_its_largest_weights_gets_a_residual_synapse(caplog):
    """One output channel with weights 1000x smaller than the others' under one threshold (as in a
    patch-whitening stem): 8 bits at the synapse's exponent round that row to zero. `auto` adds a
    residual synapse that holds it; `off` reports the row's error."""
    snn = make_snn(0, "basic", per_channel=False)
    conv1 = snn.node("conv1")
    conv1.weight = conv1.weight.copy()
    conv1.weight[1] /= 1000.0
    # raw 8-bit pixels: the synapse's exponent leaves room below it for the residual's (at input range
    # (0, 1) it sits at the floor of Loihi's exponent range and a residual gains nothing)
    with caplog.at_level(logging.WARNING, logger="toolchain.passes.quantize"):
        off = quantize(snn, input_range=(0, 255), residual_weights="off")
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["layer act1"]  # says so, names the layer
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="toolchain.passes.quantize"):
        auto = quantize(snn, input_range=(0, 255))
    assert not caplog.records
    assert off.layer("act1").stats["weight_row_rel_max"] > 0.5 and "residual_synapses" not in off.layer("act1").stats
    assert auto.layer("act1").stats["residual_synapses"] == 1
    assert auto.layer("act1").stats["weight_row_rel_max"] < RESIDUAL_ROW_ERROR
    # layers whose every row 8 bits hold keep one synapse per source
    assert [layer.stats.get("residual_synapses") for layer in auto.layers[1:]] == [None] * (len(auto.layers) - 1)


def test_a_weight_beyond_one_mantissa_is_carried_by_several_synapses(monkeypatch):
    """Batch norm after a ReLU can make one source spike worth ~150 thresholds of its target: one
    8-bit mantissa at the largest exponent (127 * 2**7) would cap the integer threshold near 2**7,
    and with it the resolution of the bias and v0, which accumulate every step. Synapses with the
    same source and geometry carry the wide weight instead, the threshold keeps its 10 bits."""
    import toolchain.passes.quantize as quantize_module

    snn = make_snn(0, "wide")
    layer = quantize(snn, input_range=(0, 1)).layer("act4")
    assert 2**10 <= layer.threshold < 2**11
    wide = [s for s in layer.synapses if s.weight_exp == 7]
    assert len(wide) == 1 + layer.stats["wide_synapses"] >= 2
    assert all((s.source, s.kind, s.in_shape, s.groups, s.nodes) == (wide[0].source, wide[0].kind, wide[0].in_shape,
               wide[0].groups, wide[0].nodes) for s in wide)  # fmt: skip
    assert max(np.abs(s.weight).max() for s in wide) <= 127
    monkeypatch.setattr(quantize_module, "MAX_WIDE_PARTS", 1)
    capped = quantize(snn, input_range=(0, 1)).layer("act4")
    assert capped.threshold < 2**8 and "wide_synapses" not in capped.stats
    assert layer.stats["bias_max_err"] < capped.stats["bias_max_err"] and layer.stats["v0_max_err"] < capped.stats["v0_max_err"]

    def weights(lay) -> np.ndarray:  # threshold units, all synapses summed
        return sum(s.weight.astype(np.float64) * 2.0**s.weight_exp for s in lay.synapses) / lay.threshold

    residual_step = 2.0 ** min(s.weight_exp for s in capped.synapses) / capped.threshold
    np.testing.assert_allclose(weights(layer), weights(capped), rtol=0, atol=residual_step)  # the same weights


def test_quantised_network_agrees_with_the_float_snn_on_random_graphs():
    steps = 32
    for variant, seed in (("basic", 1), ("basic", 3), ("odd", 1), ("odd", 2)):
        snn = make_snn(seed, variant)
        x = make_inputs(snn, 32)
        floating = torch_target(device="cpu")
        floating.prepare(snn)
        expected = floating.run(x, steps).readout[-1]
        fixed = make_target(device="cpu", input_range=(0, 1))
        fixed.prepare(snn)
        got = fixed.run(x, steps).readout[-1]
        assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.85, (variant, seed)
        assert np.abs(got - expected).mean() < 0.1 * np.abs(expected).max(), (variant, seed)
        for layer in fixed.fixed.layers:
            assert layer.stats["weight_rel_l2"] < 0.05
            assert layer.stats["safe_steps"] >= steps


def test_folded_structures():
    fixed = quantize(make_snn(0, "odd"), input_range=(0, 1))
    assert fixed.layer("act1").nodes == ["norm", "conv1"]  # input affine folded into the first conv
    assert fixed.layer("act2").nodes == ["conv2", "bn2"] and fixed.layer("act2").synapses[0].groups == 2
    assert fixed.layer("act3").synapses[0].kind == "dense"  # overlapping, padded pool before a conv: dense fallback
    assert fixed.layer("act4").nodes == ["pool3", "flat", "fc1", "fc1b"]  # consecutive linear maps folded
    (act4,) = fixed.layer("act4").synapses
    assert act4.weight.shape == (10, 6) and act4.pool == (2, 2)
    assert fixed.depth == {"act1": 1, "act2": 2, "act3": 3, "act4": 4, "fc2/readout": 5}
    with pytest.raises(ToolchainError, match="act3.*dense"):
        quantize(make_snn(0, "odd"), input_range=(0, 1), max_dense_weights=1000)


def test_overflowing_values_are_refused_naming_the_layer():
    snn = make_snn(0, "basic")
    snn.node("fc1").bias = snn.node("fc1").bias + 1e4  # 1e4 thresholds per step: no 13-bit mantissa holds it
    with pytest.raises(ToolchainError, match="act3.*bias"):
        quantize(snn, input_range=(0, 1))
    snn = make_snn(0, "basic")
    act2 = snn.node("act2")
    act2.v0 = act2.threshold * 1e5
    with pytest.raises(ToolchainError, match="act2.*24-bit"):
        quantize(snn, input_range=(0, 1))


def test_save_and_load_round_trip(tmp_path):
    snn = make_snn(0, "odd")
    fixed = quantize(snn, input_range=(0, 1))
    loaded = load_fixed(save_fixed(fixed, tmp_path / "fixed"))
    _assert_same(fixed, loaded)
    # next to the float artifact, in one atomic write
    artifact = ir.save_graph(snn, tmp_path / "artifact", extra_files=fixed_files(fixed))
    _assert_same(fixed, load_fixed(artifact))
    assert ir.load_graph(artifact).output == snn.output
    x = make_inputs(snn, 4)
    outputs = []
    for graph in (fixed, load_fixed(artifact)):
        target = make_target(device="cpu")
        target.prepare(graph)
        outputs.append(target.run(x, 8).readout)
    np.testing.assert_array_equal(outputs[0], outputs[1])
    (artifact / FIXED_TENSORS_FILE).write_bytes(b"damaged")
    with pytest.raises(ToolchainError, match="checksum"):
        load_fixed(artifact)
    with pytest.raises(ToolchainError, match="loihi"):
        load_fixed(tmp_path)


def _assert_same(a: FixedGraph, b: FixedGraph) -> None:
    assert (a.input_name, a.input_shape, a.input_bits, a.output, a.meta) == (
        b.input_name,
        b.input_shape,
        b.input_bits,
        b.output,
        b.meta,
    )
    np.testing.assert_array_equal(a.input_offset, b.input_offset)
    np.testing.assert_array_equal(a.input_step, b.input_step)
    assert len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert len(x.synapses) == len(y.synapses)
        for p, q in [(x, y), *zip(x.synapses, y.synapses, strict=True)]:
            for key, value in vars(p).items():
                other = getattr(q, key)
                if key == "synapses":
                    continue
                if isinstance(value, np.ndarray):
                    assert value.dtype == other.dtype and np.array_equal(value, other), key
                else:
                    assert value == other, key


def test_unsupported_structures_name_the_node():
    ann = make_shared_ann(pool="max")
    snn = convert(ann, compute_thresholds(ann, ThresholdSpec("ceiling")))
    with pytest.raises(ToolchainError, match=r"'pool1'.*maxpool=avg"):
        quantize(snn)
    with pytest.raises(ToolchainError, match="no IF neurons"):
        quantize(make_shared_ann())
    with pytest.raises(ToolchainError, match="'pool1'.*maxpool=relu"):
        quantize(snn)


def test_residual_add_and_concat_become_several_synapses():
    """A linear op feeding both a population and an Add (fc1) is folded into each; the Add's two paths
    are two synapses, the shorter one delayed to meet the longer in Lava."""
    fixed = quantize(_residual_snn(), input_range=(0, 1))
    if2 = fixed.layer("if2")
    assert [(s.source, s.nodes) for s in if2.synapses] == [("if1", ["fc2"]), (None, ["fc1"])]
    assert fixed.depth == {"if1": 1, "if2": 2, "out": 3} and fixed.delays()["if2"] == [0, 1]
    assert if2.nodes == ["fc1", "fc2", "add"]
    # the bias counts fc1's bias once per path through it, and the input offset the same way
    snn = make_snn(0, "residual")
    fixed = quantize(snn, input_range=(0, 1))
    act3, act5 = fixed.layer("act3"), fixed.layer("act5")
    assert [(s.source, s.kind, s.groups) for s in act3.synapses] == [("act2", "conv", 1), ("act1", "conv", 4)]  # identity
    shortcut = [("act4", (3, 3), (1, 1)), ("act3", (1, 1), (2, 2))]  # the 1x1-conv shortcut
    assert [(s.source, s.weight.shape[2:], s.stride) for s in act5.synapses] == shortcut
    assert fixed.delays()["act5"] == [0, 1] and fixed.depth["fc/readout"] == 6
    concat = quantize(make_snn(0, "concat"), input_range=(0, 1))
    act4 = concat.layer("act4")  # conv over Concat(act2, act3): the kernel's input channels sliced per source
    assert [(s.source, s.weight.shape) for s in act4.synapses] == [("act2", (4, 3, 3, 3)), ("act3", (4, 2, 3, 3))]
    act5 = concat.layer("act5")  # Concat(act1, act4) -> affine -> IF: channel placements
    assert [(s.source, s.weight.shape) for s in act5.synapses] == [("act1", (8, 4, 1, 1)), ("act4", (8, 4, 1, 1))]
    assert concat.delays()["act5"] == [2, 0]
    assert concat.timing() == {"depth": 5, "delayed_synapses": 1, "delay_steps": 2, "max_delay": 2, "relay_neurons": 0}
    assert concat.layer("act6").sources == ["act4", "act4"]  # two convs from one source, concatenated
    report = {row["layer"]: row for row in concat.report()}
    assert report["act4"]["synapse"] == "conv(act2) + conv(act3)"


def _residual_snn() -> ir.Graph:
    rng = np.random.default_rng(0)
    one = np.ones(1, np.float32)
    nodes: list[ir.Node] = [
        ir.Linear("fc1", ["x"], weight=rng.standard_normal((4, 4)).astype(np.float32)),
        ir.IFNeuron("if1", ["fc1"], threshold=one, v0=one / 2),
        ir.Linear("fc2", ["if1"], weight=rng.standard_normal((4, 4)).astype(np.float32)),
        ir.Add("add", ["fc2", "fc1"]),
        ir.IFNeuron("if2", ["add"], threshold=one, v0=one / 2),
        ir.Linear("fc3", ["if2"], weight=rng.standard_normal((2, 4)).astype(np.float32)),
        ir.Readout("out", ["fc3"]),
    ]
    graph = ir.Graph("x", (4,), nodes, "out")
    graph.infer_shapes()
    return graph


def test_raw_pixels_are_the_graded_input_spikes():
    snn = make_snn(0, "basic")
    snn.preprocess = ir.Preprocess(scale=1 / 255, mean=[0.1307], std=[0.3081])
    fixed = quantize(snn)  # default range: uint8 pixels through the preprocessing
    raw = np.random.default_rng(0).integers(0, 256, (3, *snn.input_shape)).astype(np.uint8)
    np.testing.assert_array_equal(encode_input(fixed, snn.preprocess.apply(raw)), raw)
    with pytest.raises(ToolchainError, match="shape"):
        encode_input(fixed, np.zeros((1, 3, 3)))
    # calibration data sets the range instead
    x = make_inputs(snn, 8) * 2 - 0.5
    calibrated = quantize(snn, calibration=x)
    codes = encode_input(calibrated, x)
    assert codes.min() == 0 and codes.max() == 255


def test_quantize_module_needs_neither_torch_nor_lava_to_load():
    code = (
        "import sys, toolchain.passes.quantize as q; "
        "assert 'torch' not in sys.modules and 'lava' not in sys.modules, sorted(sys.modules); "
        f"assert q.V_MAX == {V_MAX}"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_relu_maxpool_is_the_anns_max_and_lowers_to_conv_synapses():
    """--maxpool relu: max(a, b) = b + relu(a - b) from IF neurons; exact in the ANN (the IF neurons'
    ANN view), and a 2x2 pool followed by a conv composes into one conv synapse per source."""
    from toolchain.core.interpreter import run_ann
    from toolchain.passes.convert import ann_view

    tree = make_snn(0, "maxpool", maxpool="relu")
    spiking = make_snn(0, "maxpool", maxpool="spiking")
    x = make_inputs(tree, 16)
    np.testing.assert_allclose(run_ann(ann_view(tree), x), run_ann(ann_view(spiking), x), atol=1e-5)
    relus = [n.name for n in tree.nodes if isinstance(n, ir.IFNeuron) and n.name.startswith("pool")]
    assert len(relus) == 3 + 8  # a k-cell window takes k - 1 neurons: 2x2 and 3x3
    fixed = quantize(tree, input_range=(0, 1))
    act2 = fixed.layer("act2")
    assert all(s.kind == "conv" for s in act2.synapses)
    from_act1 = next(s for s in act2.synapses if s.source == "act1")  # a pooled cell through conv2: one conv
    assert from_act1.weight.shape[2:] == (6, 6) and from_act1.stride == (2, 2)
    first = fixed.layer("pool1/max0_0/relu")
    assert len(first.synapses) == 1  # a - b from one source: one synapse, weights summed


@pytest.mark.parametrize("variant", ["basic", "residual", "concat"])
def test_residual_weights_hold_each_synapses_rounding_error(variant):
    """`residual_weights`: each synapse gets a twin from the same source holding its rounding error at a
    finer exponent; the pair's weight error is far below 8-bit rounding's, and the fixed-point readout
    follows the float SNN more closely."""
    steps = 32
    snn = make_snn(0, variant)
    x = make_inputs(snn, 32)
    floating = torch_target(device="cpu")
    floating.prepare(snn)
    expected = floating.run(x, steps).readout[-1]
    errors, deviation = {}, {}
    for residual in ("off", "on"):
        fixed = quantize(snn, input_range=(0, 1), residual_weights=residual)
        target = make_target(device="cpu", fixed=fixed)
        target.prepare(fixed)
        deviation[residual] = float(np.abs(target.run(x, steps).readout[-1] - expected).mean())
        errors[residual] = {layer.name: layer.stats["weight_rel_l2"] for layer in fixed.layers}
        if residual == "on":
            for layer in fixed.layers:
                pairs = [s for s in layer.synapses if s.weight_exp < max(t.weight_exp for t in layer.synapses)]
                assert len(layer.synapses) > len({s.source for s in layer.synapses}) and pairs, layer.name
    for name, error in errors["off"].items():
        assert errors["on"][name] < error / 20, (name, error, errors["on"][name])
    assert deviation["on"] < deviation["off"], deviation


def test_a_long_run_takes_threshold_bits_off_the_populations_that_would_overflow():
    """quantize(steps=T): a population proven overflow-free for fewer than T steps gets a smaller
    integer threshold until it is not; the others, and the emulator's agreement with them, are unchanged."""
    snn = make_snn(0, "basic")
    plain = quantize(snn, input_range=(0, 1))
    safe = {layer.name: layer.stats["safe_steps"] for layer in plain.layers}
    steps = 4 * min(safe.values())
    long = quantize(snn, input_range=(0, 1), steps=steps)
    for before, after in zip(plain.layers, long.layers, strict=True):
        assert after.stats["safe_steps"] >= steps, after.name
        if safe[before.name] >= steps:
            assert after.threshold == before.threshold and "threshold_bits" not in after.stats
        else:
            assert after.stats["threshold_bits"] < 10 and after.stats["safe_steps"] > before.stats["safe_steps"]
    x = make_inputs(snn, 8)
    target = make_target(device="cpu", fixed=long)
    target.prepare(long)
    target.run(x, steps)  # raises if any membrane overflowed
