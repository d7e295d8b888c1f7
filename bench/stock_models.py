"""Stock ReLU models at low latency: each calibration method at T = 4..64, beside SpikingJelly.

The models are plain torch networks with batch norm and plain ReLU / ReLU6, trained by
`bench/stock/train_stock.py` (a script that knows nothing of this project) and exported
with the default `torch.onnx.export` (no metadata); missing ones are trained first. Each is
built through `toolchain.build` exactly as `toolchain build MODEL --calib DATA -T T [flags]`
does, once per latency budget T, with `--calib-size` training images:

  defaults     `--calibrate none`: per-channel p99.99 thresholds, v0 = theta/2 (the toolchain before
               latency calibration; built once, the same network at every T)
  v0 fit       `--calibrate none --v0 optimal --v0-T T` (the earlier best for such models)
  threshold    `--calibrate threshold`      (per-channel thresholds fitted at T)
  bias         `--calibrate bias`           (per-channel input-bias correction at T)
  threshold,bias  `--calibrate threshold,bias` (Li et al.'s light calibration; the first `auto`)
  threshold,v0 `--calibrate threshold,v0` (the second `auto`, before the weight refit)
  auto         `--calibrate auto`, i.e. nothing but `--calib DATA -T T`  (weight, threshold, v0)
  +bias        `--calibrate weight,threshold,bias,v0`

The float SNN (torch target) and the ANN (onnxruntime) run on the first `--limit` test
images; with `--fixed-budgets`, `auto` is also built for a fixed-point target at those T
(`--target loihi`: the same calibration, told which thresholds the fixed-point mapping can
hold) and that build's float SNN and fixed-point SNN (the emulator, which Lava matches spike
for spike) run side by side, to show whether the fixed point keeps the calibration's gain.
Each budget-T build is also evaluated at T/2 and 2T (does fitting for T wreck its
neighbours?). SpikingJelly's `ann2snn.Converter` (modes max, 99.9 %, 99.99 %, and 0.5 / 0.25
of the max; the best mode at each T is reported, chosen on the same test images, which
favours the peer) runs the same ONNX model through onnx2torch on the same images; it needs
`PYTHONPATH` with spikingjelly and onnx2torch (`make peers` installs them into `.peers/`) and is
skipped when they are missing, and it
cannot convert ReLU6 (a Clip in ONNX).

    PYTHONPATH=.peers OMP_NUM_THREADS=1 python bench/stock_models.py --models-dir /tmp/stock
    PYTHONPATH=.peers OMP_NUM_THREADS=1 python bench/stock_models.py --models-dir /tmp/stock \\
        --dataset cifar10 --models resnet vgg --out bench/results/stock_models_cifar10

Writes bench/results/stock_models.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import describe_machine, write_results  # noqa: E402

from toolchain.backends import get_target, open_target  # noqa: E402
from toolchain.build import BuildOptions, build  # noqa: E402
from toolchain.data import Dataset, load_dataset  # noqa: E402
from toolchain.evaluate import evaluate  # noqa: E402
from toolchain.onnx_reference import OnnxReference  # noqa: E402

STEPS = [4, 8, 16, 32, 64]
SETTINGS: dict[str, dict[str, Any]] = {
    "defaults": {"calibrate": "none"},
    "v0 fit": {"calibrate": "none", "v0": "optimal"},
    "threshold": {"calibrate": "threshold"},
    "bias": {"calibrate": "bias"},
    "threshold,bias": {"calibrate": "threshold,bias"},
    "threshold,v0": {"calibrate": "threshold,v0"},
    "auto": {"calibrate": "auto"},
    "+bias": {"calibrate": "weight,threshold,bias,v0"},
}
FLAGS = {
    "defaults": "--calibrate none",
    "v0 fit": "--calibrate none --v0 optimal --v0-T T",
    "threshold": "--calibrate threshold",
    "bias": "--calibrate bias",
    "threshold,bias": "--calibrate threshold,bias",
    "threshold,v0": "--calibrate threshold,v0",
    "auto": "(nothing: --calib DATA -T T; = --calibrate weight,threshold,v0)",
    "+bias": "--calibrate weight,threshold,bias,v0",
}
SJ_MODES: list[Any] = ["max", "99.9%", "99.99%", 0.5, 0.25]


PREFIX = {"fashion-mnist": "fmnist", "cifar10": "cifar10"}  # train_stock.py's file names
DATA_TITLE = {"fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10 (JPEG copy)"}


def ensure_models(names: list[str], folder: Path, data: Path, dataset: str, train_steps: int) -> None:
    missing = [n for n in names if not (folder / f"{PREFIX[dataset]}_{n}.onnx").exists()]
    if missing:
        subprocess.run([sys.executable, str(ROOT / "bench" / "stock" / "train_stock.py"), "--data", str(data),
                        "--dataset", dataset, "--out", str(folder), "--steps", str(train_steps), "--models", *missing],
                       check=True)  # fmt: skip


def snn_accuracy(model: Path, options: dict[str, Any], budget: int, test: Dataset, args: argparse.Namespace,
                 reference: OnnxReference, steps: list[int]) -> tuple[dict[int, float], float, dict[str, Any]]:  # fmt: skip
    kwargs = dict(options)
    if kwargs.get("v0") == "optimal":
        kwargs["v0_steps"] = budget
    started = time.perf_counter()
    result = build(BuildOptions(model=model, calib=args.calib_path, calib_size=args.calib_size, steps=budget,
                                device=args.device, **kwargs))  # fmt: skip
    seconds = time.perf_counter() - started
    target = open_target("torch", None, args.device)
    target.prepare(result.snn)
    run = evaluate(target, test, result.snn.preprocess, result.snn.input_shape, steps, 250, reference, progress=False)
    calibration = result.log.get("latency_calibration") or {}
    info = {"build_seconds": round(seconds, 1), "calibration_seconds": calibration.get("seconds"),
            "calibration_cpu_seconds": calibration.get("cpu_seconds"),
            "calibration_samples": calibration.get("samples"), "ann": run.ann_accuracy()}  # fmt: skip
    return run.snn_accuracy(), seconds, info


def fixed_point_accuracy(model: Path, budget: int, test: Dataset, args: argparse.Namespace) -> dict[str, float]:
    """`auto` built for the loihi target at `budget`: its float SNN and its fixed-point SNN at `budget` steps."""
    result = build(BuildOptions(model=model, target="loihi", calib=args.calib_path, calib_size=args.calib_size,
                                steps=budget, device=args.device))  # fmt: skip
    accuracy = {}
    for kind, target in (("float", open_target("torch", None, args.device)),
                         ("fixed", get_target("loihi", fixed=result.fixed, device=args.device))):  # fmt: skip
        target.prepare(result.snn)
        run = evaluate(target, test, result.snn.preprocess, result.snn.input_shape, [budget], 250, None, progress=False)
        accuracy[kind] = run.snn_accuracy()[budget]
    return accuracy


def spikingjelly_accuracy(model: Path, train: Dataset, test: Dataset, calib_size: int) -> dict[str, Any] | None:
    """SpikingJelly's ann2snn on the ONNX model (through onnx2torch), every mode, accuracy at every T."""
    try:
        from onnx2torch import convert as onnx_to_torch
        from spikingjelly.activation_based import functional
        from spikingjelly.activation_based.ann2snn import Converter
    except ImportError as exc:
        return {"error": f"not installed ({exc})"}
    index = np.linspace(0, len(train) - 1, calib_size).astype(np.int64)
    shape = (-1, *train.x.shape[1:])
    calib = torch.tensor(train.x[index], dtype=torch.float32).reshape(shape) / 255.0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(calib, torch.zeros(len(calib))), batch_size=100)
    x = torch.tensor(test.x, dtype=torch.float32).reshape(shape) / 255.0
    out: dict[str, Any] = {}
    for mode in SJ_MODES:
        try:
            ann = onnx_to_torch(str(model)).eval()
            snn = Converter(loader, device="cpu", mode=mode)(ann)
        except Exception as exc:  # noqa: BLE001 - the peer's own failure is the result
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        if not any("IFNode" in type(m).__name__ for m in snn.modules()):
            return {"error": "no ReLU module converted (ReLU6 exports as Clip, which ann2snn does not convert)"}
        correct = {t: 0 for t in STEPS}
        with torch.no_grad():
            for start in range(0, len(x), 250):
                functional.reset_net(snn)
                total = 0.0
                for t in range(1, max(STEPS) + 1):
                    total = total + snn(x[start : start + 250])
                    if t in correct:
                        correct[t] += int((total.argmax(1).numpy() == test.y[start : start + 250]).sum())
        out[str(mode)] = {str(t): c / len(x) for t, c in correct.items()}
    best = {str(t): max(out[str(m)][str(t)] for m in SJ_MODES) for t in STEPS}
    return {"modes": out, "best": best}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    header = " | ".join(f"T={t}" for t in STEPS)
    trained = ", ".join(f"{name} {model.get('train_steps', result['train_steps'])}" for name, model in result["models"].items())
    lines = [
        "# Stock ReLU models at low latency: latency calibration (`--calib DATA -T T`) vs SpikingJelly",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores, shared), Python {m['python']}, torch {m['torch']}, {m['date']}. "
        f"{DATA_TITLE[result['dataset']]} models in plain torch (batch norm, plain ReLU / ReLU6), trained by "
        f"`bench/stock/train_stock.py` (Adam steps: {trained}), default `torch.onnx.export`, no metadata. "
        f"Each cell: a network built for that T (`-T T`, {result['calib_size']} calibration images from the "
        f"training set) and run for T steps; float SNN (torch target) on the first {result['limit']} test images. "
        + (f"SpikingJelly: `ann2snn.Converter`, best of modes {', '.join(map(str, SJ_MODES))} at each T (picked on "
           "these test images). " if any("spikingjelly" in model for model in result["models"].values())
           else "SpikingJelly was not run (`--no-spikingjelly`, or not installed). ")
        + f"Written by `bench/stock_models.py` ({result['seconds'] / 60:.1f} minutes).",
        "",
        *(["**Partial run**: the rows finished so far.", ""] if result.get("partial") else []),
        f"| model | ANN | method | {header} |",
        "|---|---:|---|" + "---:|" * len(STEPS),
    ]
    for name, model in result["models"].items():
        for setting in result["settings"]:
            row = model["methods"].get(setting)
            if row is None or "ann" not in model:
                continue
            cells = " | ".join(f"{100 * row['at_budget'][str(t)]:.2f}" if str(t) in row["at_budget"] else "" for t in STEPS)
            lines.append(f"| {name} | {100 * model['ann']:.2f} | {setting} | {cells} |")
        sj = model.get("spikingjelly") or {}
        if "best" in sj:
            cells = " | ".join(f"{100 * sj['best'][str(t)]:.2f}" for t in STEPS)
            lines.append(f"| {name} | {100 * model['ann']:.2f} | SpikingJelly (best mode) | {cells} |")
        elif sj:
            lines.append(f"| {name} | {100 * model['ann']:.2f} | SpikingJelly | {sj['error']} |" + " |" * (len(STEPS) - 1))
    lines += ["", "Neighbouring T (the `auto` network built for T, run at T/2 and 2T; SNN - ANN in points):", "",
              "| model | budget T | at T/2 | at T | at 2T | calibration seconds |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, model in result["models"].items():
        row = model["methods"].get("auto")
        if row is None or "ann" not in model:
            continue
        for t in STEPS:
            near = row["neighbours"].get(str(t))
            if not near:
                continue
            cells = " | ".join(
                f"{100 * (near[k] - model['ann']):+.2f}" if k in near else "" for k in (str(t // 2), str(t), str(2 * t))
            )
            lines.append(f"| {name} | {t} | {cells} | {row['seconds'].get(str(t), '')} |")
    if any(model.get("fixed") for model in result["models"].values()):
        lines += ["", "Fixed point: `auto` built with `--target loihi` for T (its calibration knows which thresholds the "
                  "fixed-point mapping holds), that build's float SNN beside its fixed-point SNN (the emulator, which "
                  "Lava runs spike for spike), same test images:", "",
                  "| model | T | float SNN | fixed point | fixed - float |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for name, model in result["models"].items():
            for t, row in (model.get("fixed") or {}).items():
                lines.append(f"| {name} | {t} | {100 * row['float']:.2f} | {100 * row['fixed']:.2f} | "
                             f"{100 * (row['fixed'] - row['float']):+.2f} |")  # fmt: skip
    flags = "; ".join(f"{k}: `{v}`" for k, v in FLAGS.items() if k in result["settings"])
    history = " `threshold,v0` was `auto` before the weight refit joined it." if "threshold,v0" in result["settings"] else ""
    lines += ["", f"Methods: {flags}.{history}", "",
              f"On {result['limit']} images one point is {result['limit'] // 100} images; one training run per model."]
    lines += [f"\n{note}" for note in result.get("notes", [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet", "vgg", "densenet", "mobilenet"])
    parser.add_argument("--models-dir", type=Path, required=True, help="ONNX files from bench/stock/train_stock.py")
    parser.add_argument("--dataset", choices=tuple(PREFIX), default="fashion-mnist")
    parser.add_argument("--data", type=Path, help="its folder (default ../shared/data/DATASET)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--budgets", type=int, nargs="+", default=STEPS, help="T values to build for")
    parser.add_argument(
        "--ablation-budgets",
        type=int,
        nargs="+",
        default=[8, 32],
        help="T values for threshold, bias and +v0 (the slow part of the bench)",
    )
    parser.add_argument("--fixed-budgets", type=int, nargs="*", default=[], help="T values at which `auto` is also "
                        "built for fixed point and run in the emulator beside its float SNN")
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--calib-size", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-spikingjelly", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stock_models")
    args = parser.parse_args(argv)
    args.data = args.data or ROOT.parent / "shared" / "data" / args.dataset
    torch.set_num_threads(1)
    started = time.perf_counter()
    ensure_models(args.models, args.models_dir, args.data, args.dataset, args.train_steps)
    train = load_dataset(args.data, "train")
    test = load_dataset(args.data, "test").subset(args.limit)
    args.calib_path = args.data
    if args.dataset == "cifar10":  # decode the JPEGs once, not in every build: the same images as .npz
        args.calib_path = args.models_dir / "cifar10_train.npz"
        np.savez(args.calib_path, x=train.x, y=train.y)
    result: dict[str, Any] = {"machine": describe_machine(), "dataset": args.dataset, "train_steps": args.train_steps,
                              "limit": len(test),
                              "calib_size": args.calib_size, "settings": args.settings, "models": {}}  # fmt: skip
    for name in args.models:
        model = args.models_dir / f"{PREFIX[args.dataset]}_{name}.onnx"
        reference = OnnxReference(model)
        entry: dict[str, Any] = {"file": model.name, "methods": {}}
        info_file = model.with_suffix(".json")
        if info_file.exists():  # what train_stock.py recorded: its steps and the torch test accuracy
            trained = json.loads(info_file.read_text())
            entry["train_steps"], entry["torch_test_accuracy"] = trained.get("steps"), trained.get("test_accuracy")
        result["models"][name] = entry
        for setting in args.settings:
            row: dict[str, Any] = {"at_budget": {}, "neighbours": {}, "seconds": {}}
            if setting == "defaults":  # one network for every T
                acc, seconds, info = snn_accuracy(model, SETTINGS[setting], max(STEPS), test, args, reference, STEPS)
                row["at_budget"] = {str(t): acc[t] for t in STEPS}
                entry["ann"] = info["ann"]
            else:
                budgets = args.budgets if setting in ("auto", "v0 fit") else args.ablation_budgets
                for t in budgets:
                    # Only `auto` (what `--calib DATA -T T` builds) is also run at T/2 and 2T: a run to
                    # 2T costs twice one to T, and the other rows are there to compare at T.
                    near = sorted({max(1, t // 2), t, 2 * t}) if setting == "auto" else [t]
                    acc, seconds, info = snn_accuracy(model, SETTINGS[setting], t, test, args, reference, near)
                    row["at_budget"][str(t)] = acc[t]
                    row["neighbours"][str(t)] = {str(k): v for k, v in acc.items()}
                    row["seconds"][str(t)] = info["calibration_seconds"] or info["build_seconds"]
                    entry["ann"] = info["ann"]
                    entry["methods"][setting] = row
                    print(json.dumps({"model": name, "setting": setting, "budget": t, "accuracy": row["neighbours"][str(t)],
                                      "seconds": row["seconds"][str(t)]}), flush=True)  # fmt: skip
                    _write(args, result, started, partial=True)
            entry["methods"][setting] = row
            print(json.dumps({"model": name, "setting": setting, **row}), flush=True)
        for t in args.fixed_budgets:
            entry.setdefault("fixed", {})[str(t)] = fixed_point_accuracy(model, t, test, args)
            print(json.dumps({"model": name, "fixed_budget": t, **entry["fixed"][str(t)]}), flush=True)
            _write(args, result, started, partial=True)
        if not args.no_spikingjelly:
            entry["spikingjelly"] = spikingjelly_accuracy(model, train, test, args.calib_size)
            print(
                json.dumps({"model": name, "spikingjelly": entry["spikingjelly"].get("best", entry["spikingjelly"])}), flush=True
            )
        _write(args, result, started, partial=True)
    _write(args, result, started, partial=False)
    return 0


def _write(args: argparse.Namespace, result: dict[str, Any], started: float, partial: bool) -> None:
    """Results so far (a long run on a busy machine leaves its finished rows behind), or the final ones."""
    result["seconds"] = time.perf_counter() - started
    result["partial"] = partial
    text = markdown(result)
    if partial:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(text)
    else:
        write_results(args.out, result, text)


if __name__ == "__main__":
    sys.exit(main())
