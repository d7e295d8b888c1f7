"""Evaluation sharded across processes with torch.distributed.

    torchrun --standalone --nproc_per_node 4 -m toolchain eval ARTIFACT --data DATA [--distributed]

Each process (rank) evaluates every `world`-th sample starting at its rank (a strided
shard, so every rank sees the same mix of the split), with the same target, steps and
batch size as a single process would. The per-rank `Evaluation`s hold counts, not ratios
(correct per T, agreement with the ANN, spikes per layer and step), so gathering them
(`all_gather_object`) and adding them up (`Evaluation.merge`) gives exactly the numbers
of a one-process run; rank 0 prints them.

Backend: NCCL when the ranks run on CUDA (one GPU per rank, `cuda:LOCAL_RANK`), gloo on
CPU. The process group is set up from torchrun's environment (`RANK`, `WORLD_SIZE`,
`MASTER_ADDR`, `MASTER_PORT`, `LOCAL_RANK`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from toolchain.data import Dataset
from toolchain.errors import ToolchainError
from toolchain.evaluate import Evaluation

ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (or another env:// launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Session:
    """Where this process stands: rank, world size and the device it should run on."""

    rank: int = 0
    world: int = 1
    device: str = "auto"
    active: bool = False  # a process group is up

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, dataset: Dataset) -> Dataset:
        """This rank's samples: every `world`-th one, starting at `rank`."""
        if self.world == 1:
            return dataset
        return dataset.subset(None, start=self.rank, step=self.world)

    def combine(self, result: Evaluation) -> Evaluation:
        """The sum of every rank's counts (the same on every rank)."""
        if not self.active:
            return result
        import torch.distributed as dist

        gathered: list[Evaluation | None] = [None] * self.world
        dist.all_gather_object(gathered, result)
        return functools.reduce(Evaluation.merge, [g for g in gathered if g is not None])


def _device_for_rank(requested: str, local_rank: int) -> str:
    import torch

    if requested == "cpu":
        return "cpu"
    if requested == "auto" and not torch.cuda.is_available():
        return "cpu"
    if requested in ("auto", "cuda"):
        if local_rank >= torch.cuda.device_count():
            raise ToolchainError(
                f"rank with LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s); "
                "use --nproc_per_node <= the number of GPUs, or --device cpu"
            )
        return f"cuda:{local_rank}"
    return requested  # an explicit cuda:N: the user chose


@contextmanager
def session(enabled: bool, device: str = "auto") -> Iterator[Session]:
    """A process group for the duration of an evaluation when `enabled`, else a one-process session."""
    if not enabled:
        yield Session(device=device)
        return
    missing = [name for name in ENV_VARS if name not in os.environ]
    if missing:
        raise ToolchainError(
            f"--distributed: {', '.join(missing)} not set; start the ranks with torchrun, e.g. "
            "`torchrun --standalone --nproc_per_node 2 -m toolchain eval ARTIFACT --data DATA`"
        )
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    rank_device = _device_for_rank(device, local_rank)
    backend = "nccl" if rank_device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(rank_device))
    dist.init_process_group(backend=backend, init_method="env://")
    try:
        yield Session(dist.get_rank(), dist.get_world_size(), rank_device, active=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()
