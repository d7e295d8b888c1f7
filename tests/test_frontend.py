"""ONNX frontend: every op handler and pattern against onnxruntime on random inputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from toolchain.core import ir
from toolchain.core.interpreter import run_ann
from toolchain.errors import ToolchainError
from toolchain.passes.frontend import SUPPORTED_OPS, load_onnx

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------ helpers


def rand(*shape: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return RNG.uniform(low, high, shape).astype(np.float32)


def build(
    tmp_path: Path,
    nodes: list[onnx.NodeProto],
    inits: dict[str, np.ndarray],
    input_shape: tuple,
    output: str = "y",
    opset: int = 17,
    name: str = "model.onnx",
    metadata: dict[str, str] | None = None,
) -> Path:
    """A model from helper nodes: input 'x' (batch dim 'N'), output `output` (shape left to inference)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *input_shape])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    model.graph.output[0].type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.output[0].CopyFrom(inferred.graph.output[0])
    for key, value in (metadata or {}).items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    path = tmp_path / name
    onnx.save(model, path)
    return path


def export(tmp_path: Path, module: nn.Module, input_shape: tuple, opset: int = 17, dynamic: bool = True) -> Path:
    path = tmp_path / f"torch_{opset}.onnx"
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.randn(2, *input_shape),),
            str(path),
            opset_version=opset,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}} if dynamic else None,
        )
    return path


def check(
    path: Path,
    input_shape: tuple,
    batch: int = 5,
    atol: float = 1e-4,
    low: float = -2.0,
    high: float = 2.0,
    reference: str = "onnxruntime",
) -> ir.Graph:
    """Load with the frontend, run the IR, compare with onnxruntime (or with the ONNX reference
    implementation, `reference="onnx"`, the spec); returns the graph."""
    graph = load_onnx(path)
    assert graph.input_shape == tuple(input_shape)
    x = rand(batch, *input_shape, low=low, high=high)
    if reference == "onnx":
        evaluator = ReferenceEvaluator(str(path))
        expected = evaluator.run(None, {evaluator.input_names[0]: x})[0]
    else:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    got = run_ann(graph, x, device="cpu")
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=atol, rtol=1e-4)
    return graph


def ops(graph: ir.Graph) -> list[str]:
    return [n.op for n in graph.nodes]


def conv_node(name: str, x: str, y: str, weight: str, bias: str | None = None, **attrs) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, weight] + ([bias] if bias else []), [y], name=name, **attrs)


# ------------------------------------------------------------------ convolution and linear layers


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"pads": [1, 1, 1, 1]},
        {"pads": [0, 1, 2, 0], "strides": [2, 1]},
        {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
        {"group": 2, "pads": [1, 1, 1, 1]},
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
        {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
        {"auto_pad": "VALID"},
    ],
)
def test_conv_attributes(tmp_path, attrs):
    in_channels = 4
    weight = rand(6, in_channels // attrs.get("group", 1), 3, 3)
    node = conv_node("conv", "x", "y", "w", "b", kernel_shape=[3, 3], **attrs)
    graph = check(build(tmp_path, [node], {"w": weight, "b": rand(6)}, (in_channels, 9, 8)), (in_channels, 9, 8))
    assert ops(graph) == ["conv2d"] and graph.nodes[0].name == "conv"


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_alpha_beta_trans(tmp_path, trans_b):
    b_matrix = rand(5, 7) if trans_b else rand(7, 5)
    node = helper.make_node("Gemm", ["x", "B", "C"], ["y"], name="fc", alpha=0.5, beta=2.0, transB=trans_b)
    graph = check(build(tmp_path, [node], {"B": b_matrix, "C": rand(1, 5)}, (7,)), (7,))
    assert ops(graph) == ["linear"]


def test_matmul_add_is_one_linear(tmp_path):
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "bias"], ["y"], name="add"),
    ]
    graph = check(build(tmp_path, nodes, {"W": rand(6, 3), "bias": rand(3)}, (6,)), (6,))
    assert ops(graph) == ["linear"] and graph.nodes[0].bias is not None


# ------------------------------------------------------------------ batch norm


