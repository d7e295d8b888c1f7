"""Models not trained for conversion: per-layer thresholds, the defaults, and a fitted v0.

Three small MNIST networks written the way a user would write them, in plain torch (no
`models`, `exporters` or project code in them): a ResNet-style net (residual Add, a
strided block with a 1x1 conv + BN shortcut, global average pool), a MobileNet-style net
(depthwise-separable blocks with ReLU6 and BN, `x.mean((2, 3))` pooling) and a VGG-style
net (conv + BN + ReLU, max pooling). Each is trained here for a fixed number of seeded Adam
steps on the MNIST training images (pixels / 255, nothing else), exported with
`torch.onnx.export` (opset 17, dynamic batch, input "input", no metadata, so the toolchain
takes its default uint8 scaling 1/255, checked against the training preprocessing), and
then built twice through `toolchain.build`, as `toolchain build` does:

- per layer: `--calib MNIST --threshold p99.99` (one threshold per layer from data, v0 = theta/2)
- defaults: `--calib MNIST` (`auto`: per-channel p99.99 here, since no ceiling is trained; v0 = theta/2)
- defaults + fitted v0: `--calib MNIST --v0 optimal --v0-T 32`

(calibration: 1000 training images each)

The ANN (onnxruntime) and the float SNN (torch target) are evaluated on the first N test
images at T = 8, 16, 32, 64, 128.

    OMP_NUM_THREADS=1 .venv/bin/python bench/own_models.py     # about 5 minutes on one loaded core
    OMP_NUM_THREADS=1 .venv/bin/python bench/own_models.py --models mobilenet --steps 300 --limit 200

Writes bench/results/own_models.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import describe_machine, write_results  # noqa: E402

from toolchain.backends import open_target  # noqa: E402
from toolchain.build import BuildOptions, build  # noqa: E402
from toolchain.data import Dataset, load_dataset  # noqa: E402
from toolchain.evaluate import evaluate  # noqa: E402
from toolchain.onnx_reference import OnnxReference  # noqa: E402

MNIST = ROOT.parent / "shared" / "data" / "mnist"
STEPS = [8, 16, 32, 64, 128]
GAP_AT = 32
SETTINGS: dict[str, dict[str, Any]] = {
    "per layer": {"threshold": "p99.99", "per_channel": False, "v0": "half"},
    "defaults": {"threshold": "auto", "per_channel": False, "v0": "half"},
    "defaults + fitted v0": {"threshold": "auto", "per_channel": False, "v0": "optimal", "v0_steps": GAP_AT},
}
FLAGS = {
    "per layer": "--threshold p99.99",
    "defaults": "",
    "defaults + fitted v0": f"--v0 optimal --v0-T {GAP_AT}",
}


# --- the user's models: plain torch ---------------------------------------------------------


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the input (or its 1x1 conv + BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(), *conv_bn(cout, cout, 3))
        self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 16, 3, 2), nn.ReLU())  # 14x14
        self.blocks = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2))  # 14x14, 7x7
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class MobileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [*conv_bn(1, 16, 3, 2), nn.ReLU6()]  # 14x14
        for cin, cout, stride in [(16, 32, 1), (32, 64, 2), (64, 64, 1)]:  # 14x14, 7x7, 7x7
            layers += [*conv_bn(cin, cin, 3, stride, groups=cin), nn.ReLU6()]  # depthwise
            layers += [*conv_bn(cin, cout, 1), nn.ReLU6()]  # pointwise
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def vgg() -> nn.Module:
    return nn.Sequential(
        *conv_bn(1, 16), nn.ReLU(), nn.MaxPool2d(2),  # 14x14
        *conv_bn(16, 32), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
        *conv_bn(32, 32), nn.ReLU(), nn.MaxPool2d(2),  # 3x3
        nn.Flatten(), nn.Linear(32 * 3 * 3, 10),
    )  # fmt: skip


MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "resnet": (ResNet, "conv-BN-ReLU stem (stride 2), 2 basic blocks (residual Add; 2nd stride 2, 1x1 conv+BN "
               "shortcut), global average pool, linear"),
    "mobilenet": (MobileNet, "conv-BN-ReLU6 stem (stride 2), 3 depthwise-separable blocks (dw 3x3+BN+ReLU6, "
                  "pw 1x1+BN+ReLU6), x.mean((2,3)), linear"),
    "vgg": (vgg, "3x (conv 3x3-BN-ReLU, max pool 2), linear"),
}  # fmt: skip


def images(data: Dataset) -> torch.Tensor:
    """The training preprocessing: pixels / 255, nothing else."""
    return torch.tensor(data.x, dtype=torch.float32) / 255.0


def train(model: nn.Module, data: Dataset, steps: int, seed: int, batch_size: int = 128) -> dict[str, Any]:
    """`steps` Adam steps (lr 3e-3, cosine decay) on random batches of the training set."""
    torch.manual_seed(seed)
    x, y = images(data), torch.from_numpy(data.y).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    started = time.perf_counter()
    losses: list[float] = []
    for _ in range(steps):
        batch = torch.randint(len(y), (batch_size,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    return {"steps": steps, "batch_size": batch_size, "seconds": round(time.perf_counter() - started, 1),
            "final_loss": round(float(np.mean(losses[-50:])), 4)}  # fmt: skip


def torch_accuracy(model: nn.Module, data: Dataset) -> float:
    with torch.no_grad():
        x = images(data)
        predicted = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return float((predicted.numpy() == data.y).mean())


def export(model: nn.Module, path: Path) -> None:
    warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip


# --- the benchmark --------------------------------------------------------------------------


def convert_and_evaluate(name: str, onnx_file: Path, setting: str, test: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    options = BuildOptions(model=onnx_file, target="torch", calib=args.data, calib_size=args.calib_size,
                           device="cpu", **SETTINGS[setting])  # fmt: skip
    started = time.perf_counter()
    result = build(options)
    build_seconds = time.perf_counter() - started
    graph = result.snn
    # the toolchain's default scaling for uint8 input must be the training preprocessing
    sample = test.x[:64]
    if not np.allclose(graph.preprocess.apply(sample), sample.astype(np.float32) / 255.0, atol=1e-6):
        raise SystemExit(f"{name}: the toolchain's default preprocessing {graph.preprocess} is not x / 255")
    target = open_target("torch", None, "cpu")
    target.prepare(graph)
    run = evaluate(target, test, graph.preprocess, graph.input_shape, STEPS, args.batch_size,
                   OnnxReference(onnx_file), progress=False, label=f"{name} {setting}")  # fmt: skip
    snn = run.snn_accuracy()
    ann = run.ann_accuracy()
    assert ann is not None
    layers = result.log["layers"]
    row = {
        "model": name,
        "setting": setting,
        "flags": FLAGS[setting],
        "samples": run.samples,
        "ann": ann,
        "snn": {str(t): snn[t] for t in STEPS},
        f"gap_T{GAP_AT}": snn[GAP_AT] - ann,
        "agreement_with_ann": {str(t): c / max(1, run.samples) for t, c in run.agreement.items()},
        "threshold_sources": sorted({layer["source"] for layer in layers}),
        "thresholds": [
            {
                "layer": layer["name"],
                "min": round(layer["threshold_min"], 3),
                "max": round(layer["threshold_max"], 3),
                "source": layer["source"],
                "v0_fraction": round(layer["v0_fraction"], 3),
            }
            for layer in layers
        ],
        "build_seconds": round(build_seconds, 1),
        "eval_seconds": round(run.seconds, 1),
    }
    print(json.dumps({k: v for k, v in row.items() if k not in ("thresholds", "agreement_with_ann")}), flush=True)
    return row


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    samples = result["rows"][0]["samples"] if result["rows"] else 0
    header = " | ".join(f"T={t}" for t in STEPS)
    lines = [
        "# Models not trained for conversion: per-layer thresholds, the defaults, and a fitted v0",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores), Python {m['python']}, torch {m['torch']}, {m['date']}. "
        f"Three MNIST models in plain torch with batch norm and plain ReLU / ReLU6, trained {result['train_steps']} "
        f"Adam steps each (seed {result['seed']}), exported to ONNX without metadata; each built with "
        f"`--calib MNIST --calib-size {result['calib_size']}` and: `--threshold p99.99` (per layer), nothing more "
        f"(defaults), or `--v0 optimal --v0-T {GAP_AT}` (defaults + fitted v0); ANN (onnxruntime) and float SNN "
        f"(torch target) on the first {samples} test images. Written by `bench/own_models.py` "
        f"({result['seconds'] / 60:.1f} minutes).",
        "",
        f"| model | params | setting | ANN | {header} | SNN - ANN at T={GAP_AT} |",
        "|---|---:|---|---:|" + "---:|" * len(STEPS) + "---:|",
    ]
    for r in result["rows"]:
        params = result["models"][r["model"]]["parameters"]
        snn = " | ".join(f"{100 * r['snn'][str(t)]:.2f}" for t in STEPS)
        lines.append(f"| {r['model']} | {params:,} | {r['setting']} | {100 * r['ann']:.2f} | {snn} | "
                     f"{100 * r[f'gap_T{GAP_AT}']:+.2f} |")  # fmt: skip
    if result.get("reading"):
        lines += ["", result["reading"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=1200, help="Adam steps per model (batch 128; default 1200)")
    parser.add_argument("--limit", type=int, default=1000, help="test images (default 1000)")
    parser.add_argument("--calib-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--data", type=Path, default=MNIST, help="MNIST IDX folder")
    parser.add_argument("--keep", type=Path, help="keep the exported ONNX files in this folder")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "own_models")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not args.data.exists():
        print(f"error: unknown models {unknown}" if unknown else f"error: data not found: {args.data}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    started = time.perf_counter()
    train_data = load_dataset(args.data, "train")
    test_data = load_dataset(args.data, "test")
    test = test_data.subset(args.limit)
    result: dict[str, Any] = {"machine": describe_machine(), "train_steps": args.steps, "seed": args.seed,
                              "calib_size": args.calib_size, "steps": STEPS, "models": {}, "rows": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            factory, description = MODELS[name]
            torch.manual_seed(args.seed)
            model = factory()
            info = train(model, train_data, args.steps, args.seed)
            info.update({"description": description, "parameters": sum(p.numel() for p in model.parameters()),
                         "torch_test_accuracy_all": torch_accuracy(model, test_data)})  # fmt: skip
            result["models"][name] = info
            print(json.dumps({"model": name, **info}), flush=True)
            onnx_file = folder / f"mnist_{name}.onnx"
            export(model, onnx_file)
            for setting in SETTINGS:
                result["rows"].append(convert_and_evaluate(name, onnx_file, setting, test, args))
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["reading"] = reading(result)
    write_results(args.out, result, markdown(result))
    return 0


def reading(result: dict[str, Any]) -> str:
    """One paragraph from the numbers of this run: each setting's gap to the ANN at T=8 and T=GAP_AT."""
    rows = {(r["model"], r["setting"]): r for r in result["rows"]}
    names = [n for n in result["models"] if all((n, s) in rows for s in SETTINGS)]
    if not names:
        return ""
    samples = rows[(names[0], "defaults")]["samples"]
    low = str(STEPS[0])

    def gaps(row: dict[str, Any]) -> str:
        return f"{100 * (row['snn'][low] - row['ann']):+.1f} / {100 * row[f'gap_T{GAP_AT}']:+.1f}"

    parts = [f"{n}: " + ", ".join(f"{s} {gaps(rows[(n, s)])}" for s in SETTINGS) for n in names]
    return (
        f"SNN minus ANN at T={low} / T={GAP_AT}, in points on {samples} test images: " + "; ".join(parts) + ". "
        "With one threshold per layer, the many channels of a batch-normalised network whose activations stay "
        "far below the layer's largest spike in steps of theta/T, rarely or never at low T; that is what "
        "per-channel thresholds (the default `auto` without trained ceilings) are for, and initial potentials "
        f"fitted at T={GAP_AT} close more of the low-T gap. One seed and one training run per model; on {samples} "
        f"images a point is {samples / 100:g} images."
    )


if __name__ == "__main__":
    sys.exit(main())
