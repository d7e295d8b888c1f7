"""Dataset readers: MNIST-style IDX folders, CIFAR-10 JPEG folders or tarballs, and `.npz`.

Every reader returns raw samples, channels first, `(N, C, H, W)` (uint8 for images),
and integer labels. Nothing is ever downloaded: a missing path is an error that
says what was expected.
"""

from __future__ import annotations

import gzip
import io
import math
import tarfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolchain.errors import ToolchainError, one_line

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IDX_PREFIXES = {"train": ("train",), "test": ("t10k", "test")}


@dataclass
class Dataset:
    x: np.ndarray  # (N, C, H, W) raw samples
    y: np.ndarray  # (N,) int64 labels
    source: str
    classes: tuple[str, ...] | None = None  # class folder names, by label, where the reader had them

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, limit: int | None, start: int = 0, step: int = 1) -> Dataset:
        """The first `limit` samples (all when None), optionally every `step`-th from `start`."""
        end = len(self) if limit is None else min(len(self), limit)
        return Dataset(self.x[start:end:step], self.y[start:end:step], self.source, self.classes)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for begin in range(0, len(self), batch_size):
            yield self.x[begin : begin + batch_size], self.y[begin : begin + batch_size]


def load_dataset(path: str | Path, split: str = "test") -> Dataset:
    """Read a dataset from a path, choosing the reader by what is there; every reader's result
    passes `check_dataset`."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # an error naming the file, not a raw line
            return check_dataset(_load(Path(path), split))
    except OSError as exc:
        raise ToolchainError(f"{exc.filename or path}: cannot read the data ({exc.strerror or exc})") from None
    except MemoryError:
        raise ToolchainError(f"{path}: the data set does not fit in memory") from None


def _load(path: Path, split: str) -> Dataset:
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
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ToolchainError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = math.prod(dims)  # Python integers: a forged header cannot overflow
    if len(data) - offset < count:
        raise ToolchainError(f"{path}: truncated IDX file (header says {dims}, {len(data) - offset} bytes follow)")
    return np.frombuffer(data, np.uint8, count, offset).reshape(dims)


def _read_idx_dir(folder: Path, split: str) -> Dataset:
    images_path = _find_idx(folder, split, "images")
    labels_path = _find_idx(folder, split, "labels")
    if images_path is None or labels_path is None:
        raise ToolchainError(f"{folder}: {split} images or labels IDX file missing")
    images = read_idx(images_path)
    labels = read_idx(labels_path).astype(np.int64)
    if images.ndim != 3:
        raise ToolchainError(f"{images_path}: IDX images need 3 dimensions (count, rows, columns), found {images.shape}")
    if labels.ndim != 1:
        raise ToolchainError(f"{labels_path}: IDX labels need 1 dimension (count), found {labels.shape}")
    if len(images) != len(labels):
        raise ToolchainError(f"{folder}: {len(images)} images but {len(labels)} labels")
    return Dataset(images[:, None, :, :], labels, f"{folder} ({split})")


# ---------------------------------------------------------------- CIFAR-style JPEG trees


def _decode(data: bytes, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"), np.uint8).transpose(2, 0, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ToolchainError(f"{where}: not a readable image ({one_line(exc)})") from None


def _stack_images(names: list[str], blobs: list[bytes]) -> np.ndarray:
    """Decode every image; all must have the size of the first."""
    images: list[np.ndarray] = []
    for name, blob in zip(names, blobs, strict=True):
        image = _decode(blob, name)
        if images and image.shape != images[0].shape:
            raise ToolchainError(
                f"{name}: image of {image.shape[2]}x{image.shape[1]} pixels, but {names[0]} is "
                f"{images[0].shape[2]}x{images[0].shape[1]}; every image of a data set needs the same size"
            )
        images.append(image)
    return np.stack(images)


def _classes_in(names: list[str]) -> tuple[str, ...]:
    found = sorted(set(names))
    return CIFAR10_CLASSES if set(found) <= set(CIFAR10_CLASSES) else tuple(found)


def _read_image_folder(folder: Path) -> Dataset:
    files = sorted(p for p in folder.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise ToolchainError(f"{folder}: no <class>/*.jpg images found")
    classes = _classes_in([p.parent.name for p in files])
    y = np.array([classes.index(p.parent.name) for p in files], np.int64)
    order = interleave_classes(y)
    x = _stack_images([str(files[i]) for i in order], [files[i].read_bytes() for i in order])
    return Dataset(x, y[order], str(folder), classes)


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
    y = np.array([classes.index(r[1]) for r in records], np.int64)
    order = interleave_classes(y)
    x = _stack_images([f"{path}:{records[i][0]}" for i in order], [records[i][2] for i in order])
    return Dataset(x, y[order], f"{path} ({split})", classes)


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
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files or "y" not in archive.files:
                raise ToolchainError(f"{path}: an .npz dataset needs arrays 'x' and 'y', found {archive.files}")
            x, y = archive["x"], archive["y"]
    except ToolchainError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ToolchainError(f"{path}: cannot read .npz ({one_line(exc)})") from None
    if x.ndim == 3:  # (N, H, W) grey images
        x = x[:, None]
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ToolchainError(f"{path}: labels y need shape (N,) (class indices, not one-hot), found {y.shape}")
    if len(x) != len(y):
        raise ToolchainError(f"{path}: {len(x)} samples in x but {len(y)} labels in y")
    return Dataset(x, _labels(y, str(path)), str(path))


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    """Integer class indices from any real array: refused where not whole, finite, >= 0."""
    if y.dtype.kind not in "biuf":
        raise ToolchainError(f"{where}: labels of type {y.dtype} are not class indices")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise ToolchainError(f"{where}: labels hold NaN or infinite values")
        if not np.array_equal(y, np.round(y)):
            raise ToolchainError(f"{where}: labels are not whole numbers (class indices, not probabilities)")
    if len(y) and y.min() < 0:
        raise ToolchainError(f"{where}: negative label {int(y.min())}; labels are class indices 0, 1, ...")
    return y.astype(np.int64)


# ---------------------------------------------------------------- the checks every reader's result passes

# Samples of more elements than this are surely not one image or feature vector of a data set.
MAX_SAMPLE_ELEMENTS = 1 << 26


def check_dataset(data: Dataset) -> Dataset:
    """Dimensions, dtype, count and values of what a reader returns, in one place: integer pixels
    become uint8 (scaled by 1/255 like any image) where they fit, and are refused where they do not."""
    where = data.source
    x, y = data.x, data.y
    if x.ndim not in (2, 4):
        raise ToolchainError(f"{where}: samples need shape (N, C, H, W), (N, H, W) or (N, features), found {x.shape}")
    if len(x) == 0:
        raise ToolchainError(f"{where}: the data set is empty (0 samples)")
    if math.prod(x.shape[1:]) == 0 or math.prod(x.shape[1:]) > MAX_SAMPLE_ELEMENTS:
        raise ToolchainError(f"{where}: samples of shape {x.shape[1:]} are not images or feature vectors")
    if x.dtype.kind not in "iuf":
        raise ToolchainError(f"{where}: samples of type {x.dtype}; give numbers (uint8 pixels or floats)")
    if x.dtype.kind in "iu" and x.dtype != np.uint8:
        low, high = int(x.min()), int(x.max())
        if low < 0 or high > 255:
            raise ToolchainError(
                f"{where}: integer samples range {low}..{high}; give uint8 pixels (0..255) or floats"
            )
        x = x.astype(np.uint8)
    elif x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ToolchainError(f"{where}: samples hold NaN or infinite values")
    elif x.dtype.kind == "f" and np.abs(x).max() > np.finfo(np.float32).max:
        raise ToolchainError(f"{where}: sample values beyond the float32 range")
    if len(y) != len(x):
        raise ToolchainError(f"{where}: {len(x)} samples but {len(y)} labels")
    y = _labels(np.asarray(y), where)
    return Dataset(x, y, data.source, data.classes)


def is_unit_float(data: Dataset) -> bool:
    """Float samples already in [0, 1]: images scaled by their writer, not to be scaled by 1/255 again."""
    return data.x.dtype.kind == "f" and float(data.x.min()) >= 0.0 and float(data.x.max()) <= 1.0


def check_labels(data: Dataset, classes: int, where: str) -> None:
    """Labels against the model's outputs: a label the model cannot predict is a wrong data set."""
    top = int(data.y.max()) if len(data) else 0
    if top >= classes:
        raise ToolchainError(
            f"{data.source}: label {top} but {where} has {classes} outputs (classes 0..{classes - 1}); "
            "is it the data set the model was trained on?"
        )


def check_class_names(data: Dataset, expected: list[str] | tuple[str, ...] | None, where: str) -> None:
    """Class folders against the names stored at build: a renamed folder would re-index every label."""
    if expected is None or data.classes is None or tuple(data.classes) == tuple(expected):
        return
    extra = sorted(set(data.classes) - set(expected))
    missing = sorted(set(expected) - set(data.classes))
    detail = f"unknown {', '.join(extra)}" if extra else ""
    detail += ("; " if detail and missing else "") + (f"missing {', '.join(missing)}" if missing else "")
    raise ToolchainError(
        f"{data.source}: class folders differ from the {len(expected)} classes {where} was built with "
        f"({detail or 'another order'}); name them {', '.join(expected)}"
    )
