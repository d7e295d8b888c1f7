"""Library code names options by their library name; every flag a message advises exists.

Read from the source (every string a module can print), so a message added later is held
to the same rule: the core, the passes, the backends and the build name no CLI flag (they
call `toolchain.errors.option`), each `option(...)` names an option the CLI has, and each
`--flag` the CLI side writes is one of its parser's.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from toolchain.cli import build_parser, flag_spelling, option_flags
from toolchain.errors import ToolchainError, option, spelled_as

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [
    *sorted((ROOT / "toolchain" / "core").rglob("*.py")),
    *sorted((ROOT / "toolchain" / "passes").rglob("*.py")),
    *sorted((ROOT / "targets").rglob("*.py")),
    ROOT / "toolchain" / "build.py",
    ROOT / "toolchain" / "onnx_reference.py",
]
# Modules that speak for the command line and may write its flags.
CLI_SIDE = [ROOT / "toolchain" / "cli.py", ROOT / "toolchain" / "report" / "command.py",
            ROOT / "toolchain" / "report" / "__init__.py", ROOT / "toolchain" / "distributed.py"]  # fmt: skip
NOT_OURS = {"--standalone", "--nproc_per_node"}  # torchrun's, advised by toolchain/distributed.py
FLAG = re.compile(r"(?<![\w-])--[a-z][A-Za-z0-9_-]*")


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def message_strings(path: Path) -> list[tuple[int, str]]:
    """Every string literal of a module outside docstrings (f-string pieces included), with its line."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = _docstrings(tree)
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def option_calls(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        (node.lineno, node.args[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "option"
        and node.args and isinstance(node.args[0], ast.Constant)
    ]  # fmt: skip


def test_library_messages_name_no_cli_flag():
    found = [
        f"{path.relative_to(ROOT)}:{line}: {text!r}"
        for path in LIBRARY
        for line, text in message_strings(path)
        if FLAG.search(text)
    ]
    assert not found, "library code names CLI flags (use toolchain.errors.option):\n" + "\n".join(found)


def test_every_option_named_is_a_cli_option():
    flags = option_flags(build_parser())
    calls = [(path, line, name) for path in LIBRARY + CLI_SIDE for line, name in option_calls(path)]
    assert calls, "no option() calls found: the scan is broken"
    unknown = [f"{path.relative_to(ROOT)}:{line}: option({name!r})" for path, line, name in calls if name not in flags]
    assert not unknown, "options the command line does not have:\n" + "\n".join(unknown)


def test_every_flag_the_cli_advises_exists():
    parser = build_parser()
    known = _all_option_strings(parser)
    advised = {
        (path.relative_to(ROOT), line, flag)
        for path in CLI_SIDE
        for line, text in message_strings(path)
        for flag in FLAG.findall(text)
    }
    assert any(flag == "--v0-T" for _, _, flag in advised), "the build hint's flags were not found: the scan is broken"
    unknown = sorted(f"{path}:{line}: {flag}" for path, line, flag in advised if flag not in known | NOT_OURS)
    assert not unknown, "advice names flags the parser does not have:\n" + "\n".join(unknown)


def _all_option_strings(parser) -> set[str]:
    import argparse

    strings: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                strings |= _all_option_strings(sub)
        strings.update(action.option_strings)
    return strings


def test_option_spelling_library_and_cli():
    assert option("maxpool", "avg") == "maxpool=avg"
    assert option("per_channel") == "per_channel"
    with spelled_as(flag_spelling(build_parser())):
        assert option("maxpool", "avg") == "--maxpool avg"
        assert option("v0_steps", 8) == "--v0-T 8"
        assert option("per_channel") == "--per-channel"
    assert option("calib", "DATA") == "calib=DATA"  # restored after the command


def test_error_raised_inside_the_cli_spelling_keeps_it():
    from toolchain.passes.calibrate import ThresholdSpec

    with pytest.raises(ToolchainError, match=r"^threshold='p1000': use auto"):
        ThresholdSpec.parse("p1000")
    with spelled_as(flag_spelling(build_parser())), pytest.raises(ToolchainError, match=r"^--threshold 'p1000': use auto"):
        ThresholdSpec.parse("p1000")
