"""Could another convolution algorithm beat the dense one on a CPU? The question behind the
VGG-16 line of bench/throughput.py: there the simulator spends almost all its time in the
same dense oneDNN convolutions as SpikingJelly, so only fewer multiply-adds could make it
faster. Two ways to get fewer, each against dense `F.conv2d` on one thread, best of 3:

1. Event-driven: what neuromorphic hardware does, each spike adds its weights to the outputs
   it reaches, so the work shrinks with the spike density. Written with torch's fastest
   gather-and-sum kernel: per 3x3 kernel offset, `F.embedding_bag` sums, per output position,
   the weight rows of the input channels that spiked at the shifted position. One VGG-16
   layer (256 -> 256 channels, 8x8 maps, T x batch = 512 images), random spikes.
2. Winograd F(2x2, 3x3): 16 multiplies per 2x2 outputs instead of 36 (2.25x fewer),
   written in torch ops (input transform of adds, 16 batched GEMMs, output transform of adds),
   on every 3x3 layer shape of VGG-16 at CIFAR-10 size with 96 images (T = 32 x the
   simulator's chunk of 3), spikes of density 10 %. Also timed: the GEMMs alone, for F(2x2, 3x3)
   and for F(4x4, 3x3) (4x fewer multiplies): what a Winograd kernel could reach if its
   transforms were free. Winograd also rounds differently from the direct sum (the error
   column), so spikes near threshold would flip against the step-by-step reference.

    .venv/bin/python bench/conv_algorithms.py     # about 2 minutes; writes bench/results/conv_algorithms.{json,md}
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from machine import describe_machine, write_results  # noqa: E402

IMAGES, CHANNELS, SIDE, OUT_CHANNELS = 512, 256, 8, 256
DENSITIES = (0.02, 0.05, 0.1, 0.2)

# VGG-16 at CIFAR-10 size: (in channels, out channels, side, how many such layers); the first
# layer (3 -> 64) is left out: the simulator computes it once, not T times.
VGG16_LAYERS = ((64, 64, 32, 1), (64, 128, 16, 1), (128, 128, 16, 1), (128, 256, 8, 1), (256, 256, 8, 2),
                (256, 512, 4, 1), (512, 512, 4, 2), (512, 512, 2, 3))  # fmt: skip
WINOGRAD_IMAGES, WINOGRAD_DENSITY = 96, 0.1

# F(2x2, 3x3) (Lavin & Gray 2016): Y = A^T [(G g G^T) * (B^T d B)] A
WINOGRAD_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)


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


def winograd_weights(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> the 16 transformed kernels as (16, C_in, C_out), computed in float64."""
    g = WINOGRAD_G
    transformed = torch.einsum("ij,ocjk,lk->ilco", g, weight.double(), g)  # (4, 4, C_in, C_out)
    return transformed.reshape(16, weight.shape[1], weight.shape[0]).float().contiguous()


def _bt_rows(d: torch.Tensor, axis: int) -> torch.Tensor:
    """B^T applied along `axis` (length 4): rows d0 - d2, d1 + d2, d2 - d1, d1 - d3, stacked first."""
    d0, d1, d2, d3 = d.unbind(axis)
    return torch.stack([d0 - d2, d1 + d2, d2 - d1, d1 - d3])


def _at_rows(m: torch.Tensor) -> torch.Tensor:
    """A^T applied along the first axis (length 4): m0 + m1 + m2, m1 - m2 - m3, stacked first."""
    return torch.stack([m[0] + m[1] + m[2], m[1] - m[2] - m[3]])


