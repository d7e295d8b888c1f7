"""Architectures, activations, the ONNX exporter, the training CLI and the shipped models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from exporters import ExportError, export_onnx
from exporters import onnx_export as onnx_export_module
from models import ARCHS, QCFS, ClipReLU, build, make_act
from models.arch import DEFAULT_INPUT_SIZE
from models.train import load_checkpoint, lr_at, patch_whitening
from models.train import main as train_main
from tests.conftest import shared_data
from toolchain.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CALIB = MODELS / "data" / "mnist-calib.npz"
PRE = {"scale": 1 / 255, "mean": [0.5], "std": [0.25]}
CIFAR_ZOO = ("cifar10_vgg_clip", "cifar10_fast_clip", "cifar10_fast_qcfs4", "cifar10_fast64_clip", "cifar10_air64_clip")
ZOO = ("fmnist_vgg_clip", "fmnist_vgg_qcfs8", "fmnist_cnn_clip", *CIFAR_ZOO)
ZOO_INPUT = {"fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomise_bn(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


# ---------------------------------------------------------------- architectures and activations


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_runs_forward(arch):
    channels = 3 if DEFAULT_INPUT_SIZE[arch] == 32 else 1
    model = build(arch, channels, 10, make_act("clip")).eval()
    size = DEFAULT_INPUT_SIZE[arch]
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 10)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    # an activation after every conv/linear except the last layer
    weighted = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    shortcuts = sum(
        isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules()
    )  # a projection shortcut joins the block's add, which is followed by the block's activation
    acts = sum(isinstance(m, ClipReLU) for m in model.modules())
    assert acts == weighted - shortcuts - 1


def test_cnn_small_fits_other_input_sizes():
    model = build("cnn_small", 3, 10, make_act("relu"), input_size=32).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_clip_relu_clips_and_learns_its_ceiling():
    act = ClipReLU(2.0)
    x = torch.tensor([-1.0, 0.5, 3.0], requires_grad=True)
    y = act(x)
    assert y.tolist() == [0.0, 0.5, 2.0]
    y.sum().backward()
    assert act.lam.grad.item() == 1.0  # one input above the ceiling
    assert x.grad.tolist() == [0.0, 1.0, 0.0]


def test_qcfs_forward_and_straight_through_gradient():
    act = QCFS(levels=4, init=2.0)
    x = torch.tensor([-1.0, 0.6, 0.76, 1.0, 5.0], requires_grad=True)
    expected = 2.0 * torch.clamp(torch.floor(x.detach() * 4 / 2.0 + 0.5) / 4, 0, 1)
    act.eval()
    assert torch.equal(act(x.detach()), expected)
    act.train()
    y = act(x)
    assert torch.allclose(y, expected)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # straight through inside (0, lam)
    assert act.lam.grad is not None


def test_make_act_rejects_unknown():
    with pytest.raises(ValueError):
        make_act("gelu")


# ---------------------------------------------------------------- exporter


@pytest.mark.parametrize(
    "arch,act",
    [
        ("cnn_small", "clip"),
        ("cnn_small", "qcfs"),
        ("cnn_small", "relu"),
        ("vgg_small", "clip"),
        ("vgg_small", "qcfs"),
        ("vgg_fast", "clip"),
        ("vgg_air", "clip"),
        ("resnet20", "clip"),
    ],
)
def test_export_matches_onnxruntime(tmp_path, arch, act):
    torch.manual_seed(0)
    channels = 3 if arch == "resnet20" else 1
    size = DEFAULT_INPUT_SIZE[arch]
    model = build(arch, channels, 10, make_act(act, levels=4, init=2.5))
    _randomise_bn(model)
    model.train()  # the exporter must evaluate in eval mode and restore the mode
    path = tmp_path / "m.onnx"
    pre = dict(PRE, mean=[0.5] * channels, std=[0.25] * channels)
    raw = np.random.default_rng(0).integers(0, 256, (4, channels, size, size), dtype=np.uint8)
    diff = export_onnx(
        model,
        path,
        (channels, size, size),
        pre,
        activation=act,
        levels=4 if act == "qcfs" else 0,
        check_inputs=raw,
        verbose=False,
    )
    assert model.training
    assert diff < 1e-3 or act == "qcfs"
    onnx_model = onnx.load(str(path))
    meta = {p.key: p.value for p in onnx_model.metadata_props}
    assert json.loads(meta["toolchain.preprocess"]) == {
        "scale": 1 / 255,
        "mean": [0.5] * channels,
        "std": [0.25] * channels,
        "layout": "NCHW",
    }
    assert meta["toolchain.activation"] == act
    assert meta["toolchain.levels"] == ("4" if act == "qcfs" else "0")
    ops = _ops(onnx_model)
    assert "Identity" not in ops
    if arch != "cnn_small":
        assert "BatchNormalization" in ops  # kept for the frontend to fold
    if act == "relu":
        assert "Relu" in ops and "Clip" not in ops
    if act == "clip":
        assert "Floor" not in ops
        clips = [n for n in onnx_model.graph.node if n.op_type == "Clip"]
        constants = {n.output[0]: n for n in onnx_model.graph.node if n.op_type == "Constant"}
        ceilings = sorted(float(m.lam.detach()) for m in model.modules() if isinstance(m, ClipReLU))
        bounds = []
        for clip in clips:
            low, high = (float(numpy_helper.to_array(constants[name].attribute[0].t)) for name in clip.input[1:3])
            assert low == 0.0
            bounds.append(high)
        assert sorted(bounds) == pytest.approx(ceilings)
    if act == "qcfs":
        assert ops.count("Floor") == sum(isinstance(m, QCFS) for m in model.modules())
    # dynamic batch: the file runs on any batch size and agrees with torch
    x = torch.randn(3, channels, size, size)
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    got = _session(path).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-3 or act == "qcfs"


def test_export_refuses_a_mismatch_and_writes_nothing(tmp_path, monkeypatch):
    model = build("cnn_small", 1, 10, make_act("clip"))
    real_run = onnx_export_module._ort_run
    monkeypatch.setattr(onnx_export_module, "_ort_run", lambda data, x: real_run(data, x) + 0.1)
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="differs from torch"):
        export_onnx(model, path, (1, 28, 28), PRE, verbose=False)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_export_rejects_bad_preprocess(tmp_path):
    model = build("cnn_small", 1, 10, make_act("clip"))
    with pytest.raises(ValueError, match="std"):
        export_onnx(model, tmp_path / "m.onnx", (1, 28, 28), {"scale": 1, "mean": [0], "std": [0, 1]}, verbose=False)


# ---------------------------------------------------------------- training CLI


def _train(out: Path, *extra: str) -> int:
    return train_main(
        [
            "--arch", "cnn_small", "--dataset", "mnist", "--data", str(CALIB), "--act", "clip",
            "--epochs", "1", "--limit-train", "256", "--limit-test", "64", "--batch-size", "64",
            "--threads", "1", "--device", "cpu", "--out", str(out), *extra,
        ]
    )  # fmt: skip


def test_training_is_deterministic_and_exports(tmp_path, capsys):
    assert _train(tmp_path / "a") == 0
    assert _train(tmp_path / "b", "--no-export") == 0
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    result = json.loads((tmp_path / "a" / "result.json").read_text())
    for key in ("arch", "dataset", "act", "levels", "epochs", "seed", "test_accuracy", "train_seconds", "device"):
        assert key in result
    assert result["epochs"] == 1 and result["device"] == "cpu" and 0 <= result["test_accuracy"] <= 1
    assert (tmp_path / "a" / "model.onnx").is_file() and not (tmp_path / "b" / "model.onnx").exists()
    assert "epoch 1/1" in capsys.readouterr().out

    # the exporter CLI rebuilds the model from the checkpoint and gets the same ONNX graph
    from exporters.__main__ import main as export_main

    assert export_main(["--weights", str(tmp_path / "a" / "model.pt"), "--out", str(tmp_path / "c.onnx")]) == 0
    model, config = load_checkpoint(tmp_path / "a" / "model.pt")
    assert config["preprocess"]["mean"] == [0.1307]
    first = onnx.load(str(tmp_path / "a" / "model.onnx"))
    again = onnx.load(str(tmp_path / "c.onnx"))
    assert _ops(first) == _ops(again) and first.metadata_props == again.metadata_props


def test_a_killed_training_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL after the first epoch, then `--resume`: the same weights as a run never stopped
    (the state file is replaced atomically, so a kill mid-write leaves the previous epoch's)."""
    import signal
    import time

    args = ["--arch", "cnn_small", "--dataset", "mnist", "--data", str(CALIB), "--act", "clip", "--epochs", "3",
            "--limit-train", "1024", "--limit-test", "64", "--batch-size", "64", "--threads", "1", "--device", "cpu",
            "--no-export"]  # fmt: skip
    assert train_main([*args, "--out", str(tmp_path / "whole")]) == 0
    state = tmp_path / "cut" / "train_state.pt"
    run = subprocess.Popen([sys.executable, "-m", "models.train", *args, "--out", str(state.parent)], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    while not state.exists() and run.poll() is None:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    done = torch.load(state, weights_only=False)["progress"]["epoch"]
    assert done < 3  # killed before the end
    out = subprocess.run([sys.executable, "-m", "models.train", *args, "--out", str(state.parent), "--resume"],
                         cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"epoch {done} of 3 done" in out.stdout and f"epoch {done}/3:" not in out.stdout
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(state.parent / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # other options than the ones it was trained with: one line naming the option, nothing trained
    again = subprocess.run([sys.executable, "-m", "models.train", *args, "--seed", "1", "--out", str(state.parent),
                            "--resume"], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--seed 0, not 1" in again.stderr


def test_onecycle_schedule_rises_then_falls_to_zero():
    lrs = [lr_at(step, 100, 0.4, "onecycle", warmup=20) for step in range(101)]
    peak = lrs.index(max(lrs))
    assert peak == 19 and max(lrs) == pytest.approx(0.4) and lrs[0] == pytest.approx(0.02)
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1 : peak + 1], strict=True))
    assert all(a > b for a, b in zip(lrs[peak + 1 : 100], lrs[peak + 2 : 101], strict=True)) and lrs[100] == 0.0
    assert lr_at(0, 100, 0.4) == pytest.approx(0.4) and lr_at(100, 100, 0.4) == pytest.approx(0.0)  # cosine


def test_patch_whitening_decorrelates_patches_and_freezes_the_stem():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 1, 12, 12, generator=generator)
    # strongly correlated channels and neighbouring pixels, as in natural images
    images = torch.cat([base, 0.9 * base + 0.1 * torch.randn(64, 1, 12, 12, generator=generator), -base], 1)
    images = torch.nn.functional.avg_pool2d(images, 3, 1, 1)
    conv = torch.nn.Conv2d(3, 8, 3, bias=False)
    patch_whitening(conv, images, eps=0.0)
    assert not conv.weight.requires_grad
    assert torch.equal(conv.weight[:4], -conv.weight[4:])  # each filter with both signs
    with torch.no_grad():
        out = conv(images)[:, :4].permute(1, 0, 2, 3).reshape(4, -1).double()
    out = out - out.mean(1, keepdim=True)
    covariance = out @ out.T / out.shape[1]
    assert torch.allclose(covariance, torch.eye(4, dtype=torch.float64), atol=0.05)


