"""The report: spike totals equal what each target recorded, fan-out and SynOps equal a brute-force
count, the three formats carry the same numbers, the energy model changes only energies, and the HTML
page renders in headless Chromium."""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
import torch

from targets.torch.simulator import TorchTarget as make_target
from tests.conftest import DEFAULT_MODEL, EMBEDDED_MNIST, make_ann
from toolchain.cli import main
from toolchain.core import ir
from toolchain.core.interpreter import TorchExecutor
from toolchain.data import Dataset
from toolchain.errors import ToolchainError
from toolchain.evaluate import evaluate
from toolchain.passes.calibrate import ThresholdSpec, compute_thresholds
from toolchain.passes.convert import convert
from toolchain.report import SpikeMapRecorder, build_report, load_energy_model, report_steps, write_report
from toolchain.report.counts import fanout, fanout_adjoint, fanout_one_hot, populations
from toolchain.report.render import tables

STEPS = [1, 2, 4, 8]


# ---------------------------------------------------------------- fixtures


def _snn(ann: ir.Graph) -> ir.Graph:
    return convert(ann, compute_thresholds(ann, ThresholdSpec("ceiling")))


@pytest.fixture(scope="module")
def snn() -> ir.Graph:
    return _snn(make_ann())


@pytest.fixture(scope="module")
def data() -> Dataset:
    rng = np.random.default_rng(3)
    return Dataset(rng.integers(0, 256, (24, 1, 8, 8), dtype=np.uint8), rng.integers(0, 5, 24), "random uint8")


def _evaluate(target, graph: ir.Graph, data: Dataset, steps=STEPS):
    target.prepare(graph)
    return evaluate(target, data, graph.preprocess, graph.input_shape, steps, batch_size=10, progress=False)


def _torch_spikes(graph: ir.Graph, data: Dataset, steps: int) -> dict[str, np.ndarray]:
    """Per-neuron spike counts straight from the simulator's IF outputs (summed over samples and steps)."""
    executor = TorchExecutor(graph, "cpu")
    counts: dict[str, np.ndarray] = {}

    def observe(node: ir.Node, value: torch.Tensor) -> None:
        if isinstance(node, ir.IFNeuron):
            fired = (value != 0).sum((0, 1)).double().numpy().reshape(-1)  # IF output is spike * theta, theta > 0
            counts[node.name] = counts.get(node.name, 0) + fired

    for raw, _ in data.batches(7):
        executor.run(torch.as_tensor(graph.preprocess.apply(raw)), steps, observe)
    return counts


@pytest.fixture(scope="module")
def torch_run(snn, data):
    recorder = SpikeMapRecorder(make_target(device="cpu"))
    evaluation = _evaluate(recorder, snn, data)
    return evaluation, recorder.maps


# ---------------------------------------------------------------- (1) totals equal the targets' spikes


def _layer(report: dict, name: str) -> dict:
    return next(r for r in report["layers"] if r["name"] == name)


def test_report_spikes_equal_the_torch_simulators_spikes(snn, data, torch_run):
    evaluation, maps = torch_run
    report = build_report(snn, evaluation, spike_maps=maps)
    expected = _torch_spikes(snn, data, max(STEPS))
    assert set(expected) == {r["name"] for r in report["layers"] if r["kind"] == "if"}
    for name, per_neuron in expected.items():
        assert _layer(report, name)["spikes"] * len(data) == pytest.approx(per_neuron.sum(), abs=1e-6)
        np.testing.assert_array_equal(maps[name], per_neuron)
    assert report["totals"]["spikes"] * len(data) == pytest.approx(sum(v.sum() for v in expected.values()), abs=1e-6)
    # the plain torch target (no recorder) counts the same spikes
    plain = _evaluate(make_target(device="cpu"), snn, data)
    for name, counts in plain.spikes.items():
        np.testing.assert_array_equal(counts, evaluation.spikes[name])
    # and the accuracy at a smaller T uses only the first T steps
    assert report["accuracy"]["spikes_per_sample"]["2"] * len(data) == pytest.approx(
        sum(float(v[:2].sum()) for v in evaluation.spikes.values())
    )


