"""`load_onnx`: read, check, fold, translate and verify an ONNX model.

Steps: load the file (external data included) -> `onnx.checker` -> fix the batch
dimension and run strict shape inference -> fold every node whose inputs are known
constants -> re-infer static shapes on the folded model -> one handler per remaining
node (`registry.handler_for`, the handlers in `handlers/`) -> merge and lower element-wise chains (`patterns`) -> fold
affines into synapses and prune (`passes`) -> `Graph.infer_shapes()` and compare with
ONNX's shapes. Every problem with the input is a one-line `ToolchainError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

import numpy as np
import onnx

import toolchain.passes.frontend.handlers  # noqa: F401  (importing the package registers every handler)
from toolchain.core import ir
from toolchain.errors import InternalError, ToolchainError
from toolchain.fileio import check_external_data
from toolchain.passes.frontend.builder import PSEUDO, Builder
from toolchain.passes.frontend.folding import fold_constants, initializer_arrays
from toolchain.passes.frontend.layout import channels_last_input
from toolchain.passes.frontend.registry import handler_for, supported_ops
from toolchain.passes.frontend.simplify import Net, fold_affines, lower_elementwise, merge_elementwise, prune

DEFAULT_DOMAINS = ("", "ai.onnx")
BOUND_OPS = ("Clip", "Max", "Min")  # +-inf is a meaningful constant operand for these
PREPROCESS_KEY = "toolchain.preprocess"
DYNAMIC_BATCH = 2


def _one_line(exc: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _node_names(nodes: list[onnx.NodeProto]) -> dict[int, str]:
    """A non-empty, unique name for each node (by id), ONNX's own where it has one."""
    names: dict[int, str] = {}
    seen: set[str] = set()
    for index, node in enumerate(nodes):
        base = node.name or f"{node.op_type}_{index}"
        name, k = base, 1
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        names[id(node)] = name
    return names


