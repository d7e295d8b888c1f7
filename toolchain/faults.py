"""What the command line does about the world outside the user's input: signals, OS errors,
a full or closed stdout, and warnings of the libraries it drives."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import warnings
from types import FrameType
from typing import Any

log = logging.getLogger("toolchain")


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) raised where the program is, like SIGINT: staging folders are removed
    on the way out by the same `except`/`with` blocks."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def install() -> None:
    """SIGTERM/SIGHUP as KeyboardInterrupt; warnings as log records (-v shows them), never raw lines
    (onnxruntime's own C++ log is set to errors only where a session is made, `toolchain.onnx_reference`)."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(signum, _raise_terminated)
        except (ValueError, OSError):  # not the main thread
            pass
    warnings.showwarning = _log_warning


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, *rest: Any) -> None:
    log.info("%s: %s", category.__name__, str(message).splitlines()[0] if str(message) else "")


def exit_status(interrupt: KeyboardInterrupt) -> int:
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


def stdout_failed() -> bool:
    """Whether stdout is what cannot be written (a full device, a closed pipe)."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        return True
    return False


def is_write_without_path(error: OSError) -> bool:
    """A failed write that names no file: every file write of ours names its path, so this is stdout
    (a full device), whose buffer the first failed flush has already dropped."""
    return error.filename is None and error.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG)


def silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush at exit cannot fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def describe(error: OSError) -> str:
    """One line naming the path and the cause."""
    cause = error.strerror or type(error).__name__
    if error.filename is not None:
        second = f" -> {error.filename2}" if error.filename2 else ""
        return f"{error.filename}{second}: {cause}"
    return cause