def _fixed_point_ready(snn: ir.Graph) -> ir.Graph:
    graph = copy.deepcopy(snn)
    graph.preprocess.scale = 1 / 255  # uint8 pixels, as the default scale means
    return graph


def test_report_spikes_equal_the_loihi_emulators_spikes(snn, data):
    from toolchain.backends import get_target

    snn = _fixed_point_ready(snn)
    target = get_target("loihi", device="cpu")
    recorder = SpikeMapRecorder(target)
    evaluation = _evaluate(recorder, snn, data)
    report = build_report(snn, evaluation, target="loihi", spike_maps=recorder.maps)
    recorded: dict[str, float] = {}
    for raw, _ in data.batches(10):
        recording = target.run_recorded(snn.preprocess.apply(raw), max(STEPS))
        for name, spikes in recording.spikes.items():
            recorded[name] = recorded.get(name, 0.0) + float(np.asarray(spikes).sum())
    assert recorded, "the emulator recorded no layers"
    for name, total in recorded.items():
        assert _layer(report, name)["spikes"] * len(data) == pytest.approx(total, abs=1e-6)
    assert report["totals"]["spikes"] * len(data) == pytest.approx(sum(recorded.values()), abs=1e-6)
    assert all(r["synops_method"] == "exact" for r in report["layers"] if r["kind"] == "if")
    plain = build_report(snn, _evaluate(SpikeMapRecorder(target, rerun=False), snn, data), target="loihi")
    assert all(r["synops_method"] == "mean fan-out" for r in plain["layers"] if r["kind"] == "if")


@pytest.mark.lava
def test_report_spikes_equal_lavas_spikes(snn, data):
    if importlib.util.find_spec("lava") is None or importlib.util.find_spec("targets.lava.runner") is None:
        pytest.skip("lava-nc or targets.lava.runner is not installed here")
    from toolchain.backends import get_target

    snn = _fixed_point_ready(snn)
    small = data.subset(2)
    target = get_target("lava", record=True)
    try:
        evaluation = _evaluate(target, snn, small, steps=[1, 2, 4])
        recording = target.run_recorded(snn.preprocess.apply(small.x), 4)
    finally:
        target.close()
    report = build_report(snn, evaluation, target="lava")
    for name, spikes in recording.spikes.items():
        assert _layer(report, name)["spikes"] * len(small) == pytest.approx(float(np.asarray(spikes).sum()), abs=1e-6)
    assert report["latency"]["wall_seconds"] == evaluation.seconds


# ---------------------------------------------------------------- (4) fan-out and SynOps against brute force


def _edges(graph: ir.Graph, node: ir.Node) -> list[tuple[str, int, int]]:
    """Every connection of one node as (input name, input flat index, output flat index), by enumeration."""
    edges = []
    if isinstance(node, (ir.Conv2d, ir.AvgPool2d, ir.MaxPool2d)):
        c_in, h, w = graph.shape_of(node.inputs[0])
        c_out, oh, ow = node.shape
        if isinstance(node, ir.Conv2d):
            kh, kw = node.weight.shape[2:]
            per_group_in, per_group_out = node.weight.shape[1], c_out // node.groups
            dilation = node.dilation
        else:
            kh, kw = node.kernel
            dilation = (1, 1)
        top, left = node.padding[0], node.padding[1]
        for co in range(c_out):
            if isinstance(node, ir.Conv2d):
                group = co // per_group_out
                channels = range(group * per_group_in, (group + 1) * per_group_in)
            else:
                channels = [co]
            for oy in range(oh):
                for ox in range(ow):
                    for ci in channels:
                        for ky in range(kh):
                            for kx in range(kw):
                                iy = oy * node.stride[0] - top + ky * dilation[0]
                                ix = ox * node.stride[1] - left + kx * dilation[1]
                                if 0 <= iy < h and 0 <= ix < w:
                                    edges.append((node.inputs[0], (ci * h + iy) * w + ix, (co * oh + oy) * ow + ox))
    elif isinstance(node, ir.Linear):
        n_in, n_out = node.weight.shape[1], node.weight.shape[0]
        edges = [(node.inputs[0], i, o) for i in range(n_in) for o in range(n_out)]
    elif isinstance(node, ir.Concat):
        offset = 0
        for name in node.inputs:
            size = int(np.prod(graph.shape_of(name)))
            edges += [(name, i, offset + i) for i in range(size)]
            offset += size
    elif isinstance(node, (ir.Add, ir.Flatten, ir.ScaleShift)):
        for name in node.inputs:
            edges += [(name, i, i) for i in range(int(np.prod(graph.shape_of(name))))]
    else:
        raise AssertionError(node.op)
    return edges


