"""The one exception type users see: a message that names the file or node and what to do."""


class ToolchainError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line and exits 2."""

    exit_code = 2


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line (or its type where it has no text), for a one-line message."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
