"""Output written all at once or not at all, and never over something that is not ours.

An artifact folder is written into a staging folder beside it (`.NAME.toolchain-staging-PID-*`),
closed with a manifest (`toolchain.manifest`), and swapped into place in one step: the old
artifact stays complete until the new one is, and a staging folder left by a killed run is
swept by the next write. Only a missing path, an empty folder or one of our complete
artifacts is replaced without `--force`.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from toolchain import manifest
from toolchain.errors import ToolchainError

STAGING_TAG = ".toolchain-staging-"
RETIRED_TAG = ".toolchain-retired-"  # the old artifact between the two renames where no exchange exists
# The files an artifact written before manifests could hold (ir, build, quantize, report).
LEGACY_FILES = frozenset(
    {"graph.json", "tensors.npz", "ann.onnx", "ann.onnx.data", "build.json", "fixed_graph.json", "fixed_tensors.npz"}
)
LEGACY_DOCUMENTS = (("graph.json", "tensors.npz"), ("fixed_graph.json", "fixed_tensors.npz"))
FORCE_HINT = "pass --force to replace it anyway"


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def os_error(path: str | Path, exc: OSError, action: str = "cannot write") -> ToolchainError:
    """One line naming the path and the cause of an OS error (full disk, read-only, permissions)."""
    cause = exc.strerror or type(exc).__name__
    where = exc.filename if exc.filename and str(exc.filename) != str(path) and STAGING_TAG not in str(exc.filename) else None
    return ToolchainError(f"{path}: {action} ({cause}{f': {where}' if where else ''})")


# ---------------------------------------------------------------- what may be replaced


def is_our_report(path: Path) -> bool:
    """A report this toolchain wrote (recognised by its first bytes) or a plot PNG beside one."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    if head.startswith(b"\x89PNG") and b"Matplotlib" in head:
        return True
    text = head.decode("utf-8", "replace")
    return (
        text.startswith("# Spike and energy report: ")
        or (text.startswith("<!DOCTYPE html>") and "<title>Spike and energy report: " in text)
        or (text.lstrip().startswith("{") and '"schema": "toolchain-report/' in text)
    )


def _not_ours(folder: Path) -> str | None:
    """Why `folder` is not one of our complete outputs (None when it is, or is empty)."""
    entries = sorted(folder.iterdir())
    if not entries:
        return None
    listed = manifest.listed_files(folder)
    if listed is None:  # written before manifests: only the files such an artifact had, intact
        strays = [e.name for e in entries if not e.is_file() or (e.name not in LEGACY_FILES and not is_our_report(e))]
        if strays:
            return f"no {manifest.MANIFEST_FILE}; {strays[0]} is not a file of an artifact"
        documents = [(j, n) for j, n in LEGACY_DOCUMENTS if (folder / j).is_file()]
        if not documents or not all(_intact_document(folder, j, n) for j, n in documents):
            return f"no {manifest.MANIFEST_FILE}, and no intact graph.json with its tensors"
        return None
    for entry in entries:
        if entry.name == manifest.MANIFEST_FILE:
            continue
        if entry.is_symlink() or not entry.is_file():
            return f"{entry.name} is not a file of an artifact"
        if entry.name not in listed and not is_our_report(entry):
            return f"{entry.name} is not a file of the artifact"
    problem = manifest.mismatch(folder)
    return f"{problem} differs from the artifact's manifest" if problem else None


def _intact_document(folder: Path, json_name: str, npz_name: str) -> bool:
    """A JSON document of ours whose arrays file matches the sha256 it records (`pack_document`)."""
    try:
        document = json.loads((folder / json_name).read_bytes())
        digest = hashlib.sha256((folder / npz_name).read_bytes()).hexdigest()
    except (OSError, ValueError, RecursionError):
        return False
    checksums = document.get("checksums") if isinstance(document, dict) else None
    return isinstance(checksums, dict) and checksums.get(npz_name) == digest