def _bn_inits(channels: int) -> dict[str, np.ndarray]:
    return {
        "gamma": rand(channels, low=0.5, high=2),
        "beta": rand(channels),
        "mean": rand(channels),
        "var": rand(channels, low=0.5, high=2),
    }


def test_batchnorm_folds_into_conv(tmp_path):
    nodes = [
        conv_node("conv", "x", "c", "w", "b", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], name="bn", epsilon=1e-3),
        helper.make_node("Relu", ["n"], ["y"], name="relu"),
    ]
    graph = check(build(tmp_path, nodes, {"w": rand(4, 3, 3, 3), "b": rand(4), **_bn_inits(4)}, (3, 6, 6)), (3, 6, 6))
    assert ops(graph) == ["conv2d", "relu"]


def test_batchnorm_into_gemm_without_bias(tmp_path):
    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["h"], name="fc", transB=1),
        helper.make_node("BatchNormalization", ["h", "gamma", "beta", "mean", "var"], ["y"], name="bn"),
    ]
    graph = check(build(tmp_path, nodes, {"W": rand(4, 6), **_bn_inits(4)}, (6,)), (6,))
    assert ops(graph) == ["linear"]


def test_standalone_batchnorm_is_affine(tmp_path):
    """A BN on the input before a padded conv cannot fold (padding zeros): it stays an ScaleShift."""
    nodes = [
        helper.make_node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["n"], name="bn"),
        conv_node("conv", "n", "y", "w", "b", pads=[1, 1, 1, 1]),
    ]
    graph = check(build(tmp_path, nodes, {"w": rand(4, 3, 3, 3), "b": rand(4), **_bn_inits(3)}, (3, 5, 5)), (3, 5, 5))
    assert ops(graph) == ["affine", "conv2d"] and graph.nodes[0].name == "bn"


def test_batchnorm_with_two_consumers_is_not_folded_backward(tmp_path):
    nodes = [
        conv_node("conv", "x", "c", "w"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], name="bn"),
        helper.make_node("Add", ["n", "r"], ["y"], name="add"),
    ]
    graph = check(build(tmp_path, nodes, {"w": rand(4, 3, 1, 1), **_bn_inits(4)}, (3, 4, 4)), (3, 4, 4))
    assert sorted(ops(graph)) == ["add", "affine", "conv2d", "relu"]


def test_input_normalisation_folds_into_unpadded_conv(tmp_path):
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["s"], name="sub"),
        helper.make_node("Div", ["s", "std"], ["d"], name="div"),
        conv_node("conv", "d", "y", "w", "b", group=3),
    ]
    inits = {"mean": rand(1, 3, 1, 1), "std": rand(3, 1, 1, low=0.2, high=0.5), "w": rand(6, 1, 3, 3), "b": rand(6)}
    graph = check(build(tmp_path, nodes, inits, (3, 5, 5)), (3, 5, 5))
    assert ops(graph) == ["conv2d"]


def test_input_normalisation_before_mlp_folds_through_flatten(tmp_path):
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["s"], name="mul"),
        helper.make_node("Add", ["s", "shift"], ["a"], name="add"),
        helper.make_node("Flatten", ["a"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "W", "C"], ["y"], name="fc", transB=1),
    ]
    inits = {"scale": rand(2, 1, 1, low=0.5, high=2), "shift": rand(2, 1, 1), "W": rand(3, 18), "C": rand(3)}
    graph = check(build(tmp_path, nodes, inits, (2, 3, 3)), (2, 3, 3))
    assert ops(graph) == ["flatten", "linear"]


# ------------------------------------------------------------------ structure: residual, concat, pools, pads


