"""Accuracy vs time steps for each conversion method, the table of Bu et al. (AAAI 2022).

For every model given: the ANN's accuracy (onnxruntime) and the SNN's accuracy at
T = 1, 2, 4, ..., 128 for each threshold source (trained ceilings, max, p99.99) and
each initial potential (zero, half, optimal), all through the same `toolchain.build`
and `toolchain.evaluate` code the CLI uses. Writes JSON and Markdown.

    python bench/accuracy_latency.py --model models/zoo/fmnist_vgg_clip.onnx \
        --data ../shared/data/fashion-mnist --out bench/results/fmnist_vgg_clip

With `--v0-T each` the optimal v0 is fitted anew at every T reported (one build and one run
of T steps per T, as `toolchain build --v0 optimal --v0-T T -T T` does), instead of once at
one T for all of them; that costs sum(T) steps per sample instead of max(T).

The method `THRESHOLD/calibrated` (only when named in `--methods`) is the build's latency
calibration of every layer, `toolchain build --calibrate threshold,v0 -T T`, fitted at each
T reported: thresholds scaled per channel and v0 fitted layer by layer on the SNN's own inputs,
starting from the trained ceilings (or the data threshold).
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
FITTED_EACH_T = {"optimal": {"v0": "optimal"}, "calibrated": {"v0": "half", "calibrate": "threshold,v0"}}


def fitted_flags(mode: str) -> str:
    """FITTED_EACH_T[mode] as the build's command-line flags (a fitted v0 is fitted at the row's T: --v0-T T)."""
    options = FITTED_EACH_T[mode]
    flags = [f"--{key} {value}" for key, value in options.items()]
    return " ".join(flags + (["--v0-T T"] if options.get("v0") == "optimal" else []))


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
    per_t = args.v0_steps == "each"
    for threshold in THRESHOLDS:
        if threshold == "ceiling" and not has_ceilings:
            continue
        for v0 in (*V0_MODES, "calibrated"):
            if (args.methods and f"{threshold}/{v0}" not in args.methods) or (v0 == "calibrated" and not args.methods):
                continue
            if v0 == "calibrated" or (per_t and v0 == "optimal"):
                data = test
                if args.other_limit and args.other_limit < len(test) and f"{threshold}/{v0}" not in full:
                    data = test.subset(args.other_limit)
                rows.append(run_fitted_each(args, threshold, v0, data, calib, steps, reference))
                if rows[-1]["samples"] == len(test):
                    ann_accuracy = rows[-1]["ann_accuracy"]
                continue
            options = BuildOptions(
                model=args.model, calib=calib, threshold=threshold, v0=v0, v0_steps=8 if per_t else args.v0_steps,
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


def run_fitted_each(args: argparse.Namespace, threshold: str, mode: str, test, calib, steps: list[int],
                    reference) -> dict:  # fmt: skip
    """One row for `threshold/mode` (a key of FITTED_EACH_T) fitted anew at each T, the SNN run for exactly T steps."""
    started = time.perf_counter()
    row: dict = {"threshold": threshold, "v0": mode, "v0_fit": "each T", "samples": len(test), "snn_accuracy": {},
                 "agreement_with_ann": {}, "v0_fraction": {}, "build_seconds": {}}  # fmt: skip
    for t in steps:
        options = BuildOptions(model=args.model, calib=calib, threshold=threshold, v0_steps=t, steps=t,
                               maxpool=args.maxpool, device=args.device, calib_size=args.calib_size,
                               **FITTED_EACH_T[mode])  # fmt: skip
        build_started = time.perf_counter()
        built = build_snn(options)
        row["build_seconds"][str(t)] = round(time.perf_counter() - build_started, 1)
        target = get_target("torch", device=args.device)
        target.prepare(built.snn)
        result = evaluate(target, test, built.snn.preprocess, built.snn.input_shape, [t], args.batch_size, reference,
                          progress=None, label=f"{threshold}/{mode}@T={t}")  # fmt: skip
        row["ann_accuracy"] = result.ann_accuracy()
        row["snn_accuracy"][str(t)] = result.snn_accuracy()[t]
        row["agreement_with_ann"][str(t)] = result.agreement[t] / result.samples
        row["v0_fraction"][str(t)] = built.snn.meta["conversion"].get("v0_fraction", {})
        row["v0_samples"] = built.snn.meta["conversion"].get("v0_samples")
        print(f"{threshold:>8} {mode}@T={t:<3} {result.samples:>6} {100 * result.snn_accuracy()[t]:6.2f}", flush=True)
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _v0_samples(result: dict) -> int:
    counts = [row["v0_samples"] for row in result["rows"] if row.get("v0_samples")]
    return max(counts) if counts else min(V0_MAX_SAMPLES, result.get("calib_size", 1000))


def _v0_fit(result: dict) -> str:
    return "at each T reported (one build per T)" if result.get("v0_steps") == "each" else f"at T={result.get('v0_steps', 8)}"


def _v0_steps(value: str) -> int | str:
    if value == "each":
        return value
    try:
        steps = int(value)
    except ValueError:
        steps = 0
    if steps < 1:
        raise argparse.ArgumentTypeError(f"--v0-T {value!r}: give a number of steps >= 1 or 'each'")
    return steps


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
            f"; v0 `optimal` is fitted {_v0_fit(result)} on the first {_v0_samples(result)} of them."
            if any(row["v0"] == "optimal" for row in result["rows"])
            else "."
        )
        + (
            " Rows `calibrated`: `--calibrate threshold,v0 -T T`, every layer's thresholds and v0 fitted at each T "
            "reported, layer by layer on the SNN's own inputs (one build per T)."
            if any(row["v0"] == "calibrated" for row in result["rows"])
            else ""
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
    parser.add_argument(
        "--v0-T", dest="v0_steps", type=_v0_steps, default=8,
        help="T the optimal v0 is fitted at (default 8), or 'each': fitted anew at every T reported",
    )
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
