"""Branching networks this project did not train, deployed: `toolchain build --target lava`.

Plain-torch Fashion-MNIST models written the way other people write them (no project code in
them): a torchvision-style ResNet (BasicBlock with `F.relu`, identity and 1x1-conv+BN
shortcuts), a DenseNet/Inception-style net (`torch.cat` of a block's input with its output,
and of parallel branches), a MobileNet-style net (depthwise + pointwise convs, BN after the
ReLU), max-pooling LeNet- and VGG-style nets, the PyTorch MNIST example's layout (max pool before
its ReLU) and a DenseNet-style net whose stem conv is max-pooled with no ReLU before it; and the
same ResNet on CIFAR-10. Each is trained briefly (seeded Adam,
one thread), exported with `torch.onnx.export(model, x, path, dynamo=False)` and its defaults, and built by the
command a user runs:

    toolchain build MODEL --target lava --calib DATA --data DATA --validate 5 -T T -o OUT

which prints the ANN (onnxruntime), the float SNN (torch) and the fixed-point SNN (loihi
emulator) accuracy on the test set at T, and compares Lava with the emulator on 5 samples at
every population and step. T = 32 for every model; the max-pool models also at T = 64, and
their float spiking max-pool (`--maxpool spiking`, torch target) and `--maxpool avg` beside
the fixed-point default (`relu`).

    OMP_NUM_THREADS=1 .venv/bin/python bench/deploy_dag.py                  # all models
    OMP_NUM_THREADS=1 .venv/bin/python bench/deploy_dag.py --models resnet --steps 200

Writes bench/results/deploy_dag.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import describe_machine, write_results  # noqa: E402
from own_models import train  # noqa: E402  (seeded Adam on pixels / 255, the toolchain's uint8 default)

from toolchain.data import Dataset, load_dataset  # noqa: E402

FMNIST = ROOT.parent / "shared" / "data" / "fashion-mnist"
CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"


# --- the user's models: plain torch ---------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's BasicBlock, smaller."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, 2)
        self.layer3 = BasicBlock(32, 32, 2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseInception(nn.Module):
    """A DenseNet-style block (input concatenated with its output) and an Inception-style block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, 2, 1)
        self.bn = nn.BatchNorm2d(16)
        self.dense_conv = nn.Conv2d(16, 16, 3, 1, 1)
        self.dense_bn = nn.BatchNorm2d(32)
        self.branch1 = nn.Conv2d(32, 16, 1)
        self.branch3 = nn.Conv2d(32, 16, 3, 2, 1)
        self.reduce = nn.Conv2d(32, 16, 1, 2)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))  # 14x14
        x = F.relu(self.dense_bn(torch.cat([x, F.relu(self.dense_conv(x))], 1)))  # 32 channels
        a = F.relu(F.avg_pool2d(self.branch1(x), 2))  # 7x7
        b = F.relu(self.branch3(x))
        c = F.relu(self.reduce(x))
        x = torch.cat([a, b, c], 1)
        return self.fc(x.mean((2, 3)))


