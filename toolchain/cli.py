"""`toolchain` command line: build, eval, inspect, report, export.

Every user-facing failure is a `ToolchainError`: printed as one line on stderr, exit 2,
no traceback, nothing half-written. Anything else is a bug of ours (`InternalError`, or an
exception we did not expect): one line that says so and names the file holding the full
traceback, exit 3.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from targets import TARGETS, target_class
from toolchain.errors import InternalError, OptionSpelling, ToolchainError, library_spelling, one_line, spelled_as

DEFAULT_STEPS = "1,2,4,8,16,32,64"
BUILD_STEPS = 32


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _count(minimum: int) -> Any:
    """An argparse type: an integer >= minimum (a batch size of 0, a negative --limit or -T)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _add_preprocess_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", type=float, help="multiply raw inputs by this (default: model metadata, else 1/255 for uint8)")
    parser.add_argument("--mean", type=_floats, help="per-channel mean subtracted after scaling, e.g. 0.4914,0.4822,0.4465")
    parser.add_argument("--std", type=_floats, help="per-channel std divided after subtracting the mean")


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="torch device: auto (CUDA when present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--batch-size", type=_count(1), default=128)


def build_parser() -> argparse.ArgumentParser:
    from toolchain.options import OneLineParser

    parser = OneLineParser(prog="toolchain", description="Convert ONNX ANNs into low-latency spiking networks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every stage")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="ONNX model -> calibrated SNN artifact")
    build.add_argument("model", type=Path, help="the trained ANN as an ONNX file")
    build.add_argument("--target", default="torch", choices=tuple(TARGETS))
    build.add_argument("-o", "--out", type=Path, required=True, help="artifact folder to write")
    build.add_argument("--calib", type=Path, help="calibration data (IDX folder, CIFAR folder/.tar.gz, .npz)")
    build.add_argument("--calib-split", default="train", choices=("train", "test"))
    build.add_argument("--calib-size", type=_count(0), default=1000, help="calibration samples (spread over the split; 0: all)")
    build.add_argument("--threshold", default="auto", help="auto | ceiling | max | pXX.XX (default auto: ceilings, else p99.99)")
    build.add_argument("--per-channel", action="store_true", help="one threshold per channel instead of per layer")
    build.add_argument(
        "--v0",
        default="half",
        choices=("zero", "half", "optimal"),
        help="initial membrane potential: theta/2 (the paper), zero, or optimal: fitted to the ANN per layer "
        "and channel on --calib data at --v0-T steps (best at low T)",
    )
    build.add_argument("--v0-T", dest="v0_steps", type=_count(1), default=16, help="time steps the optimal v0 search aims at")
    build.add_argument(
        "--maxpool", default=None, choices=("spiking", "relu", "avg", "error"),  # passes.convert.MAXPOOL_POLICIES
        help="max pooling in the SNN: spiking (float targets' default), relu (IF neurons, max(a,b) = b + relu(a-b); "
        "the loihi/lava default), avg (changes the ANN) or error",
    )
    build.add_argument(
        "-T", "--steps", type=_count(1),
        help=f"the latency budget: time steps --calibrate fits the SNN for, and the checks after the build run "
        f"(default {BUILD_STEPS})",
    )  # fmt: skip
    build.add_argument(
        "--calibrate",
        default="auto",
        help="fit the SNN to the ANN at -T on --calib data, layer by layer: auto (weight,threshold,v0 on "
        "layers without trained ceilings), none, or a list of weight,threshold,bias,v0 (every layer)",
    )
    build.add_argument(
        "--residual-weights", default="auto", choices=("auto", "on", "off"),  # passes.quantize.RESIDUAL_POLICIES
        help="loihi/lava: a second 8-bit synapse holding a synapse's rounding error (about 15-bit weights, twice "
        "its synaptic memory); auto: where one weight step exceeds 1/64 of the neuron's threshold",
    )  # fmt: skip
    build.add_argument("--data", type=Path, help="test data for --validate and the accuracy summary")
    build.add_argument("--validate", type=_count(0), default=0, metavar="N", help="lava: compare N samples spike for spike")
    build.add_argument("--report", action="store_true", help="also write a report (needs --data)")
    build.add_argument("--force", action="store_true", help="replace -o even if it is not an earlier, intact artifact")
    _add_preprocess_flags(build)
    _add_run_flags(build)

    evaluate = commands.add_parser("eval", help="accuracy of an artifact at each T, beside the ANN")
    evaluate.add_argument("artifact", type=Path)
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument("--split", default="test", choices=("train", "test"))
    evaluate.add_argument("-T", "--steps", default=DEFAULT_STEPS, help=f"comma-separated time steps (default {DEFAULT_STEPS})")
    evaluate.add_argument("--target", default="torch", choices=tuple(TARGETS))
    evaluate.add_argument("--limit", type=_count(1), help="only the first N samples")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate.add_argument("--no-ann", action="store_true", help="skip the onnxruntime ANN reference")
    evaluate.add_argument(
        "--distributed", action="store_true",
        help="shard the data over torchrun's processes (on by itself under torchrun with WORLD_SIZE > 1)",
    )  # fmt: skip
    _add_preprocess_flags(evaluate)
    _add_run_flags(evaluate)

    report = commands.add_parser("report", help="spike counts, synaptic operations and energy estimates (md, json, html)")
    report.add_argument("artifact", type=Path)
    report.add_argument("--data", type=Path, required=True)
    report.add_argument("--split", default="test", choices=("train", "test"))
    report.add_argument("-T", "--steps", type=int, default=32, help="time steps of the report (accuracy also at 1, 2, 4, ...)")
    report.add_argument("--target", default="torch", choices=tuple(TARGETS))
    report.add_argument("--format", choices=("md", "json", "html"), help="default: from -o's suffix, else md")
    report.add_argument("-o", "--out", type=Path, help="file to write (needed for html; md writes its plots beside it)")
    report.add_argument("--energy-model", type=Path, help="JSON or TOML file overriding energy constants")
    report.add_argument("--limit", type=_count(1), help="only the first N samples")
    report.add_argument("--no-ann", action="store_true", help="skip the onnxruntime ANN reference")
    report.add_argument("--force", action="store_true", help="overwrite -o even if it is not a report of ours")
    _add_preprocess_flags(report)
    _add_run_flags(report)

    inspect = commands.add_parser("inspect", help="table of an artifact's layers")
    inspect.add_argument("artifact", type=Path)
    inspect.add_argument("--json", action="store_true")

    commands.add_parser("export", help="torch model -> ONNX (see `toolchain export --help`)", add_help=False)
    return parser


