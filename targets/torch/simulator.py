"""The float SNN simulator target: the one interpreter (`toolchain.core.interpreter`) run
batched on CPU or CUDA, with the precision, layout and memory choices of a backend.

The batch is run in chunks: bounded by a memory budget (so a T=256 x B=1024 VGG run
fits), and on CPU also by a cache-friendly working-set size, since a layer's whole
(T, B, ...) stack no longer fits in cache and memory-bound ops slow down (measured in
`bench/throughput.py`).
"""

from __future__ import annotations

import os
from typing import ClassVar

import numpy as np
import torch

from toolchain.core import ir
from toolchain.core.interpreter import PRECISIONS, TorchExecutor, fp32_mode, resolve_device
from toolchain.core.target import GraphKind, SimOutput, check_graph_kind
from toolchain.errors import ToolchainError

# ------------------------------------------------------------------ the target

# On CPU, a layer's (T x chunk) stack is kept near this size so memory-bound ops run
# from cache rather than DRAM (measured in bench/throughput.py: see its chunk sweep).
CPU_STACK_BYTES = 24 << 20
CPU_MEMORY_BUDGET_MAX = 8 << 30


def default_memory_budget(device: torch.device) -> int:
    """Bytes one batch chunk may use at its peak: half the free GPU memory, or a quarter of RAM (at most 8 GiB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # reusable by torch
        return int((free + cached) * 0.5)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    return int(min(total // 4, CPU_MEMORY_BUDGET_MAX))


class TorchTarget:
    """Float SNN simulation; implements `toolchain.core.target.Target` for the float `ir.Graph`.

    Options:
    - `device`: auto, cpu, cuda, cuda:1 ...
    - `precision` of the synaptic ops: float32 (IEEE, also on CUDA); tf32, float16, bfloat16 (CUDA only).
    - `channels_last`: NHWC images; None means only for float16 / bfloat16 on CUDA, because NHWC
      convolutions sum in another order and so round differently from the reference.
    - `compile`: torch.compile the IF scan (off by default; slow to compile, see bench/throughput.py).
    - `memory_budget`: bytes one chunk may use at its peak (None: `default_memory_budget`).
    - `batch_chunk`: force the number of samples run together.
    """

    name: ClassVar[str] = "torch"
    graph_kind: ClassVar[GraphKind] = "float"

    def __init__(
        self,
        device: str = "auto",
        precision: str = "float32",
        channels_last: bool | None = None,
        compile: bool = False,
        memory_budget: int | None = None,
        batch_chunk: int | None = None,
    ):
        if precision not in PRECISIONS:
            raise ToolchainError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        self.device_name = device
        self.precision = precision
        self.channels_last = channels_last
        self.compile = compile
        self.memory_budget = memory_budget
        self.batch_chunk = batch_chunk
        self.executor: TorchExecutor | None = None

    def prepare(self, graph: ir.Graph) -> None:
        check_graph_kind(self, graph, ir.Graph)
        device = resolve_device(self.device_name)
        dtype = PRECISIONS[self.precision]
        if self.precision != "float32" and device.type != "cuda":
            raise ToolchainError(f"precision {self.precision} is offered on CUDA only; use float32 on {device.type}")
        channels_last = self.channels_last
        if channels_last is None:
            # NHWC convolutions round differently from NCHW ones (other kernels, other summation
            # order): on a VGG-16 about 0.02 % of spikes flip. Off by default where results can
            # match the reference exactly; on for reduced precision on CUDA (tensor-core kernels).
            has_conv = any(isinstance(n, ir.Conv2d) for n in graph.nodes)
            channels_last = device.type == "cuda" and dtype != torch.float32 and has_conv
        self.executor = TorchExecutor(graph, device, dtype, channels_last=channels_last, compile=self.compile)

    def chunk_size(self, batch: int, steps: int) -> int:
        """How many samples run together: within the memory budget and, on CPU, the cache-friendly size."""
        executor = self.executor
        assert executor is not None, "prepare() first"
        if self.batch_chunk is not None:
            return max(1, min(batch, self.batch_chunk))
        budget = self.memory_budget if self.memory_budget is not None else default_memory_budget(executor.device)
        chunk = budget // max(1, executor.peak_bytes_per_sample(steps))
        if executor.device.type == "cpu":
            chunk = min(chunk, CPU_STACK_BYTES // max(1, executor.largest_stack_bytes_per_sample(steps)))
        return max(1, min(batch, chunk))

    def run(self, x: np.ndarray, steps: int) -> SimOutput:
        executor = self.executor
        assert executor is not None, "prepare() first"
        batch = len(x)
        chunk = self.chunk_size(batch, steps)
        inputs = torch.as_tensor(x)
        readouts: list[np.ndarray] = []
        totals: dict[str, torch.Tensor] = {}
        cuda = executor.device.type == "cuda"
        with torch.inference_mode(), fp32_mode(cuda and executor.dtype == torch.float32, self.precision == "tf32"):
            for begin in range(0, batch, chunk):
                counts: dict[str, torch.Tensor] = {}
                readout = executor.run(inputs[begin : begin + chunk], steps, counts=counts)
                readouts.append(readout.expand((steps,) + readout.shape[1:]).float().cpu().numpy())
                for name, layer_counts in counts.items():
                    totals[name] = totals[name] + layer_counts if name in totals else layer_counts
        return SimOutput(
            readout=np.concatenate(readouts, axis=1) if len(readouts) > 1 else readouts[0],
            spikes={k: v.cpu().numpy().astype(np.float64) for k, v in totals.items()},
        )

    def close(self) -> None:
        """Nothing to release: the executor holds only tensors."""
