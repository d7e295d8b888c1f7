"""The bad-input contract, as test helpers: exit 2, one line naming the culprit, no traceback,
nothing new in or beside the output, every existing file byte-identical."""

from __future__ import annotations

import contextlib
import hashlib
import io
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from toolchain import cli


@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str


def run(*args: str | Path) -> Outcome:
    """`toolchain ARGS` in this process (much faster than a subprocess), leaving the process's
    signal handlers and warning hooks as they were."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    show = warnings.showwarning
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main([str(a) for a in args])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        warnings.showwarning = show
    return Outcome(status, out.getvalue(), err.getvalue())


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder` (hidden ones included) with the sha256 of its bytes."""
    files: dict[str, str] = {}
    for path in sorted(Path(folder).rglob("*")):
        key = str(path.relative_to(folder))
        files[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return files


def assert_refused(outcome: Outcome, *needles: str) -> None:
    assert outcome.status == 2, (outcome.status, outcome.stderr)
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome.stderr
    assert "Traceback" not in outcome.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_contract(outcome: Outcome, before: dict[str, str], folder: Path, *needles: str) -> None:
    """Refused as above, and `folder` exactly as it was."""
    assert_refused(outcome, *needles)
    assert snapshot(folder) == before, "files changed or left behind"


def tiny_model(path: Path, channels: int = 1, classes: int = 4, size: int = 6) -> Path:
    """Conv(3x3) -> Relu -> Flatten -> Gemm on (channels, size, size): builds in milliseconds."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1, name="fc"),
    ]
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((3, channels, 3, 3)).astype(np.float32), "w"),
        onnx.numpy_helper.from_array(np.zeros(3, np.float32), "b"),
        onnx.numpy_helper.from_array(rng.standard_normal((classes, 3 * size * size)).astype(np.float32) * 0.1, "fc"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])
    graph = helper.make_graph(nodes, "tiny", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def tiny_data(path: Path, count: int = 16, channels: int = 1, classes: int = 4, size: int = 6) -> Path:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (count, channels, size, size), dtype=np.uint8)
    np.savez(path, x=x, y=np.arange(count) % classes)
    return path
