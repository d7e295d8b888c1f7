"""Graph passes after the op handlers: merge and lower element-wise chains, fold affines, prune.

Folding an `ScaleShift` (x * s + b per channel: a batch norm, a bias, an input normalisation)
into a neighbouring synapse is exact when:

- backward: the producer is a Conv2d/Linear whose only consumer is the ScaleShift
  (W *= s per output channel, bias = bias * s + b);
- through a ReLU: s > 0, b = 0 and the ReLU's producer is such a synapse
  (s * relu_c(x) = relu_{s*c}(s * x), also for QCFS);
- forward: every consumer is a Conv2d/Linear (W *= s per input channel,
  bias += W . b), and where b != 0 no consumer is a padded convolution (padding
  zeros would not be shifted); an ScaleShift before a Flatten moves after it first.

What cannot be folded stays an `ScaleShift` node.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from toolchain.core import ir
from toolchain.passes.frontend.patterns import Elementwise, Fail, lower

SYNAPSES = (ir.Conv2d, ir.Linear)


class Net:
    """The node list under construction, with the lookups the passes need."""

    def __init__(self, input_name: str, input_shape: tuple[int, ...], nodes: list[ir.Node], output: str):
        self.input_name = input_name
        self.input_shape = input_shape
        self.nodes = nodes
        self.output = output

    def graph(self) -> ir.Graph:
        return ir.Graph(self.input_name, self.input_shape, self.nodes, self.output)

    def infer_shapes(self) -> None:
        self.graph().infer_shapes()

    def producer(self, name: str) -> ir.Node | None:
        return next((n for n in self.nodes if n.name == name), None)

    def consumers(self, name: str) -> list[ir.Node]:
        return [n for n in self.nodes if name in n.inputs]

    def sole_consumer(self, node: ir.Node, consumer: ir.Node) -> bool:
        return node.name != self.output and self.consumers(node.name) == [consumer]

    def rename_uses(self, old: str, new: str, skip: ir.Node | None = None) -> None:
        for n in self.nodes:
            if n is not skip:
                n.inputs = [new if i == old else i for i in n.inputs]
        if self.output == old:
            self.output = new

    def remove(self, node: ir.Node, replacement: str) -> None:
        """Drop a node; its consumers read `replacement` instead."""
        self.nodes.remove(node)
        self.rename_uses(node.name, replacement)


# ------------------------------------------------------------ element-wise chains


def merge_elementwise(net: Net) -> None:
    """Join chains of element-wise pseudo-nodes so the patterns see whole activations."""
    changed = True
    while changed:
        changed = False
        for node in net.nodes:
            if not isinstance(node, Elementwise):
                continue
            parent = net.producer(node.inputs[0])
            if isinstance(parent, Elementwise) and net.sole_consumer(parent, node):
                node.tokens = parent.tokens + node.tokens
                node.inputs = list(parent.inputs)
                net.nodes.remove(parent)
                changed = True
                break


def lower_elementwise(net: Net, namer: Callable[[str], str], fail: Fail, expected: dict[str, tuple[int, ...]]) -> None:
    for node in [n for n in net.nodes if isinstance(n, Elementwise)]:
        made = lower(node, namer, fail)
        index = net.nodes.index(node)
        net.nodes[index : index + 1] = made
        for m in made:
            if node.name in expected:
                expected[m.name] = expected[node.name]
        net.rename_uses(node.name, made[-1].name if made else node.inputs[0])
        expected.pop(node.name, None)


# ------------------------------------------------------------ affine folding


def _vector(values: np.ndarray, length: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(values, np.float64).reshape(-1), (length,)).copy()


def _channels(node: ir.Node) -> int:
    return int(node.shape[0])


def _fold_backward(net: Net, affine: ir.ScaleShift) -> bool:
    synapse = net.producer(affine.inputs[0])
    if not isinstance(synapse, SYNAPSES) or not net.sole_consumer(synapse, affine):
        return False
    _scale_synapse_outputs(synapse, affine)
    net.remove(affine, synapse.name)
    return True


def _scale_synapse_outputs(synapse: ir.Conv2d | ir.Linear, affine: ir.ScaleShift) -> None:
    count = _channels(synapse)
    scale, shift = _vector(affine.scale, count), _vector(affine.shift, count)
    weight = np.asarray(synapse.weight, np.float64)
    bias = np.zeros(count) if synapse.bias is None else np.asarray(synapse.bias, np.float64)
    synapse.weight = (weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(np.float32)
    synapse.bias = (bias * scale + shift).astype(np.float32)


def _fold_through_relu(net: Net, affine: ir.ScaleShift) -> bool:
    relu = net.producer(affine.inputs[0])
    if not isinstance(relu, ir.Relu) or not net.sole_consumer(relu, affine):
        return False
    synapse = net.producer(relu.inputs[0])
    if not isinstance(synapse, SYNAPSES) or not net.sole_consumer(synapse, relu):
        return False
    count = _channels(relu)
    scale, shift = _vector(affine.scale, count), _vector(affine.shift, count)
    if np.any(shift != 0) or np.any(scale <= 0):
        return False
    _scale_synapse_outputs(synapse, ir.ScaleShift(affine.name, [], scale=scale, shift=np.zeros(count)))
    if relu.ceiling is not None:
        ceiling = _vector(relu.ceiling, count) * scale
        relu.ceiling = (ceiling[:1] if np.all(ceiling == ceiling[0]) else ceiling).astype(np.float32)
    net.remove(affine, relu.name)
    return True


def _fold_forward(net: Net, affine: ir.ScaleShift) -> bool:
    consumers = net.consumers(affine.name)
    if affine.name == net.output or not consumers or not all(isinstance(c, SYNAPSES) for c in consumers):
        return False
    count = _channels(affine)
    scale, shift = _vector(affine.scale, count), _vector(affine.shift, count)
    if np.any(shift != 0) and any(isinstance(c, ir.Conv2d) and any(c.padding) for c in consumers):
        return False
    for consumer in consumers:
        weight = np.asarray(consumer.weight, np.float64)
        outputs = weight.shape[0]
        bias = np.zeros(outputs) if consumer.bias is None else np.asarray(consumer.bias, np.float64)
        if isinstance(consumer, ir.Conv2d):
            per_group_in, per_group_out = weight.shape[1], outputs // consumer.groups
            channel = (np.arange(outputs)[:, None] // per_group_out) * per_group_in + np.arange(per_group_in)[None, :]
            consumer.bias = (bias + (weight * shift[channel][:, :, None, None]).sum(axis=(1, 2, 3))).astype(np.float32)
            consumer.weight = (weight * scale[channel][:, :, None, None]).astype(np.float32)
        else:
            consumer.bias = (bias + weight @ shift).astype(np.float32)
            consumer.weight = (weight * scale[None, :]).astype(np.float32)
    net.remove(affine, affine.inputs[0])
    return True


def _past_flatten(net: Net, affine: ir.ScaleShift, expected: dict[str, tuple[int, ...]]) -> bool:
    """ScaleShift -> Flatten -> Linear(s): move the ScaleShift after the Flatten (per feature)."""
    consumers = net.consumers(affine.name)
    if affine.name == net.output or len(consumers) != 1 or not isinstance(consumers[0], ir.Flatten):
        return False
    flatten = consumers[0]
    after = net.consumers(flatten.name)
    if flatten.name == net.output or not after or not all(isinstance(c, ir.Linear) for c in after):
        return False
    count = _channels(affine)
    per_channel = int(np.prod(affine.shape[1:]))
    affine.scale = np.repeat(_vector(affine.scale, count), per_channel).astype(np.float32)
    affine.shift = np.repeat(_vector(affine.shift, count), per_channel).astype(np.float32)
    flatten.inputs = list(affine.inputs)
    affine.inputs = [flatten.name]
    net.rename_uses(flatten.name, affine.name, skip=affine)
    net.nodes.remove(affine)
    net.nodes.insert(net.nodes.index(flatten) + 1, affine)
    if flatten.name in expected:
        expected[affine.name] = expected[flatten.name]
    return True


def _is_identity(affine: ir.ScaleShift) -> bool:
    return bool(np.all(np.asarray(affine.scale) == 1) and np.all(np.asarray(affine.shift) == 0))


def fold_affines(net: Net, expected: dict[str, tuple[int, ...]]) -> None:
    changed = True
    while changed:
        changed = False
        net.infer_shapes()
        for affine in [n for n in net.nodes if isinstance(n, ir.ScaleShift)]:
            if _is_identity(affine):
                net.remove(affine, affine.inputs[0])
            elif not (
                _fold_backward(net, affine)
                or _fold_through_relu(net, affine)
                or _fold_forward(net, affine)
                or _past_flatten(net, affine, expected)
            ):
                continue
            changed = True
            break


def prune(net: Net) -> None:
    """Drop nodes the output does not depend on."""
    needed = {net.output}
    for node in reversed(net.nodes):
        if node.name in needed:
            needed.update(node.inputs)
    net.nodes = [n for n in net.nodes if n.name in needed]
