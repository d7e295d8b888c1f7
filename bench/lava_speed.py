"""Lava vs the bit-exact emulator vs the float simulator: time per sample, and Lava == emulator spike for spike.

For each model (the shipped models/mnist_cnn.onnx on models/data/mnist; models/zoo/fmnist_cnn_clip.onnx
on ../shared/data/fashion-mnist when both exist), at T=32 on CPU, in one process:

1. build the SNN and quantise it with the defaults of `toolchain build --target lava`;
2. the full test set through the emulator (`loihi` target, fast path) and through the float simulator
   (`torch` target), interleaved chunk by chunk so that both see the same machine load: throughput in
   samples x time steps per second, accuracy;
3. the emulator before its fast path (loaded from git revision --baseline-rev) and the integer reference
   path (arithmetic="int64") against the fast path on the first --baseline-samples samples, interleaved:
   the speedup, and whether all three give the same readout bits;
4. Lava (`lava` target, fixed_pt): the network built once, --lava-samples samples streamed through it
   (build time, start-up = the first sample with compilation and runtime start, then seconds per
   sample); then `toolchain.validate.validate` on the same samples: every IF layer's spikes at every
   step and the readout accumulators against the emulator.

Writes bench/results/lava_speed.{json,md}.

    .venv/bin/python bench/lava_speed.py                  # both models, a few minutes on 2 cores
    .venv/bin/python bench/lava_speed.py --limit 1000     # quicker
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import describe_machine, write_results  # noqa: E402  (bench/machine.py)

from toolchain.backends import get_target  # noqa: E402
from toolchain.build import BuildOptions, build  # noqa: E402
from toolchain.data import load_dataset  # noqa: E402

MODELS = [
    ("mnist_cnn", ROOT / "models" / "mnist_cnn.onnx", ROOT / "models" / "data" / "mnist"),
    ("fmnist_cnn_clip", ROOT / "models" / "zoo" / "fmnist_cnn_clip.onnx", ROOT.parent / "shared" / "data" / "fashion-mnist"),
]
BASELINE_REV = "12acaa61182c25d710e3cb3119507235ddfdb6de"  # the emulator before the fast path
DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, before --threads changes it


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ baseline


def baseline_module(rev: str) -> types.ModuleType | None:
    """targets/loihi/emulator.py as it was at `rev`, imported under another name (None without git)."""
    try:
        source = subprocess.run(
            ["git", "show", f"{rev}:targets/loihi/emulator.py"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "emulator_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("emulator_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["emulator_before"] = module
    _old_module_paths()
    spec.loader.exec_module(module)
    return module


def _old_module_paths() -> None:
    """The module paths a baseline emulator from before the core/passes layout imports from."""
    from toolchain.backends import get_target as _unused  # noqa: F401  (the new modules, loaded)
    from toolchain.core import fixed, ir, target
    from toolchain.passes import quantize

    old_quantize = types.ModuleType("toolchain.quantize")
    old_quantize.__dict__.update({**vars(fixed), **vars(quantize)})
    old_quantize.as_fixed = lambda graph, preset, options: fixed.as_fixed(  # type: ignore[attr-defined]
        graph, preset, lambda g: quantize.quantize(g, **options), "loihi"
    )
    sys.modules.setdefault("targets.base", target)
    sys.modules.setdefault("toolchain.ir", ir)
    sys.modules.setdefault("toolchain.quantize", old_quantize)


# ------------------------------------------------------------------ timing


class WithThreads:
    """A target run with torch's CPU threads set to `threads` (restored after each run)."""

    def __init__(self, target: Any, threads: int):
        self.target, self.threads = target, threads

    def run(self, x: np.ndarray, steps: int) -> Any:
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self.target.run(x, steps)
        finally:
            torch.set_num_threads(previous)


