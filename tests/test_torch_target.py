"""The fast torch simulator against the plain step-by-step reference, on small hand-built SNNs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from targets.torch.simulator import TorchTarget
from targets.torch.stepwise import StepwiseTarget, simulate
from tests.conftest import make_ann
from toolchain.backends import get_target
from toolchain.core import interpreter as simulator
from toolchain.core import ir
from toolchain.errors import ToolchainError
from toolchain.passes.calibrate import ThresholdSpec, compute_thresholds
from toolchain.passes.convert import convert

make_target = TorchTarget

STEPS = 24


def _snn(ann: ir.Graph) -> ir.Graph:
    return convert(ann, compute_thresholds(ann, ThresholdSpec("ceiling")))


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _top(rng: np.random.Generator, channels: int, per_channel: bool) -> np.ndarray:
    return rng.uniform(0.8, 1.6, channels if per_channel else 1).astype(np.float32)


def residual_ann(seed: int = 0, per_channel: bool = False) -> ir.Graph:
    """conv-act, two branches (conv-act and a 1x1 conv), Add, act, max-pool, conv-act, Concat with an
    average-pooled branch (asymmetric padding, padded cells not counted), ScaleShift, flatten, linear."""
    rng = np.random.default_rng(seed)
    nodes: list[ir.Node] = [
        ir.Conv2d("c1", ["x"], weight=_w(rng, 4, 2, 3, 3), bias=rng.uniform(0, 0.2, 4).astype(np.float32), padding=(1, 1, 1, 1)),
        ir.Relu("a1", ["c1"], ceiling=_top(rng, 4, per_channel)),
        ir.Conv2d("c2", ["a1"], weight=_w(rng, 4, 4, 3, 3), bias=np.zeros(4, np.float32), padding=(1, 1, 1, 1)),
        ir.Relu("a2", ["c2"], ceiling=_top(rng, 4, per_channel)),
        ir.Conv2d("skip", ["a1"], weight=_w(rng, 4, 4, 1, 1), bias=None),
        ir.Add("sum", ["a2", "skip"]),
        ir.Relu("a3", ["sum"], ceiling=_top(rng, 4, per_channel)),
        ir.MaxPool2d("mp", ["a3"], kernel=(2, 2), stride=(2, 2)),
        ir.Conv2d("c3", ["mp"], weight=_w(rng, 6, 4, 3, 3), bias=rng.uniform(0, 0.1, 6).astype(np.float32), padding=(1, 0, 1, 2)),
        ir.Relu("a4", ["c3"], ceiling=_top(rng, 6, per_channel)),
        ir.AvgPool2d("ap", ["a3"], kernel=(3, 3), stride=(2, 2), padding=(0, 0, 1, 1), count_include_pad=False),
        ir.Concat("cat", ["a4", "ap"]),
        ir.ScaleShift(
            "aff", ["cat"], scale=rng.uniform(0.5, 1.5, 10).astype(np.float32), shift=rng.uniform(0, 0.1, 10).astype(np.float32)
        ),
        ir.Relu("a5", ["aff"], ceiling=_top(rng, 10, per_channel)),
        ir.Flatten("flat", ["a5"]),
        ir.Linear("fc", ["flat"], weight=_w(rng, 5, 160), bias=np.zeros(5, np.float32)),
    ]
    graph = ir.Graph("x", (2, 8, 8), nodes, "fc")
    graph.infer_shapes()
    return graph


def concat_input_ann(seed: int = 0) -> ir.Graph:
    """A Concat of a spiking branch with a branch that is constant over time (the analog input pooled)."""
    rng = np.random.default_rng(seed)
    nodes: list[ir.Node] = [
        ir.Conv2d("c1", ["x"], weight=_w(rng, 3, 1, 3, 3), bias=np.zeros(3, np.float32), padding=(1, 1, 1, 1)),
        ir.Relu("a1", ["c1"], ceiling=np.array([1.0], np.float32)),
        ir.MaxPool2d("mp_in", ["x"], kernel=(2, 2), stride=(2, 2)),
        ir.AvgPool2d("ap", ["a1"], kernel=(2, 2), stride=(2, 2)),
        ir.Concat("cat", ["ap", "mp_in"]),
        ir.Conv2d("c2", ["cat"], weight=_w(rng, 4, 4, 3, 3), bias=np.zeros(4, np.float32)),
        ir.Relu("a2", ["c2"], ceiling=np.array([1.2], np.float32)),
        ir.Flatten("flat", ["a2"]),
        ir.Linear("fc", ["flat"], weight=_w(rng, 3, 16), bias=np.zeros(3, np.float32)),
    ]
    graph = ir.Graph("x", (1, 8, 8), nodes, "fc")
    graph.infer_shapes()
    return graph


def ceil_pool_ann(seed: int = 0) -> ir.Graph:
    """An ONNX ceil_mode average pool: padding counted, the overhang past the end not."""
    rng = np.random.default_rng(seed)
    nodes: list[ir.Node] = [
        ir.Conv2d("c1", ["x"], weight=_w(rng, 3, 1, 3, 3), bias=np.zeros(3, np.float32), padding=(1, 1, 1, 1)),
        ir.Relu("a1", ["c1"], ceiling=np.array([1.0], np.float32)),
        ir.AvgPool2d("ap", ["a1"], kernel=(3, 3), stride=(2, 2), padding=(1, 1, 2, 2), uncounted_end=(1, 1)),
        ir.Flatten("flat", ["ap"]),
        ir.Linear("fc", ["flat"], weight=_w(rng, 3, 75), bias=np.zeros(3, np.float32)),
    ]
    graph = ir.Graph("x", (1, 8, 8), nodes, "fc")
    graph.infer_shapes()
    return graph


def mlp_ann(seed: int = 0) -> ir.Graph:
    rng = np.random.default_rng(seed)
    nodes: list[ir.Node] = [
        ir.Linear("fc1", ["x"], weight=_w(rng, 32, 20), bias=rng.uniform(0, 0.1, 32).astype(np.float32)),
        ir.Relu("a1", ["fc1"], ceiling=np.array([1.0], np.float32)),
        ir.Linear("fc2", ["a1"], weight=_w(rng, 4, 32), bias=np.zeros(4, np.float32)),
    ]
    graph = ir.Graph("x", (20,), nodes, "fc2")
    graph.infer_shapes()
    return graph


def _inputs(graph: ir.Graph, n: int = 48, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, *graph.input_shape)).astype(np.float32)


def _fast(snn: ir.Graph, x: np.ndarray, steps: int = STEPS, **options):
    target = make_target(device="cpu", **options)
    target.prepare(snn)
    return target.run(x, steps)


def assert_same_simulation(got, expected) -> None:
    """Same class at every step and the same spike counts per layer per step."""
    assert got.readout.shape == expected.readout.shape
    np.testing.assert_array_equal(got.readout.argmax(-1), expected.readout.argmax(-1))
    np.testing.assert_allclose(got.readout, expected.readout, rtol=1e-5, atol=1e-4)
    assert got.spikes.keys() == expected.spikes.keys()
    for layer in expected.spikes:
        np.testing.assert_array_equal(got.spikes[layer], expected.spikes[layer], err_msg=layer)


CASES = {
    "avgpool": lambda: make_ann(pool="avg"),
    "maxpool": lambda: make_ann(pool="max"),
    "avgpool-per-channel": lambda: make_ann(pool="avg", per_channel=True),
    "maxpool-per-channel": lambda: make_ann(pool="max", per_channel=True),
    "residual-add-concat": lambda: residual_ann(),
    "residual-per-channel": lambda: residual_ann(seed=3, per_channel=True),
    "concat-constant-branch": lambda: concat_input_ann(),
    "ceil-mode-avgpool": lambda: ceil_pool_ann(),
    "mlp": lambda: mlp_ann(),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_simulation_equals_step_by_step_reference(case):
    snn = _snn(CASES[case]())
    x = _inputs(snn)
    expected = simulate(snn, x, STEPS)
    got = _fast(snn, x)
    assert_same_simulation(got, expected)
    assert sum(v.sum() for v in got.spikes.values()) > 0, "a test network that never spikes proves nothing"


@pytest.mark.parametrize("case", ["maxpool-per-channel", "residual-add-concat"])
def test_layout_and_chunking_do_not_change_results(case):
    snn = _snn(CASES[case]())
    x = _inputs(snn, 37)
    base = _fast(snn, x, channels_last=False, batch_chunk=1000)
    for options in ({"channels_last": True}, {"batch_chunk": 1}, {"batch_chunk": 7, "channels_last": True}):
        got = _fast(snn, x, **options)
        np.testing.assert_array_equal(got.readout.argmax(-1), base.readout.argmax(-1))
        np.testing.assert_allclose(got.readout, base.readout, rtol=1e-5, atol=1e-5)
        for layer in base.spikes:
            np.testing.assert_array_equal(got.spikes[layer], base.spikes[layer], err_msg=f"{options} {layer}")


def test_eager_scan_is_bit_identical_to_the_naive_loop():
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(0.2, 0.5, (16, 5, 3, 4, 4)).astype(np.float32))
    theta = torch.tensor([0.7, 1.1, 0.9])
    v0 = theta * 0.5
    counts = torch.zeros(16, dtype=torch.int64)
    got = simulator.if_scan(x, theta, v0, 16, counts)
    th, v = theta.reshape(1, 3, 1, 1), (torch.zeros(5, 3, 4, 4) + v0.reshape(1, 3, 1, 1))
    for t in range(16):
        v = v + x[t]
        spiked = v >= th
        assert torch.equal(got[t], spiked * th)
        assert counts[t] == spiked.sum()
        v = v - spiked * th
    constant = simulator.if_scan(x[:1], theta, v0, 16)  # a constant input, broadcast over steps
    assert torch.equal(constant, simulator.if_scan(x[:1].expand(16, -1, -1, -1, -1).contiguous(), theta, v0, 16))


def test_memory_budget_bounds_the_chunk():
    snn = _snn(make_ann())
    target = TorchTarget(device="cpu")
    target.prepare(snn)
    per_sample = target.executor.peak_bytes_per_sample(256)
    assert per_sample >= 256 * 4 * 8 * 8 * 4  # at least one IF layer's (T, C, H, W) stack
    target.memory_budget = 3 * per_sample
    assert target.chunk_size(1000, 256) == 3
    target.memory_budget = 1  # never below one sample
    assert target.chunk_size(1000, 256) == 1
    x = _inputs(snn, 5)
    assert_same_simulation(target.run(x, 8), simulate(snn, x, 8))


def test_large_run_is_chunked_automatically():
    """T=256 x B=512 would be ~1.6 GB in one piece; a 64 MB budget runs it in chunks."""
    snn = _snn(make_ann(pool="max"))
    target = TorchTarget(device="cpu", memory_budget=64 << 20)
    target.prepare(snn)
    chunk = target.chunk_size(512, 256)
    assert 1 <= chunk < 512
    assert chunk * target.executor.peak_bytes_per_sample(256) <= 64 << 20
    x = _inputs(snn, 40)
    out = target.run(x, 256)
    assert out.readout.shape == (256, 40, 5)


def test_compile_failure_falls_back_to_the_eager_scan(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(simulator, "_compiled_scan", None)
    monkeypatch.setattr(simulator, "_compile_failed", False)
    snn = _snn(make_ann())
    x = _inputs(snn, 9)
    with caplog.at_level(logging.WARNING):
        got = _fast(snn, x, compile=True)
    assert "eager IF scan" in caplog.text
    assert_same_simulation(got, simulate(snn, x, STEPS))


def test_reduced_precision_is_cuda_only():
    target = TorchTarget(device="cpu", precision="float16")
    with pytest.raises(ToolchainError, match="CUDA only"):
        target.prepare(_snn(make_ann()))
    with pytest.raises(ToolchainError, match="precision"):
        TorchTarget(precision="int3")


def test_registry_and_reference_target_share_the_interface():
    snn = _snn(make_ann())
    x = _inputs(snn, 6)
    fast = get_target("torch", device="cpu")
    reference = StepwiseTarget()
    for target in (fast, reference):
        target.prepare(snn)
    assert_same_simulation(fast.run(x, 10), reference.run(x, 10))


def assert_close_simulation(got, expected, agreement: float = 0.97, spikes_rtol: float = 1e-3) -> None:
    """Across devices the convolutions' sums are rounded by other kernels, so a spike may flip where
    the potential lands within float rounding of the threshold: nearly the same, not bit for bit."""
    same_class = (got.readout[-1].argmax(-1) == expected.readout[-1].argmax(-1)).mean()
    assert same_class >= agreement, f"final class agrees on only {same_class:.1%} of samples"
    for layer in expected.spikes:
        total, reference = got.spikes[layer].sum(), expected.spikes[layer].sum()
        assert abs(total - reference) <= spikes_rtol * max(1.0, reference), f"{layer}: {total} vs {reference} spikes"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("case", ["maxpool-per-channel", "residual-add-concat", "concat-constant-branch"])
def test_cuda_matches_the_cpu_reference(case):
    snn = _snn(CASES[case]())
    x = _inputs(snn)
    expected = simulate(snn, x, STEPS)
    for options in ({}, {"batch_chunk": 5}, {"channels_last": True}):
        target = make_target(device="cuda", **options)
        target.prepare(snn)
        assert_close_simulation(target.run(x, STEPS), expected)
    cuda_reference = simulate(snn, x, STEPS, device="cuda")
    assert_close_simulation(cuda_reference, expected)
    for precision in ("tf32", "float16", "bfloat16"):
        low = make_target(device="cuda", precision=precision)
        low.prepare(snn)
        assert_close_simulation(low.run(x, STEPS), expected, agreement=0.85, spikes_rtol=0.05)
