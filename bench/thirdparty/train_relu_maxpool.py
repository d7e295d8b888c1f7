"""A model the project did not train: a plain LeNet-style torch network, exported the way
a third party would export it.

Deliberately independent of this project (no `models`, `exporters` or `toolchain`
imports): its own IDX reader, an `nn.Sequential` of Conv2d / ReLU / MaxPool2d / Linear,
`torch.onnx.export` at opset 13 with default input/output names and no metadata, so the
ONNX has a fixed batch of 1. Input: Fashion-MNIST pixels scaled to [0, 1] (x / 255, no
mean/std), shape (1, 1, 28, 28). A JSON beside the ONNX records the test accuracy and that
preprocessing, since the ONNX itself does not say.

    python bench/thirdparty/train_relu_maxpool.py --data ../shared/data/fashion-mnist \\
        --out models/zoo/thirdparty_lenet_relu_maxpool_fmnist.onnx
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(folder: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0
    return x, torch.tensor(labels, dtype=torch.long)


def lenet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum()) for i in range(0, len(y), 1000))
    return correct / len(y)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/fashion-mnist", help="Fashion-MNIST IDX folder")
    parser.add_argument("--out", default="models/zoo/thirdparty_lenet_relu_maxpool_fmnist.onnx")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    folder = Path(args.data)
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        print(f"error: {folder}: no Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_train, y_train = load(folder, "train")
    x_test, y_test = load(folder, "t10k")

    model = lenet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = args.epochs * ((len(y_train) + 127) // 128)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        for i in range(0, len(order), 128):
            batch = order[i : i + 128]
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        print(f"epoch {epoch + 1}/{args.epochs}: test accuracy {100 * accuracy(model, x_test, y_test):.2f}%", flush=True)
    seconds = time.time() - start
    test_accuracy = accuracy(model, x_test, y_test)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(out), opset_version=13, dynamo=False)
    info = {
        "arch": "lenet (Conv-ReLU-MaxPool x2, Linear 120-84-10)",
        "dataset": "fashion-mnist",
        "act": "relu",
        "pooling": "max",
        "epochs": args.epochs,
        "seed": args.seed,
        "test_accuracy": round(test_accuracy, 6),
        "train_seconds": round(seconds, 1),
        "device": "cpu",
        "preprocess": {"scale": 1 / 255, "mean": [0.0], "std": [1.0], "layout": "NCHW"},
        "note": "trained by bench/thirdparty/train_relu_maxpool.py; the ONNX has no metadata and a fixed batch of 1",
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"test accuracy {100 * test_accuracy:.2f}% ({seconds:.0f} s); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