# ---------------------------------------------------------------- commands


def cmd_build(args: argparse.Namespace) -> int:
    from toolchain.build import BuildOptions, TargetMismatch, artifact_files, build, check_test_data
    from toolchain.core.ir import graph_files
    from toolchain.data import load_dataset
    from toolchain.fileio import StagedDirectory, check_replaceable, refuse_inside
    from toolchain.options import check_preprocess_options, check_safe_steps

    steps_given = args.steps is not None
    args.steps = args.steps if steps_given else BUILD_STEPS
    options = BuildOptions(
        model=args.model,
        out=args.out,
        target=args.target,
        calib=args.calib,
        calib_split=args.calib_split,
        calib_size=args.calib_size,
        threshold=args.threshold,
        per_channel=args.per_channel,
        v0=args.v0,
        v0_steps=args.v0_steps,
        maxpool=args.maxpool,
        steps=args.steps,
        calibrate=args.calibrate,
        residual_weights=args.residual_weights,
        scale=args.scale,
        mean=args.mean,
        std=args.std,
        device=args.device,
        batch_size=args.batch_size,
    )
    if (args.validate or args.report) and args.data is None:
        raise ToolchainError("--validate and --report run test samples: pass --data DATA")
    if args.validate and args.target != "lava":
        raise ToolchainError("--validate compares Lava with the emulator: use it with --target lava")
    target_class(args.target)  # fails early, with what to install, where the target cannot run (Lava)
    check_preprocess_options(args.scale, args.mean, args.std)
    # Before any work: -o must not name the user's own files, nor hold the inputs.
    check_replaceable(args.out, force=args.force)
    refuse_inside(args.out, [args.model, args.calib, args.data])
    # Read the test data, and open the ANN in onnxruntime, before anything is written: a bad --data
    # path or a model onnxruntime cannot run (an opset newer than it knows) must leave no artifact.
    test = load_dataset(args.data, "test") if args.data is not None else None
    ann = None
    if test is not None:
        from toolchain.onnx_reference import OnnxReference

        ann = OnnxReference(args.model)
    try:
        result = build(options)
    except TargetMismatch as exc:  # say which option chose the target that cannot run this model
        raise ToolchainError(f"{exc} (--target {args.target})") from None
    if test is not None:  # the test data against the built network, before anything is written
        check_test_data(test, result, args.model)
    fixed = result.fixed
    if fixed is not None:
        safe = {row["layer"]: row["safe_steps"] for row in result.log["fixed_point"]}
        check_safe_steps(args.steps, safe, str(args.model), steps_given)
    # Everything is written into a staging folder beside -o, checked there, and swapped in at the end.
    with StagedDirectory(args.out, force=args.force) as stage:
        stage.write_all({**graph_files(result.snn), **artifact_files(result, options)})
        out = stage.path
        status = _print_build(args, result, fixed)
        if args.data is not None:
            status = _check_build(args, out, result, fixed, test, ann)
        flush_stdout()  # a full stdout fails the build before -o is replaced
        stage.commit()
    return status


def flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except OSError as exc:
        raise ToolchainError(f"stdout: cannot write ({exc.strerror or exc})") from None


def _print_build(args: argparse.Namespace, result: Any, fixed: Any) -> int:
    print(f"wrote {args.out} ({len(result.snn.nodes)} nodes, target {args.target})")
    for layer in result.log["layers"]:
        silent = layer.get("silent_channels", 0)
        source = layer["source"] + (f"; {silent} channels never active on the calibration data" if silent else "")
        print(
            f"  {layer['name']:<28} theta {layer['threshold_min']:.4g}..{layer['threshold_max']:.4g}"
            f"  v0 {layer['v0_fraction']:.2f} theta  ({source})"
        )
    if fixed is not None:
        print("fixed point (8-bit weight mantissas, 24-bit membrane):")
        for row in result.log["fixed_point"]:
            print(
                f"  {row['layer']:<28} {row['synapse']:<12} threshold {row['threshold']:>5}  2^{row['weight_exp']:<3}"
                f" weight error {100 * row['weight_rel_l2']:.2f} %  overflow-free for {row['safe_steps']} steps"
            )
        from toolchain.report.resources import fit_lines

        for line in fit_lines(result.log):
            print(line)
    return 0


def _check_build(args: argparse.Namespace, out: Path, result: Any, fixed: Any, test: Any, ann: Any) -> int:
    """After a build with --data: accuracy at T beside the ANN, Lava validation, report; `out` is the
    staging folder (the fixed-point network is the one in memory: the folder has no manifest yet)."""
    from toolchain.backends import get_target
    from toolchain.evaluate import evaluate
    from toolchain.options import fit_scale_to_data
    from toolchain.report import SpikeMapRecorder

    graph = result.snn
    preprocess = fit_scale_to_data(graph.preprocess, test, args.scale)
    steps = sorted({1, 2, 4, 8, 16, args.steps} - {t for t in (1, 2, 4, 8, 16) if t > args.steps})
    runs, recorders = {}, {}
    for name in ("torch", "loihi") if fixed is not None else ("torch",):
        fixed_option = {"fixed": fixed} if name == "loihi" else {}
        recorders[name] = target = SpikeMapRecorder(get_target(name, device=args.device, **fixed_option))
        target.prepare(graph)
        runs[name] = evaluate(target, test, preprocess, graph.input_shape, steps, args.batch_size, ann,
                              label=f"{name} T={args.steps}")
    ann_accuracy = runs["torch"].ann_accuracy()
    print(f"accuracy on {test.source}, {len(test)} samples, T={args.steps}:")
    print(f"  ANN (onnxruntime)        {100 * ann_accuracy:6.2f} %")
    print(f"  SNN float (torch)        {100 * runs['torch'].snn_accuracy()[args.steps]:6.2f} %")
    if "loihi" in runs:
        print(f"  SNN fixed point (loihi)  {100 * runs['loihi'].snn_accuracy()[args.steps]:6.2f} %")
    if result.log.get("latency_calibration"):  # fitted for T: does it hold at T/2 and 2T? (a plain run: no spike maps)
        near = sorted({max(1, args.steps // 2), 2 * args.steps} - {args.steps})
        plain = get_target("torch", device=args.device)
        plain.prepare(graph)
        accuracy = evaluate(plain, test, preprocess, graph.input_shape, near, args.batch_size, None,
                            label=f"torch T={'/'.join(map(str, near))}").snn_accuracy()  # fmt: skip
        print(f"  SNN float, calibrated for T={args.steps}, at T={' / '.join(map(str, near))}: "
              + " / ".join(f"{100 * accuracy[t]:.2f}" for t in near) + " %")
    gap = ann_accuracy - runs["torch"].snn_accuracy()[args.steps]
    hint = accuracy_hint(args, gap, result.log["layers"], result.log.get("latency_calibration"))
    if hint:
        print(hint)
    if "loihi" in runs and args.residual_weights != "on":
        fixed_gap = runs["torch"].snn_accuracy()[args.steps] - runs["loihi"].snn_accuracy()[args.steps]
        if 100 * fixed_gap > FIXED_HINT_GAP_POINTS:
            print(f"hint: the fixed-point SNN is {100 * fixed_gap:.1f} points below the float SNN; try "
                  "--residual-weights on (a second 8-bit synapse holds each weight's rounding error: twice the "
                  "synaptic memory)")
    status = 0
    if args.validate:
        from toolchain.validate import validate

        x = preprocess.apply(test.x[: args.validate]).reshape((-1, *graph.input_shape))
        check = validate(fixed, x, args.steps)
        print(f"lava validation: {check.summary()}")
        print(f"  lava {check.lava_seconds_per_sample:.2f} s/sample (start-up {check.lava_startup_seconds:.1f} s), "
              f"emulator {check.emulator_seconds / max(1, check.samples) * 1000:.2f} ms/sample")
        status = 0 if check.ok else 1
    if args.report:
        from toolchain.report import write_report

        report_target = "loihi" if "loihi" in runs else "torch"
        for fmt in ("html", "md", "json"):
            write_report(args.out, runs[report_target], graph, fmt, out / f"report.{fmt}", target=report_target,
                         data=test.source, spike_maps=recorders[report_target].maps)
        path = args.out / "report.html"
        print(f"report: {path} (also report.md, report.json)")
    return status


# An SNN this far below its ANN (points of accuracy) at the build's T gets the hint below.
HINT_GAP_POINTS = 1.0
FIXED_HINT_GAP_POINTS = 0.3  # fixed point against float beyond this: 8-bit weights are the usual cause


def accuracy_hint(
    args: argparse.Namespace, gap: float, layers: list[dict[str, Any]], calibration: dict[str, Any] | None
) -> str | None:
    """What to try when the float SNN lags its ANN at the build's T: the conversion options not used yet."""
    if 100 * gap <= HINT_GAP_POINTS:
        return None
    tries = []
    sources = [layer["source"] for layer in layers]
    if calibration is not None and "bias" not in calibration["methods"]:
        from toolchain.passes.calibrate_latency import METHODS

        methods = ",".join(m for m in METHODS if m in calibration["methods"] or m == "bias")
        tries.append(f"--calibrate {methods} (also corrects each channel's input bias, per layer, at this T)")
    elif calibration is None and args.calibrate == "none" and any(s != "ceiling" for s in sources):
        tries.append(f"leaving out --calibrate none (fits weights, thresholds and v0 to the ANN at T={args.steps})")
    elif calibration is None and args.v0 != "optimal":
        tries.append(f"--v0 optimal --v0-T {args.steps} (fits v0 to the ANN at this T)")
    # `auto` already takes its data thresholds per channel: suggest --per-channel only where it acts.
    if any(s != "ceiling" and "per channel" not in s for s in sources):
        tries.append("--per-channel (one threshold per channel: batch-normalised models often need it)")
    if "ceiling" in sources:
        tries.append(
            "--threshold p99.99 --per-channel --calib DATA (if the clip ceilings are fixed, like ReLU6, not trained)"
        )
    advice = "; ".join(tries) if tries else "a larger -T, or retraining with clipped ReLU (python -m models.train)"
    return f"hint: the SNN is {100 * gap:.1f} points below the ANN at T={args.steps}; try {advice}"


def _load_artifact_and_data(args: argparse.Namespace) -> tuple[Any, Any]:
    from toolchain.build import apply_preprocess_overrides
    from toolchain.core.ir import load_graph
    from toolchain.data import check_class_names, load_dataset
    from toolchain.options import check_preprocess_fits, check_preprocess_options, fit_scale_to_data

    check_preprocess_options(args.scale, args.mean, args.std)
    graph = load_graph(args.artifact)
    graph.preprocess = apply_preprocess_overrides(graph.preprocess, args.scale, args.mean, args.std)
    check_preprocess_fits(graph.preprocess, graph.input_shape, str(args.artifact))
    data = load_dataset(args.data, args.split).subset(args.limit)
    check_class_names(data, graph.meta.get("classes"), str(args.artifact))
    graph.preprocess = fit_scale_to_data(graph.preprocess, data, args.scale)
    return graph, data


def cmd_eval(args: argparse.Namespace) -> int:
    from toolchain.backends import open_target
    from toolchain.build import ANN_FILE
    from toolchain.distributed import launched_by_torchrun, session
    from toolchain.evaluate import evaluate, parse_steps
    from toolchain.onnx_reference import OnnxReference

    steps = parse_steps(args.steps)
    graph, data = _load_artifact_and_data(args)
    with session(args.distributed or launched_by_torchrun(), args.device) as ranks:
        target = open_target(args.target, args.artifact, ranks.device)
        try:
            target.prepare(graph)
            ann_path = args.artifact / ANN_FILE
            ann = OnnxReference(ann_path) if ann_path.is_file() and not args.no_ann else None
            result = ranks.combine(evaluate(
                target, ranks.shard(data), graph.preprocess, graph.input_shape, steps, args.batch_size, ann,
                progress=False if args.json or not ranks.is_main else None, label=f"{args.target} T={max(steps)}",
            ))  # fmt: skip
        finally:
            target.close()  # the Lava runtime holds OS processes
    if not ranks.is_main:
        return 0
    if args.json:
        print(json.dumps({"artifact": str(args.artifact), "target": args.target, **result.to_json()}, indent=1))
    else:
        print(format_eval_table(result, f"{args.artifact} on {data.source}, target {args.target}"))
    return 0


def format_eval_table(result: Any, title: str) -> str:
    lines = [title, f"samples: {result.samples}"]
    ann = result.ann_accuracy()
    if ann is not None:
        lines.append(f"ANN accuracy (onnxruntime): {100 * ann:.2f} %")
    lines.append(f"{'T':>5} {'SNN acc %':>10} {'SNN-ANN':>8} {'agree %':>8} {'spikes/sample':>14}")
    for t, accuracy in result.snn_accuracy().items():
        gap = f"{100 * (accuracy - ann):+.2f}" if ann is not None else "-"
        agree = f"{100 * result.agreement[t] / max(1, result.samples):.2f}" if result.agreement else "-"
        spikes = sum(result.spikes_per_sample(t).values())
        lines.append(f"{t:>5} {100 * accuracy:>10.2f} {gap:>8} {agree:>8} {spikes:>14.1f}")
    lines.append(f"({result.seconds:.1f} s)")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    from toolchain.core.ir import load_graph
    from toolchain.inspect import format_rows, inspect_rows

    graph = load_graph(args.artifact)
    rows = inspect_rows(graph)
    print(json.dumps(rows, indent=1) if args.json else format_rows(graph, rows))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from toolchain.report.command import run

    return run(args)


def cmd_export(argv: list[str]) -> int:
    from exporters.__main__ import main as export_main

    return export_main(argv)


COMMANDS = {"build": cmd_build, "eval": cmd_eval, "inspect": cmd_inspect, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    from toolchain import faults

    argv = list(sys.argv[1:] if argv is None else argv)
    faults.install()
    try:
        if argv and argv[0] == "export":
            return cmd_export(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s"
        )
        with spelled_as(flag_spelling(parser)):  # library messages name our flags
            status = COMMANDS[args.command](args)
        flush_stdout()
        return status
    except ToolchainError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)  # one line, whatever a library said
        if str(error).startswith("stdout:"):
            faults.silence_stdout()
        return error.exit_code
    except KeyboardInterrupt as interrupt:
        print("interrupted", file=sys.stderr)
        return faults.exit_status(interrupt)
    except BrokenPipeError:
        # The reader went away (`toolchain inspect OUT | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as error:  # a full disk, a read-only folder, an unreadable file, a full stdout
        if faults.stdout_failed() or faults.is_write_without_path(error):
            faults.silence_stdout()
            print(f"error: stdout: cannot write ({error.strerror or error})", file=sys.stderr)
        else:
            print(f"error: {faults.describe(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - a bug of ours: one line, the traceback kept in a file
        path = write_traceback(error)
        kind = "internal error" if isinstance(error, InternalError) else f"internal error ({type(error).__name__})"
        print(f"{kind}: {one_line(error)}; this is a bug in the toolchain, not in your input: "
              f"please report it with the traceback written to {path}", file=sys.stderr)  # fmt: skip
        return InternalError.exit_code


def option_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's library name (its argparse dest, the `BuildOptions` field) -> the flag the
    messages show (its first spelling: `--maxpool`, `-T`), over every subcommand."""
    flags: dict[str, str] = {}
    parsers = [parser]
    while parsers:
        current = parsers.pop(0)
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            elif action.option_strings and action.dest not in flags:
                flags[action.dest] = action.option_strings[0]
    return flags


def flag_spelling(parser: argparse.ArgumentParser) -> OptionSpelling:
    """Library messages' options as this command line's flags: `maxpool=avg` -> `--maxpool avg`."""
    flags = option_flags(parser)

    def spell(name: str, value: str | None) -> str:
        flag = flags.get(name)
        if flag is None:  # not an option of ours (tests/test_option_names.py keeps this from happening)
            return library_spelling(name, value)
        return flag if value is None else f"{flag} {value}"

    return spell


def write_traceback(error: BaseException) -> Path:
    """The full traceback, in a fresh file of the temporary folder (never among the user's files)."""
    import tempfile
    import traceback

    handle, name = tempfile.mkstemp(prefix="toolchain-traceback-", suffix=".txt")
    with os.fdopen(handle, "w") as file:
        file.write(f"toolchain {' '.join(sys.argv[1:])}\n\n")
        file.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    return Path(name)


if __name__ == "__main__":
    sys.exit(main())