def _brute_force_fanout(graph: ir.Graph, source: str) -> np.ndarray:
    """Distinct neurons of the next layers reached from each source neuron, by set propagation."""
    adjacency: dict[str, dict[tuple[str, int], list[int]]] = {}
    for node in graph.nodes:
        if node.op not in ("if", "readout"):
            table: dict[tuple[str, int], list[int]] = {}
            for name, i, o in _edges(graph, node):
                table.setdefault((name, i), []).append(o)
            adjacency[node.name] = table
    result = []
    for neuron in range(int(np.prod(graph.shape_of(source)))):
        reach: dict[str, set[int]] = {source: {neuron}}
        count = 0
        for node in graph.nodes:
            if node.op in ("if", "readout"):
                count += sum(len(reach.get(name, ())) for name in node.inputs)
                continue
            hit = {o for name in node.inputs for i in reach.get(name, ()) for o in adjacency[node.name].get((name, i), [])}
            if hit:
                reach[node.name] = hit
        result.append(count)
    return np.array(result)


def _odd_ann(seed: int = 5) -> ir.Graph:
    """Asymmetric padding, stride, groups, a residual add, an overlapping pool before a grouped conv, a max-pool,
    an add and a concat fed twice by the same layer (paths that meet again), flatten and linear into the readout."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.uniform(-0.3, 1.0, shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    one = np.array([1.0], np.float32)
    nodes: list[ir.Node] = [
        ir.Conv2d("conv1", ["x"], weight=w(4, 2, 3, 3), bias=np.full(4, 0.1, np.float32), stride=(2, 2), padding=(1, 0, 2, 1)),
        ir.Relu("a1", ["conv1"], ceiling=one),
        ir.Conv2d("conv2", ["a1"], weight=w(4, 2, 3, 3), bias=np.zeros(4, np.float32), padding=(1, 1, 1, 1), groups=2),
        ir.Relu("a2", ["conv2"], ceiling=one),
        ir.Conv2d("conv3", ["a2"], weight=w(4, 4, 3, 3), bias=np.zeros(4, np.float32), padding=(1, 1, 1, 1)),
        ir.Add("res", ["conv3", "a1"]),
        ir.Relu("a3", ["res"], ceiling=one),
        ir.AvgPool2d("pool3", ["a3"], kernel=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1)),
        ir.Conv2d("conv4", ["pool3"], weight=w(4, 2, 2, 2), bias=np.full(4, 0.05, np.float32), groups=2),
        ir.Relu("a4", ["conv4"], ceiling=one),
        ir.Conv2d("conv5", ["a4"], weight=w(4, 4, 1, 1), bias=np.zeros(4, np.float32)),
        ir.Add("skip", ["conv5", "a4"]),
        ir.Relu("a5", ["skip"], ceiling=one),
        ir.MaxPool2d("mpool", ["a5"], kernel=(2, 2), stride=(1, 1)),
        ir.Conv2d("conv6", ["a5"], weight=w(2, 4, 1, 1), bias=np.zeros(2, np.float32)),
        ir.Concat("cat", ["conv6", "a5"]),
        ir.Flatten("flat", ["cat"]),
        ir.Linear("fc", ["flat"], weight=w(6, 36), bias=np.zeros(6, np.float32)),
        ir.Flatten("mflat", ["mpool"]),
        ir.Linear("fcm", ["mflat"], weight=w(6, 8), bias=np.zeros(6, np.float32)),
        ir.Add("logits", ["fc", "fcm"]),
    ]
    graph = ir.Graph("x", (2, 7, 7), nodes, "logits")
    graph.infer_shapes()
    return graph


@pytest.mark.parametrize("make", [make_ann, _odd_ann], ids=["cnn", "odd"])
def test_fanout_equals_a_brute_force_count(make):
    graph = _snn(make())
    methods = set()
    for population in populations(graph):
        if population.kind == "readout":
            continue
        expected = _brute_force_fanout(graph, population.name)
        np.testing.assert_array_equal(population.fanout, expected, err_msg=population.name)
        np.testing.assert_array_equal(fanout_one_hot(graph, population.name, chunk=5), expected, err_msg=population.name)
        methods.add(population.fanout_method)
        if population.fanout_method == "adjoint":
            np.testing.assert_array_equal(fanout_adjoint(graph, population.name), expected)
    if make is _odd_ann:
        assert methods == {"adjoint", "separable", "one-hot"}
        # where paths meet again, counting paths would over-count: the one-hot count is needed
        assert (fanout_adjoint(graph, "a5") > fanout(graph, "a5")[0]).all()
        assert graph.node("a1").shape == (4, 4, 3)  # the asymmetric padding is really exercised


def test_synops_equal_a_brute_force_count():
    graph = _snn(_odd_ann())
    rng = np.random.default_rng(0)
    data = Dataset(rng.integers(0, 256, (12, 2, 7, 7), dtype=np.uint8), np.zeros(12, np.int64), "random")
    recorder = SpikeMapRecorder(make_target(device="cpu"))
    evaluation = _evaluate(recorder, graph, data)
    report = build_report(graph, evaluation, spike_maps=recorder.maps)
    spikes = _torch_spikes(graph, data, max(STEPS))
    total = 0.0
    for name, per_neuron in spikes.items():
        assert per_neuron.sum() > 0, f"{name} never fired: the test would prove nothing"
        expected = float(per_neuron @ _brute_force_fanout(graph, name))
        row = _layer(report, name)
        assert row["synops_method"] == "exact"
        assert row["synops"] * len(data) == pytest.approx(expected, rel=1e-12)
        total += expected
    assert report["totals"]["synops"] * len(data) == pytest.approx(total, rel=1e-12)
    assert any("max-pool" in note for note in report["notes"])  # a5 drives a spiking max-pool: upper bound said
    # without per-neuron counts: the layer's spikes x mean fan-out, with bounds around the exact value
    estimate = build_report(graph, evaluation)
    for name in spikes:
        row, exact = _layer(estimate, name), _layer(report, name)
        assert row["synops_method"] == "mean fan-out"
        low, high = row["synops_bounds"]
        assert low - 1e-9 <= exact["synops"] <= high + 1e-9


def test_ann_macs_and_static_counts(snn):
    rows = {p.name: p for p in populations(snn)}
    # conv1 4x1x3x3 on 8x8 (same padding): 4*8*8*9; conv2 6x4x3x3 -> 6x2x2 output; fc1 16x24; fc2 5x16
    assert rows["x"].ann_macs == 4 * 64 * 9
    assert rows["act1"].ann_macs == 6 * 2 * 2 * 4 * 9
    assert rows["act2"].ann_macs == 16 * 24 and rows["act3"].ann_macs == 5 * 16
    assert rows["act3"].fanout.tolist() == [5] * 16  # dense layer: every output
    assert rows["fc2/readout"].kind == "readout" and rows["fc2/readout"].fanout is None


# ---------------------------------------------------------------- (2) the same numbers in every format


def _numbers(text: str) -> float:
    return float(re.sub(r"[^0-9.eE+-]", "", text.split(" (")[0]))


def test_json_markdown_and_html_carry_the_same_numbers(snn, torch_run, tmp_path):
    evaluation, maps = torch_run
    paths = {}
    for fmt in ("json", "md", "html"):
        paths[fmt] = write_report(tmp_path / "art", evaluation, snn, fmt, tmp_path / f"report.{fmt}", spike_maps=maps)
    report = json.loads(paths["json"].read_text())
    markdown = paths["md"].read_text()
    page = paths["html"].read_text()
    import html as html_lib

    for name, (header, rows) in tables(report).items():
        for cell in header + [c for row in rows for c in row]:
            assert cell.replace("|", "\\|") in markdown, (name, cell)
            assert html_lib.escape(cell) in page, (name, cell)
    # the Markdown tables read back as the JSON numbers
    layer_table = [line for line in markdown.splitlines() if line.startswith("| total |")]
    assert len(layer_table) == 2  # layers and energy tables
    cells = [c.strip() for c in layer_table[0].strip("|").split("|")]
    totals = report["totals"]
    for index, key in [(1, "neurons"), (3, "spikes"), (5, "synops"), (6, "neuron_updates"), (8, "ann_macs")]:
        assert _numbers(cells[index]) == pytest.approx(totals[key], rel=1e-3, abs=0.06), key
    for row in report["layers"]:
        line = next(line for line in markdown.splitlines() if line.startswith(f"| {row['name']}"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert _numbers(cells[1]) == row["neurons"]
        if row["kind"] == "if":
            assert _numbers(cells[3]) == pytest.approx(row["spikes"], rel=1e-3, abs=0.006)
            assert _numbers(cells[5]) == pytest.approx(row["synops"], rel=1e-3, abs=0.006)
    # JSON carries every number behind the tables, and the PNGs beside the Markdown exist
    assert set(report["totals"]["energy_pj"]) == {"loihi", "snn_ac", "ann"}
    for name in ("report-accuracy.png", "report-firing-rate.png", "report-energy.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert f"]({name})" in markdown
    for phrase in ("memory traffic", "static", "off-chip", "Davies", "Horowitz"):
        assert phrase.lower() in markdown.lower() and phrase.lower() in page.lower()


# ---------------------------------------------------------------- (3) the energy model changes energies only


def _without_energy(report: dict) -> dict:
    report = copy.deepcopy(report)
    report.pop("energy_model")
    report["totals"].pop("energy_pj")
    report["totals"].pop("snn_over_ann")
    for row in report["layers"]:
        row.pop("energy_pj")
    return report


@pytest.mark.parametrize("suffix", ["json", "toml"])
def test_an_energy_model_file_changes_the_energy_estimates_and_nothing_else(snn, torch_run, tmp_path, suffix):
    evaluation, maps = torch_run
    path = tmp_path / f"model.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps({
            "name": "doubled", "constants": {"loihi_synaptic_op": 47.2, "mac": {"value": 9.2, "unit": "pJ", "citation": "test"}},
        }))
    else:
        path.write_text('name = "doubled"\n[constants]\nloihi_synaptic_op = 47.2\n'
                        '[constants.mac]\nvalue = 0.0092\nunit = "nJ"\ncitation = "test"\n')
    base = build_report(snn, evaluation, spike_maps=maps)
    changed = build_report(snn, evaluation, energy_model=path, spike_maps=maps)
    assert _without_energy(base) == _without_energy(changed)
    b, c = base["totals"]["energy_pj"], changed["totals"]["energy_pj"]
    assert c["loihi"]["synaptic_ops"] == pytest.approx(2 * b["loihi"]["synaptic_ops"]) and b["loihi"]["synaptic_ops"] > 0
    assert c["ann"]["total"] == pytest.approx(2 * b["ann"]["total"])
    assert c["loihi"]["neuron_updates"] == b["loihi"]["neuron_updates"]
    assert c["snn_ac"]["synaptic_ops"] == b["snn_ac"]["synaptic_ops"]
    constants = changed["energy_model"]["constants"]
    assert constants["loihi_synaptic_op"]["overridden"] and not constants["ac"]["overridden"]
    assert changed["energy_model"]["name"] == "doubled"
    # a convention is part of the model too: charging the analog first layer once
    once = build_report(snn, evaluation, energy_model={"conventions": {"analog_input": "once"}}, spike_maps=maps)
    assert once["totals"]["energy_pj"]["loihi"]["analog_input_macs"] == pytest.approx(
        b["loihi"]["analog_input_macs"] / max(STEPS)
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"constants": {"loihi_synops": 1}}', "unknown constant"),
        ('{"constants": {"mac": -1}}', "non-negative"),
        ('{"constants": {"mac": {"value": 1, "unit": "kWh"}}}', "unit"),
        ('{"conventions": {"analog_input": "sometimes"}}', "choose one of"),
        ("not json", "not valid JSON"),
    ],
)
def test_bad_energy_models_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ToolchainError, match=message):
        load_energy_model(path)


def test_every_default_constant_is_cited():
    model = load_energy_model()
    assert model.pj("loihi_synaptic_op") == 23.6 and model.pj("mac") == 4.6 and model.pj("ac") == 0.9
    assert model.pj("loihi_neuron_update_active") == 81 and model.pj("loihi_neuron_update_inactive") == 52
    assert model.pj("loihi_spike_within_tile") == 1.7
    for name, constant in model.constants.items():
        assert constant.unit == "pJ" and constant.citation and constant.per, name
        assert ("Davies" in constant.citation) == name.startswith("loihi"), name


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def artifact(snn, data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report-cli")
    ir.save_graph(snn, folder / "art")
    np.savez(folder / "data.npz", x=data.x, y=data.y)
    return folder


def test_cli_report_json_and_markdown(artifact, torch_run, capsys):
    evaluation, _ = torch_run
    code = main(["report", str(artifact / "art"), "--data", str(artifact / "data.npz"), "-T", "8", "--format", "json",
                 "--device", "cpu", "--batch-size", "10"])
    out = capsys.readouterr()
    assert code == 0 and out.err == ""
    report = json.loads(out.out)
    assert list(report["accuracy"]["snn"]) == ["1", "2", "4", "8"] and report["steps"] == 8
    assert report["totals"]["spikes"] == pytest.approx(sum(float(v.sum()) for v in evaluation.spikes.values()) / 24)
    assert all(r["synops_method"] == "exact" for r in report["layers"] if r["kind"] == "if")
    target = artifact / "out" / "r.md"
    assert main(["report", str(artifact / "art"), "--data", str(artifact / "data.npz"), "-T", "4", "--limit", "5",
                 "-o", str(target), "--device", "cpu"]) == 0
    assert "## Per layer (per sample, T = 4)" in target.read_text()
    assert (artifact / "out" / "r-energy.png").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--format", "html"], "HTML report is a file"),
        (["--energy-model", "missing.json"], "no such energy-model file"),
        (["-T", "0"], "positive"),
    ],
)
def test_cli_report_errors_are_one_line(artifact, capsys, extra, message):
    code = main(["report", str(artifact / "art"), "--data", str(artifact / "data.npz"), "--device", "cpu"] + extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_report_steps():
    assert report_steps(32) == [1, 2, 4, 8, 16, 32]
    assert report_steps(12) == [1, 2, 4, 8, 12]
    assert report_steps(1) == [1]


def test_the_shipped_mnist_model(tmp_path, capsys):
    from toolchain.build import BuildOptions, build_snn, write_artifact
    from toolchain.data import load_dataset

    options = BuildOptions(model=DEFAULT_MODEL, out=tmp_path / "mnist", threshold="ceiling", device="cpu")
    built = build_snn(options)
    write_artifact(built, options)
    assert main(["report", str(tmp_path / "mnist"), "--data", str(EMBEDDED_MNIST), "-T", "8", "--limit", "12",
                 "--format", "json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    data = load_dataset(EMBEDDED_MNIST, "test").subset(12)
    expected = _torch_spikes(built.snn, data, 8)
    for name, per_neuron in expected.items():
        assert _layer(report, name)["spikes"] * 12 == pytest.approx(per_neuron.sum())
    assert report["accuracy"]["ann"] is not None and report["accuracy"]["snn"]["8"] > 0.5
    first = report["layers"][0]
    assert first["kind"] == "input" and first["analog_macs"] == 8 * first["ann_macs"] > 0


# ---------------------------------------------------------------- (5) the HTML page in headless Chromium


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                        ["apt-get", "install", "-y", "-q", "chromium"]):  # a fresh machine has no package lists yet
            subprocess.run(command, capture_output=True, timeout=600, env=env)
            if shutil.which("chromium"):
                break
        found = shutil.which("chromium")
        if found:
            return found
    pytest.skip("headless Chromium is not installed and cannot be installed here (apt-get install chromium needs root)")


def _run_chromium(binary: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=120,
        )


def test_html_report_renders_in_headless_chromium(snn, torch_run, tmp_path):
    binary = _chromium()
    evaluation, maps = torch_run
    page = write_report(None, evaluation, snn, "html", tmp_path / "report.html", spike_maps=maps)
    dom = _run_chromium(binary, "--dump-dom", page.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', dom.stdout)
    assert {alt for alt, _ in images} == {"Accuracy vs time steps", "Firing rate per layer", "Energy per layer"}
    for _, data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")
    totals = re.search(r'<table id="totals">(.*?)</table>', dom.stdout, re.S)
    assert totals and "SynOps per sample" in totals.group(1) and "ANN MACs per sample" in totals.group(1)
    assert '<table id="layers">' in dom.stdout and '<table id="constants">' in dom.stdout
    # the plots are really drawn: the screenshot holds matplotlib's blue and orange
    shot = tmp_path / "shot.png"
    result = _run_chromium(binary, f"--screenshot={shot}", "--window-size=1200,2600", page.resolve().as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    for colour in ((31, 119, 180), (255, 127, 14)):  # tab:blue (accuracy curve), tab:orange (firing rates)
        assert (np.abs(pixels - colour).sum(1) < 30).sum() > 200, colour


def test_resources_split_large_layers_over_cores_and_warn():
    from tests.fixed_point_graphs import make_snn
    from toolchain.passes.quantize import quantize
    from toolchain.report.resources import resource_lines, resources

    fixed = quantize(make_snn(0, "basic"), input_range=(0, 1))
    layer = fixed.layer("act1")
    small = resources(fixed, "loihi1")
    assert small["layers"][0]["neurons"] == layer.size == 400 and small["layers"][0]["cores"] == 1
    assert small["layers"][0]["max_fan_in"] == 18  # 2 channels x 3 x 3
    assert small["total"]["chips"] == 1 and not small["warnings"]
    # its first population 359 times wider: 143,600 neurons need 141 cores, more than one Loihi 1 chip
    layer.shape = (4 * 359, 10, 10)
    layer.synapses[0].weight = np.tile(layer.synapses[0].weight, (359, 1, 1, 1))
    report = resources(fixed, "loihi1")
    assert report["layers"][0]["cores"] == 141
    assert report["total"]["chips"] == 2
    assert any("'act1' needs 141 cores" in w for w in report["warnings"])
    lines = resource_lines(report)
    assert lines[0].startswith("Loihi 1 resources") and any(line.startswith("  warning:") for line in lines)
    loihi2 = resources(fixed, "loihi2")["layers"][0]  # memory-bound there: 192 KiB per core, 8,192 neurons
    assert loihi2["cores"] == math.ceil(loihi2["synapse_bytes"] / (192 * 1024)) > math.ceil(143_600 / 8192)