class _Loader:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.where = str(path)
        self.opset = 0  # the model's default-domain opset, once read

    def fail(self, message: str) -> NoReturn:
        raise ToolchainError(f"{self.where}: {message}")

    def fail_node(self, node: onnx.NodeProto, name: str, message: str) -> NoReturn:
        raise ToolchainError(f"{self.where}: node {name!r} ({node.op_type}): {message}")

    # ------------------------------------------------------------------ reading and checking

    def read(self) -> onnx.ModelProto:
        if not self.path.exists():
            self.fail("no such file")
        if not self.path.is_file():
            self.fail("not a file")
        check_external_data(self.path)  # no absolute path, `..` or symlink out of the model's folder
        try:
            model = onnx.load(str(self.path))
        except Exception as exc:  # noqa: BLE001 - protobuf/IO errors become one-line user errors
            self.fail(f"not a readable ONNX model ({type(exc).__name__}: {_one_line(exc)})")
        if not model.HasField("graph") or not model.opset_import:
            self.fail("not an ONNX model (no graph or opset; truncated or a different file type?)")
        self.check_strings(model)
        if model.functions:
            try:
                from onnx import inliner

                model = inliner.inline_local_functions(model)
            except Exception as exc:  # noqa: BLE001
                self.fail(f"cannot inline the model's local functions: {_one_line(exc)}")
        nodes = list(model.graph.node)
        names = _node_names(nodes)
        for node in nodes:
            if node.domain not in DEFAULT_DOMAINS:
                self.fail_node(node, names[id(node)], f"op from domain {node.domain!r} is not supported; {_supported()}")
        self.fill_output_shapes(model)
        try:
            onnx.checker.check_model(model)
        except Exception as exc:  # noqa: BLE001
            self.fail(f"invalid ONNX model: {_one_line(exc)}")
        self.opset = default_opset(model)
        self.check_ops_on_activations(model.graph, nodes, names)
        return model

    def check_strings(self, model: onnx.ModelProto) -> None:
        """A damaged file can hold names that are not UTF-8 (protobuf then hands out bytes)."""
        graph = model.graph
        texts = [v.name for v in list(graph.input) + list(graph.output) + list(graph.initializer)]
        texts += [model.producer_name, model.producer_version, *(o.domain for o in model.opset_import)]
        texts += [t for p in model.metadata_props for t in (p.key, p.value)]
        for node in graph.node:
            texts += [node.name, node.op_type, node.domain, *node.input, *node.output]
        if not all(isinstance(t, str) for t in texts):
            self.fail("names in the model are not valid UTF-8 text (a damaged file?)")

    def check_ops_on_activations(self, graph: onnx.GraphProto, nodes: list[onnx.NodeProto], names: dict[int, str]) -> None:
        """Unsupported ops that read the input (directly or not) fail here, before anything else is checked;
        ops on constants only are left to constant folding."""
        initializers = {i.name for i in graph.initializer}
        dynamic = {v.name for v in graph.input if v.name not in initializers}
        for node in nodes:
            if not any(name in dynamic for name in node.input) or node.op_type in ("Shape", "Size"):
                continue
            if handler_for(node.op_type, self.opset) is None:
                self.fail_node(node, names[id(node)], _unsupported(node))
            dynamic.update(name for name in node.output if name)

    @staticmethod
    def fill_output_shapes(model: onnx.ModelProto) -> None:
        """onnx.checker insists that graph outputs have a shape (onnxruntime does not): infer missing ones."""
        outputs = model.graph.output
        if all(not o.type.HasField("tensor_type") or o.type.tensor_type.HasField("shape") for o in outputs):
            return
        try:
            inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(model).graph.output}
        except Exception:  # noqa: BLE001 - the checker reports what is wrong
            return
        for output in outputs:
            found = inferred.get(output.name)
            if found is not None and not output.type.tensor_type.HasField("shape") and found.type.tensor_type.HasField("shape"):
                output.type.tensor_type.shape.CopyFrom(found.type.tensor_type.shape)

    # ------------------------------------------------------------------ shapes

    def io(self, model: onnx.ModelProto) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto, int]:
        graph = model.graph
        initializers = {i.name for i in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
        inputs = [v for v in graph.input if v.name not in initializers]
        if len(inputs) != 1:
            self.fail(f"the model has {len(inputs)} inputs ({', '.join(v.name for v in inputs)}); exactly one is supported")
        if len(graph.output) != 1:
            self.fail(
                f"the model has {len(graph.output)} outputs ({', '.join(v.name for v in graph.output)}); exactly one is supported"
            )
        value = inputs[0]
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type") or tensor.elem_type not in (
            onnx.TensorProto.FLOAT,
            onnx.TensorProto.DOUBLE,
            onnx.TensorProto.FLOAT16,
        ):
            self.fail(f"input {value.name!r} is not a float tensor")
        dims = tensor.shape.dim
        if len(dims) not in (2, 3, 4):
            self.fail(
                f"input {value.name!r} has rank {len(dims)}; (batch, C, H, W), (batch, H, W) or (batch, features) is supported"
            )
        for k, dim in enumerate(dims[1:], 1):
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                self.fail(f"input {value.name!r} dimension {k} is not a fixed size; export with static C, H, W")
        # A dynamic batch is fixed at 2, not 1, so that ops mixing samples (a Reshape to [1, -1]) show up.
        batch = dims[0].dim_value if dims[0].HasField("dim_value") and dims[0].dim_value > 0 else DYNAMIC_BATCH
        return value, graph.output[0], batch

    def infer(self, model: onnx.ModelProto, stage: str) -> dict[str, tuple[int, ...] | None]:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        except Exception as exc:  # noqa: BLE001
            self.fail(f"ONNX shape inference failed{stage}: {_one_line(exc)}")
        shapes: dict[str, tuple[int, ...] | None] = {}
        graph = inferred.graph
        for value in list(graph.input) + list(graph.value_info) + list(graph.output):
            tensor = value.type.tensor_type
            if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
                shapes[value.name] = None
                continue
            dims = tensor.shape.dim
            static = all(d.HasField("dim_value") for d in dims)
            shapes[value.name] = tuple(int(d.dim_value) for d in dims) if static else None
        return shapes

    # ------------------------------------------------------------------ the whole load

    def load(self) -> ir.Graph:
        model = self.read()
        value, output, batch = self.io(model)
        value.type.tensor_type.shape.dim[0].dim_value = batch  # a reference into the model
        graph = model.graph
        shapes = self.infer(model, "")
        opsets = {o.domain if o.domain != "ai.onnx" else "": int(o.version) for o in model.opset_import}
        nodes = list(graph.node)  # these objects, so that id() names them stably
        names = _node_names(nodes)

        def fail_fold(node: onnx.NodeProto, message: str) -> NoReturn:
            self.fail_node(node, names[id(node)], message)

        try:
            known = initializer_arrays(graph)
        except ValueError as exc:
            self.fail(f"damaged model: {_one_line(exc)}")
        remaining = fold_constants(nodes, known, shapes, opsets, fail_fold)
        if output.name in known:
            self.fail(f"output {output.name!r} does not depend on the input {value.name!r}")
        for node in remaining:
            if handler_for(node.op_type, self.opset) is None:
                self.fail_node(node, names[id(node)], _unsupported(node))
        used = {name for node in remaining for name in node.input if name in known}
        for node in remaining:
            for name in node.input:
                if name in used:
                    self.check_finite(node, names[id(node)], name, known[name])
        folded = self.folded_model(model, remaining, {name: known[name] for name in used})
        shapes = self.infer(folded, " after constant folding")
        return self.translate(model, remaining, names, known, shapes, value, output, batch)

    def check_finite(self, node: onnx.NodeProto, name: str, tensor: str, array: np.ndarray) -> None:
        if not np.issubdtype(array.dtype, np.floating) or array.size == 0:
            return
        array = np.asarray(array, np.float64)
        bad = np.isnan(array) if node.op_type in BOUND_OPS else ~np.isfinite(array)
        if np.any(bad):
            what = "NaN" if np.any(np.isnan(array)) else "Inf"
            self.fail_node(node, name, f"constant input {tensor!r} contains {what} ({int(bad.sum())} of {array.size} values)")

    def folded_model(self, model: onnx.ModelProto, nodes: list[onnx.NodeProto], consts: dict[str, np.ndarray]) -> onnx.ModelProto:
        from onnx import numpy_helper

        graph = model.graph
        initializers = {i.name for i in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
        # Large constants (weights) only need their type and shape for inference: declare them as inputs.
        small = {name: np.asarray(a) for name, a in consts.items() if np.asarray(a).size <= 4096}
        large = [
            onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(np.asarray(a).dtype), np.shape(a))
            for name, a in consts.items()
            if name not in small
        ]
        new_graph = onnx.helper.make_graph(
            nodes,
            "folded",
            [v for v in graph.input if v.name not in initializers] + large,
            list(graph.output),
            [numpy_helper.from_array(array, name) for name, array in small.items()],
        )
        folded = onnx.helper.make_model(new_graph, opset_imports=list(model.opset_import))
        folded.ir_version = model.ir_version
        return folded

    def translate(
        self,
        model: onnx.ModelProto,
        nodes: list[onnx.NodeProto],
        names: dict[int, str],
        known: dict[str, np.ndarray],
        shapes: dict[str, tuple[int, ...] | None],
        value: onnx.ValueInfoProto,
        output: onnx.ValueInfoProto,
        batch: int,
    ) -> ir.Graph:
        use_counts: dict[str, int] = {}
        for node in nodes:
            for name in node.input:
                use_counts[name] = use_counts.get(name, 0) + 1
        builder = Builder(self.where, known, shapes, batch, use_counts, output.name, reserved={value.name})
        builder.values[value.name] = value.name
        input_shape = tuple(shapes[value.name] or ())[1:]
        layout = None  # the input's layout where it is not the IR's (C, H, W) or (F,)
        to_channels_first = channels_last_input(model.graph, value.name)
        if to_channels_first is not None:  # a channels-last model: the IR takes (C, H, W) images
            builder.values[to_channels_first.output[0]] = value.name
            input_shape = tuple(shapes[to_channels_first.output[0]] or ())[1:]
            nodes = [node for node in nodes if node is not to_channels_first]
            layout = "NHWC"
        elif len(input_shape) == 2:  # (N, H, W) images: the IR takes them with their one channel, (1, H, W)
            input_shape = (1, *input_shape)
            layout = "NHW"
        builder.expected[value.name] = input_shape  # what the input is in the IR (for shape-only ops on it)
        for node in nodes:
            builder.node, builder.node_name = node, names[id(node)]
            try:
                handler = handler_for(node.op_type, self.opset)
                assert handler is not None  # unsupported ops were refused before
                handler(builder, node)
            except ToolchainError:
                raise
            except Exception as exc:  # noqa: BLE001 - a handler that does not refuse cleanly is a bug of ours
                raise InternalError(
                    f"{self.where}: node {names[id(node)]!r} ({node.op_type}): the handler failed "
                    f"({type(exc).__name__}: {_one_line(exc)})"
                ) from exc
        if output.name in builder.pads:
            self.fail(f"output {output.name!r} is produced by a Pad node; Pad is supported only before Conv or pooling")
        if output.name not in builder.values:
            self.fail(f"output {output.name!r} is not produced by a supported node")
        net = Net(value.name, input_shape, builder.nodes, builder.values[output.name])
        if net.output == value.name:
            self.fail(f"output {output.name!r} is the input itself; the model has no layers")
        expected = builder.expected
        try:
            prune(net)
            merge_elementwise(net)
            lower_elementwise(net, builder.unique, builder.fail_at, expected)
            fold_affines(net, expected)
            prune(net)
        except ToolchainError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise InternalError(f"{self.where}: simplifying the graph failed ({type(exc).__name__}: {_one_line(exc)})") from exc
        if net.output == value.name:
            self.fail(f"output {output.name!r} is the input up to element-wise identities; the model has no layers")
        meta = self.meta(model) | ({"input_layout": layout} if layout else {})
        result = ir.Graph(value.name, input_shape, net.nodes, net.output, self.preprocess(model, input_shape), meta)
        self.verify(result, expected, shapes.get(output.name))
        return result

    def verify(self, graph: ir.Graph, expected: dict[str, tuple[int, ...]], output_shape: tuple[int, ...] | None) -> None:
        try:
            graph.infer_shapes()
        except Exception as exc:  # noqa: BLE001
            raise InternalError(
                f"{self.where}: the IR's shapes cannot be inferred ({type(exc).__name__}: {_one_line(exc)})"
            ) from exc
        for node in graph.nodes:
            if PSEUDO in node.name:
                raise InternalError(f"{self.where}: pseudo-node {node.name!r} left in the graph")
            want = expected.get(node.name)
            if want is not None and tuple(want) != tuple(node.shape):
                raise InternalError(
                    f"{self.where}: node {node.name!r} ({node.op}) has IR shape {list(node.shape)}, ONNX infers {list(want)}"
                )
        if output_shape is not None and tuple(output_shape[1:]) != tuple(graph.shape_of(graph.output)):
            raise InternalError(
                f"{self.where}: the IR output shape {list(graph.shape_of(graph.output))} "
                f"differs from ONNX's {list(output_shape[1:])}"
            )

    # ------------------------------------------------------------------ metadata

    def preprocess(self, model: onnx.ModelProto, input_shape: tuple[int, ...]) -> ir.Preprocess:
        props = {p.key: p.value for p in model.metadata_props}
        if PREPROCESS_KEY not in props:
            return ir.Preprocess()
        try:
            spec = json.loads(props[PREPROCESS_KEY])
            if not isinstance(spec, dict):
                raise ValueError("not a JSON object")
            scale = spec.get("scale")
            mean = [float(v) for v in spec.get("mean", [0.0])]
            std = [float(v) for v in spec.get("std", [1.0])]
            layout = str(spec.get("layout", "NCHW"))
            scale = None if scale is None else float(scale)
        except (ValueError, TypeError) as exc:
            self.fail(f"metadata {PREPROCESS_KEY!r} is not valid JSON {{scale, mean, std, layout}} ({_one_line(exc)})")
        channels = input_shape[0] if input_shape else 1
        for key, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, channels):
                self.fail(f"metadata {PREPROCESS_KEY!r}: {key} has {len(values)} values for {channels} input channels")
        if any(s == 0 for s in std):
            self.fail(f"metadata {PREPROCESS_KEY!r}: std values must be non-zero")
        if layout != "NCHW":
            self.fail(f"metadata {PREPROCESS_KEY!r}: layout {layout!r} is not supported (only NCHW)")
        return ir.Preprocess(scale=scale, mean=mean, std=std, layout=layout)

    def meta(self, model: onnx.ModelProto) -> dict:
        opset = default_opset(model)
        producer = f"{model.producer_name} {model.producer_version}".strip()
        extra = {p.key: p.value for p in model.metadata_props if p.key.startswith("toolchain.") and p.key != PREPROCESS_KEY}
        return {"source": str(self.path), "opset": opset, "producer": producer, "onnx_metadata": extra}


