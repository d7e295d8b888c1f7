"""Output written all at once or not at all."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def atomic_directory(target: Path, files: dict[str, bytes]) -> Path:
    """Write `files` into a fresh directory and move it to `target` only when complete.

    An existing `target` is replaced, so a failed build never leaves half an artifact.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, data in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def atomic_file(target: Path, data: bytes) -> Path:
    """Write a single file via a temporary sibling and rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
        tmp.write(data)
    Path(tmp.name).replace(target)
    return target
