"""Constant folding: evaluate every node whose inputs are all known constants.

General, not a list of special cases: initialisers and `Constant` outputs are known;
`Shape` and `Size` become known from the statically inferred shapes; any other node
whose inputs are all known is run once with onnx's reference evaluator and its outputs
become known too. What remains is the dynamic part of the network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

import numpy as np
import onnx
from onnx import numpy_helper

Shape = tuple[int, ...]
Fail = Callable[[onnx.NodeProto, str], NoReturn]

# Ops that must not be evaluated once at load time.
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def initializer_arrays(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        try:
            arrays[init.name] = numpy_helper.to_array(init)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"initializer {init.name!r} cannot be read ({type(exc).__name__}: {exc})") from None
    for sparse in graph.sparse_initializer:
        values = numpy_helper.to_array(sparse.values)
        indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
        dims = tuple(int(d) for d in sparse.dims)
        flat = indices if indices.ndim == 1 else np.ravel_multi_index(tuple(indices.T), dims)
        full = np.zeros(int(np.prod(dims)), values.dtype)
        full[flat] = values
        arrays[sparse.values.name] = full.reshape(dims)
    return arrays


def _shape_value(node: onnx.NodeProto, shape: Shape) -> np.ndarray:
    if node.op_type == "Size":
        return np.array(int(np.prod(shape)), np.int64)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    start = int(attrs.get("start", 0))
    end = attrs.get("end")
    return np.array(shape[start : None if end is None else int(end)], np.int64)


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def fold_constants(
    nodes: list[onnx.NodeProto],
    known: dict[str, np.ndarray],
    shapes: dict[str, Shape | None],
    opsets: dict[str, int],
    fail: Fail,
) -> list[onnx.NodeProto]:
    """Extend `known` in place with every foldable output; return the nodes that remain."""
    from onnx.reference import ReferenceEvaluator

    remaining: list[onnx.NodeProto] = []
    for node in nodes:
        inputs = [name for name in node.input if name]
        value: list[np.ndarray] | None = None
        if node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx"):
            shape = shapes.get(node.input[0])
            if shape is not None:
                value = [_shape_value(node, shape)]
        elif (
            all(name in known for name in inputs)
            and node.domain in ("", "ai.onnx")
            and node.op_type not in NONDETERMINISTIC
            and not _has_subgraph(node)
        ):
            try:
                evaluator = ReferenceEvaluator(node, opsets={"": opsets.get("", 1)})
                with np.errstate(all="ignore"):  # NaN/Inf results are reported by the caller
                    value = evaluator.run(None, {name: known[name] for name in inputs})
            except Exception as exc:  # noqa: BLE001 - reported as a one-line user error
                fail(node, f"cannot fold this constant subgraph ({type(exc).__name__}: {exc})")
            if not all(isinstance(v, np.ndarray) or np.isscalar(v) for v in value):
                fail(node, "constant folding gave a non-tensor value")
        if value is None:
            remaining.append(node)
            continue
        for name, array in zip(node.output, value, strict=False):
            if name:
                known[name] = np.asarray(array)
    return remaining
