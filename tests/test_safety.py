"""A corpus of bad inputs and faults, each held to the contract (see tests/contract.py): exit 2, one
line naming the file, node or option, no traceback, nothing new in or beside the output, every
existing artifact and user file byte-identical."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import external_data_helper

from tests.conftest import ROOT
from tests.contract import assert_contract, assert_refused, run, snapshot, tiny_data, tiny_model
from toolchain import manifest
from toolchain.errors import ToolchainError
from toolchain.fileio import STAGING_TAG, StagedDirectory


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """model.onnx, data.npz, art (torch target) and fixed (loihi target), built once."""
    folder = tmp_path_factory.mktemp("safety")
    tiny_model(folder / "model.onnx")
    tiny_data(folder / "data.npz")
    for name, target in (("art", "torch"), ("fixed", "loihi")):
        outcome = run("build", folder / "model.onnx", "--target", target, "--calib", folder / "data.npz", "-o", folder / name)
        assert outcome.status == 0, outcome.stderr
    return folder


@pytest.fixture
def work(base, tmp_path) -> Path:
    folder = tmp_path / "w"
    shutil.copytree(base, folder)
    return folder


def reseal(artifact: Path) -> None:
    """A foreign artifact: its files changed and the manifest written to match them."""
    (artifact / manifest.MANIFEST_FILE).write_bytes(manifest.build_manifest(artifact))


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document, indent=1))


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def idx(folder: Path, images: bytes, labels: bytes) -> Path:
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    return folder


def header(*dims: int) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


def images(folder: Path, sizes: dict[str, list[int]]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, sides in sizes.items():
        (folder / "test" / label).mkdir(parents=True)
        for i, side in enumerate(sides):
            Image.fromarray(rng.integers(0, 256, (side, 6, 3), dtype=np.uint8)).save(folder / "test" / label / f"{i}.png")
    return folder


# Each case: prepare the bad input in the work folder, return the command line and what the one line must name.
Case = Callable[[Path], tuple[list[object], list[str]]]


def _late_failure(w: Path):  # the build fails after the long part: the old artifact stays
    return [
        "build",
        w / "model.onnx",
        "--calib",
        w / "data.npz",
        "--data",
        save_npz(w / "s.npz", x=np.zeros((4, 1, 5, 5), np.uint8), y=np.zeros(4)),
        "-o",
        w / "art",
    ], ["s.npz", "(1, 5, 5)"]


def _user_folder_with_graph_json(w: Path):
    (w / "mine").mkdir()
    (w / "mine" / "graph.json").write_text("{}")
    (w / "mine" / "notes.txt").write_text("keep")
    return ["build", w / "model.onnx", "-o", w / "mine"], ["mine", "--force"]


def _lone_graph_json(w: Path):  # a graph.json alone is not an artifact of ours
    (w / "mine").mkdir()
    (w / "mine" / "graph.json").write_text('{"schema_version": 1}')
    return ["build", w / "model.onnx", "-o", w / "mine"], ["mine", "intact graph.json"]


def _edited_artifact_as_output(w: Path):
    (w / "art" / "build.json").write_text("{}")
    return ["build", w / "model.onnx", "-o", w / "art"], ["art", "build.json"]


def _output_is_a_file(w: Path):
    return ["build", w / "model.onnx", "-o", w / "data.npz"], ["data.npz", "not a folder"]


def _report_over_artifact_file(w: Path):
    return ["report", w / "art", "--data", w / "data.npz", "-o", w / "art" / "graph.json"], ["graph.json", "artifact"]


def _report_over_user_file(w: Path):
    (w / "notes.md").write_text("mine")
    return ["report", w / "art", "--data", w / "data.npz", "-o", w / "notes.md"], ["notes.md", "--force"]


def _report_plot_over_user_file(w: Path):
    (w / "r-accuracy.png").write_bytes(b"\x89PNG mine")
    return ["report", w / "art", "--data", w / "data.npz", "-o", w / "r.md"], ["r-accuracy.png"]


def _export_to_folder(w: Path):
    return ["export", "--weights", ROOT / "models" / "mnist_cnn.pt", "--out", w / "art"], ["--out", "folder"]


def _export_over_user_file(w: Path):
    return ["export", "--weights", ROOT / "models" / "mnist_cnn.pt", "--out", w / "data.npz"], ["data.npz", "--force"]


def _export_opset(w: Path):
    return ["export", "--weights", ROOT / "models" / "mnist_cnn.pt", "--out", w / "m.onnx", "--opset", "99"], ["--opset 99"]


def _mean_digit(w: Path):
    edit_json(w / "art" / "graph.json", lambda d: d["preprocess"].update(mean=[0.1]))
    return ["eval", w / "art", "--data", w / "data.npz"], ["graph.json", "checksum"]


def _fixed_graph_edit(w: Path):
    edit_json(w / "fixed" / "fixed_graph.json", lambda d: d["layers"][0].update(threshold=d["layers"][0]["threshold"] + 1))
    return ["eval", w / "fixed", "--target", "loihi", "--data", w / "data.npz"], ["fixed_graph.json"]


def _ann_replaced(w: Path):
    shutil.copy(w / "model.onnx", w / "art" / "ann.onnx")
    tiny_model(w / "art" / "ann.onnx", classes=5)
    return ["eval", w / "art", "--data", w / "data.npz"], ["ann.onnx", "checksum"]


def _no_manifest(w: Path):
    (w / "art" / manifest.MANIFEST_FILE).unlink()
    return ["inspect", w / "art"], ["art", manifest.MANIFEST_FILE]


def _foreign_types(w: Path):
    edit_json(w / "art" / "graph.json", lambda d: d["nodes"][0].update(stride="wide"))
    reseal(w / "art")
    return ["inspect", w / "art"], ["graph.json", "stride"]


def _foreign_shape(w: Path):
    edit_json(w / "art" / "graph.json", lambda d: d.update(input_shape=[1, 6, 7]))
    reseal(w / "art")
    return ["eval", w / "art", "--data", w / "data.npz"], ["graph.json"]


def _foreign_threshold(w: Path):
    tensors = dict(np.load(w / "art" / "tensors.npz"))
    key = next(k for k in tensors if k.endswith("/threshold"))
    tensors[key] = -np.abs(tensors[key])
    np.savez(w / "art" / "tensors.npz", **tensors)
    digest = hashlib.sha256((w / "art" / "tensors.npz").read_bytes()).hexdigest()
    edit_json(w / "art" / "graph.json", lambda d: d["checksums"].update({"tensors.npz": digest}))
    reseal(w / "art")
    return ["inspect", w / "art"], ["graph.json", "threshold"]


def _foreign_fixed_weights(w: Path):
    edit_json(w / "fixed" / "fixed_graph.json", lambda d: d["layers"][0]["synapses"][0].update(groups=2))
    reseal(w / "fixed")
    return ["eval", w / "fixed", "--target", "loihi", "--data", w / "data.npz"], ["fixed_graph.json", "layers[0]"]


def _ann_external_data_outside(w: Path):
    model = onnx.load(w / "art" / "ann.onnx")
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    (w / "outside.bin").write_bytes(tensor.raw_data)
    external_data_helper.set_external_data(tensor, str(w / "outside.bin"), 0, len(tensor.raw_data))
    tensor.ClearField("raw_data")
    (w / "art" / "ann.onnx").write_bytes(model.SerializeToString())
    reseal(w / "art")
    return ["eval", w / "art", "--data", w / "data.npz"], ["ann.onnx", "outside"]


def _idx_huge(w: Path):
    return ["eval", w / "art", "--data", idx(w / "i", header(2**31, 2**31, 2**31) + bytes(64), header(4) + bytes(4))], [
        "t10k-images"
    ]


def _idx_2d(w: Path):
    return ["eval", w / "art", "--data", idx(w / "i", header(4, 36) + bytes(144), header(4) + bytes(4))], [
        "t10k-images",
        "3 dimensions",
    ]


def _npz_truncated(w: Path):
    (w / "t.npz").write_bytes((w / "data.npz").read_bytes()[:300])
    return ["eval", w / "art", "--data", w / "t.npz"], ["t.npz"]


def _corrupt_jpeg(w: Path):
    images(w / "im", {"a": [6, 6]})
    (w / "im" / "test" / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return ["eval", w / "art", "--data", w / "im"], ["bad.jpg"]


def _mixed_sizes(w: Path):
    return ["eval", w / "art", "--data", images(w / "im", {"a": [6, 6], "b": [6, 7]})], ["1.png", "same size"]


def _labels_2d(w: Path):
    return ["eval", w / "art", "--data", save_npz(w / "l.npz", x=np.zeros((4, 1, 6, 6), np.uint8), y=np.eye(4))], [
        "l.npz",
        "one-hot",
    ]


def _labels_nan(w: Path):
    return ["eval", w / "art", "--data", save_npz(w / "l.npz", x=np.zeros((4, 1, 6, 6), np.uint8), y=np.full(4, np.nan))], [
        "l.npz",
        "NaN",
    ]


def _labels_beyond_outputs(w: Path):
    return ["eval", w / "art", "--data", save_npz(w / "l.npz", x=np.zeros((4, 1, 6, 6), np.uint8), y=np.arange(4) + 3)], [
        "l.npz",
        "4 outputs",
    ]


def _empty(w: Path):
    return ["eval", w / "art", "--data", save_npz(w / "e.npz", x=np.zeros((0, 1, 6, 6), np.uint8), y=np.zeros(0))], [
        "e.npz",
        "empty",
    ]


def _nan_pixels(w: Path):
    return [
        "build",
        w / "model.onnx",
        "--calib",
        save_npz(w / "n.npz", x=np.full((4, 1, 6, 6), np.nan, np.float32), y=np.zeros(4)),
        "-o",
        w / "art",
    ], ["n.npz", "NaN"]


def _wide_int_pixels(w: Path):
    return ["eval", w / "art", "--data", save_npz(w / "n.npz", x=np.full((4, 1, 6, 6), 4000, np.int32), y=np.zeros(4))], [
        "n.npz",
        "0..255",
    ]


def _std_zero(w: Path):
    return ["eval", w / "art", "--data", w / "data.npz", "--std", "0"], ["--std"]


def _scale_nan(w: Path):
    return ["build", w / "model.onnx", "--scale", "nan", "-o", w / "art"], ["--scale"]


def _mean_channels(w: Path):
    return ["build", w / "model.onnx", "--mean", "0.1,0.2,0.3", "-o", w / "new"], ["--mean", "1 channel"]


def _steps_beyond_overflow_free(w: Path):
    return ["build", w / "model.onnx", "--target", "loihi", "--calib", w / "data.npz", "--calibrate", "none",
            "-T", "2000000000", "-o", w / "fixed"], ["-T 2000000000", "overflow-free"]  # fmt: skip


def _calibration_beyond_memory(w: Path):  # latency calibration at -T holds every step of a layer
    return ["build", w / "model.onnx", "--calib", w / "data.npz", "--calibrate", "threshold",
            "-T", "2000000000", "-o", w / "fixed"], ["-T 2000000000", "--calibrate none"]  # fmt: skip


def _output_is_a_device(w: Path):  # --force replaces files and folders, never a device
    return ["build", w / "model.onnx", "--force", "-o", "/dev/null"], ["/dev/null", "device"]


def _fake_tarball(w: Path):  # tarfile's message is several lines: still one
    (w / "x.tar.gz").write_text("not a tarball")
    return ["eval", w / "art", "--data", w / "x.tar.gz"], ["x.tar.gz"]


def _output_holds_the_model(w: Path):
    return ["build", w / "model.onnx", "--force", "-o", w], ["holds the input"]


CASES: list[Case] = [
    _late_failure, _user_folder_with_graph_json, _lone_graph_json, _edited_artifact_as_output, _output_is_a_file,
    _report_over_artifact_file, _report_over_user_file, _report_plot_over_user_file, _export_to_folder,
    _export_over_user_file, _export_opset, _mean_digit, _fixed_graph_edit, _ann_replaced, _no_manifest, _foreign_types,
    _foreign_shape, _foreign_threshold, _foreign_fixed_weights, _ann_external_data_outside, _idx_huge, _idx_2d,
    _npz_truncated, _corrupt_jpeg, _mixed_sizes, _labels_2d, _labels_nan, _labels_beyond_outputs, _empty, _nan_pixels,
    _wide_int_pixels, _std_zero, _scale_nan, _mean_channels, _steps_beyond_overflow_free, _calibration_beyond_memory,
    _output_holds_the_model, _output_is_a_device, _fake_tarball,
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(work, case):
    args, needles = case(work)
    before = snapshot(work)
    assert_contract(run(*args), before, work, *needles)


def test_a_complete_artifact_is_replaced_and_stale_staging_swept(work):
    stale = work / f".art{STAGING_TAG}{2**22 + 12345}-x"  # a pid above the kernel's limit: surely gone
    stale.mkdir()
    (stale / "graph.json").write_text("half")
    outcome = run("build", work / "model.onnx", "--calib", work / "data.npz", "-o", work / "art")
    assert outcome.status == 0, outcome.stderr
    assert not stale.exists()
    assert [p.name for p in work.iterdir() if p.name.startswith(".")] == []
    assert run("inspect", work / "art").status == 0


def test_an_artifact_written_before_manifests_is_replaced(work):
    (work / "art" / manifest.MANIFEST_FILE).unlink()
    outcome = run("build", work / "model.onnx", "--calib", work / "data.npz", "-o", work / "art")
    assert outcome.status == 0, outcome.stderr
    assert (work / "art" / manifest.MANIFEST_FILE).is_file()


def test_sigterm_while_staging_leaves_nothing(work):
    from toolchain import faults

    previous = signal.getsignal(signal.SIGTERM)
    faults.install()
    before = snapshot(work)
    try:
        with pytest.raises(faults.Terminated), StagedDirectory(work / "art") as stage:
            stage.write("graph.json", b"{}")
            os.kill(os.getpid(), signal.SIGTERM)
            stage.commit()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert snapshot(work) == before


def test_float_images_in_unit_range_are_not_scaled_again(work):
    """uint8 images and the same images as floats in [0, 1] give the same result."""
    data = np.load(work / "data.npz")
    save_npz(work / "unit.npz", x=data["x"].astype(np.float32) / 255, y=data["y"])
    as_bytes = run("eval", work / "art", "--data", work / "data.npz", "-T", "4", "--json")
    as_floats = run("eval", work / "art", "--data", work / "unit.npz", "-T", "4", "--json")
    assert as_bytes.status == as_floats.status == 0, as_floats.stderr
    keys = ("ann_accuracy", "snn_accuracy")
    assert {k: json.loads(as_bytes.stdout)[k] for k in keys} == {k: json.loads(as_floats.stdout)[k] for k in keys}


def test_class_folders_are_stored_and_checked(tmp_path):
    model = tiny_model(tmp_path / "rgb.onnx", channels=3)
    folder = images(tmp_path / "im", {name: [6, 6] for name in ("ant", "bee", "cat", "dog")})
    outcome = run("build", model, "--calib", folder, "--calib-split", "test", "--data", folder, "-o", tmp_path / "art")
    assert outcome.status == 0, outcome.stderr
    assert json.loads((tmp_path / "art" / "graph.json").read_text())["meta"]["classes"] == ["ant", "bee", "cat", "dog"]
    (folder / "test" / "ant").rename(folder / "test" / "emmet")  # would re-index every label
    assert_refused(run("eval", tmp_path / "art", "--data", folder), "im", "emmet", "ant")


def test_stdout_to_a_full_device_is_one_line(base):
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "toolchain", "inspect", base / "art"], stdout=full,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: stdout: cannot write (No space left on device)"]


def test_external_data_outside_the_folder_is_refused_for_any_model(tmp_path):
    from toolchain.fileio import check_external_data

    model = onnx.load(tiny_model(tmp_path / "m.onnx"))
    tensor = model.graph.initializer[0]
    external_data_helper.set_external_data(tensor, "../elsewhere.bin", 0, len(tensor.raw_data))
    tensor.ClearField("raw_data")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(ToolchainError, match="outside the model's folder"):
        check_external_data(tmp_path / "sub" / "m.onnx")
