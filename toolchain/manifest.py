"""The manifest of an artifact folder: every file it holds with its size and sha256.

Written last into a staging folder (`toolchain.fileio.StagedDirectory.commit`), verified
before anything of the folder is trusted: one changed byte anywhere (a digit of the
preprocessing mean in `graph.json`, a hand-edited `fixed_graph.json`, another `ann.onnx`)
is one error that names the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from toolchain.errors import ToolchainError

MANIFEST_FILE = "toolchain.manifest"
FORMAT = "toolchain-manifest/1"
_CHUNK = 1 << 20

# Folders already verified, keyed by what `stat` says of every listed file: an eval that loads
# the float graph and the fixed-point network hashes a large ann.onnx once.
_verified: dict[str, tuple[Any, ...]] = {}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(folder: Path) -> bytes:
    """The manifest of every regular file in `folder` (flat: artifacts hold no subfolders)."""
    files = {
        entry.name: {"size": entry.stat().st_size, "sha256": _sha256(entry)}
        for entry in sorted(Path(folder).iterdir())
        if entry.is_file() and entry.name != MANIFEST_FILE
    }
    return json.dumps({"format": FORMAT, "files": files}, indent=1).encode()


def _read(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The manifest's file table; None without a manifest; an error for a damaged one."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise ToolchainError(f"{path}: unreadable manifest ({str(exc)[:200]}); rebuild the artifact") from None
    files = document.get("files") if isinstance(document, dict) else None
    if not isinstance(document, dict) or document.get("format") != FORMAT or not isinstance(files, dict):
        raise ToolchainError(f"{path}: not a toolchain manifest ({FORMAT}); rebuild the artifact")
    for name, entry in files.items():
        # A listed name is one file of this folder: never a path that leads out of it.
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ToolchainError(f"{path}: lists {name!r}, not a file name of this folder; rebuild the artifact")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("size"), int)):
            raise ToolchainError(f"{path}: malformed entry for {name!r}; rebuild the artifact")
    return files


def listed_files(folder: Path) -> set[str] | None:
    files = _read(folder)
    return None if files is None else set(files)


def lists(path: Path) -> bool:
    """Whether `path` is one of the files its folder's manifest lists (an artifact's own file)."""
    try:
        files = _read(Path(path).parent)
    except ToolchainError:
        return True  # a damaged manifest: treat the folder as an artifact, touch nothing
    return files is not None and Path(path).name in files


def mismatch(folder: Path) -> str | None:
    """The first listed file that is missing or differs, else None."""
    files = _read(folder) or {}
    for name, entry in files.items():
        path = Path(folder) / name
        if path.is_symlink() or not path.is_file():
            return name
        if path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            return name
    return None


def verify(folder: Path) -> None:
    """Refuse a folder without a manifest, or whose files differ from it, naming the file."""
    folder = Path(folder)
    files = _read(folder)
    if files is None:
        raise ToolchainError(
            f"{folder}: no {MANIFEST_FILE} (an incomplete artifact, or one written by an older toolchain); rebuild it"
        )
    key = os.path.realpath(folder)
    try:
        stamp = tuple((n, (folder / n).stat().st_mtime_ns, (folder / n).stat().st_size) for n in sorted(files))
    except OSError:
        stamp = None
    if stamp is not None and _verified.get(key) == stamp:
        return
    try:
        bad = mismatch(folder)
    except OSError as exc:
        raise ToolchainError(f"{folder}: cannot read the artifact ({exc.strerror}: {exc.filename})") from None
    if bad is not None:
        raise ToolchainError(
            f"{folder / bad}: missing or checksum mismatch with {MANIFEST_FILE} (changed since the build); rebuild the artifact"
        )
    if stamp is not None:
        _verified[key] = stamp
