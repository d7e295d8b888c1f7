"""Dataset readers on real files: IDX (gzip or not), CIFAR-style JPEG trees and tarballs, npz."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import EMBEDDED_MNIST, shared_data
from toolchain.data import CIFAR10_CLASSES, load_dataset
from toolchain.errors import ToolchainError


def test_embedded_mnist_test_split():
    data = load_dataset(EMBEDDED_MNIST, "test")
    assert data.x.shape == (10000, 1, 28, 28) and data.x.dtype == np.uint8
    assert data.y[:5].tolist() == [7, 2, 1, 0, 4]
    assert np.bincount(data.y).min() > 800


def test_shared_fashion_mnist_train_split():
    data = load_dataset(shared_data("fashion-mnist"), "train")
    assert data.x.shape == (60000, 1, 28, 28)
    assert np.bincount(data.y).tolist() == [6000] * 10


def test_uncompressed_idx_reads_the_same(tmp_path):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(gzip.decompress((EMBEDDED_MNIST / f"{name}.gz").read_bytes()))
    plain = load_dataset(tmp_path, "test")
    packed = load_dataset(EMBEDDED_MNIST, "test")
    np.testing.assert_array_equal(plain.x, packed.x)
    np.testing.assert_array_equal(plain.y, packed.y)


def test_truncated_idx_is_refused(tmp_path):
    images = gzip.decompress((EMBEDDED_MNIST / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(images[:5000])
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes((EMBEDDED_MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(ToolchainError, match="truncated"):
        load_dataset(tmp_path, "test")


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _cifar_tree(root: Path) -> None:
    for split, count in (("train", 2), ("test", 1)):
        for label in ("cat", "airplane", "truck"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i:04d}.jpg").write_bytes(_jpeg(i))


def test_cifar_folder_and_tarball(tmp_path):
    _cifar_tree(tmp_path / "tree")
    folder = load_dataset(tmp_path / "tree", "train")
    assert folder.x.shape == (6, 3, 32, 32)
    # labels follow CIFAR-10's class order, not the folder listing
    assert sorted(set(folder.y.tolist())) == sorted(CIFAR10_CLASSES.index(c) for c in ("cat", "airplane", "truck"))
    # folders are grouped by class on disk; the samples come one class after the other in turn
    assert len(set(folder.y[:3].tolist())) == 3 and folder.y[:3].tolist() == folder.y[3:].tolist()
    archive = tmp_path / "cifar-test.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "tree", arcname="cifar10")
    packed = load_dataset(archive, "test")
    unpacked = load_dataset(tmp_path / "tree", "test")
    np.testing.assert_array_equal(packed.x, unpacked.x)
    np.testing.assert_array_equal(packed.y, unpacked.y)


def test_shared_cifar10_test_tarball():
    data = load_dataset(shared_data("cifar10") / "cifar10-jpeg-test.tar.gz", "test")
    assert data.x.shape == (10000, 3, 32, 32)
    assert np.bincount(data.y).tolist() == [1000] * 10
    assert np.bincount(data.subset(20).y).tolist() == [2] * 10  # a prefix sees every class


def test_npz_grey_images_and_errors(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((5, 28, 28), np.uint8), y=np.arange(5))
    data = load_dataset(good)
    assert data.x.shape == (5, 1, 28, 28) and data.y.tolist() == [0, 1, 2, 3, 4]
    missing = tmp_path / "missing.npz"
    np.savez(missing, images=np.zeros((5, 28, 28)))
    with pytest.raises(ToolchainError, match="'x' and 'y'"):
        load_dataset(missing)
    uneven = tmp_path / "uneven.npz"
    np.savez(uneven, x=np.zeros((5, 28, 28)), y=np.zeros(4))
    with pytest.raises(ToolchainError, match="5 samples"):
        load_dataset(uneven)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(ToolchainError, match="no such data"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(ToolchainError, match="found no test split"):
        load_dataset(tmp_path, "test")
    with pytest.raises(ToolchainError, match="unknown split"):
        load_dataset(tmp_path, "validation")
