"""`toolchain report`: evaluate an artifact at T = 1, 2, 4, ..., T and write the report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toolchain.errors import ToolchainError


def run(args: argparse.Namespace) -> int:
    from toolchain.backends import open_target
    from toolchain.build import ANN_FILE
    from toolchain.cli import _load_artifact_and_data
    from toolchain.evaluate import evaluate
    from toolchain.onnx_reference import OnnxReference
    from toolchain.report import FORMATS, SpikeMapRecorder, format_from_path, load_energy_model, report_steps, write_report

    fmt = args.format or format_from_path(args.out)
    if fmt not in FORMATS:
        raise ToolchainError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "html" and args.out is None:
        raise ToolchainError("an HTML report is a file: pass -o report.html (or use --format md / json for stdout)")
    if args.limit is not None and args.limit < 1:
        raise ToolchainError(f"--limit {args.limit}: give a positive number of samples")
    if args.batch_size < 1:
        raise ToolchainError(f"--batch-size {args.batch_size}: must be positive")
    steps = report_steps(args.steps)
    if args.out is not None:  # before the long run: -o (and the plots beside it) must be new or ours
        check_report_outputs(Path(args.out), fmt, args.force)
    model = load_energy_model(args.energy_model)  # fail on a bad file before the long run
    graph, data = _load_artifact_and_data(args)
    if not graph.is_snn:
        raise ToolchainError(f"{args.artifact}: holds an ANN graph, not a converted SNN; run `toolchain build` first")
    if len(data) == 0:
        raise ToolchainError(f"{args.data}: no samples to evaluate")
    inner = open_target(args.target, args.artifact, args.device)
    target = SpikeMapRecorder(inner)
    ann_path = args.artifact / ANN_FILE
    ann = OnnxReference(ann_path) if ann_path.is_file() and not args.no_ann else None
    quiet = fmt == "json" or not sys.stderr.isatty()
    try:
        target.prepare(graph)
        evaluation = evaluate(
            target, data, graph.preprocess, graph.input_shape, steps, args.batch_size, ann,
            progress=False if quiet else None, label=f"{args.target} T={max(steps)}",
        )
    finally:
        inner.close()  # the Lava runtime holds OS processes
    result = write_report(
        args.artifact, evaluation, graph, fmt, args.out, energy_model=model, target=args.target,
        spike_maps=target.maps, data=data.source,
    )
    if args.out is None:
        sys.stdout.write(str(result))
    else:
        print(f"wrote {result}", file=sys.stderr)
    return 0


def check_report_outputs(out: Path, fmt: str, force: bool) -> None:
    """A report may replace only an earlier report of ours (and its plots), never an artifact's own
    files or anything else of the user's, without --force."""
    from toolchain.fileio import check_file_replaceable, is_our_report
    from toolchain.report import plot_files

    paths = [out] + ([out.parent / name for name in plot_files(out).values()] if fmt == "md" else [])
    for path in paths:
        check_file_replaceable(path, is_our_report(path), force)