def check_replaceable(target: Path, marker: str = "", force: bool = False) -> None:
    """Refuse an output folder whose replacement would destroy something that is not ours: only a
    missing path, an empty folder or a complete earlier output (its manifest matching every file)
    may be replaced, unless `force`."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if not (target.is_symlink() or target.is_dir() or target.is_file()):
        raise ToolchainError(f"{target}: is not a file or folder (a device?); choose another output folder")
    if force:  # anything, but never the folder the user stands in (or one above it)
        here = Path(os.getcwd()).resolve()
        if not target.is_symlink() and (target.resolve() == here or target.resolve() in here.parents):
            raise ToolchainError(f"{target}: holds the current folder; --force will not replace it")
        return
    if target.is_symlink() or not target.is_dir():
        raise ToolchainError(f"{target}: exists and is not a folder; choose another output folder or {FORCE_HINT}")
    try:
        reason = _not_ours(target)
    except OSError as exc:
        raise os_error(target, exc, "cannot read the output folder") from None
    if reason is not None:
        raise ToolchainError(
            f"{target}: a folder that is not a toolchain output ({reason}) and would be replaced; "
            f"choose a new or empty folder, or {FORCE_HINT}"
        )


def check_file_replaceable(target: Path, ours: bool, force: bool = False, option: str = "-o") -> None:
    """A single output file: a missing path, or an existing file that is ours (`ours`), and never a
    folder or a file an artifact's manifest lists (an artifact's own files)."""
    target = Path(target)
    if target.is_dir():
        raise ToolchainError(f"{option} {target}: is a folder; give a file name")
    if target.exists() and not target.is_file():
        raise ToolchainError(f"{option} {target}: is not a regular file (a device?); give a file name")
    if not target.exists() and not target.is_symlink():
        return
    if manifest.lists(target):
        raise ToolchainError(f"{option} {target}: is a file of the artifact in {target.parent}; choose another file name")
    if not force and (target.is_symlink() or not ours):
        raise ToolchainError(
            f"{option} {target}: exists and was not written by this toolchain; choose another name or {FORCE_HINT}"
        )


def refuse_inside(target: Path, inputs: Iterable[Path | None], option: str = "-o") -> None:
    """An output folder must not hold (or be) one of the command's own input files."""
    out = Path(os.path.abspath(target))
    for given in inputs:
        if given is None:
            continue
        path = Path(os.path.abspath(given))
        if path == out or out in path.parents:
            raise ToolchainError(
                f"{option} {target}: holds the input {given}, which replacing it would delete; choose another folder"
            )


# ---------------------------------------------------------------- staging and the swap


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str, tag: str) -> int | None:
    tail = name.split(tag, 1)[1]
    head = tail.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def sweep_stale(target: Path) -> None:
    """Remove staging folders of ours beside `target` whose process is gone; put back an old artifact
    retired by a run killed between the two renames of a swap without exchange."""
    parent = target.parent
    if not parent.is_dir():
        return
    for tag in (RETIRED_TAG, STAGING_TAG):
        for entry in parent.glob(f".{target.name}{tag}*"):
            pid = _owner_pid(entry.name, tag)
            if pid is None or pid == os.getpid() or _pid_alive(pid):
                continue
            if tag == RETIRED_TAG and not target.exists() and (entry / "old").exists():
                os.rename(entry / "old", target)
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


class StagedDirectory:
    """A folder written beside `target` and swapped in by `commit()`; removed unless committed.

        with StagedDirectory(out, force=False) as stage:
            stage.write("graph.json", data)
            ...                              # anything may still fail: `out` is untouched
            stage.commit()
    """

    def __init__(self, target: str | Path, force: bool = False):
        self.given = Path(target)
        self.target = Path(os.path.abspath(target))  # "." has no name to stage beside
        self.force = force
        check_replaceable(self.target, force=force)
        # Folders made for -o are removed again if nothing is committed: a failure leaves nothing new.
        self.made = [p for p in (self.target.parent, *self.target.parent.parents) if not p.exists()]
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            sweep_stale(self.target)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}{STAGING_TAG}{os.getpid()}-", dir=self.target.parent))
        except OSError as exc:
            self._remove_made()
            raise os_error(self.given, exc) from None
        self.committed = False

    def __enter__(self) -> StagedDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.discard()

    def write(self, name: str, data: bytes) -> Path:
        path = self.path / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise os_error(self.given, exc) from None
        return path

    def write_all(self, files: dict[str, bytes]) -> None:
        for name, data in files.items():
            self.write(name, data)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._remove_made()

    def _remove_made(self) -> None:
        for folder in self.made:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break

    def commit(self) -> Path:
        """Close the folder with its manifest and swap it into place."""
        try:
            self.write(manifest.MANIFEST_FILE, manifest.build_manifest(self.path))
            self.path.chmod(0o777 & ~_umask())  # mkdtemp makes it private; an artifact is for sharing
            check_replaceable(self.target, force=self.force)  # still ours (nobody wrote into it meanwhile)
            if not self.target.exists() and not self.target.is_symlink():
                os.rename(self.path, self.target)
            elif self.target.is_dir() and not self.target.is_symlink() and _exchange(self.path, self.target):
                shutil.rmtree(self.path, ignore_errors=True)  # now the old artifact
            else:
                retired = Path(tempfile.mkdtemp(prefix=f".{self.target.name}{RETIRED_TAG}{os.getpid()}-", dir=self.target.parent))
                os.rename(self.target, retired / "old")
                os.rename(self.path, self.target)
                shutil.rmtree(retired, ignore_errors=True)
        except OSError as exc:
            self.discard()
            raise os_error(self.given, exc) from None
        self.committed = True
        return self.given


