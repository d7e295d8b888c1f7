"""How often the float SNN and the ANN predict the same class, at large T, on a full test set.

    python bench/agreement.py --model models/zoo/fmnist_cnn_clip.onnx --data ../shared/data/fashion-mnist \
        -T 64,128,256 --out bench/results/agreement_fmnist_cnn_clip
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import write_results  # noqa: E402

from toolchain.backends import get_target  # noqa: E402
from toolchain.build import BuildOptions, build  # noqa: E402
from toolchain.data import load_dataset  # noqa: E402
from toolchain.evaluate import evaluate, parse_steps  # noqa: E402
from toolchain.onnx_reference import OnnxReference  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--threshold", default="auto")
    parser.add_argument("-T", "--steps", default="64,128,256")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    steps = parse_steps(args.steps)
    built = build(BuildOptions(model=args.model, calib=args.data, threshold=args.threshold))
    target = get_target("torch", device="auto")
    target.prepare(built.snn)
    test = load_dataset(args.data, "test").subset(args.limit)
    started = time.perf_counter()
    result = evaluate(target, test, built.snn.preprocess, built.snn.input_shape, steps, 250, OnnxReference(args.model))
    record = {
        "model": str(args.model),
        "data": str(args.data),
        "threshold": args.threshold,
        "v0": "half",
        **result.to_json(),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    del record["spikes_per_sample"]
    lines = [
        f"### SNN-ANN agreement: {args.model.stem}",
        "",
        f"Test split of `{args.data}`, {result.samples} samples, thresholds `{args.threshold}`, v0 = theta/2; "
        f"ANN accuracy {100 * result.ann_accuracy():.2f} %.",
        "",
        "| T | SNN accuracy | same class as the ANN |",
        "|---|---|---|",
    ]
    for t in steps:
        lines.append(f"| {t} | {100 * result.snn_accuracy()[t]:.2f} % | {100 * result.agreement[t] / result.samples:.2f} % |")
    write_results(args.out, record, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
