"""Output written all at once or not at all."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import ToolchainError


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def check_replaceable(target: Path, marker: str) -> None:
    """Refuse an output path whose replacement would destroy something that is not ours: only a
    missing path, an empty folder or an earlier output (a folder holding `marker`) may be replaced."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise ToolchainError(f"{target}: exists and is not a folder; choose another output folder")
    if any(target.iterdir()) and not (target / marker).is_file():
        raise ToolchainError(
            f"{target}: a folder that is not a toolchain output (no {marker}) and would be replaced; "
            "choose a new or empty folder"
        )


def atomic_directory(target: Path, files: dict[str, bytes], marker: str) -> Path:
    """Write `files` into a fresh directory and move it to `target` only when complete.

    An existing `target` is replaced, so a failed build never leaves half an artifact; only
    an empty folder or an earlier output, which holds `marker`, is (`check_replaceable`).
    """
    given = Path(target)  # returned as the caller named it
    target = Path(os.path.abspath(target))  # "." has no name to stage beside
    check_replaceable(target, marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, data in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; an artifact is for sharing
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return given


def atomic_file(target: Path, data: bytes) -> Path:
    """Write a single file via a temporary sibling and rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
        tmp.write(data)
    Path(tmp.name).chmod(0o666 & ~_umask())  # NamedTemporaryFile makes it private
    Path(tmp.name).replace(target)
    return target


def pack_document(document: dict[str, Any], tensors: dict[str, np.ndarray], json_name: str, npz_name: str) -> dict[str, bytes]:
    """A JSON document and its arrays as two files; the document records the arrays' sha256."""
    buffer = io.BytesIO()
    np.savez(buffer, **tensors)
    tensor_bytes = buffer.getvalue()
    document = {**document, "checksums": {npz_name: hashlib.sha256(tensor_bytes).hexdigest()}}
    return {json_name: json.dumps(document, indent=1).encode(), npz_name: tensor_bytes}


def read_document(
    directory: Path, json_name: str, npz_name: str, schema_version: int, missing: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read what `pack_document` wrote, refusing other schema versions and damaged arrays.

    `missing` completes the message when the JSON file is absent (what to run instead).
    """
    path = Path(directory) / json_name
    if not path.is_file():
        raise ToolchainError(f"{directory}: {missing} (no {json_name})")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ToolchainError(f"{path}: corrupt file ({exc})") from None
    version = document.get("schema_version")
    if version != schema_version:
        raise ToolchainError(f"{path}: schema version {version}, this toolchain reads {schema_version}; rebuild it")
    npz_path = Path(directory) / npz_name
    tensor_bytes = npz_path.read_bytes() if npz_path.is_file() else b""
    if document.get("checksums", {}).get(npz_name) != hashlib.sha256(tensor_bytes).hexdigest():
        raise ToolchainError(f"{npz_path}: missing or checksum mismatch, the artifact is damaged; rebuild it")
    with np.load(io.BytesIO(tensor_bytes)) as archive:
        return document, {k: archive[k] for k in archive.files}
