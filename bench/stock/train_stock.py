"""Stock ReLU + batch-norm networks trained the way other people train them, for bench/stock_models.py.

Deliberately independent of this project (no `models`, `exporters` or `toolchain`
imports): its own IDX reader, plain torch modules written as one usually writes them
(functional `F.relu`, `torch.cat`, ReLU6, identity and 1x1-conv shortcuts, max pooling,
pre-activation blocks, inception branches, batch norm after ReLU, input normalisation inside),
Adam with cosine decay, and the default `torch.onnx.export` (no metadata, no names beyond
the defaults). Input: pixels / 255. A JSON beside each ONNX records the test accuracy.

    OMP_NUM_THREADS=1 python bench/stock/train_stock.py --data ../shared/data/fashion-mnist \\
        --out /tmp/stock --models resnet vgg mobilenet densenet
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(data[3])]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(dims)


def load(folder: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor(read_idx(folder / f"{prefix}-images-idx3-ubyte.gz"), dtype=torch.float32).unsqueeze(1) / 255.0
    return x, torch.tensor(read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz"), dtype=torch.long)


CIFAR10_CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()


def load_cifar10(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`{split}/<class>/*.jpg` from cifar10-jpeg-{split}.tar.gz, as (N, 3, 32, 32) / 255."""
    images, labels = [], []
    with tarfile.open(folder / f"cifar10-jpeg-{split}.tar.gz") as archive:
        for member in archive:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 2 and parts[-2] in CIFAR10_CLASSES:
                handle = archive.extractfile(member)
                assert handle is not None
                images.append(np.asarray(Image.open(io.BytesIO(handle.read())).convert("RGB")))
                labels.append(CIFAR10_CLASSES.index(parts[-2]))
    x = torch.tensor(np.stack(images), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    return x.contiguous(), torch.tensor(labels, dtype=torch.long)


class Block(nn.Module):
    """torchvision-style BasicBlock: functional ReLU, identity or 1x1 conv + BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self, channels: int = 1, side: int = 28, width: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, 2, 1, bias=False)  # side / 2
        self.bn = nn.BatchNorm2d(width)
        self.layers = nn.Sequential(Block(width, width, 1), Block(width, 2 * width, 2), Block(2 * width, 2 * width, 1))
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class VGG(nn.Module):
    def __init__(self, channels: int = 1, side: int = 28) -> None:
        super().__init__()
        cfg = [16, "M", 32, 32, "M", 64, "M"]
        layers: list[nn.Module] = []
        cin = channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(64 * (side // 8) ** 2, 64), nn.ReLU(inplace=True), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class MobileNet(nn.Module):
    def __init__(self, channels: int = 1, side: int = 28) -> None:
        super().__init__()

        def dw(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True),
            ]  # fmt: skip

        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True),
            *dw(16, 32, 1), *dw(32, 64, 2), *dw(64, 64, 1),
        )  # fmt: skip
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


class DenseLayer(nn.Module):
    """BN-ReLU-conv with its output concatenated to its input (DenseNet's pre-activation order)."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class DenseNet(nn.Module):
    def __init__(self, channels: int = 1, side: int = 28, growth: int = 12) -> None:
        super().__init__()
        self.stem = nn.Conv2d(channels, 16, 3, padding=1, bias=False)
        c = 16
        blocks: list[nn.Module] = []
        for stage in range(2):
            for _ in range(3):
                blocks.append(DenseLayer(c, growth))
                c += growth
            if stage == 0:  # transition: BN-ReLU-1x1 conv-avgpool
                blocks += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
                c //= 2
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(F.max_pool2d(self.stem(x), 2))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Normalize(nn.Module):
    """transforms.Normalize folded into the model, as many export scripts do: the ONNX takes pixels / 255."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, channels, 1, 1), 0.45))
        self.register_buffer("std", torch.full((1, channels, 1, 1), 0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class PreActBlock(nn.Module):
    """He et al.'s pre-activation block: BN-ReLU-conv twice, the sum not followed by a ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, channels: int = 1, side: int = 28, width: int = 16) -> None:
        super().__init__()
        self.normalize = Normalize(channels)
        self.conv = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.layers = nn.Sequential(PreActBlock(width, width, 1), PreActBlock(width, 2 * width, 2),
                                    PreActBlock(2 * width, 4 * width, 2))  # fmt: skip
        self.bn = nn.BatchNorm2d(4 * width)
        self.fc = nn.Linear(4 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.layers(self.conv(self.normalize(x)))))
        return self.fc(F.avg_pool2d(x, x.shape[-1]).view(x.size(0), -1))


class Inception(nn.Module):
    """GoogLeNet-style module: 1x1, 1x1-3x3 and 3x3-max-pool-1x1 branches, concatenated."""

    def __init__(self, cin: int, ones: int, threes: int, pooled: int) -> None:
        super().__init__()

        def unit(a: int, b: int, k: int) -> list[nn.Module]:
            return [nn.Conv2d(a, b, k, padding=k // 2), nn.BatchNorm2d(b), nn.ReLU()]

        self.b1 = nn.Sequential(*unit(cin, ones, 1))
        self.b2 = nn.Sequential(*unit(cin, threes, 1), *unit(threes, threes, 3))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), *unit(cin, pooled, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x)], dim=1)


