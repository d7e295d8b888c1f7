"""ONNX frontend on bad input: one-line ToolchainErrors naming the file, node and op; never a traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolchain.errors import ToolchainError
from toolchain.passes.frontend import load_onnx

RNG = np.random.default_rng(0)


def rand(*shape: int) -> np.ndarray:
    return RNG.uniform(-1, 1, shape).astype(np.float32)


def save(tmp_path: Path, nodes, inits, input_shape=(2, 4, 4), opset=17, inputs=None, extra_opsets=()) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *input_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in extra_opsets)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    model.graph.output[0].type.tensor_type.ClearField("shape")
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    return path


def conv(name: str, x: str, y: str, w: str = "w", **attrs) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w], [y], name=name, **attrs)


def expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(ToolchainError) as info:
        load_onnx(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def good_model(tmp_path: Path) -> Path:
    nodes = [conv("conv", "x", "c"), helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return save(tmp_path, nodes, {"w": rand(3, 2, 3, 3)})


# ------------------------------------------------------------------ files


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.onnx", "no such file")


def test_directory(tmp_path):
    expect_error(tmp_path, "not a file")


def test_truncated_file(tmp_path):
    path = good_model(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_error(path)


@pytest.mark.parametrize("content", [b"", b"hello, this is not an onnx model\n" * 20, b"\x89PNG\r\n\x1a\n" + bytes(range(256))])
def test_not_onnx(tmp_path, content):
    path = tmp_path / "junk.onnx"
    path.write_bytes(content)
    expect_error(path)


def test_corrupted_bytes_never_raise_anything_else(tmp_path):
    path = good_model(tmp_path)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(1)
    messages: list[str] = []
    loaded: list = []
    for trial in range(40):
        broken = bytearray(data)
        for position in rng.integers(0, len(broken), size=1 + trial % 4):
            broken[position] = int(rng.integers(0, 256))
        path.write_bytes(bytes(broken))
        try:
            graph = load_onnx(path)
        except ToolchainError as exc:
            messages.append(str(exc))
        else:
            loaded.append(graph)
    # Outside the except, so the test fails when nothing was refused (it then exercised nothing).
    assert messages, "no corrupted file was refused"
    assert all("\n" not in m and str(path) in m for m in messages), messages
    assert all(g.nodes and g.output for g in loaded)  # a corruption that still parses gives a whole graph


# ------------------------------------------------------------------ unsupported ops and patterns


@pytest.mark.parametrize("op", ["Sigmoid", "Tanh", "Softplus", "LeakyRelu"])
def test_unsupported_op(tmp_path, op):
    nodes = [conv("conv", "x", "c"), helper.make_node(op, ["c"], ["y"], name="the_act")]
    message = expect_error(save(tmp_path, nodes, {"w": rand(3, 2, 3, 3)}), "'the_act'", f"({op})", "supported ops:", "Conv")
    assert "Relu" in message


@pytest.mark.parametrize("op", ["Sigmoid", "LeakyRelu", "Erf", "HardSwish"])
def test_non_relu_activation_says_what_to_do(tmp_path, op):
    nodes = [conv("conv", "x", "c"), helper.make_node(op, ["c"], ["y"], name="the_act")]
    expect_error(save(tmp_path, nodes, {"w": rand(3, 2, 3, 3)}), "'the_act'", "only ReLU and clipped ReLU", "retrain with ReLU")


def test_transposes_other_than_channels_last_detours_are_refused(tmp_path):
    """A channels-last input's Transpose is dropped (tests/test_frontend.py); others are named."""
    nodes = [conv("conv", "x", "c"), helper.make_node("Transpose", ["c"], ["y"], name="swap_hw", perm=[0, 1, 3, 2])]
    expect_error(save(tmp_path, nodes, {"w": rand(3, 2, 3, 3)}), "'swap_hw'", "perm [0, 1, 3, 2]", "channels-last")


def test_conv_transpose_is_named_as_upsampling(tmp_path):
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2])]
    expect_error(save(tmp_path, nodes, {"w": rand(2, 3, 2, 2)}), "'up'", "(ConvTranspose)", "upsampling")


def test_lstm(tmp_path):
    hidden, features = 3, 4
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="lstm", hidden_size=hidden)]
    inits = {"W": rand(1, 4 * hidden, features), "R": rand(1, 4 * hidden, hidden)}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "N", features])]
    expect_error(save(tmp_path, nodes, inits, inputs=inputs), "(LSTM)", "'lstm'")


def test_custom_domain_op(tmp_path):
    nodes = [helper.make_node("FancyAct", ["x"], ["y"], name="fancy", domain="com.example")]
    expect_error(save(tmp_path, nodes, {}, extra_opsets=("com.example",)), "'fancy'", "FancyAct")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight(tmp_path, bad):
    weight = rand(3, 2, 3, 3)
    weight[1, 0, 2, 2] = bad
    nodes = [conv("conv1", "x", "c"), helper.make_node("Relu", ["c"], ["y"], name="relu")]
    expect_error(save(tmp_path, nodes, {"w": weight}), "'conv1'", "(Conv)", "NaN" if np.isnan(bad) else "Inf", "'w'")