def interleaved(runners: dict[str, Any], x: np.ndarray, steps: int, chunks: int) -> dict[str, dict[str, Any]]:
    """Run every runner over x in `chunks` pieces, alternating runners per piece; seconds and readouts."""
    seconds = {name: 0.0 for name in runners}
    readouts: dict[str, list[np.ndarray]] = {name: [] for name in runners}
    bounds = np.linspace(0, len(x), chunks + 1).astype(int)
    for i, (begin, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        order = list(runners) if i % 2 == 0 else list(reversed(runners))
        for name in order:
            started = time.perf_counter()
            out = runners[name].run(x[begin:end], steps)
            seconds[name] += time.perf_counter() - started
            readouts[name].append(out.readout)
    return {name: {"seconds": seconds[name], "readout": np.concatenate(readouts[name], axis=1)} for name in runners}


def bench_model(name: str, model: Path, data: Path, args: argparse.Namespace, before: types.ModuleType | None) -> dict[str, Any]:
    steps = args.steps
    log(f"[{name}] building and quantising {model.relative_to(ROOT)}")
    built = build(BuildOptions(model=model, target="loihi", device="cpu"))
    snn, fixed = built.snn, built.fixed
    test = load_dataset(data, "test").subset(args.limit)
    x = snn.network_input(test.x).astype(np.float32)
    labels = np.asarray(test.y)
    result: dict[str, Any] = {"model": str(model.relative_to(ROOT)), "data": test.source, "samples": len(test), "steps": steps}

    emulator = get_target("loihi", device="cpu", fixed=fixed)
    emulator.prepare(fixed)
    result["emulator_plan"] = emulator.emulator.describe(steps)  # type: ignore[union-attr]
    result["emulator_batch_size"] = emulator.emulator.batch_size(steps)  # type: ignore[union-attr]
    floating = get_target("torch", device="cpu")
    floating.prepare(snn)
    warm = x[: min(16, len(x))]
    emulator.run(warm, steps)
    floating.run(warm, steps)

    log(f"[{name}] full test set ({len(x)} samples, T={steps}): emulator and float simulator, interleaved")
    full = interleaved({"emulator": emulator, "float": floating}, x, steps, args.chunks)
    for key in ("emulator", "float"):
        seconds = full[key]["seconds"]
        result[key] = {
            "seconds": round(seconds, 3),
            "ms_per_sample": round(1000 * seconds / len(x), 4),
            "samples_x_steps_per_s": round(len(x) * steps / seconds, 1),
            "accuracy": float((full[key]["readout"][-1].argmax(-1) == labels).mean()),
        }
    result["emulator_vs_float_speed"] = round(full["float"]["seconds"] / full["emulator"]["seconds"], 3)
    result["emulator_float_same_class"] = float(
        (full["emulator"]["readout"][-1].argmax(-1) == full["float"]["readout"][-1].argmax(-1)).mean()
    )

    n = min(args.baseline_samples, len(x))
    runners: dict[str, Any] = {"fast": emulator}
    exact = get_target("loihi", device="cpu", fixed=fixed, arithmetic="int64")
    exact.prepare(fixed)
    runners["int64"] = exact
    if before is not None:
        old = before.make_target(device="cpu", fixed=fixed)
        old.prepare(fixed)
        runners["before"] = WithThreads(old, DEFAULT_THREADS)  # as shipped: torch's default threads
        runners["before_1_thread"] = WithThreads(old, 1)
    runners["float_default_threads"] = WithThreads(floating, DEFAULT_THREADS)
    for runner in runners.values():
        runner.run(warm, steps)
    log(f"[{name}] emulator before / int64 path / fast path on {n} samples, interleaved")
    base = interleaved(runners, x[:n], steps, max(2, args.chunks // 2))
    emulators = [key for key in base if not key.startswith("float")]
    result["baseline"] = {
        "samples": n,
        "revision": args.baseline_rev if before is not None else None,
        "default_threads": DEFAULT_THREADS,
        **{f"{key}_ms_per_sample": round(1000 * base[key]["seconds"] / n, 4) for key in base},
        **{f"speedup_vs_{key}": round(base[key]["seconds"] / base["fast"]["seconds"], 2) for key in base if key != "fast"},
        "same_readout_bits": all(np.array_equal(base[key]["readout"], base["fast"]["readout"]) for key in emulators),
    }

    result["lava"] = bench_lava(fixed, x[: args.lava_samples], steps, emulator, name)
    result["lava_vs_emulator_speed"] = round(1000 * result["lava"]["seconds_per_sample"] / result["emulator"]["ms_per_sample"], 1)
    return result


def bench_lava(fixed: Any, x: np.ndarray, steps: int, emulator: Any, name: str) -> dict[str, Any]:
    from toolchain.validate import validate

    log(f"[{name}] Lava fixed_pt: {len(x)} samples streamed through one network")
    lava = get_target("lava", fixed=fixed)
    lava.prepare(fixed)
    started = time.perf_counter()
    try:
        out = lava.run(x, steps)
    finally:
        lava.close()
    total = time.perf_counter() - started
    expected = emulator.run(x, steps)
    streamed = {
        "samples": len(x),
        "build_seconds": round(float(lava.build_seconds or 0.0), 3),
        "startup_seconds": round(float(lava.startup_seconds or 0.0), 3),
        "seconds_per_sample": round(float(lava.seconds_per_sample or 0.0), 4),
        "total_seconds": round(total, 3),
        "readout_equals_emulator": bool(np.array_equal(out.readout, expected.readout)),
    }
    log(f"[{name}] validate: {len(x)} samples, every IF layer, every step")
    report = validate(fixed, x, steps)
    streamed["validation"] = {
        "ok": report.ok,
        "summary": report.summary(),
        "spikes_compared": report.spikes_compared,
        "layers": report.layers,
        "readout_equal": report.readout_equal,
        "seconds_per_sample_recording": round(report.lava_seconds_per_sample, 4),
        "emulator_seconds_recording": round(report.emulator_seconds, 4),
    }
    return streamed


# ------------------------------------------------------------------ report


def machine() -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        **describe_machine(),
        "numpy": np.__version__,
        "lava-nc": version("lava-nc"),
        "torch_threads_float_simulator": torch.get_num_threads(),
        "emulator_threads": 1,
    }


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Lava vs the bit-exact emulator vs the float simulator",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores), Python {m['python']}, torch {m['torch']}, numpy {m['numpy']}, "
        f"lava-nc {m['lava-nc']}; float simulator on {m['torch_threads_float_simulator']} thread(s), emulator on "
        f"{m['emulator_threads']}; {m['date']}; load average {m['load_average_at_start']} at start, "
        f"{results['load_average_at_end']} at the end. Written by `bench/lava_speed.py`.",
        "",
        "Throughput in samples x time steps per second on the whole test set, emulator and float simulator",
        "timed interleaved chunk by chunk. Lava: `fixed_pt` on the CPU simulator, one network built once and",
        "samples streamed through it (start-up = compiling and starting the runtime with the first sample).",
        "",
        "| model | samples | T | float sim | emulator | emulator / float | full test set (emulator) | Lava s/sample "
        "| Lava start-up | Lava / emulator time | Lava == emulator |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["models"]:
        lava = r["lava"]
        check = lava["validation"]
        lines.append(
            f"| {r['model']} | {r['samples']} | {r['steps']} | {r['float']['samples_x_steps_per_s']:.0f} "
            f"| {r['emulator']['samples_x_steps_per_s']:.0f} | **{r['emulator_vs_float_speed']:.2f}x** "
            f"| {r['emulator']['seconds']:.1f} s | {lava['seconds_per_sample']:.3f} | {lava['startup_seconds']:.1f} s "
            f"| {r['lava_vs_emulator_speed']:.0f}x | {'yes' if check['ok'] else 'NO'}: {check['spikes_compared']} spike slots, "
            f"{lava['samples']} samples |"
        )
    lines += [
        "",
        "Accuracy on the same runs: "
        + "; ".join(
            f"{r['model']}: float {100 * r['float']['accuracy']:.2f} %, fixed point {100 * r['emulator']['accuracy']:.2f} % "
            f"(same class {100 * r['emulator_float_same_class']:.2f} %)"
            for r in results["models"]
        )
        + ".",
        "",
        "## Emulator speedup (same samples, interleaved, same readout bits)",
        "",
        "ms per sample at T as above; threads: the emulator's fast and int64 paths 1, \"before\" torch's default",
        "(as shipped) and 1, the float simulator torch's default for context.",
        "",
        "| model | samples | before | before, 1 thread | int64 path | fast path | fast vs before | fast vs before, 1 thread "
        "| fast vs int64 | identical bits | float sim, default threads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]

    def cell(b: dict[str, Any], key: str, fmt: str) -> str:
        return format(b[key], fmt) if key in b else "n/a"

    for r in results["models"]:
        b = r["baseline"]
        lines.append(
            f"| {r['model']} | {b['samples']} | {cell(b, 'before_ms_per_sample', '.2f')} "
            f"| {cell(b, 'before_1_thread_ms_per_sample', '.2f')} | {b['int64_ms_per_sample']:.2f} "
            f"| {b['fast_ms_per_sample']:.2f} "
            f"| **{cell(b, 'speedup_vs_before', '.1f')}x** | {cell(b, 'speedup_vs_before_1_thread', '.1f')}x "
            f"| {b['speedup_vs_int64']:.1f}x | {'yes' if b['same_readout_bits'] else 'NO'} "
            f"| {b['float_default_threads_ms_per_sample']:.2f} |"
        )
    lines += [
        "",
        f"\"before\" is `targets/loihi/emulator.py` at {results['baseline_rev'][:7]} (batch 256), torch's default threads: "
        f"{results['models'][0]['baseline']['default_threads'] if results['models'] else '?'}. The fast path's per-layer",
        "arithmetic (from `Emulator.describe`, for T as above):",
        "",
    ]
    for r in results["models"]:
        rows = ", ".join(
            f"{p['layer']}: {p['synapse']}/{p['membrane']}{' checked' if p['saturation_checks'] else ''}"
            for p in r["emulator_plan"]
        )
        lines.append(f"- {r['model']} (batch {r['emulator_batch_size']}): {rows}")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-T", "--steps", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="test samples (default: all)")
    parser.add_argument("--chunks", type=int, default=10, help="interleaving pieces of the test set")
    parser.add_argument("--baseline-samples", type=int, default=500)
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    parser.add_argument("--lava-samples", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the float simulator")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lava_speed")
    args = parser.parse_args(argv)
    logging.getLogger("toolchain.passes.calibrate").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"machine": machine(), "baseline_rev": args.baseline_rev, "models": []}
    before = baseline_module(args.baseline_rev)
    for name, model, data in MODELS:
        if not model.exists() or not data.exists():
            log(f"[{name}] skipped: {model} or {data} is missing")
            continue
        results["models"].append(bench_model(name, model, data, args, before))
    results["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    write_results(args.out, results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
