"""Command line: export a checkpoint written by `models.train` to the toolchain's ONNX.

    python -m exporters --weights out/mnist_cnn/model.pt --out model.onnx
    python -m exporters --arch cnn_small --act clip --weights state_dict.pt --in-channels 1 \\
        --input-size 28 --mean 0.1307 --std 0.3081 --out model.onnx

A checkpoint from `models.train` carries its architecture, activation and preprocessing;
a plain state_dict needs --arch, --act (and --levels), the input shape and --mean/--std.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def build_parser() -> argparse.ArgumentParser:
    from models.arch import ARCHS
    from models.layers import ACTIVATIONS
    from toolchain.options import OneLineParser

    parser = OneLineParser(prog="toolchain export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="checkpoint (models.train model.pt) or a state_dict file")
    parser.add_argument("--out", required=True, help="ONNX file to write")
    parser.add_argument("--arch", choices=sorted(ARCHS), help="architecture (taken from the checkpoint if there)")
    parser.add_argument("--act", choices=ACTIVATIONS, help="activation (taken from the checkpoint if there)")
    parser.add_argument("--levels", type=int, help="QCFS levels L")
    parser.add_argument("--width", type=int, help="base channel count (vgg_small)")
    parser.add_argument("--in-channels", type=int, help="input channels (default from checkpoint, else 1)")
    parser.add_argument("--num-classes", type=int, help="classes (default from checkpoint, else 10)")
    parser.add_argument("--input-size", type=int, help="input image side (default from checkpoint or architecture)")
    parser.add_argument("--scale", type=float, help="pixel scale of the preprocessing (default 1/255)")
    parser.add_argument("--mean", type=float, nargs="+", help="per-channel mean after scaling")
    parser.add_argument("--std", type=float, nargs="+", help="per-channel std after scaling")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--check-data", help="dataset path whose first test images join the onnxruntime check")
    parser.add_argument("--force", action="store_true", help="overwrite --out even if it is not an ONNX file of ours")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from exporters.onnx_export import ExportError, export_onnx
    from models.arch import DEFAULT_INPUT_SIZE, build
    from models.layers import make_act
    from models.train import CHECKPOINT_FORMAT

    def fail(message: str) -> int:
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return 2

    from toolchain.errors import ToolchainError
    from toolchain.fileio import check_file_replaceable
    from toolchain.options import check_export_opset

    try:  # the options and --out before the weights are read: nothing of the user's is replaced
        check_export_opset(args.opset)
        check_file_replaceable(Path(args.out), is_our_onnx(Path(args.out)), args.force, "--out")
    except ToolchainError as exc:
        return fail(str(exc))
    path = Path(args.weights)
    if not path.is_file():
        return fail(f"{path}: no such weights file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        return fail(f"{path}: cannot read torch weights ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})")
    config: dict = {}
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        config, state = dict(ckpt["config"]), ckpt["state_dict"]
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt
    else:
        return fail(f"{path}: neither a models.train checkpoint nor a state_dict")

    arch = args.arch or config.get("arch")
    act = args.act or config.get("act")
    if arch is None or act is None:
        return fail("a plain state_dict needs --arch and --act")
    levels = args.levels if args.levels is not None else int(config.get("levels") or 0)
    if act == "qcfs" and levels < 1:
        return fail("--levels L (>= 1) is needed with --act qcfs")
    in_channels = args.in_channels or config.get("in_channels", 1)
    num_classes = args.num_classes or config.get("num_classes", 10)
    size = args.input_size or config.get("input_size") or DEFAULT_INPUT_SIZE[arch]
    pre = dict(config.get("preprocess") or {})
    if args.scale is not None:
        pre["scale"] = args.scale
    if args.mean is not None:
        pre["mean"] = args.mean
    if args.std is not None:
        pre["std"] = args.std
    pre.setdefault("scale", 1 / 255)
    pre.setdefault("mean", [0.0] * in_channels)
    pre.setdefault("std", [1.0] * in_channels)

    width = args.width or config.get("width")
    try:
        model = build(arch, in_channels, num_classes, make_act(act, levels or 8), size, width)
    except ValueError as exc:
        return fail(str(exc))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        return fail(f"{path}: weights do not fit {arch} ({first[1].strip() if len(first) > 1 else first[0]})")
    check = None
    if args.check_data:
        from toolchain.data import load_dataset

        try:
            check = load_dataset(args.check_data, "test").x[:64]
        except ToolchainError as exc:
            return fail(str(exc))
    try:
        diff = export_onnx(
            model,
            args.out,
            (in_channels, size, size),
            pre,
            opset=args.opset,
            activation=act,
            levels=levels,
            check_inputs=check,
        )
    except (ExportError, ValueError, ToolchainError) as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"{args.out}: cannot write ({exc.strerror or exc})")
    print(f"wrote {args.out} ({arch}, {act}{f' L={levels}' if act == 'qcfs' else ''}, max abs diff {diff:.3g})")
    return 0


def is_our_onnx(path: Path) -> bool:
    """An ONNX file this exporter wrote (it records the preprocessing in the metadata)."""
    if not path.is_file():
        return False
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
    return any(prop.key == "toolchain.preprocess" for prop in model.metadata_props)


if __name__ == "__main__":
    sys.exit(main())