def atomic_directory(target: Path, files: dict[str, bytes], marker: str = "", force: bool = False) -> Path:
    """Write `files` into a fresh folder and swap it in for `target` only when complete (`StagedDirectory`)."""
    with StagedDirectory(target, force) as stage:
        stage.write_all(files)
        return stage.commit()


def atomic_file(target: Path, data: bytes) -> Path:
    """Write a single file via a temporary sibling and rename."""
    target = Path(target)
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(target)
        prefix = f".{target.name}{STAGING_TAG}{os.getpid()}-"
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=prefix, delete=False) as handle:
            tmp = handle.name
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).chmod(0o666 & ~_umask())  # NamedTemporaryFile makes it private
        Path(tmp).replace(target)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise os_error(target, exc) from None
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


# ---------------------------------------------------------------- JSON + arrays documents


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
    """Read what `pack_document` wrote, refusing other schema versions, files that differ from the
    folder's manifest and damaged arrays.

    `missing` completes the message when the JSON file is absent (what to run instead).
    """
    path = Path(directory) / json_name
    if not path.is_file():
        raise ToolchainError(f"{directory}: {missing} (no {json_name})")
    try:
        document = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ToolchainError(f"{path}: corrupt file ({str(exc)[:200]})") from None
    except OSError as exc:
        raise os_error(path, exc, "cannot read") from None
    if not isinstance(document, dict):
        raise ToolchainError(f"{path}: not a toolchain document (a JSON {type(document).__name__}); rebuild the artifact")
    version = document.get("schema_version")
    if version != schema_version:
        raise ToolchainError(f"{path}: schema version {version}, this toolchain reads {schema_version}; rebuild it")
    manifest.verify(Path(directory))
    npz_path = Path(directory) / npz_name
    try:
        tensor_bytes = npz_path.read_bytes() if npz_path.is_file() else b""
    except OSError as exc:
        raise os_error(npz_path, exc, "cannot read") from None
    checksums = document.get("checksums")
    if not isinstance(checksums, dict) or checksums.get(npz_name) != hashlib.sha256(tensor_bytes).hexdigest():
        raise ToolchainError(f"{npz_path}: missing or checksum mismatch, the artifact is damaged; rebuild it")
    try:
        with np.load(io.BytesIO(tensor_bytes), allow_pickle=False) as archive:
            return document, {k: archive[k] for k in archive.files}
    except Exception as exc:  # noqa: BLE001 - zip, format and pickle errors of a damaged file
        raise ToolchainError(f"{npz_path}: unreadable arrays ({type(exc).__name__}); rebuild the artifact") from None


# ---------------------------------------------------------------- ONNX external data


def check_external_data(model_path: str | Path) -> None:
    """Every external-data file an ONNX model names must lie inside the model's own folder: no
    absolute path, no `..`, no symlink out of it (onnxruntime would follow any of them)."""
    import onnx
    from onnx import external_data_helper

    path = Path(model_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except OSError as exc:
        raise os_error(path, exc, "cannot read") from None
    except Exception:  # noqa: BLE001 - not an ONNX file: the loader that opens it next says so
        return
    folder = Path(os.path.realpath(path.parent))
    for tensor in external_data_helper._get_all_tensors(model):  # initializers, attributes, subgraphs
        if not external_data_helper.uses_external_data(tensor):
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        where = Path(os.path.realpath(folder / location))
        if not location or os.path.isabs(location) or (where != folder and folder not in where.parents):
            raise ToolchainError(
                f"{path}: tensor {tensor.name!r} keeps its data in {location!r}, outside the model's folder; "
                "external data must lie beside the model"
            )
