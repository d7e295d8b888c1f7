"""The registry of ONNX op handlers, keyed by (op type, opset version the handler is valid from).

As in the ONNX reference ops and onnx2torch, an op whose meaning changed at some opset has one
handler per version range: `handler_for` picks the newest handler whose `since` is at most the
model's opset. Registering the same (op type, since) twice is a bug and fails at import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import onnx

if TYPE_CHECKING:
    from toolchain.passes.frontend.builder import Builder

Handler = Callable[["Builder", onnx.NodeProto], None]
HANDLERS: dict[tuple[str, int], Handler] = {}


def handles(*op_types: str, since: int = 1) -> Callable[[Handler], Handler]:
    """Register a handler for `op_types` at opsets >= `since` (until a handler with a later `since`)."""

    def register(function: Handler) -> Handler:
        for op_type in op_types:
            key = (op_type, since)
            if key in HANDLERS:
                raise RuntimeError(
                    f"{op_type} from opset {since} has two handlers: {HANDLERS[key].__qualname__} and {function.__qualname__}"
                )
            HANDLERS[key] = function
        return function

    return register


def handler_for(op_type: str, opset: int) -> Handler | None:
    """The handler for `op_type` in a model of default-domain `opset`, or None where there is none."""
    versions = [since for (op, since) in HANDLERS if op == op_type and since <= opset]
    return HANDLERS[(op_type, max(versions))] if versions else None


def supported_ops() -> tuple[str, ...]:
    return tuple(sorted({op for op, _ in HANDLERS}))
