"""Small random SNN graphs for the fixed-point tests (quantize, Loihi emulator, Lava).

`make_snn(seed, variant)` builds an ANN by hand, takes data-driven per-channel thresholds
(99.9th percentile) and converts it, so every layer fires at useful rates.

* "basic": conv -> IF -> avgpool -> conv -> IF -> avgpool -> flatten -> linear -> IF -> linear
* "odd": affine input, strided conv with asymmetric padding, grouped dilated conv, an
  overlapping average pool (folded into a dense synapse), an odd-sized pool (floors),
  two consecutive linear maps (folded) and an affine after a conv.
* "residual": an identity shortcut and a strided 1x1-conv shortcut (batch norm after the
  Add), global average pooling.
* "concat": Inception-style concatenations of populations into a conv and of convs into a
  population, a DenseNet-style block input concatenated with its output (batch norm after
  it), and concatenated pooled branches into the classifier.
* "maxpool": LeNet/VGG-style max pooling (2x2, and an overlapping padded 3x3 with stride 2),
  converted with `maxpool` ("relu": IF-neuron max trees, which fixed point runs).
* "concat_maxpool": max pooling over channel concatenations of populations (SqueezeNet's fire
  module, Inception's pooled block output), converted with "relu" max trees.
* "stem_maxpool": a max-pool over a stem conv's currents (no ReLU before it), its output also
  concatenated on: the ANN pass rewrites it as a ReLU tree whose thresholds come from data.
* "depthwise": MobileNet-style depthwise and pointwise convolutions, a channel multiplier,
  batch norm after a ReLU, global average pooling.
* "wide": "depthwise" with one population's thresholds 8 times lower after conversion, so
  that one source spike is worth ~150 of its thresholds (as batch norm after a ReLU gave a
  plain-torch MobileNet): more than one 8-bit mantissa holds at the largest weight exponent.
"""

from __future__ import annotations

import numpy as np

from toolchain.core import ir
from toolchain.passes.calibrate import ThresholdSpec, compute_thresholds
from toolchain.passes.convert import ConversionOptions, convert, replace_maxpool


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _b(rng: np.random.Generator, n: int, scale: float = 0.1) -> np.ndarray:
    return rng.uniform(-scale, 2 * scale, n).astype(np.float32)