@pytest.mark.parametrize("arch", ["vgg_fast", "vgg_air"])
def test_fast_recipe_trains_deterministically_and_lowers_to_fixed_point(tmp_path, arch):
    """`--recipe fast` on real CIFAR-10 images: two runs give the same weights, the stem stays the
    frozen whitening, and the exported network converts and lowers to Loihi synapses (conv only;
    vgg_air's unpadded 2x2 stem makes odd maps, 31, 15, 7 and 3 pixels wide, pooled with floor)."""
    from toolchain.build import BuildOptions, build_snn
    from toolchain.passes.quantize import quantize

    train = load_dataset(shared_data("cifar10"), "train").subset(128)  # read once: the tarball is slow to decode
    data = tmp_path / "cifar128.npz"
    np.savez(data, x=np.array(train.x), y=train.y)
    common = ["--arch", arch, "--width", "8", "--dataset", "cifar10", "--data", str(data), "--recipe", "fast",
              "--epochs", "1", "--limit-test", "32", "--batch-size", "64", "--threads", "1", "--device", "cpu"]  # fmt: skip
    assert train_main([*common, "--out", str(tmp_path / "a")]) == 0
    assert train_main([*common, "--no-export", "--out", str(tmp_path / "b")]) == 0
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    result = json.loads((tmp_path / "a" / "result.json").read_text())
    assert result["recipe"] == "fast" and result["whiten"] and result["label_smoothing"] == 0.2
    assert result["batch_size"] == 64 and result["schedule"] == "onecycle" and result["translate"] == 2

    model, config = load_checkpoint(tmp_path / "a" / "model.pt")
    stem = model[0]
    assert config["whiten"] and not stem.weight.requires_grad
    # the stem was not trained: it is still the whitening of the first 5000 (here 128) training images
    fresh = torch.nn.Conv2d(3, stem.out_channels, stem.kernel_size, padding=stem.padding, bias=False)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (config["preprocess"]["mean"], config["preprocess"]["std"]))
    patch_whitening(fresh, (torch.from_numpy(np.array(train.x)).float() / 255 - mean) / std)
    assert torch.allclose(stem.weight, fresh.weight, atol=1e-6)

    built = build_snn(BuildOptions(model=tmp_path / "a" / "model.onnx", calib=data, calib_size=32, v0="half",
                                   device="cpu"))  # fmt: skip
    fixed = quantize(built.snn, residual_weights="off")  # (briefly trained weights may take residual synapses)
    synapses = [[s.kind for s in layer.synapses] for layer in fixed.layers]
    assert synapses == [["conv"]] * 7 + [["dense"]]  # 7 convs, one synapse each; the readout: global pool + linear