def test_residual_add_and_sub_of_activations(tmp_path):
    nodes = [
        conv_node("conv1", "x", "a", "w1", "b1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu1"),
        conv_node("conv2", "r", "c", "w2", "b2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "r"], ["s"], name="residual"),
        helper.make_node("Sub", ["s", "a"], ["y"], name="difference"),
    ]
    inits = {"w1": rand(4, 2, 3, 3), "b1": rand(4), "w2": rand(4, 4, 3, 3), "b2": rand(4)}
    graph = check(build(tmp_path, nodes, inits, (2, 5, 5)), (2, 5, 5))
    assert ops(graph).count("add") == 2
    assert isinstance(graph.node("residual"), ir.Add)


def test_concat_on_channels(tmp_path):
    nodes = [
        conv_node("left", "x", "a", "w1"),
        conv_node("right", "x", "b", "w2", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Concat", ["a", "b"], ["c"], name="cat", axis=1),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    graph = check(build(tmp_path, nodes, {"w1": rand(2, 3, 1, 1), "w2": rand(5, 3, 3, 3)}, (3, 4, 4)), (3, 4, 4))
    assert graph.node("cat").shape == (7, 4, 4)


def test_global_average_pool_squeeze_gemm(tmp_path):
    nodes = [
        conv_node("conv", "x", "c", "w"),
        helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
        helper.make_node("Squeeze", ["g", "axes"], ["s"], name="squeeze"),
        helper.make_node("Gemm", ["s", "W"], ["y"], name="fc", transB=1),
    ]
    inits = {"w": rand(4, 3, 1, 1), "axes": np.array([2, 3], np.int64), "W": rand(5, 4)}
    graph = check(build(tmp_path, nodes, inits, (3, 6, 5)), (3, 6, 5))
    assert ops(graph) == ["conv2d", "avgpool2d", "flatten", "linear"]
    assert graph.node("gap").kernel == (6, 5)


@pytest.mark.parametrize(
    "attrs",
    [
        {"kernel_shape": [2, 2], "strides": [2, 2]},
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
        {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 0, 1], "ceil_mode": 1},
        {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1},
        {"kernel_shape": [3, 3], "strides": [1, 1], "auto_pad": "SAME_UPPER"},
    ],
)
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool0", "AveragePool1"])
def test_pools(tmp_path, op, attrs):
    if op.startswith("AveragePool"):
        attrs = {**attrs, "count_include_pad": int(op[-1])}
        op = "AveragePool"
    node = helper.make_node(op, ["x"], ["y"], name="pool", **attrs)
    path = build(tmp_path, [node], {}, (2, 5, 7))
    graph = check(path, (2, 5, 7), reference="onnx")
    assert ops(graph) == ["maxpool2d" if op == "MaxPool" else "avgpool2d"]
    # onnxruntime 1.23 counts the overhang of ceil_mode windows in an average's divisor when
    # count_include_pad=1; the ONNX reference, torch and later onnxruntime do not.
    if not (op == "AveragePool" and attrs.get("ceil_mode") and attrs["count_include_pad"]):
        check(path, (2, 5, 7))


def test_ceil_mode_average_pool_matches_torch(tmp_path):
    """torch's AvgPool2d(ceil_mode=True, count_include_pad=True) exported and converted: same values."""
    module = nn.Sequential(nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=True))
    path = export(tmp_path, module, (2, 6, 6))
    x = rand(3, 2, 6, 6)
    with torch.no_grad():
        expected = module(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(run_ann(load_onnx(path), x, device="cpu"), expected, rtol=1e-5, atol=1e-6)


class _SpatialReduce(nn.Module):
    def __init__(self, kind: str, keepdim: bool):
        super().__init__()
        self.conv, self.kind, self.keepdim = nn.Conv2d(2, 4, 3), kind, keepdim

    def forward(self, x):
        x = self.conv(x)
        if self.kind == "mean":
            return x.mean(dim=(2, 3), keepdim=self.keepdim)
        return torch.amax(x, dim=(-2, -1), keepdim=self.keepdim)


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("kind", ["mean", "max"])
@pytest.mark.parametrize("keepdim", [False, True])
def test_spatial_reductions_are_global_pools(tmp_path, opset, kind, keepdim):
    graph = check(export(tmp_path, _SpatialReduce(kind, keepdim), (2, 6, 6), opset=opset), (2, 6, 6))
    pool = "avgpool2d" if kind == "mean" else "maxpool2d"
    assert ops(graph) == ["conv2d", pool] + ([] if keepdim else ["flatten"])


def test_reductions_over_other_axes_are_refused(tmp_path):
    class ChannelMean(nn.Module):
        def forward(self, x):
            return x.mean(dim=1)

    path = export(tmp_path, ChannelMean(), (2, 4, 4))
    with pytest.raises(ToolchainError, match=r"ReduceMean.*only the two spatial axes"):
        load_onnx(path)


def test_global_max_pool(tmp_path):
    nodes = [helper.make_node("GlobalMaxPool", ["x"], ["y"], name="gmp")]
    graph = check(build(tmp_path, nodes, {}, (3, 4, 5)), (3, 4, 5))
    assert ops(graph) == ["maxpool2d"]


@pytest.mark.parametrize("consumer", ["Conv", "AveragePool"])
def test_pad_folds_into_conv_and_pool(tmp_path, consumer):
    pad = helper.make_node("Pad", ["x", "pads"], ["p"], name="pad", mode="constant")
    if consumer == "Conv":
        after = conv_node("conv", "p", "y", "w", kernel_shape=[3, 3])
    else:
        after = helper.make_node("AveragePool", ["p"], ["y"], name="pool", kernel_shape=[3, 3], strides=[2, 2])
    inits = {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 0], np.int64), "w": rand(2, 3, 3, 3)}
    graph = check(build(tmp_path, [pad, after], inits, (3, 5, 5)), (3, 5, 5))
    assert len(graph.nodes) == 1 and graph.nodes[0].padding == (1, 2, 2, 0)