class InceptionNet(nn.Module):
    def __init__(self, channels: int = 1, side: int = 28) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.i1, self.i2 = Inception(32, 16, 24, 8), Inception(48, 24, 32, 8)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.i1(F.max_pool2d(self.stem(x), 2)), 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.i2(x), 1), 1))


class VGGBNAfterReLU(nn.Module):
    """conv-ReLU-BN (batch norm after the activation), average pooling, dropout, two linear layers."""

    def __init__(self, channels: int = 1, side: int = 28) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout, pool in ((channels, 32, False), (32, 32, True), (32, 64, False), (64, 64, True)):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(cout)]
            layers += [nn.AvgPool2d(2)] if pool else []
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * (side // 4) ** 2, 128), nn.ReLU(),
                                        nn.Linear(128, 10))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS = {"resnet": ResNet, "vgg": VGG, "mobilenet": MobileNet, "densenet": DenseNet,
          "preact": PreActResNet, "inception": InceptionNet, "vgg_bn_after": VGGBNAfterReLU}  # fmt: skip


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return sum(int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum()) for i in range(0, len(y), 1000)) / len(y)


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random horizontal flips and 4-pixel translations (zero padding)."""
    flip = torch.rand(len(x)) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2,))
    return padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/fashion-mnist"))
    parser.add_argument("--dataset", choices=("fashion-mnist", "cifar10"), default="fashion-mnist")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.dataset == "cifar10":  # flips and 4-pixel crops, as CIFAR-10 scripts usually train
        (x, y), (xt, yt), prefix = load_cifar10(args.data, "train"), load_cifar10(args.data, "test"), "cifar10"
    else:
        (x, y), (xt, yt), prefix = load(args.data, "train"), load(args.data, "t10k"), "fmnist"
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        torch.manual_seed(args.seed)
        model = MODELS[name](x.shape[1], x.shape[2])
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
        started = time.time()
        model.train()
        for _ in range(args.steps):
            batch = torch.randint(len(y), (128,))
            inputs = x[batch]
            if args.dataset == "cifar10":
                inputs = augment(inputs)
            loss = F.cross_entropy(model(inputs), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        test = accuracy(model, xt, yt)
        torch.onnx.export(model, (torch.zeros(1, *x.shape[1:]),), str(args.out / f"{prefix}_{name}.onnx"), dynamo=False)
        info = {"model": name, "dataset": args.dataset, "preprocess": "x / 255", "test_accuracy": test,
                "steps": args.steps, "seconds": round(time.time() - started, 1),
                "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
        (args.out / f"{prefix}_{name}.json").write_text(json.dumps(info, indent=1))
        print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
