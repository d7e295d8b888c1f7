"""Low-latency deployment, end to end: each model built for Lava at a small T with the fitted
initial potentials (`--v0 optimal --v0-T T`; `--method calibrated`: every layer's thresholds and
v0 fitted at T, `--calibrate threshold,v0`), then, on the whole test set at that T, the ANN
(onnxruntime), the float SNN (torch target) and the fixed-point SNN (loihi emulator, the
network Lava runs); and Lava itself (fixed_pt, CPU simulator) against the emulator spike for
spike on the first few test images.

This is what `toolchain build MODEL --target lava --v0 optimal --v0-T T -T T --data DATA
--validate N` does, for several models and T in one run, written to JSON and Markdown.

    .venv/bin/python bench/deploy.py                     # about two hours on one core (each width-64 CIFAR-10 model: 30+ min)
    .venv/bin/python bench/deploy.py --models cifar10_fast64_clip --steps 16 --method calibrated  # its README row
    .venv/bin/python bench/deploy.py --models cifar10_air64_clip --steps 16 --method calibrated --limit 2000 \
        --out bench/results/deploy_cifar10_air64  # its README row (7 minutes)
    .venv/bin/python bench/deploy.py --steps 8 --models fmnist_vgg_clip

Writes bench/results/deploy.{json,md}. Models with max pooling are left out: the fixed-point
targets do not lower the spiking max-pool yet.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from accuracy_latency import FITTED_EACH_T, fitted_flags  # noqa: E402
from machine import describe_machine, write_results  # noqa: E402

from toolchain.backends import open_target  # noqa: E402
from toolchain.build import BuildOptions, build, write_artifact  # noqa: E402
from toolchain.data import load_dataset  # noqa: E402
from toolchain.errors import ToolchainError  # noqa: E402
from toolchain.evaluate import evaluate  # noqa: E402
from toolchain.onnx_reference import OnnxReference  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
# name -> (ONNX file, dataset folder)
MODELS = {
    "mnist_cnn": (ROOT / "models" / "mnist_cnn.onnx", SHARED / "mnist"),
    "fmnist_cnn_clip": (ROOT / "models" / "zoo" / "fmnist_cnn_clip.onnx", SHARED / "fashion-mnist"),
    "fmnist_vgg_clip": (ROOT / "models" / "zoo" / "fmnist_vgg_clip.onnx", SHARED / "fashion-mnist"),
    "fmnist_vgg_qcfs8": (ROOT / "models" / "zoo" / "fmnist_vgg_qcfs8.onnx", SHARED / "fashion-mnist"),
    "cifar10_vgg_clip": (ROOT / "models" / "zoo" / "cifar10_vgg_clip.onnx", SHARED / "cifar10"),
    "cifar10_fast_clip": (ROOT / "models" / "zoo" / "cifar10_fast_clip.onnx", SHARED / "cifar10"),
    "cifar10_fast_qcfs4": (ROOT / "models" / "zoo" / "cifar10_fast_qcfs4.onnx", SHARED / "cifar10"),
    "cifar10_fast64_clip": (ROOT / "models" / "zoo" / "cifar10_fast64_clip.onnx", SHARED / "cifar10"),
    "cifar10_air64_clip": (ROOT / "models" / "zoo" / "cifar10_air64_clip.onnx", SHARED / "cifar10"),
}

def lava_validate() -> Any:
    """`toolchain.validate.validate`, or None where Lava cannot run (not Python 3.10, not installed)."""
    try:
        import targets.lava  # noqa: F401  (raises ToolchainError where Lava cannot run)
    except ToolchainError:
        return None
    from toolchain.validate import validate

    return validate


def deploy(name: str, steps: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    model, data = MODELS[name]
    test = load_dataset(data, "test").subset(args.limit)
    options = BuildOptions(model=model, out=workdir / f"{name}-T{steps}", target="lava", calib=data, v0_steps=steps,
                           steps=steps, device=args.device, **FITTED_EACH_T[args.method])  # fmt: skip
    started = time.perf_counter()
    result = build(options)
    fixed = result.fixed
    out = write_artifact(result, options)
    built_seconds = time.perf_counter() - started
    graph = result.snn
    accuracy: dict[str, float] = {}
    for target_name in ("torch", "loihi"):
        target = open_target(target_name, out, args.device)
        target.prepare(graph)
        # the ANN (onnxruntime) runs beside the first target only: its accuracy does not change
        ann = OnnxReference(out / "ann.onnx") if target_name == "torch" else None
        run = evaluate(target, test, graph.preprocess, graph.input_shape, [steps], args.batch_size, ann,
                       progress=False, label=f"{name} {target_name}")  # fmt: skip
        if ann is not None:
            accuracy["ann"] = run.ann_accuracy()
        accuracy[target_name] = run.snn_accuracy()[steps]
    row: dict[str, Any] = {
        "model": str(model.relative_to(ROOT)),
        "data": str(data),
        "samples": len(test),
        "steps": steps,
        "method": args.method,
        "v0_fraction": {k: round(v, 3) for k, v in graph.meta["conversion"]["v0_fraction"].items()},
        "ann": accuracy["ann"],
        "float_snn": accuracy["torch"],
        "fixed_point_snn": accuracy["loihi"],
        "build_seconds": round(built_seconds, 1),
    }
    validate = lava_validate()
    if validate is None:
        row["lava"] = "Lava not available on this Python"
    else:
        check = validate(fixed, graph.network_input(test.x[: args.lava_samples]), steps)
        row["lava"] = {"identical": check.ok, "summary": check.summary(), "samples": check.samples,
                       "seconds_per_sample": round(check.lava_seconds_per_sample, 3)}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    method = result.get("method", "optimal")  # results written before --method existed
    lines = [
        "# Deployment at low latency: float, fixed point and Lava",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores), Python {m['python']}, torch {m['torch']}, {m['date']}. "
        f"Each model built with `--target lava -T T {fitted_flags(method)}` "
        + (
            "(thresholds: trained ceilings, v0 fitted on training images at the same T)"
            if method == "optimal"
            else "(thresholds and v0 of every layer fitted layer by layer on training images at the same T)"
        )
        + ", then the test images at T steps; Lava (fixed_pt) checked against the emulator on the first test "
        "images. Written by `bench/deploy.py`.",
        "",
        "| model | T | samples | ANN | float SNN | fixed-point SNN | fixed - ANN | Lava == emulator |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lava = r["lava"] if isinstance(r["lava"], str) else (
            f"{'yes' if r['lava']['identical'] else 'NO'}: {r['lava']['samples']} samples, every spike"
        )  # fmt: skip
        lines.append(
            f"| {Path(r['model']).stem} | {r['steps']} | {r['samples']} | {100 * r['ann']:.2f} | "
            f"{100 * r['float_snn']:.2f} | {100 * r['fixed_point_snn']:.2f} | "
            f"{100 * (r['fixed_point_snn'] - r['ann']):+.2f} | {lava} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--steps", default="8,16", help="comma-separated T (default 8,16)")
    # --method: the build options besides -T of bench/accuracy_latency.py's rows fitted at each T: the
    # fitted initial potentials of every layer (v0 only), or the latency calibration of thresholds and v0.
    parser.add_argument(
        "--method", choices=sorted(FITTED_EACH_T), default="optimal",
        help=f"how the build fits the SNN at T: {'; '.join(f'{m}: {fitted_flags(m)}' for m in FITTED_EACH_T)}",
    )
    parser.add_argument("--limit", type=int, help="test samples (default: all)")
    parser.add_argument("--lava-samples", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "deploy")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    missing = [str(MODELS[n][1]) for n in names if n in MODELS and not MODELS[n][1].exists()]
    if unknown or missing:
        print(f"error: unknown models {unknown}" if unknown else f"error: data not found: {', '.join(missing)} "
              "(see ../shared/data/README.md)", file=sys.stderr)  # fmt: skip
        return 2
    result: dict[str, Any] = {"machine": describe_machine(), "method": args.method, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for steps in [int(t) for t in args.steps.split(",")]:
                result["rows"].append(deploy(name, steps, args, Path(tmp)))
    write_results(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
