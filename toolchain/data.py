"""Dataset readers: MNIST-style IDX folders, CIFAR-10 JPEG folders or tarballs, and `.npz`.

Every reader returns raw samples, channels first, `(N, C, H, W)` (uint8 for images),
and integer labels. Nothing is ever downloaded: a missing path is an error that
says what was expected.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain.errors import ToolchainError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IDX_PREFIXES = {"train": ("train",), "test": ("t10k", "test")}


@dataclass
class Dataset:
    x: np.ndarray  # (N, C, H, W) raw samples
    y: np.ndarray  # (N,) int64 labels
    source: str

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, limit: int | None, start: int = 0, step: int = 1) -> Dataset:
        """The first `limit` samples (all when None), optionally every `step`-th from `start`."""
        end = len(self) if limit is None else min(len(self), limit)
        return Dataset(self.x[start:end:step], self.y[start:end:step], self.source)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for begin in range(0, len(self), batch_size):
            yield self.x[begin : begin + batch_size], self.y[begin : begin + batch_size]


def load_dataset(path: str | Path, split: str = "test") -> Dataset:
    """Read a dataset from a path, choosing the reader by what is there."""
    if split not in IDX_PREFIXES:
        raise ToolchainError(f"unknown split {split!r}; use train or test")
    path = Path(path)
    if not path.exists():
        raise ToolchainError(
            f"{path}: no such data file or folder; pass an MNIST-style IDX folder, a CIFAR-10 folder or "
            ".tar.gz of {train,test}/<class>/*.jpg, or an .npz with x and y"
        )
    if path.is_file() and path.suffix == ".npz":
        return _read_npz(path)
    if path.is_file() and (path.name.endswith(".tar.gz") or path.name.endswith(".tgz") or path.suffix == ".tar"):
        return _read_image_tar(path, split)
    if path.is_dir():
        if _find_idx(path, split, "images") is not None:
            return _read_idx_dir(path, split)
        if (path / split).is_dir():
            return _read_image_folder(path / split)
        tarballs = sorted(path.glob(f"*{split}*.tar.gz"))
        if tarballs:
            return _read_image_tar(tarballs[0], split)
    raise ToolchainError(
        f"{path}: found no {split} split here; expected {IDX_PREFIXES[split][0]}-images-idx3-ubyte[.gz] and labels, "
        f"a {split}/<class>/*.jpg folder, a *{split}*.tar.gz, or an .npz with x and y"
    )


# ---------------------------------------------------------------- IDX (MNIST)


def _find_idx(folder: Path, split: str, kind: str) -> Path | None:
    for prefix in IDX_PREFIXES[split]:
        for ext in ("", ".gz"):
            for sep in ("-", "."):
                candidate = folder / f"{prefix}-{kind}{sep}idx{3 if kind == 'images' else 1}-ubyte{ext}"
                if candidate.is_file():
                    return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ToolchainError(f"{path}: cannot read IDX file ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ToolchainError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(data) - offset < count:
        raise ToolchainError(f"{path}: truncated IDX file (header says {dims})")
    return np.frombuffer(data, np.uint8, count, offset).reshape(dims)


def _read_idx_dir(folder: Path, split: str) -> Dataset:
    images_path = _find_idx(folder, split, "images")
    labels_path = _find_idx(folder, split, "labels")
    if images_path is None or labels_path is None:
        raise ToolchainError(f"{folder}: {split} images or labels IDX file missing")
    images = read_idx(images_path)
    labels = read_idx(labels_path).astype(np.int64)
    if len(images) != len(labels):
        raise ToolchainError(f"{folder}: {len(images)} images but {len(labels)} labels")
    return Dataset(images[:, None, :, :], labels, f"{folder} ({split})")


# ---------------------------------------------------------------- CIFAR-style JPEG trees


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), np.uint8).transpose(2, 0, 1)


def _class_index(name: str, classes: tuple[str, ...]) -> int:
    if name not in classes:
        raise ToolchainError(f"unknown class folder {name!r}; expected one of {', '.join(classes)}")
    return classes.index(name)


def _classes_in(names: list[str]) -> tuple[str, ...]:
    found = sorted(set(names))
    return CIFAR10_CLASSES if set(found) <= set(CIFAR10_CLASSES) else tuple(found)


def _read_image_folder(folder: Path) -> Dataset:
    files = sorted(p for p in folder.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise ToolchainError(f"{folder}: no <class>/*.jpg images found")
    classes = _classes_in([p.parent.name for p in files])
    y = np.array([_class_index(p.parent.name, classes) for p in files], np.int64)
    order = interleave_classes(y)
    x = np.stack([_decode(files[i].read_bytes()) for i in order])
    return Dataset(x, y[order], str(folder))


def _read_image_tar(path: Path, split: str) -> Dataset:
    records: list[tuple[str, str, bytes]] = []
    try:
        with tarfile.open(path) as archive:
            for member in archive:
                parts = Path(member.name).parts
                if not member.isfile() or len(parts) < 3 or parts[-3] != split:
                    continue
                if not parts[-1].lower().endswith((".jpg", ".jpeg", ".png")):
                    continue
                handle = archive.extractfile(member)
                if handle is not None:
                    records.append((member.name, parts[-2], handle.read()))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ToolchainError(f"{path}: cannot read tar archive ({exc})") from None
    if not records:
        raise ToolchainError(f"{path}: no {split}/<class>/*.jpg images inside")
    records.sort()
    classes = _classes_in([r[1] for r in records])
    y = np.array([_class_index(r[1], classes) for r in records], np.int64)
    order = interleave_classes(y)
    x = np.stack([_decode(records[i][2]) for i in order])
    return Dataset(x, y[order], f"{path} ({split})")


def interleave_classes(y: np.ndarray) -> np.ndarray:
    """An order that takes one sample of each class in turn (first of every class, then the
    second, ...): image folders come grouped by class, and `--limit N` or a calibration
    subset must not see one class only."""
    rank_in_class = np.zeros(len(y), np.int64)
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        rank_in_class[members] = np.arange(len(members))
    return np.lexsort((y, rank_in_class))


# ---------------------------------------------------------------- npz


def _read_npz(path: Path) -> Dataset:
    try:
        with np.load(path) as archive:
            if "x" not in archive.files or "y" not in archive.files:
                raise ToolchainError(f"{path}: an .npz dataset needs arrays 'x' and 'y', found {archive.files}")
            x, y = archive["x"], archive["y"].astype(np.int64)
    except (OSError, ValueError) as exc:
        raise ToolchainError(f"{path}: cannot read .npz ({exc})") from None
    if x.ndim == 3:  # (N, H, W) grey images
        x = x[:, None]
    if len(x) != len(y):
        raise ToolchainError(f"{path}: {len(x)} samples in x but {len(y)} labels in y")
    return Dataset(x, y.reshape(-1), str(path))
