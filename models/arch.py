"""Architectures built for conversion: average pooling only, an activation after every
conv/linear except the last, no max pooling, no dropout at inference.

Every builder takes `(in_channels, num_classes, act, input_size)` where `act` is a
factory of activation modules (see `models.layers.make_act`) and `input_size` the side
of the square input image.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from models.layers import make_act

Act = Callable[[], nn.Module]

# default input side for each architecture
DEFAULT_INPUT_SIZE = {
    "cnn_small": 28, "vgg_small": 28, "vgg_fast": 32, "vgg_air": 32, "vgg16": 32, "resnet20": 32, "resnet18": 32,
}  # fmt: skip


def cnn_small(in_channels: int = 1, num_classes: int = 10, act: Act | None = None, input_size: int = 28) -> nn.Module:
    """Two 5x5 convs with 2x2 average pooling and a hidden linear layer (about 0.2 M parameters)."""
    act = act or make_act("clip")
    side = input_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 5, padding=2),
        act(),
        nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2),
        act(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * side * side, 128),
        act(),
        nn.Linear(128, num_classes),
    )


def _conv_bn(in_channels: int, out_channels: int, act: Act) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), act()]


def _pooled_blocks(channels: int, widths: tuple[int, ...], act: Act) -> tuple[list[nn.Module], int]:
    """The fast networks' blocks: for each width, conv-BN-act, 2x2 average pooling, conv-BN-act.
    Returns the layers and the channel count they end with."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += _conv_bn(channels, width, act) + [nn.AvgPool2d(2)] + _conv_bn(width, width, act)
        channels = width
    return layers, channels


def vgg_small(
    in_channels: int = 1, num_classes: int = 10, act: Act | None = None, input_size: int = 28, width: int = 32
) -> nn.Module:
    """VGG-style for 28x28: w-w-pool-2w-2w-pool-4w 3x3 convs with BN, then a linear classifier."""
    act = act or make_act("clip")
    w = width
    layers: list[nn.Module] = []
    layers += _conv_bn(in_channels, w, act) + _conv_bn(w, w, act) + [nn.AvgPool2d(2)]
    layers += _conv_bn(w, 2 * w, act) + _conv_bn(2 * w, 2 * w, act) + [nn.AvgPool2d(2)]
    layers += _conv_bn(2 * w, 4 * w, act) + [nn.AvgPool2d(2)]
    side = input_size // 8
    layers += [nn.Flatten(), nn.Linear(4 * w * side * side, num_classes)]
    return nn.Sequential(*layers)


