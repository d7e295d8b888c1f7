"""Element-wise activation patterns: clipped ReLUs and QCFS in every form exporters write.

Element-wise ONNX ops with constant operands (Add/Sub/Mul/Div/Neg, Relu, Clip, Max/Min,
Floor, BatchNormalization) become *tokens* of an `Elementwise` pseudo-node:

    Scale(s, b)   x * s + b, per channel
    Clamp(lo, hi) clip(x, lo, hi), per channel (Relu is Clamp(0, inf))
    Floor         floor(x)

Chains of such nodes are merged, then rewritten into a canonical order with exact
identities (per channel, all scales > 0):

    Scale(s1, b1) Scale(s2, b2)     -> Scale(s1*s2, s2*b1 + b2)
    Clamp Clamp                     -> one Clamp (intersected bounds)
    Scale(s, 0) Clamp(lo, hi)       -> Clamp(lo/s, hi/s) Scale(s, 0)
    Clamp(lo, hi) [Scale(s, b)] Floor -> [Scale(s, b)] Floor Clamp(floor(s*lo+b), floor(s*hi+b))

(the last one because floor and positive affine maps are monotone). In canonical form
`Div(c) Clip(0, 1) Mul(c)`, `Relu Min(c)`, `Max(0) Min(c)` and `Clip(0, c)` are all
`Clamp(0, c)`, and both QCFS spellings are `Scale(a, beta) Floor Clamp(0, L) Scale(g, 0)`,
which lowers to `ScaleShift` (only if a*g != 1 or beta != 1/2) + `Relu(ceiling=g*L, levels=L)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, NoReturn

import numpy as np

from toolchain.core import ir

Source = tuple[str, str]  # (ONNX node name, op type), for names and error messages
Fail = Callable[[Source, str], NoReturn]


@dataclass
class Scale:
    scale: np.ndarray
    shift: np.ndarray
    source: Source


@dataclass
class Clamp:
    lo: np.ndarray
    hi: np.ndarray
    source: Source


@dataclass
class Floor:
    source: Source


Token = Scale | Clamp | Floor


@dataclass
class Elementwise(ir.Node):
    """Frontend-internal pseudo-node: a chain of element-wise tokens (never in a returned graph)."""

    tokens: list[Token] = field(default_factory=list)
    op: ClassVar[str] = "elementwise"


def _positive(scale: np.ndarray) -> bool:
    return bool(np.all(scale > 0))


def _is_identity(token: Scale) -> bool:
    return bool(np.all(np.abs(token.scale - 1) <= 1e-6) and np.all(np.abs(token.shift) <= 1e-7))


def _rewrite_once(t: list[Token]) -> bool:
    for i, a in enumerate(t):
        b = t[i + 1] if i + 1 < len(t) else None
        c = t[i + 2] if i + 2 < len(t) else None
        if isinstance(a, Scale) and _is_identity(a):
            del t[i]
            return True
        if isinstance(a, Scale) and isinstance(b, Scale):
            t[i : i + 2] = [Scale(a.scale * b.scale, a.shift * b.scale + b.shift, a.source)]
            return True
        if isinstance(a, Clamp) and isinstance(b, Clamp):
            t[i : i + 2] = [Clamp(np.maximum(a.lo, b.lo), np.minimum(a.hi, b.hi), a.source)]
            return True
        if isinstance(a, Floor) and isinstance(b, Floor):
            del t[i + 1]
            return True
        if isinstance(a, Scale) and isinstance(b, Clamp) and _positive(a.scale) and not np.any(a.shift):
            t[i : i + 2] = [Clamp(b.lo / a.scale, b.hi / a.scale, b.source), a]
            return True
        if isinstance(a, Clamp) and isinstance(b, Floor):
            t[i : i + 2] = [b, Clamp(np.floor(a.lo), np.floor(a.hi), a.source)]
            return True
        if isinstance(a, Clamp) and isinstance(b, Scale) and isinstance(c, Floor) and _positive(b.scale):
            lo, hi = np.floor(b.scale * a.lo + b.shift), np.floor(b.scale * a.hi + b.shift)
            t[i : i + 3] = [b, c, Clamp(lo, hi, a.source)]
            return True
    return False


def canonical(tokens: list[Token]) -> list[Token]:
    """The token chain rewritten into canonical order (a new list; see the module docstring)."""
    result = list(tokens)
    with np.errstate(all="ignore"):
        for _ in range(10_000):
            if not _rewrite_once(result):
                break
    return result


def _ceiling(hi: np.ndarray) -> np.ndarray:
    """Per-channel ceiling, collapsed to shape (1,) when every channel has the same one."""
    hi = np.asarray(hi, np.float64).reshape(-1)
    if np.all(hi == hi[0]):
        hi = hi[:1]
    return hi.astype(np.float32)


def _relu(name: str, source: Source, token: Clamp, fail: Fail) -> ir.Relu:
    lo, hi = token.lo, token.hi
    if np.any(lo != 0):
        if np.all(np.isneginf(lo)):
            fail(source, "an upper clip (Min/Clip) without a lower bound of 0 is not a ReLU; only clip(x, 0, c) is supported")
        fail(source, f"Clip with min != 0 (min = {_show(lo)}) is not supported; only clip(x, 0, c) / ReLU activations are")
    if np.all(np.isposinf(hi)):
        return ir.Relu(name, [], ceiling=None)
    if np.any(~np.isfinite(hi)):
        fail(source, "a clipped ReLU whose ceiling is infinite for some channels only is not supported")
    if np.any(hi <= 0):
        fail(source, f"a clipped ReLU needs a positive ceiling (max = {_show(hi)})")
    return ir.Relu(name, [], ceiling=_ceiling(hi))


def _show(values: np.ndarray) -> str:
    flat = np.unique(np.asarray(values).reshape(-1))
    text = ", ".join(f"{v:g}" for v in flat[:4])
    return text if len(flat) <= 4 else text + ", ..."


def lower(node: Elementwise, namer: Callable[[str], str], fail: Fail) -> list[ir.Node]:
    """The IR nodes (ScaleShift / Relu) equivalent to an element-wise chain, inputs chained from node.inputs."""
    tokens = canonical(node.tokens)
    out: list[ir.Node] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if isinstance(token, Floor) or (isinstance(token, Scale) and isinstance(nxt, Floor)):
            consumed, made = _lower_qcfs(tokens, i, namer, fail)
            out.extend(made)
            i += consumed
        elif isinstance(token, Clamp):
            out.append(_relu(namer(token.source[0]), token.source, token, fail))
            i += 1
        else:
            assert isinstance(token, Scale)
            out.append(_affine(namer(token.source[0]), token.scale, token.shift))
            i += 1
    previous = node.inputs[0]
    for made_node in out:
        made_node.inputs = [previous]
        previous = made_node.name
    return out


def _affine(name: str, scale: np.ndarray, shift: np.ndarray) -> ir.ScaleShift:
    return ir.ScaleShift(
        name, [], scale=np.asarray(scale, np.float32).reshape(-1), shift=np.asarray(shift, np.float32).reshape(-1)
    )


def _lower_qcfs(tokens: list[Token], i: int, namer: Callable[[str], str], fail: Fail) -> tuple[int, list[ir.Node]]:
    """`[Scale(a, beta)] Floor Clamp(0, L) [Scale(g, b2)]` -> [ScaleShift] Relu(g*L, levels=L) [ScaleShift]."""
    start = i
    pre = tokens[i] if isinstance(tokens[i], Scale) else None
    if pre is not None:
        i += 1
    floor = tokens[i]
    assert isinstance(floor, Floor)
    i += 1
    clamp = tokens[i] if i < len(tokens) else None
    if not isinstance(clamp, Clamp):
        fail(floor.source, "Floor is supported only inside a QCFS activation, lam * clip(floor(x * L / lam + 0.5) / L, 0, 1)")
    i += 1
    post = tokens[i] if i < len(tokens) and isinstance(tokens[i], Scale) else None
    if post is not None:
        i += 1
    hi = np.asarray(clamp.hi, np.float64).reshape(-1)
    levels = float(hi[0])
    if np.any(clamp.lo != 0) or not np.all(hi == levels) or not np.isfinite(levels) or levels < 1 or levels != round(levels):
        fail(
            clamp.source,
            "Floor followed by this Clip is not a QCFS activation lam * clip(floor(x * L / lam + 0.5) / L, 0, 1) "
            f"(clip bounds after normalisation: [{_show(clamp.lo)}], [{_show(clamp.hi)}]; need [0, L] with integer L)",
        )
    g = np.ones(1) if post is None else np.asarray(post.scale, np.float64)
    if not _positive(g):
        fail(post.source if post else clamp.source, "a QCFS activation needs a positive scale lam")
    a = np.ones(1) if pre is None else np.asarray(pre.scale, np.float64)
    beta = np.zeros(1) if pre is None else np.asarray(pre.shift, np.float64)
    made: list[ir.Node] = []
    pre_scale, pre_shift = a * g, (beta - 0.5) * g
    if not _is_identity(Scale(pre_scale, pre_shift, clamp.source)):
        made.append(_affine(namer((pre or floor).source[0]), pre_scale, pre_shift))
    made.append(ir.Relu(namer(clamp.source[0]), [], ceiling=_ceiling(g * levels), levels=int(levels)))
    if post is not None and np.any(post.shift):
        made.append(_affine(namer(post.source[0]), np.ones_like(post.shift), post.shift))
    return i - start, made
