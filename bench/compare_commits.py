"""No behaviour change between two commits: each builds the same models with its own code and
evaluates them with `toolchain eval --json`; accuracies, agreement with the ANN and spike counts
must be identical (wall times are not compared).

    .venv/bin/python bench/compare_commits.py                       # 79812e5 (before issue 11) vs this tree
    .venv/bin/python bench/compare_commits.py --old main --limit 200

The old commit is checked out into a temporary `git worktree` (removed afterwards) and run as
`python -m toolchain` from its root, so it uses its own code; the new side is this checkout.
Writes bench/results/restructure_identity.{json,md}; exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from machine import describe_machine, write_results  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
MODELS = {  # model -> dataset folder under ../shared/data
    "models/mnist_cnn.onnx": "mnist",
    "models/zoo/fmnist_vgg_clip.onnx": "fashion-mnist",
}
COMPARED = ("samples", "ann_accuracy", "snn_accuracy", "agreement_with_ann", "spikes_per_sample")


def toolchain(tree: Path, *args: str | Path) -> str:
    """`python -m toolchain ARGS` run from `tree`'s root (its own code first on sys.path)."""
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run([sys.executable, "-m", "toolchain", *map(str, args)], cwd=tree, env=env,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{tree}: toolchain {' '.join(map(str, args))} failed:\n{done.stderr}")
    return done.stdout


def run_tree(tree: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Build every model for loihi with `tree`'s code and evaluate it on each target."""
    results: dict[str, Any] = {}
    for model, dataset in MODELS.items():
        data = SHARED / dataset
        artifact = work / Path(model).stem
        toolchain(tree, "build", ROOT / model, "--target", "loihi", "--calib", data, "-o", artifact)
        for target in args.targets:
            out = toolchain(tree, "eval", artifact, "--data", data, "--limit", str(args.limit), "-T", args.steps,
                            "--target", target, "--json")  # fmt: skip
            evaluation = json.loads(out)
            results[f"{model} {target}"] = {key: evaluation[key] for key in COMPARED} | {"seconds": evaluation["seconds"]}
            print(f"{tree.name}: {model} {target} done ({evaluation['seconds']:.0f} s)", flush=True)
    return results


def _describe(tree: Path) -> str:
    return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=tree, capture_output=True, text=True).stdout.strip()


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Identical behaviour: {result['old']} vs {result['new']}",
        "",
        f"{result['limit']} test images, T = {result['steps']}; each commit builds the models (target loihi, "
        "calibration on the train split) and runs `toolchain eval --json`. Verdict: "
        + ("**identical**" if result["identical"] else "**DIFFERENT**: " + "; ".join(result["differences"])),
        "",
        "| model | target | T | SNN acc % (old) | SNN acc % (new) | spikes/sample (old) | spikes/sample (new) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, old in result["runs"]["old"].items():
        new = result["runs"]["new"][key]
        model, target = key.rsplit(" ", 1)
        for t in old["snn_accuracy"]:
            old_spikes = sum(old["spikes_per_sample"][t].values())
            new_spikes = sum(new["spikes_per_sample"][t].values())
            lines.append(
                f"| {model} | {target} | {t} | {100 * old['snn_accuracy'][t]:.2f} | {100 * new['snn_accuracy'][t]:.2f} "
                f"| {old_spikes:.3f} | {new_spikes:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="79812e5", help="the commit to compare this tree with")
    parser.add_argument("--limit", type=int, default=1000, help="test images")
    parser.add_argument("-T", "--steps", default="1,4,16,32")
    parser.add_argument("--targets", nargs="+", default=["torch", "loihi"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "restructure_identity")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="compare-commits-") as scratch:
        old_tree = Path(scratch) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old_tree), args.old], cwd=ROOT, check=True)
        try:
            (Path(scratch) / "old-out").mkdir()
            (Path(scratch) / "new-out").mkdir()
            runs = {"old": run_tree(old_tree, Path(scratch) / "old-out", args)}
            new_rev = _describe(ROOT)  # this tree as the new side runs it
            runs["new"] = run_tree(ROOT, Path(scratch) / "new-out", args)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, check=False)
    differences = [
        f"{key}: {field}"
        for key, old in runs["old"].items()
        for field in COMPARED
        if old[field] != runs["new"][key][field]
    ]
    result = {
        "machine": describe_machine(),
        "old": args.old,
        "new": new_rev,
        "limit": args.limit,
        "steps": args.steps,
        "identical": not differences,
        "differences": differences,
        "runs": runs,
    }
    write_results(args.out, result, markdown(result))
    return 0 if not differences else 1


if __name__ == "__main__":
    sys.exit(main())
