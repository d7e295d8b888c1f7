"""The two kinds of failure: the user's (`ToolchainError`) and ours (`InternalError`), and how
messages name an option.

Library code names an option by its library name, the `BuildOptions` field or function
keyword (`maxpool`, `calib`, `device`), through `option()`. From Python that reads as the
keyword (`maxpool=avg`); the command line installs its own spelling (`--maxpool avg`) with
`spelled_as` around a command, derived from its argparse parser, so the library never writes
a CLI flag and every flag the CLI prints is one its parser has.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

# (library name, value or None) -> the text a message shows.
OptionSpelling = Callable[[str, "str | None"], str]


def library_spelling(name: str, value: str | None) -> str:
    """How the Python API names an option: its keyword, `=` the value."""
    return name if value is None else f"{name}={value}"


_spelling: OptionSpelling = library_spelling


def option(name: str, value: object = None) -> str:
    """The option `name` (set to `value`, when given) as the caller's interface spells it."""
    return _spelling(name, None if value is None else str(value))


@contextlib.contextmanager
def spelled_as(spelling: OptionSpelling) -> Iterator[None]:
    """Messages made inside name options with `spelling` (the CLI's flags); restored after."""
    global _spelling
    saved, _spelling = _spelling, spelling
    try:
        yield
    finally:
        _spelling = saved


class ToolchainError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line and exits 2.
    The message names the file, node or option (`option()`) and what to do."""

    exit_code = 2


class InternalError(Exception):
    """A bug in the toolchain met while handling valid-looking input (the message says where).
    The CLI says so in one line, writes the full traceback to a file it names, and exits 3."""

    exit_code = 3


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line (or its type where it has no text), for a one-line message."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
