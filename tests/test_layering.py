"""The layers of docs/ARCHITECTURE.md hold in the code: core < passes < backends < drivers.

Read from the source (every import statement, also those inside functions), so a lazy import
cannot hide a dependency that runs the wrong way.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_MODEL, ROOT

# What each layer may import from this project (third-party packages are not restricted here).
BASE = ("toolchain.errors", "toolchain.fileio", "toolchain.manifest")
ALLOWED = {
    "toolchain/core": ("toolchain.core", *BASE),
    "toolchain/passes": ("toolchain.core", "toolchain.passes", *BASE),
}


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return [n for n in names if n.split(".")[0] in ("toolchain", "targets", "bench", "models", "exporters")]


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _offending(folder: str, allowed: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        # `from toolchain.core import ir` names the module toolchain.core and the member toolchain.core.ir
        for name in _imports(path):
            if not _within(name, allowed) and not _within(name.rsplit(".", 1)[0], allowed):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_core_and_passes_import_nothing_above_them(folder):
    assert _offending(folder, ALLOWED[folder]) == []


def test_backends_import_only_the_core_and_their_own_folder():
    bad = []
    for backend in sorted(p for p in (ROOT / "targets").iterdir() if p.is_dir() and not p.name.startswith("_")):
        allowed = ("toolchain.core", *BASE, f"targets.{backend.name}")
        bad += _offending(f"targets/{backend.name}", allowed)
    bad += _offending("targets/__init__.py", ("toolchain.core", *BASE))  # the registry names, it does not import
    assert bad == []


def test_the_checker_sees_a_wrong_way_import(tmp_path):
    """The rule above can fail: a core module importing a backend lazily is caught."""
    module = tmp_path / "toolchain" / "core" / "bad.py"
    module.parent.mkdir(parents=True)
    module.write_text("def f():\n    from targets.torch.simulator import TorchTarget\n    return TorchTarget\n")
    names = _imports(module)
    assert "targets.torch.simulator" in names
    assert not _within("targets.torch.simulator", ALLOWED["toolchain/core"])


# ---------------------------------------------------------------- the registries


def test_target_registry_kinds_match_the_backends_and_the_cli():
    from targets import TARGETS, target_class
    from toolchain.cli import build_parser

    for name, entry in TARGETS.items():
        if name == "lava" and importlib.util.find_spec("lava") is None:
            continue
        cls = target_class(name)
        assert cls.name == name and cls.graph_kind == entry.graph_kind
        assert callable(cls.prepare) and callable(cls.run) and callable(cls.close)
    build = build_parser()._subparsers._group_actions[0].choices["build"]  # noqa: SLF001
    target = next(a for a in build._actions if a.dest == "target")  # noqa: SLF001
    assert tuple(target.choices) == tuple(TARGETS)


def test_unknown_target_options_are_refused():
    from toolchain.backends import get_target
    from toolchain.errors import ToolchainError

    with pytest.raises(ToolchainError, match="no option 'artifact'"):
        get_target("torch", device="cpu", artifact=None)
    with pytest.raises(ToolchainError, match="no option 'thresholdbits'"):
        get_target("loihi", device="cpu", thresholdbits=9)
    assert get_target("loihi", device="cpu", threshold_bits=9).lower.keywords == {"threshold_bits": 9}


def test_frontend_registry_refuses_a_duplicate_and_picks_by_opset():
    from toolchain.passes.frontend import registry
    from toolchain.passes.frontend.handlers import elementwise

    with pytest.raises(RuntimeError, match="two handlers"):
        registry.handles("Relu")(elementwise.relu)
    assert registry.handler_for("Clip", 6) is elementwise.clip_attributes
    assert registry.handler_for("Clip", 11) is elementwise.clip_inputs
    assert registry.handler_for("Clip", 21) is elementwise.clip_inputs
    assert registry.handler_for("Sigmoid", 21) is None


def test_a_bug_of_ours_is_an_internal_error_with_its_traceback_in_a_file(tmp_path, monkeypatch, capsys):
    from toolchain.cli import main
    from toolchain.passes.frontend import registry

    def broken(builder, node):
        raise ZeroDivisionError("a handler bug")

    monkeypatch.setitem(registry.HANDLERS, ("Conv", 1), broken)  # every model here has a Conv
    out = tmp_path / "out"
    status = main(["build", str(DEFAULT_MODEL), "-o", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 3 and len(lines) == 1, lines
    assert lines[0].startswith("internal error: ") and "a handler bug" in lines[0] and "bug in the toolchain" in lines[0]
    written = Path(lines[0].rsplit(" ", 1)[1])
    assert written.is_file() and "ZeroDivisionError" in written.read_text() and "Traceback" in written.read_text()
    assert not out.exists()
    written.unlink()
