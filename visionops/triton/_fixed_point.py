"""Scatter-add for the Triton RoI backward kernels: float atomics, or a deterministic fixed-point sum.

The deterministic variant (chosen when ``torch.are_deterministic_algorithms_enabled()``) mirrors
csrc/ops/cuda/roi_fixed_point.cuh. Float atomics add in whatever order the programs run, so the bits of the sum vary
run to run. Instead each contribution is rounded to a 64-bit fixed-point integer and added with integer atomics,
which are associative: the sum, and so the gradient, is bit-identical whatever the order. The scale is a power of
two computed on the device from max|finite grad| and a bound on the total weight one cell can receive (no host
sync), so no sum can overflow, and one fixed-point unit is under 2^-61 of max|grad| * bound. Non-finite
contributions (NaN, +inf, -inf) set bits in an int32 flag word per cell and are restored by `finish` as a float sum
would have them. Memory: 8 + 4 bytes per gradient element.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

FLAG_NAN, FLAG_POS_INF, FLAG_NEG_INF = 1, 2, 4  # bits of a cell's flag word
_NAN, _POS_INF, _NEG_INF = tl.constexpr(FLAG_NAN), tl.constexpr(FLAG_POS_INF), tl.constexpr(FLAG_NEG_INF)


@triton.jit
def _round_half_away(x):
    """Nearest integer of a float64 block, halves away from zero (exact: a - floor(a) is exact)."""
    a = tl.abs(x)
    f = tl.math.floor(a)
    r = f + tl.where(a - f >= 0.5, 1.0, 0.0)
    return tl.where(x < 0, -r, r)


@triton.jit
def _fixed_point_add(q_ptr, flags_ptr, offs, v, mask, scale):
    """q[offs] += round(v * scale) as int64 where v is finite; flags[offs] |= the kind of v where it is not."""
    finite = v - v == 0  # v - v is NaN for NaN and +-inf
    kind = tl.where(v != v, _NAN, tl.where(v > 0, _POS_INF, _NEG_INF))
    tl.atomic_or(flags_ptr + offs, kind, mask=mask & ~finite, sem="relaxed")
    q = _round_half_away(tl.where(finite, v, 0.0).to(tl.float64) * scale).to(tl.int64)
    tl.atomic_add(q_ptr + offs, q, mask=mask & finite, sem="relaxed")


@triton.jit
def scatter_add(dst_ptr, flags_ptr, offs, v, mask, scale, DETERMINISTIC: tl.constexpr):
    """dst[offs] += v (float32 v, masked lanes skipped). DETERMINISTIC: dst is the int64 sum buffer of `buffers`,
    flags its flag words and scale the value `load_scale` read; otherwise dst is float32 and flags/scale unused."""
    if DETERMINISTIC:
        _fixed_point_add(dst_ptr, flags_ptr, offs, v, mask, scale)
    else:
        tl.atomic_add(dst_ptr + offs, v, mask=mask, sem="relaxed")


@triton.jit
def load_scale(scale_ptr, DETERMINISTIC: tl.constexpr):
    """The fixed-point scale (float64) when DETERMINISTIC; scale_ptr may be None otherwise."""
    return tl.load(scale_ptr) if DETERMINISTIC else 0.0


def buffers(grad: Tensor, sizes, terms: int):
    """Zeroed int64 sums and int32 flags of each shape in `sizes`, and the fixed-point scale: a one-element float64
    device tensor 2^(62 - e) with max|finite grad| * terms < 2^e, computed without leaving the device. `terms` bounds
    the total weight one cell can receive, so every |sum| < 2^62."""
    q = [torch.zeros(s, dtype=torch.int64, device=grad.device) for s in sizes]
    flags = [torch.zeros(s, dtype=torch.int32, device=grad.device) for s in sizes]
    max_abs = torch.nan_to_num(grad.abs(), 0.0, 0.0, 0.0).amax().to(torch.float64).reshape(1)
    bound = (max_abs * float(terms)).clamp(max=torch.finfo(torch.float64).max)  # finite, for frexp
    _, e = torch.frexp(bound)
    # 2^n built from its bits: exact, where torch.ldexp and pow may round or pass through float32
    n = (62 - e.to(torch.int64)).clamp(-1022, 1023)
    return q, flags, ((n + 1023) << 52).view(torch.float64)


def finish(q: Tensor, flags: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The sums as `dtype`: q / scale, or NaN / +inf / -inf where flags say a float sum would have given them
    (NaN seen, or both infinities)."""
    v = q.to(torch.float64) / scale  # scale is a power of two: exact after the int64 -> float64 rounding

    def seen(bit, value):
        return torch.where((flags & bit) != 0, value, 0.0)

    special = seen(FLAG_NAN, torch.nan) + seen(FLAG_POS_INF, torch.inf) + seen(FLAG_NEG_INF, -torch.inf)  # inf-inf: NaN
    return torch.where(flags != 0, special, v).to(dtype)
