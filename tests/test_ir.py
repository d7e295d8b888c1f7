import json

import numpy as np
import pytest

from tests.conftest import make_ann
from toolchain.core import ir
from toolchain.errors import ToolchainError
from toolchain.passes.calibrate import ThresholdSpec, compute_thresholds
from toolchain.passes.convert import convert


def _snn() -> ir.Graph:
    ann = make_ann(per_channel=True)
    return convert(ann, compute_thresholds(ann, ThresholdSpec("ceiling")))


def test_shapes_are_inferred():
    graph = make_ann()
    assert graph.node("conv1").shape == (4, 8, 8)
    assert graph.node("pool1").shape == (4, 4, 4)
    assert graph.node("conv2").shape == (6, 2, 2)
    assert graph.node("flat").shape == (24,)
    assert graph.node("fc2").shape == (5,)


def test_artifact_round_trip_keeps_every_field(tmp_path):
    snn = _snn()
    snn.preprocess = ir.Preprocess(scale=0.5, mean=[0.1], std=[0.3])
    ir.save_graph(snn, tmp_path / "a")
    loaded = ir.load_graph(tmp_path / "a")
    assert ir.graph_to_json(loaded) == ir.graph_to_json(snn)
    for key, value in ir.graph_tensors(snn).items():
        np.testing.assert_array_equal(ir.graph_tensors(loaded)[key], value)
    assert loaded.preprocess == snn.preprocess
    assert loaded.is_snn


def test_damaged_tensors_are_refused(tmp_path):
    out = ir.save_graph(_snn(), tmp_path / "a")
    data = bytearray((out / ir.TENSORS_FILE).read_bytes())
    data[-10] ^= 0xFF
    (out / ir.TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(ToolchainError, match="checksum"):
        ir.load_graph(out)


def test_newer_schema_is_refused(tmp_path):
    out = ir.save_graph(_snn(), tmp_path / "a")
    document = json.loads((out / ir.GRAPH_FILE).read_text())
    document["schema_version"] = ir.SCHEMA_VERSION + 1
    (out / ir.GRAPH_FILE).write_text(json.dumps(document))
    with pytest.raises(ToolchainError, match="schema version"):
        ir.load_graph(out)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ToolchainError, match="not a toolchain artifact"):
        ir.load_graph(tmp_path)


def test_preprocess_defaults_to_1_over_255_for_uint8_only():
    pre = ir.Preprocess()
    assert pre.apply(np.full((1, 1, 2, 2), 255, np.uint8)).max() == pytest.approx(1.0)
    assert pre.apply(np.full((1, 1, 2, 2), 2.0, np.float32)).max() == pytest.approx(2.0)


def test_save_replaces_an_earlier_artifact_but_nothing_else(tmp_path):
    out = ir.save_graph(_snn(), tmp_path / "a")
    assert ir.save_graph(_snn(), out) == out  # rebuilt in place
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ToolchainError, match="not a toolchain output"):
        ir.save_graph(_snn(), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(ToolchainError, match="not a folder"):
        ir.save_graph(_snn(), tmp_path / "mine" / "notes.txt")
