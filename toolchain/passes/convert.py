"""ANN graph + thresholds -> SNN graph.

Every `Relu` becomes an `IFNeuron` with reset by subtraction whose threshold is the
calibrated theta and whose initial potential is 0, theta/2 or a searched fraction of
theta. The last layer does not spike: a `Readout` accumulates it over time. Max pooling
becomes a spiking max-pool (default), an average pool (changes the ANN; warned about),
or an error, as the user chooses.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np

from toolchain.core import ir
from toolchain.errors import ToolchainError, option
from toolchain.passes.calibrate import Thresholds

log = logging.getLogger(__name__)

MAXPOOL_POLICIES = ("spiking", "avg", "error")
V0_MODES = ("zero", "half", "optimal")


@dataclass
class ConversionOptions:
    v0: str = "half"  # zero | half | optimal (optimal starts from half; calibrate.optimise_v0 refines it)
    maxpool: str = "spiking"


def replace_maxpool(graph: ir.Graph, policy: str) -> ir.Graph:
    """Apply the max-pool policy to an ANN graph (returns a new graph when anything changes)."""
    if policy not in MAXPOOL_POLICIES:
        raise ToolchainError(f"maxpool={policy!r}: choose one of {', '.join(MAXPOOL_POLICIES)}")
    pools = [n for n in graph.nodes if isinstance(n, ir.MaxPool2d)]
    if not pools or policy == "spiking":
        return graph
    if policy == "error":
        raise ToolchainError(
            f"node {pools[0].name!r} (MaxPool): max pooling refused by {option('maxpool', 'error')}; "
            f"use {option('maxpool', 'spiking')} (spiking max-pool) or {option('maxpool', 'avg')} "
            "(average pooling, changes the ANN)"
        )
    graph = copy.deepcopy(graph)
    for index, node in enumerate(graph.nodes):
        if isinstance(node, ir.MaxPool2d):
            log.warning("node %s (MaxPool): replaced by average pooling, which changes the ANN's function", node.name)
            graph.nodes[index] = ir.AvgPool2d(
                node.name, node.inputs, node.shape, node.kernel, node.stride, node.padding, count_include_pad=False
            )
    return graph


def convert(ann: ir.Graph, thresholds: Thresholds, options: ConversionOptions | None = None) -> ir.Graph:
    """Build the SNN graph. `ann` must already have its max-pool policy applied."""
    options = options or ConversionOptions()
    if options.v0 not in V0_MODES:
        raise ToolchainError(f"v0={options.v0!r}: choose one of {', '.join(V0_MODES)}")
    if ann.is_snn:
        raise ToolchainError("the graph is already an SNN")
    fraction = 0.0 if options.v0 == "zero" else 0.5
    nodes: list[ir.Node] = []
    for node in ann.nodes:
        if isinstance(node, ir.Relu):
            if node.name not in thresholds.values:
                raise ToolchainError(f"node {node.name!r} (Relu): no threshold was computed for it")
            theta = np.asarray(thresholds.values[node.name], np.float32).reshape(-1)
            nodes.append(ir.IFNeuron(node.name, list(node.inputs), node.shape, threshold=theta, v0=theta * fraction))
        else:
            nodes.append(copy.deepcopy(node))
    readout = ir.Readout(f"{ann.output}/readout", [ann.output], ann.shape_of(ann.output))
    nodes.append(readout)
    meta = dict(ann.meta)
    meta["conversion"] = {
        "v0": options.v0,
        "maxpool": options.maxpool,
        "threshold_source": dict(thresholds.source),
    }
    return ir.Graph(ann.input_name, ann.input_shape, nodes, readout.name, copy.deepcopy(ann.preprocess), meta)


def ann_view(snn: ir.Graph) -> ir.Graph:
    """The ANN that an SNN approximates: IF neurons back to clip(x, 0, theta), no readout.

    Used to compare layer activations and to run the ANN when the ONNX file is not at hand.
    """
    nodes: list[ir.Node] = []
    for node in snn.nodes:
        if isinstance(node, ir.IFNeuron):
            nodes.append(ir.Relu(node.name, list(node.inputs), node.shape, ceiling=node.threshold))
        elif not isinstance(node, ir.Readout):
            nodes.append(node)
    output = snn.node(snn.output).inputs[0] if isinstance(snn.node(snn.output), ir.Readout) else snn.output
    return ir.Graph(snn.input_name, snn.input_shape, nodes, output, snn.preprocess, snn.meta)
