"""The one exception type users see: a message that names the file or node and what to do."""


class ToolchainError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line and exits 2."""

    exit_code = 2
