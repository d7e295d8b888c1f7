"""Accuracy vs time steps for each conversion method, the table of Bu et al. (AAAI 2022).

For every model given: the ANN's accuracy (onnxruntime) and the SNN's accuracy at
T = 1, 2, 4, ..., 128 for each threshold source (trained ceilings, max, p99.99) and
each initial potential (zero, half, optimal), all through the same `toolchain.build`
and `toolchain.evaluate` code the CLI uses. Writes JSON and Markdown.

    python bench/accuracy_latency.py --model models/zoo/fmnist_vgg_clip.onnx \
        --data ../shared/data/fashion-mnist --out bench/results/fmnist_vgg_clip
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import write_results  # noqa: E402

from toolchain.backends import get_target  # noqa: E402
from toolchain.build import BuildOptions, build_snn  # noqa: E402
from toolchain.core.interpreter import resolve_device  # noqa: E402
from toolchain.data import load_dataset  # noqa: E402
from toolchain.errors import ToolchainError  # noqa: E402
from toolchain.evaluate import evaluate, parse_steps  # noqa: E402
from toolchain.onnx_reference import OnnxReference  # noqa: E402
from toolchain.passes.calibrate import V0_MAX_SAMPLES, activations  # noqa: E402
from toolchain.passes.frontend import load_onnx  # noqa: E402

THRESHOLDS = ("ceiling", "max", "p99.99")
V0_MODES = ("zero", "half", "optimal")


def run(args: argparse.Namespace) -> dict:
    steps = parse_steps(args.steps)
    test = load_dataset(args.data, "test").subset(args.limit)
    calib = args.calib or args.data
    ann_graph = load_onnx(args.model)
    has_ceilings = all(n.ceiling is not None for n in activations(ann_graph))
    source = "ceiling" if has_ceilings else "p99.99"
    full = args.full if args.full is not None else [f"{source}/half", f"{source}/optimal"]
    rows = []
    ann_accuracy = None
    reference = OnnxReference(args.model)
    for threshold in THRESHOLDS:
        if threshold == "ceiling" and not has_ceilings:
            continue
        for v0 in V0_MODES:
            if args.methods and f"{threshold}/{v0}" not in args.methods:
                continue
            options = BuildOptions(
                model=args.model, calib=calib, threshold=threshold, v0=v0, v0_steps=args.v0_steps,
                maxpool=args.maxpool, device=args.device, calib_size=args.calib_size,
            )
            started = time.perf_counter()
            built = build_snn(options)
            target = get_target("torch", device=args.device)
            target.prepare(built.snn)
            subsets = [test]
            if args.other_limit and args.other_limit < len(test):
                # The other methods run on a prefix of the test set; the --full ones run on both,
                # so that every comparison between rows is on the same samples.
                prefix = test.subset(args.other_limit)
                subsets = [test, prefix] if f"{threshold}/{v0}" in full else [prefix]
            for data in subsets:
                result = evaluate(target, data, built.snn.preprocess, built.snn.input_shape, steps, args.batch_size,
                                  reference, progress=None, label=f"{threshold}/{v0}")
                if result.samples == len(test):
                    ann_accuracy = result.ann_accuracy()
                rows.append({
                    "threshold": threshold,
                    "v0": v0,
                    "samples": result.samples,
                    "ann_accuracy": result.ann_accuracy(),
                    "snn_accuracy": {str(t): a for t, a in result.snn_accuracy().items()},
                    "agreement_with_ann": {str(t): c / result.samples for t, c in result.agreement.items()},
                    "v0_fraction": built.snn.meta["conversion"].get("v0_fraction", {}),
                    "v0_samples": built.snn.meta["conversion"].get("v0_samples"),
                    "seconds": round(time.perf_counter() - started, 1),
                })
                print(f"{threshold:>8} {v0:>8} {result.samples:>6} "
                      + " ".join(f"{100 * a:6.2f}" for a in result.snn_accuracy().values()), flush=True)
    return {
        "model": str(args.model),
        "data": str(args.data),
        "test_samples": len(test),
        "ann_accuracy": ann_accuracy,
        "steps": steps,
        "maxpool": args.maxpool,
        "v0_steps": args.v0_steps,
        "calib_size": args.calib_size,
        "rows": rows,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "device": str(resolve_device(args.device)),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%d"),
    }


def _v0_samples(result: dict) -> int:
    counts = [row["v0_samples"] for row in result["rows"] if row.get("v0_samples")]
    return max(counts) if counts else min(V0_MAX_SAMPLES, result.get("calib_size", 1000))


def markdown(result: dict) -> str:
    steps = result["steps"]
    lines = [
        f"### {Path(result['model']).stem}"
        + (" (max pooling replaced by average pooling)" if result["maxpool"] == "avg" else ""),
        "",
        f"Model `{result['model']}`, data `{result['data']}`; ANN accuracy (onnxruntime) "
        f"**{100 * result['ann_accuracy']:.2f} %** on all {result['test_samples']} test samples. "
        "SNN accuracy (%) at T time steps, with the ANN's accuracy on the same samples beside it; "
        f"machine: {result['machine']['device']}, torch {result['machine']['torch']}, {result['date']}. "
        f"Thresholds come from {result.get('calib_size', 1000)} training images"
        + (
            f"; v0 `optimal` is fitted at T={result.get('v0_steps', 8)} on the first {_v0_samples(result)} of them."
            if any(row["v0"] == "optimal" for row in result["rows"])
            else "."
        ),
        "",
        "| threshold | v0 | samples | ANN | " + " | ".join(f"T={t}" for t in steps) + " |",
        "|---|---|---|---|" + "---|" * len(steps),
    ]
    for row in result["rows"]:
        cells = " | ".join(f"{100 * row['snn_accuracy'][str(t)]:.2f}" for t in steps)
        lines.append(f"| {row['threshold']} | {row['v0']} | {row['samples']} | {100 * row['ann_accuracy']:.2f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="dataset (test split evaluated, train split calibrates)")
    parser.add_argument("--calib", type=Path, help="calibration data (default: --data, train split)")
    parser.add_argument("--calib-size", type=int, default=1000)
    parser.add_argument("--out", type=Path, required=True, help="output prefix: writes PREFIX.json and PREFIX.md")
    parser.add_argument("-T", "--steps", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--limit", type=int, help="test samples for the headline method (default: all)")
    parser.add_argument("--other-limit", type=int, help="test samples for the other methods (default: same as --limit)")
    parser.add_argument("--methods", nargs="*", help="only these, e.g. ceiling/half max/zero")
    parser.add_argument(
        "--full", nargs="*",
        help="methods also run on the whole test set with --other-limit (default: ceiling/half and ceiling/optimal, "
        "or p99.99/half and p99.99/optimal for a model without ceilings)",
    )
    parser.add_argument("--maxpool", default="spiking")
    parser.add_argument("--v0-T", dest="v0_steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except ToolchainError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    write_results(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