class MobileNet(nn.Module):
    """Depthwise-separable blocks; batch norm after the ReLU, as some people place it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, 2, 1)
        layers: list[nn.Module] = [nn.ReLU(), nn.BatchNorm2d(16)]
        for cin, cout, stride in [(16, 32, 1), (32, 64, 2), (64, 64, 1)]:
            layers += [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin), nn.ReLU(), nn.BatchNorm2d(cin)]
            layers += [nn.Conv2d(cin, cout, 1), nn.ReLU(), nn.BatchNorm2d(cout)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(self.stem(x)), 1).flatten(1))


class LeNet(nn.Module):
    """The PyTorch tutorial's LeNet: F.max_pool2d(F.relu(conv(x)), 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class MnistExample(nn.Module):
    """The PyTorch MNIST example's layout: the pool before its ReLU, F.relu(F.max_pool2d(conv(x), 2)),
    dropout (inactive once exported for inference), log_softmax out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 5)
        self.conv2 = nn.Conv2d(10, 20, 5)
        self.drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.drop(self.conv2(x)), 2))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return F.log_softmax(self.fc2(x), dim=1)


class DenseStem(nn.Module):
    """DenseNet-style: a stem conv max-pooled with no ReLU before the pool, pre-activation dense layers
    (BN-ReLU-conv, output concatenated to the input), BN-ReLU, global average pool, fc."""

    def __init__(self, growth: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bns = nn.ModuleList([nn.BatchNorm2d(16 + k * growth) for k in range(3)])
        self.convs = nn.ModuleList([nn.Conv2d(16 + k * growth, growth, 3, padding=1, bias=False) for k in range(3)])
        self.bn = nn.BatchNorm2d(16 + 3 * growth)
        self.fc = nn.Linear(16 + 3 * growth, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.stem(x), 2)
        for bn, conv in zip(self.bns, self.convs, strict=True):
            x = torch.cat([x, conv(F.relu(bn(x)))], 1)
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def vgg() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(inplace=True), nn.Linear(64, 10),
    )  # fmt: skip


RESNET = "conv-BN-ReLU, 3 BasicBlocks (identity; 1x1 conv+BN shortcuts, stride 2), GAP, fc"
# name: (factory, description, has max pooling, data set)
MODELS: dict[str, tuple[Any, str, bool, str]] = {
    "resnet": (ResNet, RESNET, False, "fashion-mnist"),
    "dense_inception": (DenseInception, "torch.cat(x, relu(conv x)) + BN; 3 branches (1x1+avgpool, 3x3/2, 1x1/2) "
                        "concatenated; mean, fc", False, "fashion-mnist"),
    "mobilenet": (MobileNet, "conv, 3 depthwise-separable blocks, ReLU then BN (BN after ReLU), GAP, fc", False,
                  "fashion-mnist"),
    "lenet_max": (LeNet, "the PyTorch tutorial LeNet: 2x (conv 5x5, ReLU, max pool 2), 3 fc", True, "fashion-mnist"),
    "vgg_max": (vgg, "VGG-style: conv-BN-ReLU x2, max pool, conv-BN-ReLU, max pool, fc-ReLU-fc", True,
                "fashion-mnist"),
    "resnet_cifar10": (lambda: ResNet(3), RESNET + "; 3x32x32 input", False, "cifar10"),
    "mnist_example_max": (MnistExample, "the PyTorch MNIST example: 2x (conv 5x5, max pool 2, then ReLU), dropout, "
                          "2 fc, log_softmax", True, "fashion-mnist"),
    "dense_stem_max": (DenseStem, "stem conv, max pool 2 (no ReLU before it), 3 dense layers (BN-ReLU-conv, "
                       "concatenated), BN-ReLU, GAP, fc", True, "fashion-mnist"),
}  # fmt: skip
DATA_NAMES = {"fashion-mnist": "FMNIST", "cifar10": "CIFAR10"}


def export(model: nn.Module, path: Path, input_shape: tuple[int, ...], exporter: str = "default") -> None:
    """`default`: the exporter's defaults (opset, names, fixed batch). This torch's default is the dynamo
    exporter, which needs onnxscript (not installed here): the TorchScript one, `dynamo=False`, with its
    defaults. `legacy`: the same exporter as older scripts call it (opset 11, no constant folding, the
    weights listed as graph inputs too, named inputs and outputs, a dynamic batch axis)."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if exporter == "default":
        torch.onnx.export(model, (torch.zeros(1, *input_shape),), str(path), dynamo=False)
        return
    torch.onnx.export(model, (torch.zeros(2, *input_shape),), str(path), dynamo=False, opset_version=11,
                      do_constant_folding=False, keep_initializers_as_inputs=True, input_names=["image"],
                      output_names=["scores"], dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}})


EXPORTERS = {
    "default": "torch.onnx.export(model, x, path, dynamo=False)",
    "legacy": "torch.onnx.export(..., opset_version=11, do_constant_folding=False, keep_initializers_as_inputs=True, "
              "dynamic_axes={batch})",
}  # fmt: skip


# --- the command and what it prints ----------------------------------------------------------

PATTERNS = {
    "ann": r"ANN \(onnxruntime\)\s+([\d.]+) %",
    "float": r"SNN float \(torch\)\s+([\d.]+) %",
    "fixed": r"SNN fixed point \(loihi\)\s+([\d.]+) %",
}


