"""Schema checks of an artifact's JSON documents and arrays on load: types, shapes, ranges.

The manifest (`toolchain.manifest`) says a file is the one the build wrote; these checks say
a document is one the toolchain can run, so that a foreign or hand-made artifact is one
clear line naming the file and the field, never a traceback or a silently wrong result.
The field types come from the dataclasses themselves (`ir` nodes, `quantize.FixedLayer`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import ToolchainError

MAX_DIM = 1 << 24  # no tensor dimension of a real network is larger


class SchemaError(ToolchainError):
    pass


def fail(path: Path, where: str, message: str) -> typing.NoReturn:
    raise SchemaError(f"{path}: {where}: {message}; rebuild the artifact")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def check_shape(path: Path, where: str, value: Any, length: int | None = None) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(is_int(d) and 0 < d <= MAX_DIM for d in value):
        fail(path, where, f"expected a list of positive integers, found {str(value)[:80]}")
    if length is not None and len(value) != length:
        fail(path, where, f"expected {length} values, found {len(value)}")
    return tuple(value)


def _tensor(path: Path, where: str, value: Any, tensors: dict[str, np.ndarray]) -> np.ndarray:
    if not (isinstance(value, dict) and isinstance(value.get("tensor"), str)):
        fail(path, where, "expected a tensor reference")
    array = tensors.get(value["tensor"])
    if array is None:
        fail(path, where, f"tensor {value['tensor']!r} is not in the tensors file")
    if array.dtype.kind not in "biuf" or (array.dtype.kind == "f" and not np.isfinite(array).all()):
        fail(path, where, f"tensor {value['tensor']!r} is not finite numbers ({array.dtype})")
    return array


def _allowed(annotation: Any) -> tuple[Any, bool]:
    """(the base type, whether None is allowed) of a dataclass field annotation."""
    hint = annotation
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    return hint, optional


def check_fields(
    path: Path, where: str, cls: type, record: Any, tensors: dict[str, np.ndarray], skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The record's fields, typed as `cls` declares them: tensors looked up, lists of ints as tuples.
    `skip` names keys the caller reads itself; any other key `cls` does not have is refused (a field
    in the wrong place would otherwise be ignored without a word)."""
    if not isinstance(record, dict):
        fail(path, where, "expected an object")
    unknown = set(record) - {f.name for f in dataclasses.fields(cls)} - set(skip)
    if unknown:
        fail(path, where, f"unknown fields {sorted(unknown)}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name not in record:
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if f.name not in skip and not has_default:
                fail(path, where, f"field {f.name!r} is missing")
            continue
        value = record[f.name]
        kind, optional = _allowed(hints[f.name])
        here = f"{where}.{f.name}"
        if value is None and optional:
            values[f.name] = None
        elif kind is np.ndarray:
            values[f.name] = _tensor(path, here, value, tensors)
        elif kind is str:
            if not isinstance(value, str):
                fail(path, here, f"expected text, found {type(value).__name__}")
            values[f.name] = value
        elif kind is bool:
            if not isinstance(value, bool):
                fail(path, here, f"expected true or false, found {str(value)[:40]}")
            values[f.name] = value
        elif kind is int:
            if not is_int(value) or abs(value) > 2**62:
                fail(path, here, f"expected an integer, found {str(value)[:40]}")
            values[f.name] = value
        elif kind is float:
            if not is_number(value):
                fail(path, here, f"expected a finite number, found {str(value)[:40]}")
            values[f.name] = float(value)
        elif typing.get_origin(kind) is tuple:
            if not isinstance(value, list) or not all(is_int(v) and 0 <= v <= MAX_DIM for v in value):
                fail(path, here, f"expected a list of non-negative integers, found {str(value)[:80]}")
            args = typing.get_args(kind)
            if args and args[-1] is not Ellipsis and len(value) != len(args):
                fail(path, here, f"expected {len(args)} integers, found {len(value)}")
            values[f.name] = tuple(value)
        elif typing.get_origin(kind) is list:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                fail(path, here, "expected a list of names")
            values[f.name] = list(value)
        elif typing.get_origin(kind) is dict:
            if not isinstance(value, dict):
                fail(path, here, "expected an object")
            values[f.name] = value
        else:
            values[f.name] = value
    return values


def check_preprocess(path: Path, record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        fail(path, "preprocess", "expected an object")
    scale = record.get("scale")
    if scale is not None and not (is_number(scale) and scale > 0):
        fail(path, "preprocess.scale", f"expected a positive number, found {str(scale)[:40]}")
    for key in ("mean", "std"):
        values = record.get(key, [0.0] if key == "mean" else [1.0])
        if not isinstance(values, list) or not values or not all(is_number(v) for v in values):
            fail(path, f"preprocess.{key}", f"expected a list of finite numbers, found {str(values)[:80]}")
        if key == "std" and not all(v > 0 for v in values):
            fail(path, "preprocess.std", f"every std must be positive, found {values}")
    layout = record.get("layout", "NCHW")
    if not isinstance(layout, str):
        fail(path, "preprocess.layout", "expected text")
    unknown = set(record) - {"scale", "mean", "std", "layout"}
    if unknown:
        fail(path, "preprocess", f"unknown fields {sorted(unknown)}")
    return {"scale": scale, "mean": record.get("mean", [0.0]), "std": record.get("std", [1.0]), "layout": layout}


def check_graph_document(path: Path, document: dict[str, Any], tensors: dict[str, np.ndarray]) -> Any:
    """graph.json + tensors -> an `ir.Graph`, or one error naming the file and the field."""
    from toolchain.core import ir

    if not isinstance(document.get("input_name"), str):
        fail(path, "input_name", "expected text")
    input_shape = check_shape(path, "input_shape", document.get("input_shape"))
    if not 1 <= len(input_shape) <= 3:
        fail(path, "input_shape", f"expected 1 to 3 dimensions, found {len(input_shape)}")
    if not isinstance(document.get("output"), str):
        fail(path, "output", "expected text")
    meta = document.get("meta", {})
    if not isinstance(meta, dict):
        fail(path, "meta", "expected an object")
    classes = meta.get("classes")
    if classes is not None and not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        fail(path, "meta.classes", "expected a list of class names")
    if not isinstance(meta.get("source", ""), str):
        fail(path, "meta.source", "expected text")
    nodes_json = document.get("nodes")
    if not isinstance(nodes_json, list) or not nodes_json:
        fail(path, "nodes", "expected a non-empty list")
    known = {document["input_name"]}
    nodes: list[ir.Node] = []
    for index, record in enumerate(nodes_json):
        where = f"nodes[{index}]"
        if not isinstance(record, dict) or not isinstance(record.get("op"), str) or record["op"] not in ir.NODE_TYPES:
            op = record.get("op") if isinstance(record, dict) else None
            fail(path, where, f"unknown node op {str(op)[:40]!r} (written by a newer toolchain?)")
        cls = ir.NODE_TYPES[record["op"]]
        values = check_fields(path, where, cls, record, tensors, skip=("op",))
        name = values["name"]
        if name in known:
            fail(path, where, f"duplicate name {name!r}")
        for source in values["inputs"]:
            if source not in known:
                fail(path, f"{where}.inputs", f"{source!r} is not the input or an earlier node")
        if not values["inputs"]:
            fail(path, f"{where}.inputs", "a node needs an input")
        known.add(name)
        nodes.append(cls(**values))
    if document["output"] not in known:
        fail(path, "output", f"{document['output']!r} is not a node")
    graph = ir.Graph(
        input_name=document["input_name"],
        input_shape=input_shape,
        nodes=nodes,
        output=document["output"],
        preprocess=ir.Preprocess(**check_preprocess(path, document.get("preprocess", {}))),
        meta=meta,
    )
    check_graph_semantics(path, graph)
    return graph


def check_graph_semantics(path: Path, graph: Any) -> None:
    """Shapes re-inferred from the input must be the stored ones; parameters must fit their inputs."""
    shapes: dict[str, tuple[int, ...]] = {graph.input_name: tuple(graph.input_shape)}
    for node in graph.nodes:
        where = f"node {node.name!r} ({node.op})"
        inputs = [shapes[i] for i in node.inputs]
        problem = _node_problem(node, inputs)
        if problem:
            fail(path, where, problem)
        try:
            inferred = tuple(int(d) for d in node.infer_shape(inputs))
        except (ValueError, TypeError, IndexError, ZeroDivisionError) as exc:
            fail(path, where, f"inconsistent with its inputs ({type(exc).__name__})")
        if inferred != tuple(node.shape) or any(d <= 0 for d in inferred):
            fail(path, where, f"stored shape {tuple(node.shape)} but its inputs give {inferred}")
        shapes[node.name] = inferred


def _channels_fit(values: np.ndarray | None, channels: int) -> bool:
    return values is None or np.asarray(values).size in (1, channels)


def _node_problem(node: Any, inputs: list[tuple[int, ...]]) -> str | None:
    from toolchain.core import ir

    first = inputs[0]
    if isinstance(node, ir.Conv2d):
        w = node.weight
        if w.ndim != 4 or len(first) != 3 or node.groups < 1 or first[0] != w.shape[1] * node.groups:
            return f"weight {w.shape} (groups {node.groups}) does not fit an input of shape {first}"
        if w.shape[0] % node.groups or (node.bias is not None and node.bias.shape != (w.shape[0],)):
            return f"bias or output channels do not fit the weight {w.shape}"
        if min(node.stride) < 1 or min(node.dilation) < 1:
            return "stride and dilation must be positive"
    elif isinstance(node, ir.Linear):
        w = node.weight
        if w.ndim != 2 or len(first) != 1 or first[0] != w.shape[1]:
            return f"weight {w.shape} does not fit an input of shape {first}"
        if node.bias is not None and node.bias.shape != (w.shape[0],):
            return f"bias {node.bias.shape} does not fit the weight {w.shape}"
    elif isinstance(node, ir.AvgPool2d | ir.MaxPool2d):
        if len(first) != 3 or min(node.kernel) < 1 or min(node.stride) < 1:
            return f"pooling of an input of shape {first} with kernel {node.kernel}, stride {node.stride}"
    elif isinstance(node, ir.Add | ir.Concat):
        rest = [s[1:] for s in inputs] if isinstance(node, ir.Concat) else inputs
        if any(s != rest[0] for s in rest):
            return f"inputs of different shapes {inputs}"
    elif isinstance(node, ir.ScaleShift):
        if not (_channels_fit(node.scale, first[0]) and _channels_fit(node.shift, first[0])):
            return f"scale/shift do not fit {first[0]} channels"
    elif isinstance(node, ir.Relu):
        if not _channels_fit(node.ceiling, first[0]) or (node.ceiling is not None and not (node.ceiling > 0).all()):
            return "ceiling must be positive, one value or one per channel"
        if node.levels < 0:
            return "levels must not be negative"
    elif isinstance(node, ir.IFNeuron):
        if not _channels_fit(node.threshold, first[0]) or not (node.threshold > 0).all():
            return "threshold must be positive, one value or one per channel"
        if not _channels_fit(node.v0, first[0]):
            return "v0 must be one value or one per channel"
    return None


def check_fixed_document(path: Path, document: dict[str, Any], tensors: dict[str, np.ndarray]) -> Any:
    """fixed_graph.json + tensors -> a `FixedGraph`, or one error naming the file and the field."""
    from toolchain.core.fixed import V_BITS, FixedGraph, FixedLayer, FixedSynapse

    if not isinstance(document.get("input_name"), str) or not isinstance(document.get("output"), str):
        fail(path, "input_name/output", "expected text")
    input_shape = check_shape(path, "input_shape", document.get("input_shape"))
    bits = document.get("input_bits")
    if not is_int(bits) or not 1 <= bits <= 24:
        fail(path, "input_bits", f"expected an integer 1..24, found {str(bits)[:40]}")
    v_bits = document.get("v_bits", V_BITS)
    if not is_int(v_bits) or not 2 <= v_bits <= 32:
        fail(path, "v_bits", f"expected an integer 2..32, found {str(v_bits)[:40]}")
    for key in ("input_offset", "input_step"):
        if key not in tensors or not np.isfinite(tensors[key]).all():
            fail(path, key, "missing or not finite")
    if not (tensors["input_step"] > 0).all():
        fail(path, "input_step", "must be positive")
    layers_json = document.get("layers")
    if not isinstance(layers_json, list) or not layers_json:
        fail(path, "layers", "expected a non-empty list")
    layers: list[FixedLayer] = []
    names: dict[str, tuple[int, ...]] = {}
    for index, record in enumerate(layers_json):
        where = f"layers[{index}]"
        values = check_fields(path, where, FixedLayer, record, tensors, skip=("synapses",))
        records = record.get("synapses")
        if not isinstance(records, list) or not records:
            fail(path, f"{where}.synapses", "expected a non-empty list")
        synapses = [
            FixedSynapse(**check_fields(path, f"{where}.synapses[{k}]", FixedSynapse, item, tensors))
            for k, item in enumerate(records)
        ]
        layer = FixedLayer(**values, synapses=synapses)
        if layer.kind not in ("if", "readout"):
            fail(path, where, f"kind {layer.kind!r} unknown")
        problem = _fixed_layer_problem(layer, v_bits)
        if problem:
            fail(path, where, problem)
        for k, synapse in enumerate(layer.synapses):
            here = f"{where}.synapses[{k}]"
            source_shape = input_shape if synapse.source is None else names.get(synapse.source)
            if source_shape is None:
                fail(path, f"{here}.source", f"{synapse.source!r} is not an earlier layer")
            if tuple(synapse.in_shape) != tuple(source_shape):
                fail(path, f"{here}.in_shape", f"{synapse.in_shape} but its source has shape {source_shape}")
            problem = _fixed_synapse_problem(synapse, layer.shape)
            if problem:
                fail(path, here, problem)
        names[layer.name] = tuple(layer.shape)
        layers.append(layer)
    if document["output"] not in names:
        fail(path, "output", f"{document['output']!r} is not a layer")
    meta = document.get("meta", {})
    if not isinstance(meta, dict):
        fail(path, "meta", "expected an object")
    return FixedGraph(
        input_name=document["input_name"], input_shape=input_shape, input_bits=bits,
        input_offset=tensors["input_offset"], input_step=tensors["input_step"], layers=layers,
        output=document["output"], v_bits=v_bits, meta=meta,
    )  # fmt: skip


def _fixed_layer_problem(layer: Any, v_bits: int) -> str | None:
    """What is wrong with a population's own fields (its synapses: `_fixed_synapse_problem`)."""
    limit = 2 ** (v_bits - 1)
    if not layer.shape:
        return "empty shape"
    if layer.bias_mant.dtype.kind not in "iu" or layer.v0.dtype.kind not in "iu":
        return "bias and v0 must be integers"
    if not 0 <= layer.bias_exp <= 16:
        return f"bias exponent {layer.bias_exp} out of range"
    if not 0 <= layer.threshold < limit or (layer.kind == "if" and layer.threshold < 1):
        return f"threshold {layer.threshold} out of range"
    if layer.bias_mant.size not in (1, math.prod(layer.shape)) or layer.v0.size not in (1, math.prod(layer.shape)):
        return f"bias or v0 of {layer.bias_mant.size}/{layer.v0.size} values for a population of shape {layer.shape}"
    if np.asarray(layer.scale).size not in (1, layer.shape[0]) or not (np.asarray(layer.scale) > 0).all():
        return "scale must be positive, one value or one per channel"
    return None


def _fixed_synapse_problem(synapse: Any, shape: tuple[int, ...]) -> str | None:
    """What is wrong with one synapse into a population of `shape`."""
    if synapse.kind not in ("conv", "dense"):
        return f"synapse kind {synapse.kind!r} unknown"
    if not synapse.in_shape:
        return "empty input shape"
    w = synapse.weight
    if w.dtype.kind not in "iu" or (w.size and np.abs(w.astype(np.int64)).max() > 255):
        return "weights must be 8-bit integer mantissas"
    if not -16 <= synapse.weight_exp <= 16:
        return f"weight exponent {synapse.weight_exp} out of range"
    if min(synapse.pool) < 1 or min(synapse.stride) < 1 or min(synapse.dilation) < 1:
        return "pool, stride and dilation must be positive"
    c_in = synapse.pooled_shape[0] if len(synapse.in_shape) == 3 else None
    if synapse.kind == "conv":
        if (w.ndim != 4 or len(shape) != 3 or c_in is None or w.shape[0] != shape[0]
                or synapse.groups < 1 or w.shape[1] * synapse.groups != c_in):
            return f"conv weight {w.shape} does not fit {synapse.in_shape} -> {shape}"
    elif w.ndim != 2 or w.shape != (math.prod(shape), math.prod(synapse.pooled_shape)):
        return f"dense weight {w.shape} does not fit {synapse.pooled_shape} -> {shape}"
    return None
