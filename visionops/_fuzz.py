"""Fuzz specs: how to draw calls of an op, valid and invalid, and how close its result must be to the reference.

Every op declares a :class:`FuzzSpec` beside its registry entry (``OpDef.fuzz``). A spec draws through the small
:class:`Draw` interface, not through hypothesis (a test dependency only): the fuzz harness
(``visionops/testing_fuzz.py``) implements it over ``hypothesis.strategies.data()`` in the tests, so failures
shrink, and over :class:`random.Random` for long campaigns.

A drawn :class:`Call` carries its own validity: ``bad`` names the argument a mutation broke and ``exc`` the exception
classes the call must raise (with ``bad`` in the message); a call without ``bad`` must match the reference.
The helpers below build the inputs the specs share: boxes (inverted, huge, NaN), layouts (non-contiguous,
channels_last, overlapping strides) and the usual wrong arguments (types, dtypes, ranks, out-of-range numbers).
"""

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# (rtol, atol) against the reference run on float64 copies; atol scales with the largest expected magnitude
TOL = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


class Draw:
    """What a spec may draw. ``small`` is set when the case runs on a slow backend (the Triton interpreter)."""

    small: bool = False

    def ints(self, lo: int, hi: int) -> int:  # lo <= v <= hi
        raise NotImplementedError

    def floats(self, lo: float, hi: float) -> float:
        raise NotImplementedError

    def choice(self, seq: Sequence):
        raise NotImplementedError

    def bool(self, p: float = 0.5) -> bool:
        raise NotImplementedError


class RandomDraw(Draw):
    """:class:`Draw` over a seeded ``random.Random`` (long campaigns: no shrinking, no hypothesis)."""

    def __init__(self, rng: random.Random, small: bool = False):
        self.rng, self.small = rng, small

    def ints(self, lo, hi):
        return self.rng.randint(lo, hi)

    def floats(self, lo, hi):
        return self.rng.uniform(lo, hi)

    def choice(self, seq):
        return self.rng.choice(list(seq))

    def bool(self, p=0.5):
        return self.rng.random() < p


@dataclass
class Call:
    """One drawn call of the public wrapper: ``fn(*args, backend=..., **kwargs)``."""

    args: tuple
    kwargs: Dict[str, Any] = field(default_factory=dict)
    bad: Optional[str] = None  # the offending argument's name (None: a valid call)
    exc: Tuple[type, ...] = ()  # the exception classes an invalid call must raise


@dataclass(frozen=True)
class FuzzSpec:
    """How to fuzz one op.

    draw: Draw -> Call, a valid call or one broken by a single mutation (see :func:`mutate`).
    public: the function users call (``public(*args, backend=b, **kwargs)``).
    exact: outputs are selections (indices, kept scores): the reference runs in the inputs' dtype and integer
        outputs must be equal; otherwise the reference runs on float64 copies.
    same: (got, expected, call) -> bool, an optional tie-tolerant comparison used when the plain one fails
        (selections whose order is decided by near-equal numbers).
    """

    draw: Callable[[Draw], Call]
    public: Callable
    exact: bool = False
    same: Optional[Callable] = None
    tol: Dict[torch.dtype, Tuple[float, float]] = field(default_factory=lambda: dict(TOL))


# ---- tensors ------------------------------------------------------------------------------------------------------


def gen(d: Draw) -> torch.Generator:
    return torch.Generator().manual_seed(d.ints(0, 2**31 - 1))


def dtype(d: Draw, half: bool = True) -> torch.dtype:
    return d.choice(FLOATS if half else FLOATS[:2])


def uniform(d: Draw, shape, dt, lo=-1.0, hi=1.0) -> Tensor:
    return (torch.rand(shape, generator=gen(d), dtype=torch.float64) * (hi - lo) + lo).to(dt)


def layout(d: Draw, t: Tensor) -> Tensor:
    """The same values in another memory layout: contiguous, strided (every other element of a larger buffer),
    transposed storage, or channels_last (4-D/5-D)."""
    kind = d.choice(("contiguous", "strided", "transposed", "channels_last"))
    if kind == "strided" and t.dim() >= 1:
        buf = torch.zeros((*t.shape[:-1], 2 * t.shape[-1] + 1), dtype=t.dtype)
        view = buf[..., 1::2]
        view.copy_(t)
        return view
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if kind == "channels_last" and t.dim() in (4, 5):
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t


def overlapping(d: Draw, t: Tensor) -> Tensor:
    """Sometimes every row a view of the first (stride 0): the kernels must read, never assume, the strides."""
    if t.dim() >= 1 and t.shape[0] > 1 and d.bool(0.1):
        return t[:1].expand(t.shape)
    return t


def specials(d: Draw, t: Tensor, p: float = 0.15, huge: bool = True) -> Tensor:
    """Sometimes a few NaN / +-Inf / huge (``huge``) entries (valid input: the result must still match the
    reference)."""
    if t.numel() == 0 or not t.is_floating_point() or not d.bool(p):
        return t
    t = t.clone()
    flat = t.view(-1)
    big = torch.finfo(t.dtype).max / 4
    for _ in range(d.ints(1, 3)):
        flat[d.ints(0, flat.numel() - 1)] = d.choice((math.nan, math.inf, -math.inf) + ((big, -big) if huge else ()))
    return t