NON_SPIKING = {
    "Sigmoid", "Tanh", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Erf", "HardSigmoid", "HardSwish", "Softplus",
    "Softsign", "Mish", "ThresholdedRelu", "Exp", "Log", "Sqrt", "Pow", "Abs", "Sin", "Cos", "Tan",
}  # fmt: skip
UPSAMPLING = {"ConvTranspose", "Resize", "Upsample", "DepthToSpace"}


def _unsupported(node: onnx.NodeProto) -> str:
    """Why an op without a handler is refused, with what to do where that is known."""
    hint = ""
    if node.op_type in NON_SPIKING:
        hint = " (IF neurons express only ReLU and clipped ReLU, Clip(x, 0, c): retrain with ReLU)"
    elif node.op_type in UPSAMPLING:
        hint = " (upsampling: the IR and the Loihi synapses have no transposed convolution or resize)"
    return f"unsupported op type {node.op_type!r}{hint}; {_supported()}"


def _supported() -> str:
    return f"supported ops: {', '.join(supported_ops())} (any op on constants only is folded)"


def default_opset(model: onnx.ModelProto) -> int:
    """The opset of the default (ai.onnx) domain, which picks the handler version of each op."""
    return next((int(o.version) for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)


def load_onnx(path: str | Path) -> ir.Graph:
    """Load an ONNX ANN as a toolchain IR graph (batch-free shapes, BN folded, activations recognised).

    Raises `ToolchainError` with a one-line message naming the file (and node) on bad input, and
    `InternalError` (naming the file) where our own code fails: that is a bug, not a bad model.
    """
    loader = _Loader(path)
    try:
        return loader.load()
    except (ToolchainError, InternalError):
        raise
    except Exception as exc:  # noqa: BLE001 - the original traceback stays chained for the report
        raise InternalError(f"{loader.where}: loading failed ({type(exc).__name__}: {_one_line(exc)})") from exc