def toolchain_build(
    model: Path, out: Path, steps: int, calib: Path, test: Path, extra: list[str], validate: int, data_name: str
) -> dict[str, Any]:
    command = [sys.executable, "-m", "toolchain", "build", str(model), "--target", "lava", "--calib", str(calib),
               "--data", str(test), "--validate", str(validate), "-T", str(steps), "-o", str(out), *extra]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    row: dict[str, Any] = {"command": f"toolchain build MODEL --target lava --calib {data_name} --data {data_name} "
                           f"--validate {validate} -T {steps}" + "".join(f" {e}" for e in extra),
                           "exit": done.returncode, "seconds": round(time.perf_counter() - started, 1)}
    for key, pattern in PATTERNS.items():
        found = re.search(pattern, done.stdout)
        row[key] = float(found.group(1)) if found else None
    check = re.search(r"lava validation: (.*)", done.stdout)
    row["lava"] = check.group(1) if check else None
    row["lava_equal"] = bool(check and "lava == emulator" in check.group(1))
    timing = re.search(r"lava timing: (.*)", done.stdout)
    row["lava_timing"] = timing.group(1) if timing else None
    build_log = out / "build.json"
    if build_log.exists():
        log = json.loads(build_log.read_text())
        if "resources" in log:
            row["loihi1"] = log["resources"]["loihi1"]["total"]
            row["loihi2"] = log["resources"]["loihi2"]["total"]
            row["warnings"] = log["resources"]["loihi1"]["warnings"]
            row["populations"] = len(log["fixed_point"])
    if done.returncode != 0:
        row["stderr"] = done.stderr[-2000:]
        row["stdout"] = done.stdout[-2000:]
    print(json.dumps({k: v for k, v in row.items() if k not in ("stdout",)}), flush=True)
    return row


def same_arrays(a: Path, b: Path) -> bool:
    """Whether two fixed-point builds hold the same arrays (names and values)."""
    if not (a.exists() and b.exists()):
        return False
    with np.load(a) as left, np.load(b) as right:
        return sorted(left.files) == sorted(right.files) and all(
            np.array_equal(left[k], right[k]) for k in left.files
        )


def float_spiking_maxpool(model: Path, data: Path, test: Dataset, steps: int) -> float:
    """The float SNN with the spiking max-pool (the torch target's default), for comparison."""
    from toolchain.backends import open_target
    from toolchain.build import BuildOptions, build
    from toolchain.evaluate import evaluate

    result = build(BuildOptions(model=model, target="torch", calib=data, maxpool="spiking", steps=steps, device="cpu"))
    target = open_target("torch", None, "cpu")
    target.prepare(result.snn)
    run = evaluate(target, test, result.snn.preprocess, result.snn.input_shape, [steps], 500, None, progress=False)
    return 100 * run.snn_accuracy()[steps]


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Branching and max-pooling networks deployed to fixed point and Lava",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores, shared), Python {m['python']}, torch {m['torch']}, {m['date']}. "
        "Models in plain torch (not written for this toolchain), seeded Adam steps (Fashion-MNIST "
        f"{result['train_steps']}, CIFAR-10 {result['cifar_steps']}; batch 128, no augmentation), exported by "
        "`torch.onnx.export(model, x, path, dynamo=False)` with its defaults, built by "
        "`toolchain build MODEL --target lava --calib DATA --data DATA --validate 5 -T T` (so with the default "
        "`--calibrate auto` at T); accuracies on "
        f"{result['test_samples']}; Lava compared with the emulator at every population "
        f"and step on {result['validate']} of them. Written by `bench/deploy_dag.py` ({result['seconds'] / 60:.0f} minutes).",
        "",
        "| model | data | exporter | T | max-pool | ANN | float SNN | fixed point | fixed - float | Lava == emulator | "
        "populations | Loihi 1 cores | Loihi 2 cores |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for r in result["rows"]:
        gap = "-" if r.get("fixed") is None or r.get("float") is None else f"{r['fixed'] - r['float']:+.2f}"
        if r.get("lava_equal"):
            lava = f"yes ({result['validate']} samples)"
        else:
            lava = f"no: {r.get('lava')}" if r.get("lava") else f"build failed (exit {r['exit']})"
        exporter = r.get("exporter", "default")
        if exporter != "default":
            # The exports differ in float rounding (folding order), which can tip a calibration's
            # discrete choices (threshold scale, v0 rounding); the network is then equally valid, not equal.
            same = "same fixed-point arrays as default" if r.get("same_fixed_point") else "other fixed-point arrays"
            exporter = f"{exporter} ({r.get('test_images')} images; {same})"
        lines.append(
            f"| {r['model']} | {r['data']} | {exporter} | {r['T']} | {r['maxpool']} | {pct(r.get('ann'))} | "
            f"{pct(r.get('float'))} | "
            f"{pct(r.get('fixed'))} | {gap} | {lava} | {r.get('populations', '-')} | "
            f"{r.get('loihi1', {}).get('cores', '-')} | {r.get('loihi2', {}).get('cores', '-')} |"
        )
    if result.get("notes"):
        lines += ["", result["notes"]]
    lines += ["", "Exporters: " + "; ".join(f"`{k}`: `{v}`" for k, v in EXPORTERS.items()) + ". A legacy row is "
              "built and measured on its own; its fixed-point arrays equal the default export's "
              "unless the exports' float rounding (their folding order differs) tipped a discrete calibration choice "
              "(a threshold scale, a v0 rounded to the next unit), after which later layers differ too."]
    if result.get("spiking_maxpool"):
        lines += ["", "Float SNN with the spiking max-pool (`--maxpool spiking`, torch target; Loihi has no synapse "
                  "for it), same calibration data and test images:", ""]
        lines += [f"- {name}, T={t}: {acc:.2f} %" for (name, t), acc in
                  ((tuple(k.split("@")), v) for k, v in result["spiking_maxpool"].items())]
    return "\n".join(lines) + "\n"