def boxes(d: Draw, n: int, dt, scale: float = 100.0, weird: bool = True) -> Tensor:
    """Tensor[n, 4] of (x1, y1, x2, y2); with ``weird``: sometimes inverted, zero-size, huge or negative boxes."""
    g = gen(d)
    xy = torch.rand((n, 2), generator=g, dtype=torch.float64) * scale - (scale / 2 if d.bool(0.2) else 0)
    wh = torch.rand((n, 2), generator=g, dtype=torch.float64) * scale / 2
    if weird and n and d.bool(0.3):
        kind = d.choice(("inverted", "zero", "huge"))
        k = d.ints(0, n - 1)
        if kind == "inverted":
            wh[k] = -wh[k]
        elif kind == "zero":
            wh[k] = 0
        else:
            xy[k] = xy[k] * 1e6
    return torch.cat([xy, xy + wh], 1).to(dt)


def grid_boxes(d: Draw, n: int, dt) -> Tensor:
    """Boxes on an integer grid with sides >= 1 (exact in every float dtype): for selections compared exactly."""
    g = gen(d)
    xy = torch.randint(0, 40, (n, 2), generator=g)
    wh = torch.randint(1, 20, (n, 2), generator=g)
    return torch.cat([xy, xy + wh], 1).to(dt)


def distinct_scores(d: Draw, n: int, dt) -> Tensor:
    """n scores in (0, 1], pairwise distinct in every float dtype (a permutation of k/n, n <= 256)."""
    perm = torch.randperm(n, generator=gen(d))
    return ((perm + 1).double() / max(n, 1)).to(dt)


# ---- mutations: one argument broken, the exception it must raise ---------------------------------------------------

VALUE = (ValueError,)
TYPE = (TypeError,)


def wrong_type(d: Draw, t):
    """Not a tensor: a list, a number, None or a string."""
    return d.choice((lambda: t.tolist() if isinstance(t, Tensor) else [1.0], lambda: 3, lambda: None, lambda: "x"))()


def int_dtype(d: Draw, t: Tensor) -> Tensor:
    return t.to(d.choice((torch.int32, torch.int64, torch.bool, torch.uint8)))


def rank(d: Draw, t: Tensor) -> Tensor:
    """One dimension more or fewer."""
    return t.unsqueeze(0) if t.dim() == 0 or d.bool() else t.reshape(-1) if t.dim() > 1 else t.reshape(1, -1)


def last_dim(d: Draw, t: Tensor) -> Tensor:
    """The last dimension one too short or too long."""
    if t.shape[-1] > 1 and d.bool():
        return t[..., :-1]
    return torch.cat([t, t[..., :1]], -1)


def fewer_rows(t: Tensor) -> Tensor:
    return t[:-1] if t.shape[0] else torch.cat([t, t]) if t.numel() else t.new_zeros((1, *t.shape[1:]))


def mutate(d: Draw, valid: Call, mutations: Sequence[Tuple[str, tuple, Callable]], p: float = 0.5) -> Call:
    """With probability ``p`` break the valid call by one of ``mutations``: (argument name, exception classes,
    fn(d, call) -> Call) where fn returns the call with that argument broken."""
    if not mutations or not d.bool(p):
        return valid
    name, exc, fn = d.choice(mutations)
    call = fn(d, Call(tuple(valid.args), dict(valid.kwargs)))
    call.bad, call.exc = name, exc
    return call


def arg(i: int, fn: Callable) -> Callable:
    """A mutation of positional argument ``i``: fn(d, value) -> broken value."""

    def apply(d: Draw, call: Call) -> Call:
        args = list(call.args)
        args[i] = fn(d, args[i])
        return Call(tuple(args), call.kwargs)

    return apply


def kwarg(key: str, fn: Callable) -> Callable:
    """A mutation of keyword argument ``key``: fn(d, value) -> broken value."""

    def apply(d: Draw, call: Call) -> Call:
        return Call(call.args, {**call.kwargs, key: fn(d, call.kwargs.get(key))})

    return apply


def tensor_mutations(name: str, i: int, *, dims: bool = True, float_only: bool = True) -> list:
    """The usual mutations of tensor argument ``name`` at position ``i``: not a tensor, integer dtype, wrong rank."""
    out = [(name, TYPE, arg(i, wrong_type))]
    if float_only:
        out.append((name, TYPE, arg(i, int_dtype)))
    if dims:
        out.append((name, VALUE, arg(i, rank)))
    return out


# ---- tie-tolerant comparisons of selections -------------------------------------------------------------------------


def iou64(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU in float64 (NaN where undefined), to tell ill-posed selections from wrong ones."""
    a, b = a.double(), b.double()
    area = lambda t: (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])  # noqa: E731
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def near(values: Tensor, thresholds, eps: float = 1e-4) -> bool:
    """Whether any finite value lies within ``eps`` (relative) of a threshold or of another value."""
    v = values.double().flatten()
    v = v[v.isfinite()]
    for t in thresholds:
        if bool(((v - t).abs() <= eps * max(1.0, abs(t))).any()):
            return True
    s = v.sort().values
    return bool(((s[1:] - s[:-1]).abs() <= eps * s[1:].abs().clamp(min=1)).any())