def test_nan_from_folding(tmp_path):
    nodes = [
        helper.make_node("Div", ["zero", "zero"], ["nan"], name="div"),
        helper.make_node("Mul", ["x", "nan"], ["y"], name="scale"),
    ]
    expect_error(save(tmp_path, nodes, {"zero": np.float32(0)}), "'scale'", "(Mul)", "NaN")


def test_clip_with_nonzero_min(tmp_path):
    nodes = [conv("conv", "x", "c"), helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="hardtanh")]
    inits = {"w": rand(3, 2, 3, 3), "lo": np.float32(-1), "hi": np.float32(1)}
    expect_error(save(tmp_path, nodes, inits), "'hardtanh'", "(Clip)", "min != 0")


def test_min_without_relu(tmp_path):
    nodes = [conv("conv", "x", "c"), helper.make_node("Min", ["c", "hi"], ["y"], name="cap")]
    expect_error(save(tmp_path, nodes, {"w": rand(3, 2, 3, 3), "hi": np.float32(1)}), "'cap'", "(Min)", "lower bound")


def test_floor_outside_qcfs(tmp_path):
    nodes = [conv("conv", "x", "c"), helper.make_node("Floor", ["c"], ["y"], name="floor")]
    expect_error(save(tmp_path, nodes, {"w": rand(3, 2, 3, 3)}), "'floor'", "(Floor)", "QCFS")


def test_softmax_in_the_middle(tmp_path):
    nodes = [
        conv("conv", "x", "c"),
        helper.make_node("Softmax", ["c"], ["s"], name="sm", axis=1),
        helper.make_node("Relu", ["s"], ["y"], name="relu"),
    ]
    expect_error(save(tmp_path, nodes, {"w": rand(3, 2, 3, 3)}), "'sm'", "(Softmax)", "last op")


def test_reshape_that_does_not_flatten(tmp_path):
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")]
    expect_error(save(tmp_path, nodes, {"shape": np.array([0, 2, 16], np.int64)}), "'reshape'", "(Reshape)", "flatten")


def test_reshape_that_mixes_samples(tmp_path):
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")]
    expect_error(save(tmp_path, nodes, {"shape": np.array([1, -1], np.int64)}), "'reshape'", "batch dimension")


def test_product_of_activations(tmp_path):
    nodes = [conv("conv", "x", "c"), helper.make_node("Mul", ["c", "c"], ["y"], name="square")]
    expect_error(save(tmp_path, nodes, {"w": rand(3, 2, 3, 3)}), "'square'", "(Mul)", "product")


def test_spatially_varying_constant(tmp_path):
    nodes = [helper.make_node("Add", ["x", "bias"], ["y"], name="addmap")]
    expect_error(save(tmp_path, nodes, {"bias": rand(2, 4, 4)}), "'addmap'", "(Add)", "per-channel")


def test_reflect_pad(tmp_path):
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], name="pad", mode="reflect"), conv("conv", "p", "y")]
    inits = {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "w": rand(3, 2, 3, 3)}
    expect_error(save(tmp_path, nodes, inits), "'pad'", "(Pad)", "reflect")


def test_pad_before_relu(tmp_path):
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], name="pad"), helper.make_node("Relu", ["p"], ["y"], name="relu")]
    expect_error(save(tmp_path, nodes, {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}), "'relu'", "'pad'")


def test_dynamic_spatial_input(tmp_path):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, "H", "W"])]
    expect_error(save(tmp_path, [conv("conv", "x", "y")], {"w": rand(3, 2, 3, 3)}, inputs=inputs), "'x'", "fixed size")


def test_two_inputs(tmp_path):
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("a", "b")]
    nodes = [helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    expect_error(save(tmp_path, nodes, {}, inputs=inputs), "2 inputs")


def test_constant_output(tmp_path):
    nodes = [helper.make_node("Identity", ["c"], ["y"], name="id")]
    expect_error(save(tmp_path, nodes, {"c": rand(3)}), "does not depend on the input")


def test_invalid_graph(tmp_path):
    nodes = [conv("conv", "x", "y", w="missing_weight")]
    expect_error(save(tmp_path, nodes, {}), "invalid ONNX model")


def test_bad_preprocess_metadata(tmp_path):
    path = good_model(tmp_path)
    model = onnx.load(path)
    model.metadata_props.append(onnx.StringStringEntryProto(key="toolchain.preprocess", value="{not json"))
    onnx.save(model, path)
    expect_error(path, "toolchain.preprocess")
