"""The command line end to end, on the shipped model and the embedded MNIST test set."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.conftest import DEFAULT_MODEL, EMBEDDED_MNIST, ROOT

CALIB = ROOT / "models" / "data" / "mnist-calib.npz"


def toolchain(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "toolchain", *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=600
    )


def assert_clean_failure(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("build") / "mnist"
    result = toolchain("build", DEFAULT_MODEL, "--target", "torch", "--calib", CALIB, "-o", out)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    return out


def test_build_writes_a_complete_artifact(artifact):
    assert {p.name for p in artifact.iterdir()} >= {"graph.json", "tensors.npz", "ann.onnx", "build.json"}
    log = json.loads((artifact / "build.json").read_text())
    # The shipped model's first ceiling (7.28) is above every calibration activation: p99.99 per channel there.
    sources = [layer["source"] for layer in log["layers"]]
    assert sources == ["p99.99 per channel (ceiling 7.283 not reached)", "ceiling", "ceiling"], sources


def test_eval_json_reports_ann_and_snn_accuracy(artifact):
    result = toolchain("eval", artifact, "--data", EMBEDDED_MNIST, "-T", "4,16,32", "--limit", "500", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["samples"] == 500
    assert set(report["snn_accuracy"]) == {"4", "16", "32"}
    assert report["ann_accuracy"] > 0.97
    assert report["snn_accuracy"]["32"] > report["ann_accuracy"] - 0.02
    assert report["snn_accuracy"]["32"] >= report["snn_accuracy"]["4"]


def test_eval_table_and_inspect(artifact):
    table = toolchain("eval", artifact, "--data", EMBEDDED_MNIST, "-T", "8", "--limit", "64")
    assert table.returncode == 0, table.stderr
    assert "ANN accuracy" in table.stdout and "SNN acc" in table.stdout
    inspect = toolchain("inspect", artifact)
    assert inspect.returncode == 0, inspect.stderr
    assert "if" in inspect.stdout and "readout" in inspect.stdout and "total parameters" in inspect.stdout


def test_percentile_build_with_calibration_data(tmp_path):
    out = tmp_path / "p"
    result = toolchain("build", DEFAULT_MODEL, "--calib", CALIB, "--threshold", "p99.9", "--per-channel", "-o", out)
    assert result.returncode == 0, result.stderr
    log = json.loads((out / "build.json").read_text())
    assert all(layer["source"] == "p99.9 per channel" for layer in log["layers"])


def test_a_build_far_below_its_ann_says_what_to_try(tmp_path):
    """At T=2 the shipped model's SNN lags its ANN by points: the build names the options not used yet, and
    with them the SNN is within a point."""
    lagging = toolchain("build", DEFAULT_MODEL, "--target", "torch", "-T", "2", "--data", EMBEDDED_MNIST, "-o", tmp_path / "a")
    assert lagging.returncode == 0, lagging.stderr
    hint = [line for line in lagging.stdout.splitlines() if line.startswith("hint: ")]
    assert len(hint) == 1 and "--v0 optimal --v0-T 2" in hint[0] and "--per-channel" in hint[0], lagging.stdout
    tried = toolchain("build", DEFAULT_MODEL, "--target", "torch", "-T", "2", "--data", EMBEDDED_MNIST, "-o", tmp_path / "b",
                      "--calib", CALIB, "--calib-size", "256", "--v0", "optimal", "--v0-T", "2", "--per-channel",
                      "--threshold", "p99.99")  # fmt: skip
    assert tried.returncode == 0, tried.stderr
    assert "hint: " not in tried.stdout  # the advice works: 98.64 % at T=2 (ANN 99.02 %)
    # Calibrated for T=2 (the --calib build), it also says how that network does at T/2 and 2T.
    assert "calibrated for" not in lagging.stdout
    near = [line for line in tried.stdout.splitlines() if "calibrated for T=2, at T=1 / 4:" in line]
    assert len(near) == 1, tried.stdout
    at_one, at_four = (float(v) for v in near[0].split(":")[1].rstrip(" %").split(" / "))
    assert 0 <= at_one < at_four <= 100


def test_a_channels_last_model_builds_for_loihi_and_its_ann_reads_the_same_images(tmp_path):
    """A Keras-style (N, H, W, C) model: the IR and the data readers stay channels-first, onnxruntime
    gets the images transposed back; the ANN accuracy eval reports is the torch module's on NHWC images."""
    import torch
    from torch import nn

    from toolchain.data import load_dataset

    class ChannelsLast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.pool, self.fc = nn.Conv2d(1, 4, 5, padding=2), nn.AvgPool2d(4), nn.Linear(4 * 7 * 7, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.pool(torch.relu(self.conv(x.permute(0, 3, 1, 2))))
            return self.fc(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1))

    torch.manual_seed(0)
    module, model = ChannelsLast().eval(), tmp_path / "nhwc.onnx"
    batch_axes = {"input": {0: "n"}, "logits": {0: "n"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(module, (torch.zeros(1, 28, 28, 1),), str(model), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], dynamic_axes=batch_axes)  # fmt: skip
    out = tmp_path / "o"
    built = toolchain("build", model, "--target", "loihi", "--calib", CALIB, "--calib-size", "64", "-o", out)
    assert built.returncode == 0, built.stderr
    result = toolchain("eval", out, "--data", EMBEDDED_MNIST, "-T", "8", "--limit", "200", "--target", "loihi", "--json")
    assert result.returncode == 0, result.stderr
    test = load_dataset(EMBEDDED_MNIST, "test").subset(200)
    with torch.inference_mode():
        logits = module(torch.tensor(test.x, dtype=torch.float32).div(255).permute(0, 2, 3, 1)).numpy()
    assert json.loads(result.stdout)["ann_accuracy"] == pytest.approx(float(np.mean(logits.argmax(1) == test.y)))


def _external_data_copy(folder: Path) -> Path:
    """The shipped model saved as torch's dynamo exporter saves: weights in model.onnx.data beside it."""
    folder.mkdir()
    model = folder / "model.onnx"
    onnx.save_model(onnx.load(DEFAULT_MODEL), model, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return model


def test_external_data_model_builds_a_self_contained_artifact(tmp_path):
    model = _external_data_copy(tmp_path / "src")
    out = tmp_path / "art"
    assert toolchain("build", model, "-o", out).returncode == 0
    for path in (tmp_path / "src").iterdir():
        path.unlink()  # the artifact must not need the exporter's files
    result = toolchain("eval", out, "--data", EMBEDDED_MNIST, "-T", "8", "--limit", "32", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ann_accuracy"] > 0.9


def test_ann_past_the_protobuf_limit_keeps_its_data_beside_it(tmp_path):
    import onnxruntime as ort

    from toolchain.build import ANN_DATA_FILE, ANN_FILE, ann_files

    model = _external_data_copy(tmp_path / "src")
    files = ann_files(model, limit=1000)  # as if the weights did not fit one protobuf
    assert set(files) == {ANN_FILE, ANN_DATA_FILE}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    x = np.random.default_rng(0).random((2, 1, 28, 28), np.float32)
    want = ort.InferenceSession(str(DEFAULT_MODEL)).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(tmp_path / ANN_FILE)).run(None, {"input": x})[0]
    np.testing.assert_array_equal(got, want)
    assert ann_files(DEFAULT_MODEL) == {ANN_FILE: DEFAULT_MODEL.read_bytes()}


# ---------------------------------------------------------------- bad input


def _sigmoid_model(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"], name="squash")], "g", [x], [y])
    onnx.save(helper.make_model(graph), path)
    return path


@pytest.mark.parametrize(
    "case",
    ["missing", "not_onnx", "truncated", "sigmoid"],
)
def test_bad_models_fail_cleanly_and_write_nothing(tmp_path, case):
    model = tmp_path / "model.onnx"
    needles: tuple[str, ...] = (str(model),)
    if case == "not_onnx":
        model.write_bytes(b"this is not a model\n" * 10)
    elif case == "truncated":
        model.write_bytes(DEFAULT_MODEL.read_bytes()[:3000])
    elif case == "sigmoid":
        _sigmoid_model(model)
        needles = ("squash", "Sigmoid")
    out = tmp_path / "out"
    assert_clean_failure(toolchain("build", model, "-o", out), *needles)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "model.onnx"] == []


def test_missing_data_and_bad_steps_fail_cleanly(artifact, tmp_path):
    assert_clean_failure(toolchain("eval", artifact, "--data", tmp_path / "nowhere"), "nowhere")
    assert_clean_failure(toolchain("eval", artifact, "--data", EMBEDDED_MNIST, "-T", "0,4"), "-T")
    assert_clean_failure(toolchain("eval", tmp_path, "--data", EMBEDDED_MNIST), "not a toolchain artifact")


def test_wrong_input_shape_is_named(artifact, tmp_path):
    data = tmp_path / "rgb.npz"
    np.savez(data, x=np.zeros((4, 3, 32, 32), np.uint8), y=np.zeros(4, np.int64))
    assert_clean_failure(toolchain("eval", artifact, "--data", data), "(3, 32, 32)", "(1, 28, 28)")


def test_thresholds_from_data_need_calibration_data(tmp_path):
    assert_clean_failure(toolchain("build", DEFAULT_MODEL, "--threshold", "max", "-o", tmp_path / "o"), "--calib")
    assert not (tmp_path / "o").exists()


def test_a_model_the_fixed_point_targets_cannot_lower_is_named_with_the_fix(tmp_path):
    """The spiking max-pool has no Loihi synapse (the loihi/lava default is --maxpool relu)."""
    model = ROOT / "models" / "zoo" / "thirdparty_lenet_relu_maxpool_fmnist.onnx"
    out = tmp_path / "o"
    result = toolchain("build", model, "--target", "loihi", "--maxpool", "spiking", "--calib", CALIB,
                       "--calib-size", "64", "-o", out)
    assert_clean_failure(result, str(model), "max-pool", "--maxpool relu", "--maxpool avg")
    assert not out.exists()


def test_bad_test_data_path_leaves_no_artifact(tmp_path):
    out = tmp_path / "o"
    assert_clean_failure(toolchain("build", DEFAULT_MODEL, "--data", tmp_path / "nowhere", "-o", out), "nowhere")
    assert not out.exists()


def test_a_model_onnxruntime_cannot_run_is_refused_before_anything_is_written(tmp_path):
    """The frontend reads opsets onnxruntime may not know yet; `build --data` needs onnxruntime for the ANN."""
    import onnxruntime

    model = onnx.load(DEFAULT_MODEL)
    model.opset_import[0].version = onnx.defs.onnx_opset_version()
    path = tmp_path / "newest_opset.onnx"
    onnx.save(model, path)
    try:
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - onnxruntime's own exception types
        pass
    else:
        pytest.skip(f"onnxruntime {onnxruntime.__version__} runs opset {model.opset_import[0].version}")
    out = tmp_path / "o"
    result = toolchain("build", path, "--data", EMBEDDED_MNIST, "-o", out)
    assert_clean_failure(result, str(path), "onnxruntime cannot load it")
    assert not out.exists()


def test_output_never_replaces_what_is_not_an_artifact(tmp_path):
    """-o naming the user's own folder or file (a typo, `-o .`) is refused before any work, nothing deleted."""
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    model_copy = tmp_path / "model.onnx"
    model_copy.write_bytes(DEFAULT_MODEL.read_bytes())
    assert_clean_failure(toolchain("build", DEFAULT_MODEL, "-o", folder), str(folder), "not a toolchain output")
    assert (folder / "thesis.tex").read_text() == "precious"
    assert_clean_failure(toolchain("build", DEFAULT_MODEL, "-o", model_copy), str(model_copy), "not a folder")
    assert model_copy.read_bytes() == DEFAULT_MODEL.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "thesis"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert toolchain("build", DEFAULT_MODEL, "-o", empty).returncode == 0
    assert toolchain("build", DEFAULT_MODEL, "-o", empty).returncode == 0  # an earlier artifact is replaced


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`toolchain inspect OUT | head -1`: the reader goes away; no traceback, no noise."""
    out = tmp_path / "art"
    assert toolchain("build", DEFAULT_MODEL, "-o", out).returncode == 0
    process = subprocess.Popen(
        [sys.executable, "-m", "toolchain", "inspect", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    process.stdout.close()  # before the child has written anything
    stderr = process.stderr.read().decode()
    assert process.wait() == 141, stderr
    assert stderr == ""


@pytest.mark.parametrize(
    "args",
    [
        ("eval", "ART", "--data", EMBEDDED_MNIST, "--batch-size", "0"),
        ("eval", "ART", "--data", EMBEDDED_MNIST, "--limit", "-5"),
        ("build", DEFAULT_MODEL, "-o", "OUT", "--target", "loihi", "-T", "0", "--data", EMBEDDED_MNIST),
        ("build", DEFAULT_MODEL, "-o", "OUT", "--v0", "optimal", "--v0-T", "0", "--calib", CALIB),
        ("build", DEFAULT_MODEL, "-o", "OUT", "--target", "lava", "--validate", "-2", "--data", EMBEDDED_MNIST),
    ],
)
def test_counts_below_their_minimum_are_refused_before_any_work(tmp_path, args):
    """A batch size of 0 or a negative -T, --limit or --validate ended in a traceback (-T 0 after writing the artifact)."""
    out = tmp_path / "out"
    result = toolchain(*[out if a == "OUT" else tmp_path if a == "ART" else a for a in args])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "must be at least" in result.stderr.strip().splitlines()[-1]
    assert not out.exists()


def _rgb_model(path: Path) -> Path:
    """Conv(3 -> 4) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(10) on (3, 8, 8) images."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        onnx.numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "fc"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def test_channels_last_images_and_wrong_mean_counts_are_refused(tmp_path):
    """NHWC images of the same size were reshaped into garbage without a word; --mean with the wrong
    number of values ended in a numpy traceback."""
    model = _rgb_model(tmp_path / "rgb.onnx")
    images = np.random.default_rng(1).integers(0, 256, (8, 3, 8, 8), dtype=np.uint8)
    nchw, nhwc = tmp_path / "nchw.npz", tmp_path / "nhwc.npz"
    np.savez(nchw, x=images, y=np.arange(8) % 10)
    np.savez(nhwc, x=images.transpose(0, 2, 3, 1), y=np.arange(8) % 10)
    out = tmp_path / "out"
    assert_clean_failure(toolchain("build", model, "--calib", nhwc, "-o", out), str(nhwc), "channels-last")
    assert_clean_failure(toolchain("build", model, "--calib", nchw, "--mean", "0.5,0.5", "-o", out), "--mean", "3 channel")
    assert not out.exists()
    assert toolchain("build", model, "--calib", nchw, "--mean", "0.5,0.4,0.3", "-o", out).returncode == 0
    assert_clean_failure(toolchain("eval", out, "--data", nhwc, "-T", "4"), str(nhwc), "channels-last")
    assert toolchain("eval", out, "--data", nchw, "-T", "4").returncode == 0