def test_pad_with_axes_opset18(tmp_path):
    nodes = [
        helper.make_node("Pad", ["x", "pads", "", "axes"], ["p"], name="pad"),
        conv_node("conv", "p", "y", "w"),
    ]
    inits = {"pads": np.array([1, 0, 1, 3], np.int64), "axes": np.array([2, 3], np.int64), "w": rand(2, 3, 2, 2)}
    graph = check(build(tmp_path, nodes, inits, (3, 4, 4), opset=18), (3, 4, 4))
    assert graph.nodes[0].padding == (1, 0, 1, 3)


def test_flatten_reshape_identity_dropout(tmp_path):
    nodes = [
        helper.make_node("Identity", ["x"], ["i"], name="identity"),
        helper.make_node("Dropout", ["i"], ["d"], name="dropout"),
        helper.make_node("Reshape", ["d", "shape"], ["r"], name="reshape"),
        helper.make_node("Gemm", ["r", "W"], ["y"], name="fc"),
    ]
    graph = check(build(tmp_path, nodes, {"shape": np.array([-1, 12], np.int64), "W": rand(12, 3)}, (3, 2, 2)), (3, 2, 2))
    assert ops(graph) == ["flatten", "linear"] and graph.nodes[0].name == "reshape"


def test_constant_folding_of_shape_arithmetic(tmp_path):
    """Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])) with Cast/Div/Mul of initialisers."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsqueeze"),
        helper.make_node("Constant", [], ["minus_one"], name="const", value=numpy_helper.from_array(np.array([-1], np.int64))),
        helper.make_node("Concat", ["n1", "minus_one"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"], name="flatten"),
        helper.make_node(
            "ConstantOfShape", ["wshape"], ["ones"], name="cos", value=numpy_helper.from_array(np.ones(1, np.float32))
        ),
        helper.make_node("Mul", ["ones", "W"], ["w2"], name="wmul"),
        helper.make_node("Cast", ["two"], ["two_f"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Div", ["w2", "two_f"], ["w3"], name="wdiv"),
        helper.make_node("MatMul", ["flat", "w3"], ["y"], name="mm"),
    ]
    inits = {
        "zero": np.array(0, np.int64),
        "axes0": np.array([0], np.int64),
        "wshape": np.array([24, 4], np.int64),
        "W": rand(24, 4),
        "two": np.array(2, np.int32),
    }
    graph = check(build(tmp_path, nodes, inits, (2, 3, 4)), (2, 3, 4))
    assert ops(graph) == ["flatten", "linear"]
    assert graph.node("flatten").shape == (24,)


def test_local_functions_are_inlined(tmp_path):
    body = [
        helper.make_node("Mul", ["a", "k"], ["m"]),
        helper.make_node("Relu", ["m"], ["b"]),
    ]
    function = helper.make_function("local", "ScaledRelu", ["a", "k"], ["b"], body, [helper.make_opsetid("", 17)])
    nodes = [conv_node("conv", "x", "c", "w"), helper.make_node("ScaledRelu", ["c", "two"], ["y"], name="act", domain="local")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 3, 3])],
        [numpy_helper.from_array(rand(2, 2, 1, 1), "w"), numpy_helper.from_array(np.float32(2), "two")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8, functions=[function])
    path = tmp_path / "functions.onnx"
    onnx.save(model, path)
    graph = check(path, (2, 3, 3))
    assert ops(graph) == ["conv2d", "relu"]


def test_trailing_softmax_is_dropped(tmp_path):
    nodes = [
        helper.make_node("Gemm", ["x", "W", "C"], ["z"], name="fc"),
        helper.make_node("Softmax", ["z"], ["y"], name="softmax", axis=-1),
    ]
    path = build(tmp_path, nodes, {"W": rand(6, 4), "C": rand(4)}, (6,))
    graph = load_onnx(path)
    assert ops(graph) == ["linear"] and graph.output == "fc"
    x = rand(8, 6)
    logits = run_ann(graph, x, device="cpu")
    probs = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(torch.softmax(torch.tensor(logits), -1).numpy(), probs, atol=1e-5)


def test_node_names_unique_and_non_empty(tmp_path):
    """Empty names get one; a node named like the input (a different ONNX namespace) is renamed."""
    nodes = [
        conv_node("", "x", "a", "w1"),
        helper.make_node("Relu", ["a"], ["r"], name="x"),
        conv_node("conv", "r", "y", "w2"),
    ]
    graph = check(build(tmp_path, nodes, {"w1": rand(2, 1, 1, 1), "w2": rand(2, 2, 1, 1)}, (1, 3, 3)), (1, 3, 3))
    assert [n.name for n in graph.nodes] == ["Conv_0", "x_1", "conv"]


# ------------------------------------------------------------------ clipped activations


def _clip_variants() -> dict[str, tuple[list[onnx.NodeProto], dict[str, np.ndarray], int]]:
    """Ways to write clip(conv(x), 0, c): nodes from 'c' to 'y', extra initialisers, opset."""
    c = np.array(0.75, np.float32)
    per_channel = np.array([0.5, 1.0, 1.5, 2.0], np.float32).reshape(4, 1, 1)
    return {
        "clip_inputs": (
            [helper.make_node("Clip", ["c", "zero", "top"], ["y"], name="act")],
            {"zero": np.float32(0), "top": c},
            13,
        ),
        "clip_attributes": ([helper.make_node("Clip", ["c"], ["y"], name="act", min=0.0, max=0.75)], {}, 10),
        "relu_min": (
            [helper.make_node("Relu", ["c"], ["r"], name="act"), helper.make_node("Min", ["r", "top"], ["y"], name="min")],
            {"top": c},
            17,
        ),
        "relu_min_per_channel": (
            [helper.make_node("Relu", ["c"], ["r"], name="act"), helper.make_node("Min", ["r", "top"], ["y"], name="min")],
            {"top": per_channel},
            17,
        ),
        "max_min": (
            [helper.make_node("Max", ["c", "zero"], ["r"], name="act"), helper.make_node("Min", ["r", "top"], ["y"], name="min")],
            {"zero": np.zeros(1, np.float32), "top": c},
            20,
        ),
        "div_clip_mul": (
            [
                helper.make_node("Div", ["c", "top"], ["d"], name="div"),
                helper.make_node("Clip", ["d", "zero", "one"], ["k"], name="act"),
                helper.make_node("Mul", ["k", "top"], ["y"], name="mul"),
            ],
            {"top": c, "zero": np.float32(0), "one": np.float32(1)},
            17,
        ),
        "div_clip_mul_per_channel": (
            [
                helper.make_node("Div", ["c", "top"], ["d"], name="div"),
                helper.make_node("Clip", ["d", "zero", "one"], ["k"], name="act"),
                helper.make_node("Mul", ["top", "k"], ["y"], name="mul"),
            ],
            {"top": per_channel, "zero": np.float32(0), "one": np.float32(1)},
            17,
        ),
        "clip_no_max": ([helper.make_node("Clip", ["c", "zero"], ["y"], name="act")], {"zero": np.float32(0)}, 13),
        "clip_inf_max": (
            [helper.make_node("Clip", ["c", "zero", "inf"], ["y"], name="act")],
            {"zero": np.float32(0), "inf": np.float32(np.inf)},
            13,
        ),
    }


@pytest.mark.parametrize("variant", sorted(_clip_variants()))
def test_clip_forms_become_relu_with_ceiling(tmp_path, variant):
    act_nodes, inits, opset = _clip_variants()[variant]
    nodes = [conv_node("conv", "x", "c", "w", "b", pads=[1, 1, 1, 1]), *act_nodes]
    graph = check(build(tmp_path, nodes, {"w": rand(4, 2, 3, 3), "b": rand(4), **inits}, (2, 4, 4), opset=opset), (2, 4, 4))
    assert ops(graph) == ["conv2d", "relu"]
    relu = graph.nodes[1]
    assert relu.name == "act" and relu.levels == 0
    if variant.startswith("clip_no") or variant.startswith("clip_inf"):
        assert relu.ceiling is None
    elif variant.endswith("per_channel"):
        np.testing.assert_allclose(relu.ceiling, [0.5, 1.0, 1.5, 2.0], rtol=1e-6)
    else:
        np.testing.assert_allclose(relu.ceiling, [0.75], rtol=1e-6)


def test_scaled_relu_folds_into_conv(tmp_path):
    """Conv -> Mul(2) -> Relu -> Mul(3): scales end up in the conv weights and the ceiling stays exact."""
    nodes = [
        conv_node("conv", "x", "c", "w", "b"),
        helper.make_node("Mul", ["c", "two"], ["m"], name="mul"),
        helper.make_node("Clip", ["m", "zero", "one"], ["r"], name="act"),
        helper.make_node("Mul", ["r", "three"], ["y"], name="mul2"),
    ]
    inits = {
        "w": rand(3, 2, 1, 1),
        "b": rand(3),
        "two": np.float32(2),
        "three": np.float32(3),
        "zero": np.float32(0),
        "one": np.float32(1),
    }
    graph = check(build(tmp_path, nodes, inits, (2, 3, 3)), (2, 3, 3))
    assert ops(graph) == ["conv2d", "relu"]
    np.testing.assert_allclose(graph.nodes[1].ceiling, [3.0], rtol=1e-6)


# ------------------------------------------------------------------ torch exports: QCFS and whole networks


class QCFS(nn.Module):
    def __init__(self, lam: float = 2.0, levels: int = 4):
        super().__init__()
        self.lam = nn.Parameter(torch.tensor(lam))
        self.levels = levels

    def forward(self, x):
        return self.lam * torch.clamp(torch.floor(x * self.levels / self.lam + 0.5) / self.levels, 0, 1)


class QCFSClampFirst(QCFS):
    """The other common spelling: clamp to [0, 1] before quantising."""

    def forward(self, x):
        x = torch.clamp(x / self.lam, 0, 1)
        return torch.floor(x * self.levels + 0.5) / self.levels * self.lam


class ClipReLU(nn.Module):
    def __init__(self, ceiling: float):
        super().__init__()
        self.ceiling = ceiling

    def forward(self, x):
        return torch.clamp(x, 0, self.ceiling)


class SmallNet(nn.Module):
    def __init__(self, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = act()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.act2 = act()
        self.avg = nn.AvgPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.fc1 = nn.Linear(32, 16)
        self.act3 = act()
        self.fc2 = nn.Linear(16, 10)
        for bn in (self.bn1, self.bn2):
            with torch.no_grad():
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = self.pool(self.act1(self.bn1(self.conv1(x))))
        x = self.avg(self.act2(self.bn2(self.conv2(x))))
        x = self.drop(x.view(x.size(0), -1))
        return self.fc2(self.act3(self.fc1(x)))


@pytest.mark.parametrize("opset", [13, 17, 20])
@pytest.mark.parametrize("module", ["qcfs", "qcfs_clamp_first"])
def test_qcfs_export_becomes_quantised_relu(tmp_path, opset, module):
    torch.manual_seed(0)
    act = QCFS(1.5, 8) if module == "qcfs" else QCFSClampFirst(1.5, 8)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), act, nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2.0)
    graph = check(export(tmp_path, net, (2, 4, 4), opset), (2, 4, 4), atol=1e-4)
    assert ops(graph) == ["conv2d", "relu", "flatten", "linear"]
    relu = graph.nodes[1]
    assert relu.levels == 8
    np.testing.assert_allclose(relu.ceiling, [1.5], rtol=1e-6)


@pytest.mark.parametrize("opset", [13, 17, 20])
def test_torch_cnn_exports(tmp_path, opset):
    torch.manual_seed(opset)
    graph = check(export(tmp_path, SmallNet(), (3, 8, 8), opset), (3, 8, 8))
    assert ops(graph) == ["conv2d", "relu", "maxpool2d", "conv2d", "relu", "avgpool2d", "flatten", "linear", "relu", "linear"]
    assert graph.meta["opset"] == opset and graph.meta["producer"].startswith("pytorch")


def test_torch_clip_relu_and_static_batch(tmp_path):
    torch.manual_seed(1)
    graph = check(export(tmp_path, SmallNet(lambda: ClipReLU(1.25)), (3, 8, 8), 17, dynamic=False), (3, 8, 8), batch=2)
    ceilings = [float(n.ceiling[0]) for n in graph.nodes if isinstance(n, ir.Relu)]
    assert ceilings == [1.25, 1.25, 1.25]


def test_torch_initializers_as_inputs(tmp_path):
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)).eval()
    path = tmp_path / "inputs.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (torch.randn(1, 2, 4, 4),), str(path), opset_version=13, dynamo=False, keep_initializers_as_inputs=True
        )
    assert len(onnx.load(path).graph.input) > 1
    graph = check(path, (2, 4, 4), batch=1)
    assert ops(graph) == ["conv2d", "relu", "flatten", "linear"]


def test_torch_relu6_and_hardtanh_zero_one(tmp_path):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU6(), nn.Conv2d(2, 2, 1), nn.Hardtanh(0.0, 1.0))
    graph = check(export(tmp_path, net, (1, 5, 5), 17), (1, 5, 5), low=-4, high=4)
    assert [float(n.ceiling[0]) for n in graph.nodes if isinstance(n, ir.Relu)] == [6.0, 1.0]


# ------------------------------------------------------------------ metadata


def test_metadata_preprocess_and_meta(tmp_path):
    spec = {"scale": 1 / 255, "mean": [0.5, 0.4], "std": [0.2, 0.3], "layout": "NCHW"}
    metadata = {"toolchain.preprocess": json.dumps(spec), "toolchain.activation": "clip", "other": "ignored"}
    path = build(tmp_path, [conv_node("conv", "x", "y", "w")], {"w": rand(1, 2, 1, 1)}, (2, 3, 3), metadata=metadata)
    graph = load_onnx(path)
    assert graph.preprocess == ir.Preprocess(scale=1 / 255, mean=[0.5, 0.4], std=[0.2, 0.3], layout="NCHW")
    assert graph.meta["onnx_metadata"] == {"toolchain.activation": "clip"}
    assert graph.meta["source"] == str(path) and graph.meta["opset"] == 17


def test_no_metadata_gives_default_preprocess(tmp_path):
    graph = load_onnx(build(tmp_path, [conv_node("conv", "x", "y", "w")], {"w": rand(1, 2, 1, 1)}, (2, 3, 3)))
    assert graph.preprocess == ir.Preprocess()


def test_graph_roundtrips_through_artifact(tmp_path):
    torch.manual_seed(2)
    graph = load_onnx(export(tmp_path, SmallNet(lambda: QCFS(1.0, 4)), (3, 8, 8), 17))
    loaded = ir.load_graph(ir.save_graph(graph, tmp_path / "artifact"))
    x = rand(3, 3, 8, 8)
    np.testing.assert_allclose(run_ann(loaded, x, device="cpu"), run_ann(graph, x, device="cpu"))


def test_supported_ops_list():
    for op in ("Conv", "Gemm", "MatMul", "BatchNormalization", "Clip", "Floor", "MaxPool", "Pad", "Concat", "Softmax"):
        assert op in SUPPORTED_OPS
    assert "Sigmoid" not in SUPPORTED_OPS


def test_frontend_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, toolchain.passes.frontend; assert 'torch' not in sys.modules, 'torch imported'"
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# ------------------------------------------------------------------ channels-last models


class ChannelsLastCNN(nn.Module):
    """What a Keras model looks like through tf2onnx, written in torch: (N, H, W, C) in, transposed to
    channels-first, and back to channels-last before flattening into the classifier."""

    def __init__(self, flatten: str = "channels_last") -> None:
        super().__init__()
        self.flatten = flatten
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
        self.pool, self.fc = nn.AvgPool2d(2), nn.Linear(5 * 4 * 3, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x.permute(0, 3, 1, 2))))
        x = torch.relu(self.conv2(x))
        if self.flatten == "channels_last":
            x = x.permute(0, 2, 3, 1)
        elif self.flatten == "cancelled":
            x = x.permute(0, 2, 3, 1).permute(0, 3, 1, 2)
        return self.fc(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("flatten", ["channels_last", "channels_first", "cancelled"])
def test_channels_last_models_take_channels_first_images(tmp_path, flatten):
    """The IR drops the input Transpose (it takes (C, H, W)) and reorders the classifier's columns for a
    channels-last flatten; the ANN reference transposes the images back for onnxruntime."""
    from toolchain.onnx_reference import OnnxReference

    module = ChannelsLastCNN(flatten).eval()
    path = export(tmp_path, module, (8, 6, 3))
    graph = load_onnx(path)
    assert graph.input_shape == (3, 8, 6) and graph.meta["input_layout"] == "NHWC"
    assert ops(graph) == ["conv2d", "relu", "avgpool2d", "conv2d", "relu", "flatten", "linear"]
    x = rand(4, 3, 8, 6)
    with torch.inference_mode():
        expected = module(torch.as_tensor(x).permute(0, 2, 3, 1)).numpy()
    np.testing.assert_allclose(run_ann(graph, x, device="cpu"), expected, atol=1e-5)
    np.testing.assert_allclose(OnnxReference(path)(x), expected, atol=1e-5)


def test_channels_last_values_other_than_a_flatten_into_a_classifier_are_refused(tmp_path):
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Relu", ["t"], ["y"], name="relu_nhwc"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])  # fmt: skip
    path = tmp_path / "nhwc_relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    with pytest.raises(ToolchainError, match=r"'relu_nhwc'.*channels-last .*Gemm/MatMul classifier") as info:
        load_onnx(path)
    assert str(path) in str(info.value)


class GreyImagesMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(6 * 5, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GreyImagesCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 6 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x.unsqueeze(1))).flatten(1))


@pytest.mark.parametrize("module", [GreyImagesMLP, GreyImagesCNN])
def test_models_of_channel_free_images_take_them_with_their_one_channel(tmp_path, module):
    """An (N, H, W) input (nn.Flatten first, or x.unsqueeze(1) before a conv) is (1, H, W) in the IR, as
    the data readers give grey images; the ANN reference drops the channel axis for onnxruntime."""
    from toolchain.onnx_reference import OnnxReference

    model = module().eval()
    path = export(tmp_path, model, (6, 5))
    graph = load_onnx(path)
    assert graph.input_shape == (1, 6, 5) and graph.meta["input_layout"] == "NHW"
    x = rand(4, 1, 6, 5)
    with torch.inference_mode():
        expected = model(torch.as_tensor(x[:, 0])).numpy()
    np.testing.assert_allclose(run_ann(graph, x, device="cpu"), expected, atol=1e-5)
    np.testing.assert_allclose(OnnxReference(path)(x), expected, atol=1e-5)
