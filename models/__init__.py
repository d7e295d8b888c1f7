"""Conversion-ready ANN architectures, activations, training, and the shipped default model."""

from pathlib import Path

from models.arch import ARCHS, build
from models.layers import QCFS, ClipReLU, make_act

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = PACKAGE_DIR / "mnist_cnn.onnx"
DEFAULT_MODEL_INFO = PACKAGE_DIR / "mnist_cnn.json"
MNIST_TEST_DATA = PACKAGE_DIR / "data" / "mnist"

__all__ = ["ARCHS", "QCFS", "ClipReLU", "build", "make_act", "DEFAULT_MODEL", "DEFAULT_MODEL_INFO", "MNIST_TEST_DATA"]