def test_train_cli_missing_data_is_one_clear_line(tmp_path):
    missing = tmp_path / "nowhere"
    proc = subprocess.run(
        [sys.executable, "-m", "models.train", "--arch", "cnn_small", "--dataset", "mnist", "--data", str(missing),
         "--out", str(tmp_path / "o")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and lines[0].startswith("error:")
    assert not (tmp_path / "o").exists()


def test_export_cli_missing_weights(tmp_path, capsys):
    from exporters.__main__ import main as export_main

    assert export_main(["--weights", str(tmp_path / "none.pt"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "no such weights file" in capsys.readouterr().err


# ---------------------------------------------------------------- shipped models and data


def test_default_mnist_model_is_shipped_and_accurate():
    path = MODELS / "mnist_cnn.onnx"
    assert path.stat().st_size < 2_000_000
    info = json.loads((MODELS / "mnist_cnn.json").read_text())
    assert info["arch"] == "cnn_small" and info["act"] == "clip" and info["test_accuracy"] >= 0.985
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    pre = json.loads(meta["toolchain.preprocess"])
    assert meta["toolchain.activation"] == "clip" and pre["mean"] == [0.1307]
    test = load_dataset(MODELS / "data" / "mnist", "test")
    assert len(test) == 10000 and (MODELS / "data" / "mnist" / "LICENSE.md").is_file()
    x = onnx_export_module.apply_preprocess(test.x, pre)
    logits = _session(path).run(None, {"input": x})[0]
    accuracy = float(np.mean(logits.argmax(1) == test.y))
    assert accuracy == pytest.approx(info["test_accuracy"], abs=1e-4)
    calib = load_dataset(CALIB)
    assert calib.x.shape == (1000, 1, 28, 28) and calib.x.dtype == np.uint8


@pytest.mark.parametrize("name", ZOO)
def test_zoo_models(name):
    path = MODELS / "zoo" / f"{name}.onnx"
    assert path.stat().st_size < 10_000_000  # the vgg_air CIFAR-10 model: 2.0 M parameters, 7.9 MB
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["test_accuracy"] > (0.85 if info["dataset"] == "fashion-mnist" else 0.8)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["toolchain.activation"] == info["act"] and meta["toolchain.levels"] == str(info["levels"])
    assert len(json.loads(meta["toolchain.preprocess"])["mean"]) == ZOO_INPUT[info["dataset"]][0]
    out = _session(path).run(None, {"input": np.zeros((2, *ZOO_INPUT[info["dataset"]]), np.float32)})[0]
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", CIFAR_ZOO)
def test_cifar10_zoo_models_classify_real_test_images(name):
    """The CPU-trained CIFAR-10 models through their own metadata preprocessing, on the JPEG test split:
    the first 1000 test images agree with the accuracy recorded on all 10,000 within 3 points."""
    path = MODELS / "zoo" / f"{name}.onnx"
    info = json.loads(path.with_suffix(".json").read_text())
    pre = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["toolchain.preprocess"])
    test = load_dataset(shared_data("cifar10"), "test").subset(1000)  # 100 of each class
    logits = _session(path).run(None, {"input": onnx_export_module.apply_preprocess(test.x, pre)})[0]
    assert float(np.mean(logits.argmax(1) == test.y)) == pytest.approx(info["test_accuracy"], abs=0.03)


def test_thirdparty_model_has_no_metadata():
    path = MODELS / "zoo" / "thirdparty_lenet_relu_maxpool_fmnist.onnx"
    model = onnx.load(str(path))
    assert not model.metadata_props and model.opset_import[0].version == 13
    assert {"MaxPool", "Relu"} <= set(_ops(model))
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["test_accuracy"] > 0.85
