"""Sharded evaluation under torchrun (2 processes, gloo) gives exactly the one-process numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, make_ann
from toolchain.core.ir import save_graph
from toolchain.data import Dataset
from toolchain.distributed import Session, session
from toolchain.errors import ToolchainError
from toolchain.evaluate import Evaluation
from toolchain.passes.calibrate import ThresholdSpec, compute_thresholds
from toolchain.passes.convert import convert


@pytest.fixture
def artifact_and_data(tmp_path):
    ann = make_ann(pool="max", per_channel=True)
    snn = convert(ann, compute_thresholds(ann, ThresholdSpec("ceiling")))
    artifact = save_graph(snn, tmp_path / "snn")
    rng = np.random.default_rng(5)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.integers(0, 256, (45, 1, 8, 8), dtype=np.uint8), y=rng.integers(0, 5, 45))
    return artifact, data


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _eval_json(command: list[str]) -> dict:
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    result.pop("seconds")
    return result


def test_two_gloo_ranks_give_the_single_process_result(artifact_and_data):
    artifact, data = artifact_and_data
    args = ["-m", "toolchain", "eval", str(artifact), "--data", str(data), "-T", "1,3,8,16", "--json", "--no-ann",
            "--device", "cpu", "--batch-size", "7"]  # fmt: skip
    single = _eval_json([sys.executable, *args])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    sharded = _eval_json([*torchrun, *args, "--distributed"])
    assert single["samples"] == 45
    assert sharded == single  # accuracies at every T and spikes per layer, to the last digit
    assert sum(sum(layer.values()) for layer in [single["spikes_per_sample"]["16"]]) > 0


def test_shards_partition_the_dataset():
    data = Dataset(np.arange(10)[:, None], np.arange(10), "toy")
    shards = [Session(rank, 3).shard(data) for rank in range(3)]
    assert sorted(np.concatenate([s.y for s in shards]).tolist()) == list(range(10))
    assert [len(s) for s in shards] == [4, 3, 3]


def test_merging_counts_is_exact():
    a = Evaluation(3, [1, 4], {1: 1, 4: 2}, {1: 2, 4: 3}, 2, {"l": np.array([1.0, 2, 3, 4])}, 1.0)
    empty = Evaluation(0, [1, 4], {1: 0, 4: 0}, {1: 0, 4: 0}, 0, {}, 0.5)
    merged = a.merge(empty).merge(a)
    assert merged.samples == 6 and merged.snn_correct == {1: 2, 4: 4} and merged.ann_correct == 4
    np.testing.assert_array_equal(merged.spikes["l"], [2, 4, 6, 8])


def test_distributed_flag_without_torchrun_says_how(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ToolchainError, match="torchrun"):
        with session(True, "cpu"):
            pass
    with session(False, "cpu") as one:
        assert one.is_main and one.world == 1 and one.device == "cpu"