def winograd_conv(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """3x3 convolution, padding 1, stride 1, of NCHW images with even sides, by F(2x2, 3x3)."""
    n, c, h, w = x.shape
    tiles_h, tiles_w = h // 2, w // 2
    tiles = F.pad(x, (1, 1, 1, 1)).unfold(2, 4, 2).unfold(3, 4, 2)  # (n, c, th, tw, 4, 4)
    v = _bt_rows(_bt_rows(tiles, 4), 5)  # (4 cols, 4 rows, n, c, th, tw)
    v = v.permute(1, 0, 2, 4, 5, 3).reshape(16, n * tiles_h * tiles_w, c)
    m = torch.bmm(v, kernels).reshape(4, 4, n, tiles_h, tiles_w, -1)
    y = _at_rows(_at_rows(m).transpose(0, 1))  # (2 cols, 2 rows, n, th, tw, c_out)
    return y.permute(2, 5, 3, 1, 4, 0).reshape(n, -1, h, w)


def best_seconds(fn: Callable[[], torch.Tensor], repeats: int = 3) -> tuple[float, torch.Tensor]:
    y = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        y = fn()
        times.append(time.perf_counter() - start)
    return min(times), y


def event_driven_rows(generator: torch.Generator) -> list[dict[str, Any]]:
    weight = torch.randn(OUT_CHANNELS, CHANNELS, 3, 3, generator=generator) * 0.05
    tables = [weight[:, :, dy, dx].t().contiguous() for dy in range(3) for dx in range(3)]
    rows = []
    for density in DENSITIES:
        spikes = (torch.rand(IMAGES, CHANNELS, SIDE, SIDE, generator=generator) < density).float()
        dense_s, dense = best_seconds(lambda: F.conv2d(spikes, weight, padding=1))  # noqa: B023
        event_s, event = best_seconds(lambda: event_driven_conv(spikes, tables))  # noqa: B023
        rows.append({
            "density": density,
            "dense_ms": round(1e3 * dense_s, 2),
            "event_driven_ms": round(1e3 * event_s, 2),
            "event_vs_dense": round(dense_s / event_s, 3),
            "max_abs_diff": float((dense - event).abs().max()),
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def winograd_rows(generator: torch.Generator) -> list[dict[str, Any]]:
    rows = []
    for c_in, c_out, side, count in VGG16_LAYERS:
        weight = torch.randn(c_out, c_in, 3, 3, generator=generator) / (3 * c_in**0.5)
        spikes = (torch.rand(WINOGRAD_IMAGES, c_in, side, side, generator=generator) < WINOGRAD_DENSITY).float()
        kernels = winograd_weights(weight)
        dense_s, dense = best_seconds(lambda: F.conv2d(spikes, weight, padding=1))  # noqa: B023
        winograd_s, winograd = best_seconds(lambda: winograd_conv(spikes, kernels))  # noqa: B023
        gemm_times = {}
        for name, tile, positions in (("f2", 2, 16), ("f4", 4, 36)):
            tiles = WINOGRAD_IMAGES * (-(-side // tile)) ** 2
            a = torch.rand(positions, tiles, c_in, generator=generator)
            b = torch.rand(positions, c_in, c_out, generator=generator)
            gemm_times[name], _ = best_seconds(lambda: torch.bmm(a, b))  # noqa: B023
        rows.append({
            "layer": f"{c_in}->{c_out} @ {side}x{side}",
            "count": count,
            "dense_ms": round(1e3 * dense_s, 2),
            "winograd_f2_ms": round(1e3 * winograd_s, 2),
            "gemm_only_f2_ms": round(1e3 * gemm_times["f2"], 2),
            "gemm_only_f4_ms": round(1e3 * gemm_times["f4"], 2),
            "max_abs_diff": float((dense - winograd).abs().max()),
            "max_abs_output": float(dense.abs().max()),
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Other convolution algorithms vs dense, on this CPU",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, 1 thread, {m['date']}; load average "
        f"at start {', '.join(str(v) for v in m['load_average_at_start'])}. Random weights and spikes, best of 3; "
        "written by `bench/conv_algorithms.py`.",
        "",
        f"## Event-driven (one VGG-16 layer: {CHANNELS} -> {OUT_CHANNELS} channels, 3x3, {SIDE}x{SIDE}, "
        f"{IMAGES} images)",
        "",
        "| spike density | dense (ms) | event-driven (ms) | event-driven speed vs dense | max abs diff |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in result["event_driven"]:
        lines.append(
            f"| {100 * r['density']:.0f} % | {r['dense_ms']:.1f} | {r['event_driven_ms']:.1f} | "
            f"{r['event_vs_dense']:.2f}x | {r['max_abs_diff']:.1e} |"
        )
    lines += [
        "",
        f"## Winograd (VGG-16's 3x3 layers after the first, {WINOGRAD_IMAGES} images, "
        f"{100 * WINOGRAD_DENSITY:.0f} % spikes)",
        "",
        "| layer | dense (ms) | Winograd F(2x2,3x3) in torch ops (ms) | its GEMMs alone (ms) | "
        "F(4x4,3x3) GEMMs alone (ms) | max abs diff / max output |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    totals = dict.fromkeys(("dense_ms", "winograd_f2_ms", "gemm_only_f2_ms", "gemm_only_f4_ms"), 0.0)
    for r in result["winograd"]:
        times = " | ".join(f"{r[k]:.1f}" for k in totals)
        repeated = f" (x{r['count']})" if r["count"] > 1 else ""
        error = r["max_abs_diff"] / r["max_abs_output"]
        lines.append(f"| {r['layer']}{repeated} | {times} | {error:.1e} |")
        for key in totals:
            totals[key] += r["count"] * r[key]
    lines.append("| **all 12 layers** | " + " | ".join(f"**{v:.1f}**" for v in totals.values()) + " | |")
    dense = totals["dense_ms"]
    lines += [
        "",
        f"Speed vs dense over the 12 layers: Winograd F(2x2,3x3) in torch ops "
        f"{dense / totals['winograd_f2_ms']:.2f}x; its GEMMs alone {dense / totals['gemm_only_f2_ms']:.2f}x; "
        f"F(4x4,3x3) GEMMs alone {dense / totals['gemm_only_f4_ms']:.2f}x (transforms free: an upper bound).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        result = {
            "machine": describe_machine(),
            "event_driven_layer": [IMAGES, CHANNELS, SIDE, SIDE, OUT_CHANNELS],
            "event_driven": event_driven_rows(generator),
            "winograd_images": WINOGRAD_IMAGES,
            "winograd_density": WINOGRAD_DENSITY,
            "winograd": winograd_rows(generator),
        }
    write_results(ROOT / "bench" / "results" / "conv_algorithms", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
