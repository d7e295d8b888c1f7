"""Could an event-driven convolution beat the dense one on a CPU? Dense oneDNN convolution
against an event-driven version of the same layer, on random spike maps of a given density.

The event-driven version does what neuromorphic hardware does: each spike adds its weights to
the outputs it reaches. Written with torch's fastest gather-and-sum kernel: for each of the
3x3 kernel offsets, `F.embedding_bag` sums, per output position, the weight rows of the
input channels that spiked at the shifted position. Its work shrinks with the density; the
dense kernel's does not. Both on one thread, same layer (a VGG-16 block: 256 -> 256 channels,
3x3, 8x8 maps, T x batch = 512 images), best of 3.

    .venv/bin/python bench/sparse_conv.py        # about a minute; writes bench/results/sparse_conv.{json,md}
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from machine import describe_machine, write_results  # noqa: E402

IMAGES, CHANNELS, SIDE, OUT_CHANNELS = 512, 256, 8, 256
DENSITIES = (0.02, 0.05, 0.1, 0.2)


def event_driven_conv(spikes: torch.Tensor, tables: list[torch.Tensor]) -> torch.Tensor:
    """3x3, padding 1: per kernel offset, sum the weight rows (C_in -> C_out) of active inputs."""
    n, c, h, w = spikes.shape
    padded = F.pad(spikes, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # NHWC
    out = torch.zeros(n * h * w, tables[0].shape[1])
    for index, table in enumerate(tables):
        dy, dx = divmod(index, 3)
        active = padded[:, dy : dy + h, dx : dx + w, :].reshape(n * h * w, c).nonzero()  # row-sorted
        counts = torch.bincount(active[:, 0], minlength=n * h * w)
        out += F.embedding_bag(active[:, 1], table, torch.cumsum(counts, 0) - counts, mode="sum")
    return out.reshape(n, h, w, -1).permute(0, 3, 1, 2)


def best_seconds(fn, x: torch.Tensor, repeats: int = 3) -> tuple[float, torch.Tensor]:
    y = fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        y = fn(x)
        times.append(time.perf_counter() - start)
    return min(times), y


def main() -> int:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(OUT_CHANNELS, CHANNELS, 3, 3, generator=generator) * 0.05
    tables = [weight[:, :, dy, dx].t().contiguous() for dy in range(3) for dx in range(3)]
    rows = []
    with torch.inference_mode():
        for density in DENSITIES:
            spikes = (torch.rand(IMAGES, CHANNELS, SIDE, SIDE, generator=generator) < density).float()
            dense_s, dense = best_seconds(lambda x: F.conv2d(x, weight, padding=1), spikes)
            event_s, event = best_seconds(lambda x: event_driven_conv(x, tables), spikes)
            rows.append({
                "density": density,
                "dense_ms": round(1e3 * dense_s, 2),
                "event_driven_ms": round(1e3 * event_s, 2),
                "event_vs_dense": round(dense_s / event_s, 3),
                "max_abs_diff": float((dense - event).abs().max()),
            })  # fmt: skip
            print(rows[-1], flush=True)
    result = {"machine": describe_machine(), "layer": [IMAGES, CHANNELS, SIDE, SIDE, OUT_CHANNELS], "rows": rows}
    lines = [
        "# Event-driven vs dense convolution on this CPU",
        "",
        f"Machine: {result['machine']['cpu']} ({result['machine']['cpu_count']} cores), torch "
        f"{result['machine']['torch']}, 1 thread, {result['machine']['date']}. One VGG-16 layer "
        f"({CHANNELS} -> {OUT_CHANNELS} channels, 3x3, {SIDE}x{SIDE}, {IMAGES} images), random spikes; "
        "written by `bench/sparse_conv.py`.",
        "",
        "| spike density | dense (ms) | event-driven (ms) | event-driven speed vs dense | max abs diff |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {100 * r['density']:.0f} % | {r['dense_ms']:.1f} | {r['event_driven_ms']:.1f} | "
            f"{r['event_vs_dense']:.2f}x | {r['max_abs_diff']:.1e} |"
        )
    write_results(ROOT / "bench" / "results" / "sparse_conv", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
