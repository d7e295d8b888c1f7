"""The two kinds of failure: the user's (`ToolchainError`) and ours (`InternalError`)."""


class ToolchainError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line and exits 2.
    The message names the file, node or option and what to do."""

    exit_code = 2


class InternalError(Exception):
    """A bug in the toolchain met while handling valid-looking input (the message says where).
    The CLI says so in one line, writes the full traceback to a file it names, and exits 3."""

    exit_code = 3


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line (or its type where it has no text), for a one-line message."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
