"""Conversion-friendly activations.

* `ClipReLU`: `clip(x, 0, lambda)` with one trainable ceiling `lambda` per layer (Bu et al.,
  AAAI 2022); the converted SNN uses `theta = lambda` as the firing threshold. Put weight decay
  on `lambda` (see `parameter_groups`), as in the paper, so the ceiling tightens during training.
* `QCFS`: the quantization-clip-floor-shift activation (Bu et al., ICLR 2022),
  `lam * clamp(floor(x * L / lam + 0.5) / L, 0, 1)`, trained with a straight-through
  gradient for the floor. Exact conversion at T = L.
* plain `nn.ReLU` for models whose thresholds come from data.

While `torch.onnx.export` traces a model, the activations use the ceiling as a Python
float, so the ONNX holds constants: `ClipReLU` becomes one `Clip(x, 0, lambda)` node and
`QCFS` the op chain Mul, Div, Add, Floor, Div, Clip, Mul with constant operands.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ACTIVATIONS = ("clip", "qcfs", "relu")


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export()


class ClipReLU(nn.Module):
    """`clip(x, 0, lambda)` with a trainable scalar ceiling `lambda`."""

    def __init__(self, init: float = 8.0):
        super().__init__()
        self.lam = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _exporting():
            return torch.clamp(x, 0.0, float(self.lam.detach()))
        # minimum() passes the gradient to lambda where x exceeds it
        return torch.minimum(torch.relu(x), self.lam.to(x.dtype))

    def extra_repr(self) -> str:
        return f"lam={float(self.lam.detach()):.4g}"


class _FloorSTE(torch.autograd.Function):
    """floor() forward (exact values), identity backward: the straight-through estimator."""

    @staticmethod
    def forward(ctx, x):
        return torch.floor(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class QCFS(nn.Module):
    """`lam * clamp(floor(x * L / lam + 0.5) / L, 0, 1)`, straight-through floor in training."""

    def __init__(self, levels: int = 8, init: float = 8.0):
        super().__init__()
        if levels < 1:
            raise ValueError(f"QCFS needs levels >= 1, got {levels}")
        self.levels = int(levels)
        self.lam = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = self.levels
        if _exporting():
            lam = float(self.lam.detach())
            return lam * torch.clamp(torch.floor(x * levels / lam + 0.5) / levels, 0, 1)
        x = x.float()  # rounding in bf16/fp16 under autocast would be far too coarse
        lam = self.lam
        y = x * levels / lam + 0.5
        y = _FloorSTE.apply(y) if self.training else torch.floor(y)
        return lam * torch.clamp(y / levels, 0, 1)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, lam={float(self.lam.detach()):.4g}"


def make_act(kind: str = "clip", levels: int = 8, init: float = 8.0) -> Callable[[], nn.Module]:
    """A factory of fresh activation modules: "clip", "qcfs" (with `levels`) or "relu"."""
    if kind == "clip":
        return lambda: ClipReLU(init)
    if kind == "qcfs":
        return lambda: QCFS(levels, init)
    if kind == "relu":
        return lambda: nn.ReLU()
    raise ValueError(f"unknown activation {kind!r}; use one of {', '.join(ACTIVATIONS)}")


def parameter_groups(model: nn.Module, weight_decay: float, ceiling_lr_scale: float = 1.0) -> list[dict]:
    """Optimizer groups: weight decay on conv/linear weights and on the activation ceilings
    (which may learn `ceiling_lr_scale` times faster), none on biases or BN parameters."""
    decay, ceilings, no_decay = [], [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, (ClipReLU, QCFS)):
                ceilings.append(param)
            elif name == "weight" and param.ndim > 1:
                decay.append(param)
            else:
                no_decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": ceilings, "weight_decay": weight_decay, "lr_scale": float(ceiling_lr_scale)},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    return [group for group in groups if group["params"]]
