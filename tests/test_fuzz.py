"""Property-based fuzzing of the bad-input contract: mutated ONNX models, artifacts and data files
either work (exit 0) or end with one clear line and exit 2, never a traceback, and a refused
command leaves every file as it was and nothing new behind."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.contract import assert_refused, run, snapshot, tiny_data, tiny_model
from toolchain import manifest

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
_counter = itertools.count()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    tiny_model(folder / "model.onnx")
    tiny_data(folder / "data.npz")
    outcome = run("build", folder / "model.onnx", "--target", "loihi", "--calib", folder / "data.npz", "-o", folder / "art")
    assert outcome.status == 0, outcome.stderr
    return folder


def fresh(base: Path) -> Path:
    """A copy of the base folder for one example (hypothesis runs many in one test)."""
    folder = base.parent / f"{base.name}-example-{next(_counter)}"
    shutil.copytree(base, folder, ignore=shutil.ignore_patterns("*-example-*"))
    return folder


def holds_contract(args: list[Any], folder: Path, output: Path | None = None) -> int:
    before = snapshot(folder)
    outcome = run(*args)
    assert outcome.status in (0, 2), (outcome.status, outcome.stderr)
    assert "Traceback" not in outcome.stderr
    if outcome.status == 2:
        assert_refused(outcome)
        assert snapshot(folder) == before, f"a refused command changed files: {outcome.stderr}"
    elif output is not None:
        assert output.is_dir() and (output / manifest.MANIFEST_FILE).is_file()
    assert not [p for p in folder.iterdir() if ".toolchain-" in p.name], "a staging folder was left behind"
    return outcome.status


# ---------------------------------------------------------------- ONNX models

byte_edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6)


@SETTINGS
@given(edits=byte_edits, cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_mutated_onnx_models(base, edits, cut):
    folder = fresh(base)
    data = bytearray((folder / "model.onnx").read_bytes())
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    (folder / "model.onnx").write_bytes(bytes(data))
    holds_contract(["build", folder / "model.onnx", "--calib", folder / "data.npz", "-o", folder / "art"], folder, folder / "art")


# ---------------------------------------------------------------- artifacts

json_values = st.recursive(
    # no subnormals: a library loaded by other tests (Lava's) may set flush-to-zero, and Hypothesis then refuses them
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True, allow_subnormal=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _paths(document: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix] if prefix else []
    if isinstance(document, dict):
        for key, value in document.items():
            paths += _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            paths += _paths(value, (*prefix, index))
    return paths


def _set(document: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        document = document[key]
    document[path[-1]] = value


@SETTINGS
@given(
    choice=st.integers(0, 10**6),
    value=json_values,
    reseal=st.booleans(),
    document=st.sampled_from(["graph.json", "fixed_graph.json"]),
    command=st.sampled_from(["inspect", "eval"]),
)
def test_mutated_artifacts(base, choice, value, reseal, document, command):
    """One field of graph.json or fixed_graph.json replaced by any JSON value; resealed (a foreign
    artifact whose manifest matches) or not (a hand edit the manifest must catch)."""
    folder = fresh(base)
    path = folder / "art" / document
    content = json.loads(path.read_text())
    paths = _paths(content)
    _set(content, paths[choice % len(paths)], value)
    path.write_text(json.dumps(content))
    if reseal:
        (folder / "art" / manifest.MANIFEST_FILE).write_bytes(manifest.build_manifest(folder / "art"))
    target = ["--target", "loihi"] if document == "fixed_graph.json" else []
    run_eval = command == "eval" or document == "fixed_graph.json"  # inspect reads graph.json only
    args = (
        ["eval", folder / "art", "--data", folder / "data.npz", "-T", "2", "--no-ann", *target]
        if run_eval
        else ["inspect", folder / "art"]
    )
    status = holds_contract(args, folder)
    if not reseal:
        assert status == 2  # every edit the manifest did not see is refused


# ---------------------------------------------------------------- data files

dtypes = st.sampled_from([np.uint8, np.int16, np.int64, np.float16, np.float32, np.float64, np.bool_, np.complex64])
shapes = st.lists(st.integers(0, 7), min_size=1, max_size=5)


@SETTINGS
@given(
    x_shape=shapes,
    x_dtype=dtypes,
    y_shape=shapes,
    y_dtype=dtypes,
    fill=st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False, width=32), st.integers(-(2**20), 2**20)),
)
def test_mutated_data_files(base, x_shape, x_dtype, y_shape, y_dtype, fill):
    folder = fresh(base)
    rng = np.random.default_rng(0)
    with np.errstate(all="ignore"):
        x = (np.full(x_shape, fill) if fill != 0 else rng.integers(0, 256, x_shape)).astype(x_dtype)
        y = rng.integers(0, 4, y_shape).astype(y_dtype)
    np.savez(folder / "d.npz", x=x, y=y)
    holds_contract(["eval", folder / "art", "--data", folder / "d.npz", "-T", "2", "--no-ann"], folder)
