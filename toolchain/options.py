"""Checks of command-line options against each other and against the model, before any work.

Every message names the option and what to give instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from toolchain.core.ir import Preprocess
from toolchain.errors import ToolchainError


def check_preprocess_options(scale: float | None, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    """--scale, --mean, --std as numbers: finite, and positive where they divide or scale."""
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ToolchainError(f"--scale {scale}: must be a finite positive number (e.g. 0.00392 for 1/255)")
    if mean is not None and not all(math.isfinite(v) for v in mean):
        raise ToolchainError(f"--mean {','.join(map(str, mean))}: every value must be a finite number")
    if std is not None and not all(math.isfinite(v) and v > 0 for v in std):
        raise ToolchainError(f"--std {','.join(map(str, std))}: every value must be a finite positive number")


def input_channels(input_shape: Sequence[int]) -> int | None:
    """The channels that --mean/--std apply to: those of an image input; None for a flat input
    (its channels are those of the data, known only when it is read)."""
    return int(input_shape[0]) if len(input_shape) == 3 else None


def check_preprocess_fits(preprocess: Preprocess, input_shape: Sequence[int], where: str) -> None:
    """The preprocessing (options or the model's metadata) against the model's input channels."""
    check_preprocess_options(preprocess.scale, preprocess.mean, preprocess.std)
    channels = input_channels(input_shape)
    for key, values in (("mean", preprocess.mean), ("std", preprocess.std)):
        if not values:
            raise ToolchainError(f"--{key}: give at least one value")
        if channels is not None and len(values) not in (1, channels):
            raise ToolchainError(
                f"--{key}: {len(values)} values for the {channels} channel(s) of {where}'s input; "
                "give one per channel or one for all"
            )


def check_safe_steps(steps: int, safe: dict[str, int], model: str, explicit: bool) -> None:
    """A build's -T within the steps the fixed-point network is proven free of membrane overflow."""
    if not safe or not explicit:
        return
    layer, bound = min(safe.items(), key=lambda item: item[1])
    if steps > bound:
        raise ToolchainError(
            f"-T {steps}: {model}'s fixed-point layer {layer!r} is proven overflow-free for only {bound} steps; "
            f"use -T {bound} or less"
        )


# The ONNX opsets torch's exporter writes and the frontend reads.
EXPORT_OPSETS = (7, 20)


def check_export_opset(opset: int) -> None:
    low, high = EXPORT_OPSETS
    if not low <= opset <= high:
        raise ToolchainError(f"--opset {opset}: choose an opset from {low} to {high} (default 17)")


def fit_scale_to_data(preprocess: Preprocess, data: Any, scale: float | None) -> Preprocess:
    """Float images already in [0, 1] are not scaled by a model's 1/255 again (that would feed it
    a black image); the user's own --scale always applies."""
    from toolchain.data import is_unit_float

    if scale is not None or preprocess.scale is None or abs(preprocess.scale * 255 - 1) > 1e-6 or not is_unit_float(data):
        return preprocess
    return dataclasses.replace(preprocess, scale=1.0)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (no usage block) naming the option, exit 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {self.prog}: {message} (see {self.prog} --help)\n")
        sys.exit(2)