def vgg_fast(
    in_channels: int = 3, num_classes: int = 10, act: Act | None = None, input_size: int = 32, width: int = 48
) -> nn.Module:
    """The fast-training CIFAR network of `--recipe fast`, in the shape of Jordan's airbench (2024) but
    made of what converts: a stem of w/2 channels (3x3; `--recipe fast` sets it to frozen patch
    whitening), then three blocks (w, 2w, 4w) of conv-BN-act, 2x2 average pooling, conv-BN-act, and
    global average pooling into one linear layer. No max pooling, no residual Add: every layer
    lowers to a Loihi synapse. Width 48 is about 48 M multiply-accumulates per 32x32 image."""
    act = act or make_act("clip")
    stem = max(1, width // 2)
    blocks, channels = _pooled_blocks(stem, (width, 2 * width, 4 * width), act)
    layers = _conv_bn(in_channels, stem, act) + blocks
    side = input_size // 8
    layers += [nn.AvgPool2d(side), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def vgg_air(
    in_channels: int = 3, num_classes: int = 10, act: Act | None = None, input_size: int = 32, width: int = 64
) -> nn.Module:
    """airbench's network (Jordan 2024) in what converts, trained with `--recipe fast`: a 2x2 unpadded stem
    of 2 * 3 * 4 channels (all the patch-whitening directions with both signs), then three blocks of
    widths (w, 4w, 4w), each conv-BN-act, 2x2 average pooling, conv-BN-act, and global average
    pooling into one linear layer. The wide second block is where airbench puts its capacity; the
    unpadded stem makes the maps 31, 15, 7 and 3 pixels wide. Average pooling instead of max
    pooling and a clipped ReLU instead of GELU: every layer lowers to one Loihi synapse. Width 64 is
    about 118 M multiply-accumulates per 32x32 image."""
    act = act or make_act("clip")
    stem = 2 * in_channels * 2 * 2  # both signs of every direction of a 2x2 patch
    blocks, channels = _pooled_blocks(stem, (width, 4 * width, 4 * width), act)
    layers = [nn.Conv2d(in_channels, stem, 2, bias=False), nn.BatchNorm2d(stem), act(), *blocks]
    side = (input_size - 1) // 8  # the unpadded 2x2 stem takes one pixel, each of the three poolings halves (floor)
    layers += [nn.AvgPool2d(side), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


VGG16_CFG = (64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512, "P")


def vgg16(in_channels: int = 3, num_classes: int = 10, act: Act | None = None, input_size: int = 32) -> nn.Module:
    """VGG-16 for CIFAR: 13 3x3 convs with BN, average pooling, 512-512-classes classifier."""
    act = act or make_act("clip")
    layers: list[nn.Module] = []
    channels = in_channels
    for item in VGG16_CFG:
        if item == "P":
            layers.append(nn.AvgPool2d(2))
        else:
            layers += _conv_bn(channels, int(item), act)
            channels = int(item)
    side = input_size // 32
    layers += [nn.Flatten(), nn.Linear(512 * side * side, 512), act(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """conv-BN-act-conv-BN plus a shortcut (1x1 conv + BN when the shape changes), then act."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, act: Act):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = act()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.act2 = act()

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        act: Act,
        widths: tuple[int, ...],
        blocks: int,
        input_size: int,
    ):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, widths[0], act))
        stages: list[nn.Module] = []
        channels = widths[0]
        for index, width in enumerate(widths):
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(BasicBlock(channels, width, stride, act))
                channels = width
        self.layers = nn.Sequential(*stages)
        side = input_size // 2 ** (len(widths) - 1)
        self.pool = nn.AvgPool2d(side)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


def resnet20(in_channels: int = 3, num_classes: int = 10, act: Act | None = None, input_size: int = 32) -> nn.Module:
    """CIFAR ResNet-20 (He et al. 2016): 16-32-64 channels, 3 basic blocks per stage."""
    return ResNet(in_channels, num_classes, act or make_act("clip"), (16, 32, 64), 3, input_size)


def resnet18(in_channels: int = 3, num_classes: int = 10, act: Act | None = None, input_size: int = 32) -> nn.Module:
    """CIFAR ResNet-18: 3x3 stem without max pooling, 64-128-256-512 channels, 2 blocks per stage."""
    return ResNet(in_channels, num_classes, act or make_act("clip"), (64, 128, 256, 512), 2, input_size)


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "cnn_small": cnn_small,
    "vgg_small": vgg_small,
    "vgg_fast": vgg_fast,
    "vgg_air": vgg_air,
    "vgg16": vgg16,
    "resnet20": resnet20,
    "resnet18": resnet18,
}


WIDTH_ARCHS = ("vgg_small", "vgg_fast", "vgg_air")  # architectures with a width (base channel count) option


def build(
    arch: str,
    in_channels: int,
    num_classes: int,
    act: Act | None = None,
    input_size: int | None = None,
    width: int | None = None,
) -> nn.Module:
    """Build a registered architecture by name (`width` only for vgg_small (default 32), vgg_fast (48)
    and vgg_air (64))."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    size = input_size or DEFAULT_INPUT_SIZE[arch]
    if width is None:
        return ARCHS[arch](in_channels, num_classes, act, size)
    if arch not in WIDTH_ARCHS:
        raise ValueError(f"{arch} has no width option (only {', '.join(WIDTH_ARCHS)})")
    return ARCHS[arch](in_channels, num_classes, act, size, width=width)