def merge(parts: list[Path], out: Path, notes: str = "") -> int:
    """One result from runs of different models: rows, models and max-pool figures of each part in
    turn; the machine line and settings of the first; the seconds summed (CPU time, not wall time)."""
    results = [json.loads(part.read_text()) for part in parts]
    settings = ("train_steps", "cifar_steps", "seed", "validate")
    for part, result in zip(parts[1:], results[1:], strict=True):
        differs = [k for k in settings if result.get(k) != results[0].get(k)]
        if differs:
            print(f"error: {part}: other settings than {parts[0]} ({', '.join(differs)}); rerun with the same", file=sys.stderr)
            return 2
    merged = {**results[0], "rows": [], "models": {}, "spiking_maxpool": {}, "seconds": 0.0,
              "merged_from": [str(p) for p in parts], "notes": notes}  # fmt: skip
    for result in results:
        merged["rows"] += result["rows"]
        merged["models"].update(result["models"])
        merged["spiking_maxpool"].update(result.get("spiking_maxpool", {}))
        merged["seconds"] += result["seconds"]
    write_results(out, merged, markdown(merged))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=600, help="Adam steps per Fashion-MNIST model (batch 128)")
    parser.add_argument("--cifar-steps", type=int, default=1000, help="Adam steps per CIFAR-10 model (batch 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=FMNIST, help="Fashion-MNIST")
    parser.add_argument("--cifar10", type=Path, default=CIFAR10, help="CIFAR-10 (folder or .tar.gz of JPEGs)")
    parser.add_argument("--validate", type=int, default=5)
    parser.add_argument("--limit", type=int, default=0, help="the first N test images (0: all 10,000)")
    parser.add_argument("--keep", type=Path, help="keep the ONNX files and artifacts here")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "deploy_dag")
    parser.add_argument("--exporters", default="default,legacy", help=f"of {', '.join(EXPORTERS)}; default always runs")
    parser.add_argument("--legacy-limit", type=int, default=0, help="test images for the legacy-export rows (0: the "
                        "default rows' images; at 2,000 the fixed - float gap is too noisy to hold to 0.3 points)")  # fmt: skip
    parser.add_argument("--merge", type=Path, nargs="+", help="only merge these result JSONs (runs of other models, "
                        "e.g. on another core) into --out, in the order given, and exit")  # fmt: skip
    parser.add_argument("--notes", default="", help="with --merge: a paragraph for the result (how the run went)")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, args.notes)
    names = [n for n in args.models.split(",") if n]
    exporters = [e for e in args.exporters.split(",") if e]
    if any(e not in EXPORTERS for e in exporters):
        print(f"error: --exporters: choose among {', '.join(EXPORTERS)}", file=sys.stderr)
        return 2
    folders = {"fashion-mnist": args.data, "cifar10": args.cifar10}
    if any(n not in MODELS for n in names):
        print(f"error: --models: choose among {', '.join(MODELS)}", file=sys.stderr)
        return 2
    for name in names:
        if not folders[MODELS[name][3]].exists():
            print(f"error: {folders[MODELS[name][3]]}: no {MODELS[name][3]} data for {name}; pass its folder", file=sys.stderr)
            return 2
    torch.set_num_threads(1)
    started = time.perf_counter()
    result: dict[str, Any] = {"machine": describe_machine(), "train_steps": args.steps, "cifar_steps": args.cifar_steps,
                              "seed": args.seed, "validate": args.validate, "test_samples": "", "models": {}, "rows": [],
                              "spiking_maxpool": {}}
    loaded: dict[str, tuple[Dataset, Dataset, Path, Path]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)

        def data_for(dataset: str) -> tuple[Dataset, Dataset, Path, Path]:
            """Training and test sets, and the paths the command reads them from."""
            if dataset not in loaded:
                train_data, test = load_dataset(folders[dataset], "train"), load_dataset(folders[dataset], "test")
                calib_path = test_path = folders[dataset]
                if dataset == "cifar10":  # decode the JPEGs once, not in every build: the same images as .npz
                    calib_path, test_path = folder / "cifar10_train.npz", folder / "cifar10_test.npz"
                    np.savez(calib_path, x=train_data.x, y=train_data.y)
                if args.limit:
                    test = test.subset(args.limit)
                if args.limit or dataset == "cifar10":
                    test_path = folder / f"{dataset}_test_{len(test)}.npz"
                    np.savez(test_path, x=test.x, y=test.y)
                loaded[dataset] = (train_data, test, calib_path, test_path)
            return loaded[dataset]

        for name in names:
            factory, description, has_maxpool, dataset = MODELS[name]
            train_data, test, calib_path, test_path = data_for(dataset)
            result["test_samples"] = (
                f"the first {args.limit} test images" if args.limit else "the whole test set (10,000 images)"
            )
            torch.manual_seed(args.seed)
            model = factory()
            info = train(model, train_data, args.cifar_steps if dataset == "cifar10" else args.steps, args.seed)
            info.update({"description": description, "parameters": sum(p.numel() for p in model.parameters()),
                         "data": dataset})
            result["models"][name] = info
            onnx_file = folder / f"{dataset}_{name}.onnx"
            export(model, onnx_file, tuple(train_data.x.shape[1:]))
            runs = [(32, "relu" if has_maxpool else "-", [])]
            if has_maxpool:
                runs += [(64, "relu", []), (64, "avg", ["--maxpool", "avg"])]
            for steps, policy, extra in runs:
                row = toolchain_build(onnx_file, folder / f"{name}_T{steps}_{policy}", steps, calib_path, test_path,
                                      extra, args.validate, DATA_NAMES[dataset])
                result["rows"].append({"model": name, "data": dataset, "T": steps, "maxpool": policy,
                                       "exporter": "default", **row})
            if "legacy" in exporters:
                # The other export of the same trained model, built and measured on its own; whether its
                # fixed-point arrays equal the default export's is recorded (float rounding can tip them).
                legacy_file = folder / f"{dataset}_{name}_legacy.onnx"
                export(model, legacy_file, tuple(train_data.x.shape[1:]), "legacy")
                steps, policy, extra = runs[0]
                limited, limited_path = test, test_path
                if 0 < args.legacy_limit < len(test):
                    limited = test.subset(args.legacy_limit)
                    limited_path = folder / f"{dataset}_test_{len(limited)}.npz"
                    np.savez(limited_path, x=limited.x, y=limited.y)
                out = folder / f"{name}_T{steps}_{policy}_legacy"
                row = toolchain_build(legacy_file, out, steps, calib_path, limited_path, extra, args.validate,
                                      DATA_NAMES[dataset])
                row["same_fixed_point"] = same_arrays(out / "fixed_tensors.npz",
                                                      folder / f"{name}_T{steps}_{policy}" / "fixed_tensors.npz")
                row["test_images"] = len(limited)
                result["rows"].append({"model": name, "data": dataset, "T": steps, "maxpool": policy,
                                       "exporter": "legacy", **row})
            if has_maxpool:
                for steps in (32, 64):
                    result["spiking_maxpool"][f"{name}@{steps}"] = float_spiking_maxpool(
                        onnx_file, calib_path, test, steps
                    )
            write_results(args.out, {**result, "seconds": round(time.perf_counter() - started, 1)},
                          markdown({**result, "seconds": time.perf_counter() - started}))
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_results(args.out, result, markdown(result))
    return 0 if all(r["exit"] == 0 for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