def make_ann(seed: int = 0, variant: str = "basic") -> ir.Graph:
    rng = np.random.default_rng(seed)
    if variant == "basic":
        shape = (2, 10, 10)
        nodes: list[ir.Node] = [
            ir.Conv2d("conv1", ["x"], weight=_w(rng, 4, 2, 3, 3), bias=_b(rng, 4), padding=(1, 1, 1, 1)),
            ir.Relu("act1", ["conv1"]),
            ir.AvgPool2d("pool1", ["act1"]),
            ir.Conv2d("conv2", ["pool1"], weight=_w(rng, 6, 4, 3, 3), bias=_b(rng, 6), padding=(1, 1, 1, 1)),
            ir.Relu("act2", ["conv2"]),
            ir.AvgPool2d("pool2", ["act2"]),
            ir.Flatten("flat", ["pool2"]),
            ir.Linear("fc1", ["flat"], weight=_w(rng, 16, 24), bias=_b(rng, 16)),
            ir.Relu("act3", ["fc1"]),
            ir.Linear("fc2", ["act3"], weight=_w(rng, 5, 16), bias=_b(rng, 5)),
        ]
    elif variant == "odd":
        shape = (3, 9, 11)
        nodes = [
            ir.ScaleShift("norm", ["x"], scale=rng.uniform(0.5, 2, 3).astype(np.float32), shift=_b(rng, 3, 0.3)),
            ir.Conv2d("conv1", ["norm"], weight=_w(rng, 4, 3, 3, 3), bias=_b(rng, 4), stride=(2, 2), padding=(1, 0, 0, 1)),
            ir.Relu("act1", ["conv1"]),
            ir.Conv2d(
                "conv2", ["act1"], weight=_w(rng, 4, 2, 3, 3), bias=_b(rng, 4), padding=(2, 2, 2, 2), dilation=(2, 2), groups=2
            ),
            ir.ScaleShift("bn2", ["conv2"], scale=rng.uniform(0.5, 1.5, 4).astype(np.float32), shift=_b(rng, 4)),
            ir.Relu("act2", ["bn2"]),
            ir.AvgPool2d("pool2", ["act2"], kernel=(3, 3), stride=(2, 2), padding=(1, 1, 1, 1)),
            ir.Conv2d("conv3", ["pool2"], weight=_w(rng, 6, 4, 1, 1), bias=_b(rng, 6)),
            ir.Relu("act3", ["conv3"]),
            ir.AvgPool2d("pool3", ["act3"]),
            ir.Flatten("flat", ["pool3"]),
            ir.Linear("fc1", ["flat"], weight=_w(rng, 12, 6), bias=_b(rng, 12)),
            ir.Linear("fc1b", ["fc1"], weight=_w(rng, 10, 12), bias=_b(rng, 10)),
            ir.Relu("act4", ["fc1b"]),
            ir.Linear("fc2", ["act4"], weight=_w(rng, 4, 10), bias=_b(rng, 4)),
        ]
    elif variant == "residual":
        shape = (2, 8, 8)
        nodes = [
            ir.Conv2d("conv1", ["x"], weight=_w(rng, 4, 2, 3, 3), bias=_b(rng, 4), padding=(1, 1, 1, 1)),
            ir.Relu("act1", ["conv1"]),
            ir.Conv2d("conv2", ["act1"], weight=_w(rng, 4, 4, 3, 3), bias=_b(rng, 4), padding=(1, 1, 1, 1)),
            ir.Relu("act2", ["conv2"]),
            ir.Conv2d("conv3", ["act2"], weight=_w(rng, 4, 4, 3, 3), bias=_b(rng, 4), padding=(1, 1, 1, 1)),
            ir.Add("add1", ["conv3", "act1"]),  # identity shortcut
            ir.Relu("act3", ["add1"]),
            ir.Conv2d("conv4", ["act3"], weight=_w(rng, 6, 4, 3, 3), bias=_b(rng, 6), stride=(2, 2), padding=(1, 1, 1, 1)),
            ir.Relu("act4", ["conv4"]),
            ir.Conv2d("conv5", ["act4"], weight=_w(rng, 6, 6, 3, 3), bias=_b(rng, 6), padding=(1, 1, 1, 1)),
            ir.Conv2d("short", ["act3"], weight=_w(rng, 6, 4, 1, 1), stride=(2, 2)),  # 1x1-conv shortcut
            ir.Add("add2", ["conv5", "short"]),
            ir.ScaleShift("bn5", ["add2"], scale=rng.uniform(0.5, 1.5, 6).astype(np.float32), shift=_b(rng, 6)),
            ir.Relu("act5", ["bn5"]),
            ir.AvgPool2d("gap", ["act5"], kernel=(4, 4), stride=(4, 4)),
            ir.Flatten("flat", ["gap"]),
            ir.Linear("fc", ["flat"], weight=_w(rng, 5, 6), bias=_b(rng, 5)),
        ]
    elif variant == "concat":
        shape = (2, 8, 8)
        nodes = [
            ir.Conv2d("conv1", ["x"], weight=_w(rng, 4, 2, 3, 3), bias=_b(rng, 4), padding=(1, 1, 1, 1)),
            ir.Relu("act1", ["conv1"]),
            ir.Conv2d("branch_a", ["act1"], weight=_w(rng, 3, 4, 1, 1), bias=_b(rng, 3)),
            ir.Relu("act2", ["branch_a"]),
            ir.Conv2d("branch_b", ["act1"], weight=_w(rng, 2, 4, 3, 3), bias=_b(rng, 2), padding=(1, 1, 1, 1)),
            ir.Relu("act3", ["branch_b"]),
            ir.Concat("cat1", ["act2", "act3"]),  # populations into a conv
            ir.Conv2d("conv4", ["cat1"], weight=_w(rng, 4, 5, 3, 3), bias=_b(rng, 4), padding=(1, 1, 1, 1)),
            ir.Relu("act4", ["conv4"]),
            ir.Concat("cat2", ["act1", "act4"]),  # a block's input with its output
            ir.ScaleShift("bn5", ["cat2"], scale=rng.uniform(0.5, 1.5, 8).astype(np.float32), shift=_b(rng, 8)),
            ir.Relu("act5", ["bn5"]),
            ir.Conv2d("conv6a", ["act4"], weight=_w(rng, 2, 4, 1, 1), bias=_b(rng, 2)),
            ir.Conv2d("conv6b", ["act4"], weight=_w(rng, 3, 4, 3, 3), bias=_b(rng, 3), padding=(1, 1, 1, 1)),
            ir.Concat("cat3", ["conv6a", "conv6b"]),  # convs into a population
            ir.Relu("act6", ["cat3"]),
            ir.AvgPool2d("pool5", ["act5"], kernel=(4, 4), stride=(4, 4)),
            ir.AvgPool2d("pool6", ["act6"], kernel=(4, 4), stride=(4, 4)),
            ir.Concat("cat4", ["pool5", "pool6"]),
            ir.Flatten("flat", ["cat4"]),
            ir.Linear("fc", ["flat"], weight=_w(rng, 5, 52), bias=_b(rng, 5)),
        ]
    elif variant == "maxpool":
        shape = (2, 10, 10)
        nodes = [
            ir.Conv2d("conv1", ["x"], weight=_w(rng, 4, 2, 3, 3), bias=_b(rng, 4), padding=(1, 1, 1, 1)),
            ir.Relu("act1", ["conv1"]),
            ir.MaxPool2d("pool1", ["act1"]),
            ir.Conv2d("conv2", ["pool1"], weight=_w(rng, 6, 4, 3, 3), bias=_b(rng, 6), padding=(1, 1, 1, 1)),
            ir.Relu("act2", ["conv2"]),
            ir.MaxPool2d("pool2", ["act2"], kernel=(3, 3), stride=(2, 2), padding=(1, 1, 1, 1)),
            ir.Flatten("flat", ["pool2"]),
            ir.Linear("fc", ["flat"], weight=_w(rng, 5, 54), bias=_b(rng, 5)),
        ]
    elif variant == "concat_maxpool":  # SqueezeNet's fire module and Inception's pooled block output
        shape = (2, 10, 10)
        nodes = [
            ir.Conv2d("conv1", ["x"], weight=_w(rng, 4, 2, 3, 3), bias=_b(rng, 4), padding=(1, 1, 1, 1)),
            ir.Relu("act1", ["conv1"]),
            ir.Conv2d("squeeze", ["act1"], weight=_w(rng, 2, 4, 1, 1), bias=_b(rng, 2)),
            ir.Relu("act_s", ["squeeze"]),
            ir.Conv2d("expand1", ["act_s"], weight=_w(rng, 3, 2, 1, 1), bias=_b(rng, 3)),
            ir.Relu("act_e1", ["expand1"]),
            ir.Conv2d("expand3", ["act_s"], weight=_w(rng, 3, 2, 3, 3), bias=_b(rng, 3), padding=(1, 1, 1, 1)),
            ir.Relu("act_e3", ["expand3"]),
            ir.Concat("fire", ["act_e1", "act_e3"]),
            ir.MaxPool2d("pool1", ["fire"]),  # over two populations' spikes
            ir.Conv2d("conv2", ["pool1"], weight=_w(rng, 4, 6, 3, 3), bias=_b(rng, 4), padding=(1, 1, 1, 1)),
            ir.Relu("act2", ["conv2"]),
            ir.Conv2d("branch", ["pool1"], weight=_w(rng, 2, 6, 1, 1), bias=_b(rng, 2)),
            ir.Relu("act_b", ["branch"]),
            ir.Concat("cat2", ["act2", "act_b"]),
            ir.MaxPool2d("pool2", ["cat2"], kernel=(3, 3), stride=(2, 2), padding=(1, 1, 1, 1)),
            ir.Flatten("flat", ["pool2"]),
            ir.Linear("fc", ["flat"], weight=_w(rng, 5, 54), bias=_b(rng, 5)),
        ]
    elif variant == "stem_maxpool":  # a max-pool over currents: a stem conv with no ReLU before the pool
        shape = (2, 10, 10)
        nodes = [
            ir.Conv2d("stem", ["x"], weight=_w(rng, 4, 2, 3, 3), bias=_b(rng, 4), padding=(1, 1, 1, 1)),
            ir.MaxPool2d("pool1", ["stem"]),
            ir.ScaleShift("bn1", ["pool1"], scale=rng.uniform(0.5, 1.5, 4).astype(np.float32), shift=_b(rng, 4)),
            ir.Relu("act1", ["bn1"]),
            ir.Conv2d("conv2", ["act1"], weight=_w(rng, 4, 4, 3, 3), bias=_b(rng, 4), padding=(1, 1, 1, 1)),
            ir.Relu("act2", ["conv2"]),
            ir.Concat("cat", ["pool1", "act2"]),  # the pooled currents also go on, DenseNet-style
            ir.ScaleShift("bn3", ["cat"], scale=rng.uniform(0.5, 1.5, 8).astype(np.float32), shift=_b(rng, 8)),
            ir.Relu("act3", ["bn3"]),
            ir.Flatten("flat", ["act3"]),
            ir.Linear("fc", ["flat"], weight=_w(rng, 5, 200), bias=_b(rng, 5)),
        ]
    elif variant == "depthwise":
        shape = (3, 8, 8)
        nodes = [
            ir.Conv2d("conv1", ["x"], weight=_w(rng, 4, 3, 3, 3), bias=_b(rng, 4), padding=(1, 1, 1, 1)),
            ir.Relu("act1", ["conv1"]),
            ir.Conv2d("dw2", ["act1"], weight=_w(rng, 4, 1, 3, 3), bias=_b(rng, 4), padding=(1, 1, 1, 1), groups=4),
            ir.ScaleShift("bn2", ["dw2"], scale=rng.uniform(0.5, 1.5, 4).astype(np.float32), shift=_b(rng, 4)),
            ir.Relu("act2", ["bn2"]),
            ir.Conv2d("pw3", ["act2"], weight=_w(rng, 8, 4, 1, 1), bias=_b(rng, 8)),
            ir.Relu("act3", ["pw3"]),
            ir.ScaleShift("bn3", ["act3"], scale=rng.uniform(0.5, 1.5, 8).astype(np.float32), shift=_b(rng, 8)),  # after ReLU
            ir.Conv2d(
                "dw4", ["bn3"], weight=_w(rng, 16, 1, 3, 3), bias=_b(rng, 16), stride=(2, 2), padding=(1, 1, 1, 1), groups=8
            ),
            ir.Relu("act4", ["dw4"]),
            ir.ScaleShift("bn4", ["act4"], scale=rng.uniform(0.5, 1.5, 16).astype(np.float32), shift=_b(rng, 16)),
            ir.AvgPool2d("gap", ["bn4"], kernel=(4, 4), stride=(4, 4)),
            ir.Flatten("flat", ["gap"]),
            ir.Linear("fc", ["flat"], weight=_w(rng, 5, 16), bias=_b(rng, 5)),
        ]
    else:
        raise ValueError(variant)
    graph = ir.Graph("x", shape, nodes, nodes[-1].name)
    graph.infer_shapes()
    return graph


def make_inputs(graph: ir.Graph, count: int, seed: int = 1) -> np.ndarray:
    """Inputs in [0, 1] (so `input_range=(0, 1)` covers them)."""
    return np.random.default_rng(seed).uniform(0, 1, (count, *graph.input_shape)).astype(np.float32)


def make_snn(seed: int = 0, variant: str = "basic", per_channel: bool = True, maxpool: str = "relu") -> ir.Graph:
    ann = replace_maxpool(make_ann(seed, "depthwise" if variant == "wide" else variant), maxpool)
    x = make_inputs(ann, 64, seed + 100)
    spec = ThresholdSpec("percentile", percentile=99.9, per_channel=per_channel)
    snn = convert(ann, compute_thresholds(ann, spec, [x], len(x), "cpu"), ConversionOptions(maxpool=maxpool))
    if variant == "wide":
        act4 = snn.node("act4")
        act4.threshold, act4.v0 = act4.threshold / 8, act4.v0 / 8  # type: ignore[attr-defined]
    return snn
