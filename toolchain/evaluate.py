"""Stream a dataset through a target (and the ANN beside it) and count what matters.

One run of T_max steps gives the accuracy at every requested T <= T_max, because the
readout is accumulated step by step. Counts, not ratios, are kept so that shards of a
distributed evaluation combine exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolchain.core.ir import Preprocess
from toolchain.core.target import Target
from toolchain.data import Dataset, check_labels
from toolchain.errors import ToolchainError
from toolchain.progress import Progress

AnnFunction = Callable[[np.ndarray], np.ndarray]


@dataclass
class Evaluation:
    samples: int
    steps: list[int]
    snn_correct: dict[int, int]
    agreement: dict[int, int] = field(default_factory=dict)  # SNN class == ANN class, per T
    ann_correct: int | None = None
    spikes: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> spikes per step, summed over samples
    seconds: float = 0.0

    def snn_accuracy(self) -> dict[int, float]:
        return {t: c / max(1, self.samples) for t, c in self.snn_correct.items()}

    def ann_accuracy(self) -> float | None:
        return None if self.ann_correct is None else self.ann_correct / max(1, self.samples)

    def spikes_per_sample(self, steps: int) -> dict[str, float]:
        """Mean spikes per sample of each layer over the first `steps` steps."""
        return {k: float(v[:steps].sum()) / max(1, self.samples) for k, v in self.spikes.items()}

    def merge(self, other: Evaluation) -> Evaluation:
        spikes = {k: self.spikes.get(k, 0) + other.spikes.get(k, 0) for k in self.spikes.keys() | other.spikes.keys()}
        ann = None if self.ann_correct is None or other.ann_correct is None else self.ann_correct + other.ann_correct
        return Evaluation(
            self.samples + other.samples,
            self.steps,
            {t: self.snn_correct[t] + other.snn_correct[t] for t in self.steps},
            {t: self.agreement.get(t, 0) + other.agreement.get(t, 0) for t in self.agreement},
            ann,
            spikes,
            max(self.seconds, other.seconds),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "ann_accuracy": self.ann_accuracy(),
            "snn_accuracy": {str(t): a for t, a in self.snn_accuracy().items()},
            "agreement_with_ann": {str(t): c / max(1, self.samples) for t, c in self.agreement.items()},
            "spikes_per_sample": {str(t): self.spikes_per_sample(t) for t in self.steps},
            "seconds": round(self.seconds, 3),
        }


def parse_steps(text: str) -> list[int]:
    try:
        steps = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ToolchainError(f"-T {text!r}: give time steps as integers, e.g. 1,2,4,8,16,32") from None
    if not steps or steps[0] < 1:
        raise ToolchainError(f"-T {text!r}: time steps must be positive integers")
    return steps


def check_input_shape(dataset: Dataset, input_shape: tuple[int, ...], source: str) -> None:
    sample_shape = tuple(dataset.x.shape[1:])
    if sample_shape == tuple(input_shape):
        return
    same_size = int(np.prod(sample_shape)) == int(np.prod(input_shape))
    if same_size and (len(input_shape) == 1 or _squeezed(sample_shape) == _squeezed(input_shape)):
        return  # (1, 28, 28) images for a (784,) MLP input, or unit dimensions: reshaped on the fly
    hint = ""
    if len(sample_shape) == 3 and sample_shape == (*input_shape[1:], input_shape[0]):
        hint = "; they look channels-last (N, H, W, C): give images as (N, C, H, W)"
    raise ToolchainError(f"{dataset.source}: samples have shape {sample_shape} but {source} expects {tuple(input_shape)}{hint}")


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def evaluate(
    target: Target,
    dataset: Dataset,
    preprocess: Preprocess,
    input_shape: tuple[int, ...],
    steps: list[int],
    batch_size: int = 256,
    ann: AnnFunction | None = None,
    progress: bool | None = None,
    label: str = "eval",
) -> Evaluation:
    """Run `dataset` through `target` (already prepared) for max(steps) steps."""
    check_input_shape(dataset, input_shape, "the model")
    t_max = max(steps)
    result = Evaluation(0, steps, {t: 0 for t in steps}, {t: 0 for t in steps} if ann else {}, 0 if ann else None)
    bar = Progress(len(dataset), label, progress)
    start = time.perf_counter()
    for raw, labels in dataset.batches(batch_size):
        x = preprocess.apply(raw).reshape((len(raw), *input_shape))
        out = target.run(x, t_max)
        if result.samples == 0:  # every label must be one of the model's outputs
            check_labels(dataset, int(out.readout.shape[-1]), "the model")
        predictions = out.readout[[t - 1 for t in steps]].argmax(-1)  # (len(steps), B)
        ann_prediction = ann(x).argmax(-1) if ann else None
        for i, t in enumerate(steps):
            result.snn_correct[t] += int((predictions[i] == labels).sum())
            if ann_prediction is not None:
                result.agreement[t] += int((predictions[i] == ann_prediction).sum())
        if ann_prediction is not None:
            result.ann_correct = (result.ann_correct or 0) + int((ann_prediction == labels).sum())
        for layer, counts in out.spikes.items():
            result.spikes[layer] = result.spikes.get(layer, 0) + counts[:t_max]
        result.samples += len(labels)
        bar.advance(len(labels))
    bar.close()
    result.seconds = time.perf_counter() - start
    return result
