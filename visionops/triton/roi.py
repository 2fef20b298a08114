"""Triton RoIAlign / RoIPool, forward and backward, each wrapped as its own custom op.

Same math as visionops/reference/roi.py and csrc/ops/common/roi_{align,pool}.h, evaluated in float32. One program
per (RoI, bin) and block of channels: the RoI geometry and each sample's taps are scalar work shared by the channel
block; features are read through their strides, so channels_last input is read in place.

The RoIAlign kernels take their feature maps as a tuple of levels (1 for roi_align; up to the C++ kernels' level
limit for multi_scale_roi_align, MultiScaleRoIAlign in one launch): each RoI reads its level index and picks that
level's pointer, sizes, strides and scale with a select chain over the levels (`_pick`), as the CUDA kernel indexes
its level table. Backward kernels scatter into float32 buffers with float atomics (cast to the gradient's dtype
afterwards) or, under ``torch.use_deterministic_algorithms(True)``, into 64-bit fixed-point sums with integer
atomics, bit-identical run to run (visionops/triton/_fixed_point.py). As on CUDA, a RoI whose batch index or level
is out of range yields zeros and no gradient (checking it would need a device sync).

RoIPool keeps no argmax: the backward finds each bin's maximum again with the forward's rule (first strict maximum,
NaN never wins), as the C++ kernels do.
"""

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from visionops import _registry as registry
from visionops.triton import _fixed_point
from visionops.triton._fixed_point import load_scale, scatter_add
from visionops.triton._math import div_rn

FLT_MAX = tl.constexpr(3.4028234663852886e38)
BLOCK_C = 64  # channels per program
MAX_GRID = tl.constexpr(registry.limit("roi_align_max_grid"))  # adaptive sampling grid cap per axis


@triton.jit
def _pick(l, values, NL: tl.constexpr):
    """values[l] for a level index known only at run time (values[0] when l is out of range: callers mask it)."""
    v = values[0]
    for i in tl.static_range(1, NL):
        v = tl.where(l == i, values[i], v)
    return v


@triton.jit
def _program_bin(C, PH, PW, BLOCK_C: tl.constexpr):
    """This program's RoI k, bin (ph, pw) and block of channels cs (mask cmask): grid (K * PH * PW, C blocks)."""
    pid = tl.program_id(0)
    k = pid // (PH * PW)
    ph = (pid // PW) % PH
    pw = pid % PW
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return k, ph, pw, cs, cs < C


@triton.jit
def _align_geom(rois_ptr, k, spatial_scale, PH, PW, sampling_ratio, ALIGNED: tl.constexpr):
    """Batch index, start, bin size and sample grid of RoI k (see roi_align_geom in roi_align.h)."""
    r = rois_ptr + k * 5
    bf = tl.load(r)
    b = tl.where((bf > -1.0e9) & (bf < 1.0e9), bf, -1.0).to(tl.int64)  # truncation, like the int cast
    offset: tl.constexpr = 0.5 if ALIGNED else 0.0
    sw = tl.load(r + 1) * spatial_scale - offset
    sh = tl.load(r + 2) * spatial_scale - offset
    rw = tl.load(r + 3) * spatial_scale - offset - sw
    rh = tl.load(r + 4) * spatial_scale - offset - sh
    if not ALIGNED:
        rw = tl.where(rw < 1.0, 1.0, rw)
        rh = tl.where(rh < 1.0, 1.0, rh)
    qh = tl.math.ceil(div_rn(rh, PH))
    qw = tl.math.ceil(div_rn(rw, PW))
    # Non-finite or non-positive sizes: no samples (qh - qh is NaN for inf and NaN).
    gh = tl.where((qh > 0) & (qh - qh == 0), tl.minimum(qh, MAX_GRID), 0.0).to(tl.int32)
    gw = tl.where((qw > 0) & (qw - qw == 0), tl.minimum(qw, MAX_GRID), 0.0).to(tl.int32)
    gh = tl.where(sampling_ratio > 0, sampling_ratio, gh)
    gw = tl.where(sampling_ratio > 0, sampling_ratio, gw)
    return b, sh, sw, div_rn(rh, PH), div_rn(rw, PW), gh, gw


@triton.jit
def _axis(v, size):
    """One axis of the bilinear taps: (lo, hi, w_lo, w_hi, valid), as bilinear_axis in roi_align.h."""
    valid = (v >= -1.0) & (v <= size)
    v = tl.where(v <= 0.0, 0.0, v)
    lo = v.to(tl.int32)
    last = lo >= size - 1
    lo = tl.where(last, size - 1, lo)
    hi = tl.where(last, size - 1, lo + 1)
    v = tl.where(last, lo.to(tl.float32), v)
    # an invalid (e.g. NaN) sample gets weight 0, not NaN: its taps are masked, and NaN * 0 would still be NaN
    w_hi = tl.where(valid, v - lo.to(tl.float32), 0.0)
    # the cells as int64: they multiply row strides (and H * W, C * H * W) past 2^31 in a large map
    return lo.to(tl.int64), hi.to(tl.int64), tl.where(valid, 1.0 - w_hi, 0.0), w_hi, valid


@triton.jit
def _sample_axis(start, bin_, p, i, grid, size):
    """Taps along one axis of sample i of bin p, at start + p * bin + (i + 0.5) * bin / grid (roi_align_sample)."""
    return _axis(start + p * bin_ + div_rn((i + 0.5) * bin_, grid), size)


@triton.jit
def _roi_align_fwd_kernel(
    levels,
    rois_ptr,
    lvl_ptr,
    out_ptr,
    C,
    PH,
    PW,
    sampling_ratio,
    NL: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """levels: (x_ptr, B, H, W, sxb, sxc, sxh, sxw, spatial_scale), each an NL-tuple; lvl_ptr: RoI levels or None."""
    k, ph, pw, cs, cmask = _program_bin(C, PH, PW, BLOCK_C)
    l = 0 if lvl_ptr is None else tl.load(lvl_ptr + k)
    x_ptr, B, H, W, sxb, sxc, sxh, sxw, spatial_scale = [_pick(l, f, NL) for f in levels]
    b, sh, sw, bh, bw, gh, gw = _align_geom(rois_ptr, k, spatial_scale, PH, PW, sampling_ratio, ALIGNED)
    ok = (b >= 0) & (b < B) & (l >= 0) & (l < NL)
    base = x_ptr + tl.where(ok, b, 0) * sxb + cs.to(tl.int64) * sxc
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for iy in range(0, gh):
        ylo, yhi, hy, ly, vy = _sample_axis(sh, bh, ph, iy, gh, H)
        for ix in range(0, gw):
            xlo, xhi, hx, lx, vx = _sample_axis(sw, bw, pw, ix, gw, W)
            m = tl.where(vy & vx & ok, cmask, False)  # (block & scalar mask trips the interpreter)
            v1 = tl.load(base + ylo * sxh + xlo * sxw, mask=m, other=0.0).to(tl.float32)
            v2 = tl.load(base + ylo * sxh + xhi * sxw, mask=m, other=0.0).to(tl.float32)
            v3 = tl.load(base + yhi * sxh + xlo * sxw, mask=m, other=0.0).to(tl.float32)
            v4 = tl.load(base + yhi * sxh + xhi * sxw, mask=m, other=0.0).to(tl.float32)
            acc += hy * hx * v1 + hy * lx * v2 + ly * hx * v3 + ly * lx * v4
    count = tl.maximum(gh * gw, 1).to(tl.float32)
    out = out_ptr + ((k.to(tl.int64) * C + cs) * PH + ph) * PW + pw
    tl.store(out, div_rn(acc, count), mask=cmask)


@triton.jit
def _roi_align_bwd_kernel(
    g_ptr,
    sgk,
    sgc,
    sgh,
    sgw,
    levels,
    rois_ptr,
    lvl_ptr,
    scale_ptr,
    C,
    PH,
    PW,
    sampling_ratio,
    NL: tl.constexpr,
    ALIGNED: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """levels: (gin_ptr, flags_ptr, B, H, W, spatial_scale), each an NL-tuple; gin is a contiguous [B, C, H, W]
    float32 buffer, or the fixed-point sums with their flags when DETERMINISTIC (see _fixed_point.scatter_add)."""
    k, ph, pw, cs, cmask = _program_bin(C, PH, PW, BLOCK_C)
    l = 0 if lvl_ptr is None else tl.load(lvl_ptr + k)
    gin_ptr, flags_ptr, B, H, W, spatial_scale = [_pick(l, f, NL) for f in levels]
    b, sh, sw, bh, bw, gh, gw = _align_geom(rois_ptr, k, spatial_scale, PH, PW, sampling_ratio, ALIGNED)
    ok = (b >= 0) & (b < B) & (l >= 0) & (l < NL)
    count = (gh * gw).to(tl.float32)
    g = tl.load(g_ptr + k.to(tl.int64) * sgk + cs.to(tl.int64) * sgc + ph * sgh + pw * sgw, mask=cmask, other=0.0)
    g = g.to(tl.float32)
    scale = load_scale(scale_ptr, DETERMINISTIC)
    base = (tl.where(ok, b, 0) * C + cs.to(tl.int64)) * H * W
    for iy in range(0, gh):
        ylo, yhi, hy, ly, vy = _sample_axis(sh, bh, ph, iy, gh, H)
        for ix in range(0, gw):
            xlo, xhi, hx, lx, vx = _sample_axis(sw, bw, pw, ix, gw, W)
            m = tl.where(vy & vx & ok, cmask, False)  # (block & scalar mask trips the interpreter)
            scatter_add(gin_ptr, flags_ptr, base + ylo * W + xlo, div_rn(g * (hy * hx), count), m, scale, DETERMINISTIC)
            scatter_add(gin_ptr, flags_ptr, base + ylo * W + xhi, div_rn(g * (hy * lx), count), m, scale, DETERMINISTIC)
            scatter_add(gin_ptr, flags_ptr, base + yhi * W + xlo, div_rn(g * (ly * hx), count), m, scale, DETERMINISTIC)
            scatter_add(gin_ptr, flags_ptr, base + yhi * W + xhi, div_rn(g * (ly * lx), count), m, scale, DETERMINISTIC)


@triton.jit
def _round(v):
    """C's round(): halves away from zero, exact (v - floor(v) is exact in float32)."""
    a = tl.abs(v)
    f = tl.math.floor(a)
    r = f + tl.where(a - f >= 0.5, 1.0, 0.0)
    r = tl.minimum(r, 1073741824.0)
    return tl.where(v < 0, -r, r).to(tl.int32)


@triton.jit
def _pool_bin(rois_ptr, k, spatial_scale, PH, PW, ph, pw, H, W):
    """Batch index and the clipped cell range [h0, h1) x [w0, w1) of bin (ph, pw) (see roi_pool.h)."""
    r = rois_ptr + k * 5
    bf = tl.load(r)
    b = tl.where((bf > -1.0e9) & (bf < 1.0e9), bf, -1.0).to(tl.int64)
    x1 = tl.load(r + 1) * spatial_scale
    y1 = tl.load(r + 2) * spatial_scale
    x2 = tl.load(r + 3) * spatial_scale
    y2 = tl.load(r + 4) * spatial_scale
    valid = (x1 == x1) & (y1 == y1) & (x2 == x2) & (y2 == y2)
    sw = _round(x1)
    sh = _round(y1)
    bh = div_rn(tl.maximum(_round(y2) - sh + 1, 1).to(tl.float32), PH)
    bw = div_rn(tl.maximum(_round(x2) - sw + 1, 1).to(tl.float32), PW)
    h0 = tl.minimum(tl.maximum(tl.math.floor(ph * bh).to(tl.int32) + sh, 0), H)
    h1 = tl.minimum(tl.maximum(tl.math.ceil((ph + 1) * bh).to(tl.int32) + sh, 0), H)
    w0 = tl.minimum(tl.maximum(tl.math.floor(pw * bw).to(tl.int32) + sw, 0), W)
    w1 = tl.minimum(tl.maximum(tl.math.ceil((pw + 1) * bw).to(tl.int32) + sw, 0), W)
    h1 = tl.where(valid, h1, h0)
    return b, h0, h1, w0, w1


@triton.jit
def _pool_max(x_ptr, cs, cmask, sxc, sxh, sxw, h0, h1, w0, w1, W, BLOCK_C: tl.constexpr):
    """Max and argmax (h * W + w, -1 if nothing beats the initial value) over the bin, per channel. The argmax is an
    int32 cell index: the launchers refuse planes of 2^31 cells or more (_check_plane)."""
    empty = (h1 <= h0) | (w1 <= w0)
    best = tl.zeros([BLOCK_C], dtype=tl.float32) + tl.where(empty, 0.0, -FLT_MAX)
    arg = tl.zeros([BLOCK_C], dtype=tl.int32) - 1
    for h in range(h0, h1):
        x_row = x_ptr + cs.to(tl.int64) * sxc + tl.cast(h, tl.int64) * sxh  # int64: can pass 2^31
        for w in range(w0, w1):
            v = tl.load(x_row + tl.cast(w, tl.int64) * sxw, mask=cmask, other=0.0).to(tl.float32)
            gt = v > best  # strict: the first maximum wins; NaN never does
            best = tl.where(gt, v, best)
            arg = tl.where(gt, h * W + w, arg)
    return best, arg


@triton.jit
def _pool_roi_bin(
    x_ptr, rois_ptr, k, ph, pw, cs, cmask, B, H, W, sxb, sxc, sxh, sxw, spatial_scale, PH, PW, BLOCK_C: tl.constexpr
):
    """(batch index or 0 when out of range, max, argmax) of bin (ph, pw) of RoI k over channels cs; an out-of-range
    batch index gives an empty bin (0, argmax -1)."""
    b, h0, h1, w0, w1 = _pool_bin(rois_ptr, k, spatial_scale, PH, PW, ph, pw, H, W)
    ok = (b >= 0) & (b < B)
    bs = tl.where(ok, b, 0)
    best, arg = _pool_max(x_ptr + bs * sxb, cs, cmask, sxc, sxh, sxw, h0, tl.where(ok, h1, h0), w0, w1, W, BLOCK_C)
    return bs, best, arg


@triton.jit
def _roi_pool_fwd_kernel(
    x_ptr, rois_ptr, out_ptr, B, C, H, W, sxb, sxc, sxh, sxw, spatial_scale, PH, PW, BLOCK_C: tl.constexpr
):
    k, ph, pw, cs, cmask = _program_bin(C, PH, PW, BLOCK_C)
    bs, best, arg = _pool_roi_bin(
        x_ptr, rois_ptr, k, ph, pw, cs, cmask, B, H, W, sxb, sxc, sxh, sxw, spatial_scale, PH, PW, BLOCK_C
    )
    tl.store(out_ptr + ((k.to(tl.int64) * C + cs) * PH + ph) * PW + pw, best, mask=cmask)


@triton.jit
def _roi_pool_bwd_kernel(
    g_ptr,
    x_ptr,
    rois_ptr,
    gin_ptr,
    flags_ptr,
    scale_ptr,
    B,
    C,
    H,
    W,
    sxb,
    sxc,
    sxh,
    sxw,
    sgk,
    sgc,
    sgh,
    sgw,
    spatial_scale,
    PH,
    PW,
    DETERMINISTIC: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    k, ph, pw, cs, cmask = _program_bin(C, PH, PW, BLOCK_C)
    bs, best, arg = _pool_roi_bin(
        x_ptr, rois_ptr, k, ph, pw, cs, cmask, B, H, W, sxb, sxc, sxh, sxw, spatial_scale, PH, PW, BLOCK_C
    )
    g = tl.load(g_ptr + k.to(tl.int64) * sgk + cs.to(tl.int64) * sgc + ph * sgh + pw * sgw, mask=cmask, other=0.0)
    dst = (bs * C + cs.to(tl.int64)) * H * W + tl.maximum(arg, 0)
    scatter_add(
        gin_ptr,
        flags_ptr,
        dst,
        g.to(tl.float32),
        cmask & (arg >= 0),
        load_scale(scale_ptr, DETERMINISTIC),
        DETERMINISTIC,
    )


# ---- launchers and custom ops ------------------------------------------


def _grid(k, ph, pw, c, op):
    """(RoI bins, channel blocks): one program per bin and block of BLOCK_C channels. CUDA grids take at most
    2^31 - 1 programs on their first axis and 65535 on the second: past those the launch is refused here, by name."""
    if k * ph * pw >= 2**31:
        raise ValueError(
            f"{op}: rois x output_size must be below 2^31 bins for the Triton backend, got {k} x {ph} x {pw}"
        )
    if triton.cdiv(c, BLOCK_C) > 65535:
        raise ValueError(f"{op}: input must have at most {65535 * BLOCK_C} channels for the Triton backend, got {c}")
    return (k * ph * pw, triton.cdiv(c, BLOCK_C))


def _check_plane(op, h, w):
    """RoIPool's argmaxes are int32 cell indices h * W + w (as on the CPU): one plane must stay below 2^31 cells."""
    if h * w >= 2**31:
        raise ValueError(f"{op}: input's H * W must be below 2^31, got {h} x {w}")


def _rois32(rois: Tensor) -> Tensor:
    return rois.to(torch.float32).contiguous()


def align_forward(
    features: Sequence[Tensor],
    rois: Tensor,
    levels: Optional[Tensor],
    scales: Sequence[float],
    ph: int,
    pw: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """RoIAlign of each RoI from features[levels[k]] (features[0] without `levels`) in one launch."""
    f0 = features[0]
    op = "roi_align" if levels is None else "multi_scale_roi_align"
    grid = _grid(rois.shape[0], ph, pw, f0.shape[1], op)
    out = f0.new_empty((rois.shape[0], f0.shape[1], ph, pw))
    if out.numel() == 0:
        return out
    per_level = [(f, f.shape[0], f.shape[2], f.shape[3], *f.stride(), float(s)) for f, s in zip(features, scales)]
    _roi_align_fwd_kernel[grid](
        tuple(zip(*per_level)),
        _rois32(rois),
        None if levels is None else levels.contiguous(),
        out,
        f0.shape[1],
        ph,
        pw,
        sampling_ratio,
        NL=len(features),
        ALIGNED=bool(aligned),
        BLOCK_C=BLOCK_C,
    )
    return out


def _scatter_buffers(grad: Tensor, shapes: Sequence[Sequence[int]], terms: int):
    """Zeroed destinations of a backward scatter, their flags and the fixed-point scale when deterministic (else
    float32 buffers, themselves again as the unused flags, and None)."""
    if torch.are_deterministic_algorithms_enabled():
        return _fixed_point.buffers(grad, shapes, terms)
    gins = [torch.zeros(s, dtype=torch.float32, device=grad.device) for s in shapes]
    return gins, gins, None


def _finish(dsts: List[Tensor], flags: List[Tensor], scale: Optional[Tensor], dtype: torch.dtype) -> List[Tensor]:
    if scale is None:
        return [d.to(dtype) for d in dsts]
    return [_fixed_point.finish(q, f, scale, dtype) for q, f in zip(dsts, flags)]


def align_backward(
    grad: Tensor,
    rois: Tensor,
    levels: Optional[Tensor],
    scales: Sequence[float],
    ph: int,
    pw: int,
    shapes: Sequence[Sequence[int]],
    sampling_ratio: int,
    aligned: bool,
) -> List[Tensor]:
    """Gradient of `align_forward` for each level (shapes: [B, C, H, W] per level), in grad's dtype."""
    K, C = rois.shape[0], shapes[0][1]
    if K == 0 or grad.numel() == 0:
        return [grad.new_zeros(s) for s in shapes]
    # Per RoI, one cell receives at most weight 1 from each bin (the bound the CUDA kernel uses).
    dsts, flags, scale = _scatter_buffers(grad, shapes, K * ph * pw)
    per_level = [(d, f, s[0], s[2], s[3], float(sc)) for d, f, s, sc in zip(dsts, flags, shapes, scales)]
    op = "roi_align" if levels is None else "multi_scale_roi_align"
    _roi_align_bwd_kernel[_grid(K, ph, pw, C, op)](
        grad,
        *grad.stride(),
        tuple(zip(*per_level)),
        _rois32(rois),
        None if levels is None else levels.contiguous(),
        scale,
        C,
        ph,
        pw,
        sampling_ratio,
        NL=len(shapes),
        ALIGNED=bool(aligned),
        DETERMINISTIC=scale is not None,
        BLOCK_C=BLOCK_C,
    )
    return _finish(dsts, flags, scale, grad.dtype)


@registry.triton_op("roi_align")
def triton_roi_align(
    input: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    return align_forward([input], rois, None, [spatial_scale], pooled_height, pooled_width, sampling_ratio, aligned)


@registry.triton_op("roi_align", backward=True)
def triton_roi_align_backward(
    grad: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    batch_size: int,
    channels: int,
    height: int,
    width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    return align_backward(
        grad,
        rois,
        None,
        [spatial_scale],
        pooled_height,
        pooled_width,
        [(batch_size, channels, height, width)],
        sampling_ratio,
        aligned,
    )[0]


@registry.triton_op("roi_pool")
def triton_roi_pool(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int) -> Tensor:
    B, C, H, W = input.shape
    K = rois.shape[0]
    _check_plane("roi_pool", H, W)
    grid = _grid(K, pooled_height, pooled_width, C, "roi_pool")
    out = input.new_empty((K, C, pooled_height, pooled_width))
    if out.numel() == 0:
        return out
    _roi_pool_fwd_kernel[grid](
        input,
        _rois32(rois),
        out,
        B,
        C,
        H,
        W,
        *input.stride(),
        spatial_scale,
        pooled_height,
        pooled_width,
        BLOCK_C=BLOCK_C,
    )
    return out


@registry.triton_op("roi_pool", backward=True)
def triton_roi_pool_backward(
    grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int
) -> Tensor:
    B, C, H, W = input.shape
    K = rois.shape[0]
    _check_plane("_roi_pool_backward", H, W)
    if K == 0 or input.numel() == 0:
        return grad.new_zeros(input.shape)
    grid = _grid(K, pooled_height, pooled_width, C, "_roi_pool_backward")
    # Each bin sends its gradient to one cell.
    (gin,), (flags,), scale = _scatter_buffers(grad, [input.shape], K * pooled_height * pooled_width)
    _roi_pool_bwd_kernel[grid](
        grad,
        input,
        _rois32(rois),
        gin,
        flags,
        scale,
        B,
        C,
        H,
        W,
        *input.stride(),
        *grad.stride(),
        spatial_scale,
        pooled_height,
        pooled_width,
        DETERMINISTIC=scale is not None,
        BLOCK_C=BLOCK_C,
    )
    return _finish([gin], [flags], scale, grad.dtype)[0]


@registry.triton_op("multi_scale_roi_align")
def triton_multi_scale_roi_align(
    features: List[Tensor],
    rois: Tensor,
    levels: Tensor,
    scales: List[float],
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """MultiScaleRoIAlign in one launch: RoI k pooled from features[levels[k]] (a level out of range gives zeros)."""
    return align_forward(features, rois, levels, scales, pooled_height, pooled_width, sampling_ratio, aligned)


@registry.triton_op("multi_scale_roi_align", backward=True)
def triton_multi_scale_roi_align_backward(
    grad: Tensor,
    rois: Tensor,
    levels: Tensor,
    scales: List[float],
    pooled_height: int,
    pooled_width: int,
    feature_shapes: List[int],
    sampling_ratio: int,
    aligned: bool,
) -> List[Tensor]:
    """Every level's gradient in one launch (feature_shapes: [B, C, H, W] of every level, concatenated). Each level
    gets its own buffer rather than a view of one flat buffer: a custom op's outputs may not alias each other."""
    shapes = [feature_shapes[i : i + 4] for i in range(0, len(feature_shapes), 4)]
    if list(grad.shape) != [rois.shape[0], shapes[0][1], pooled_height, pooled_width]:
        raise ValueError(f"multi_scale_roi_align backward: grad must have shape [K, C, PH, PW], got {list(grad.shape)}")
    return align_backward(grad, rois, levels, scales, pooled_height, pooled_width, shapes, sampling_ratio, aligned)


def compile_specs():
    """(kernel, signature, constexprs) of every kernel here, for an sm_90 compile check without a GPU: RoIAlign with
    one level (roi_align) and four (multi_scale_roi_align), backward kernels with float and fixed-point atomics."""
    i32, f32 = "i32", "fp32"
    x = {"B": i32, "C": i32, "H": i32, "W": i32, "sxb": i32, "sxc": i32, "sxh": i32, "sxw": i32}
    gs = {"sgk": i32, "sgc": i32, "sgh": i32, "sgw": i32}
    common = {"spatial_scale": f32, "PH": i32, "PW": i32}
    blk = {"BLOCK_C": "constexpr"}
    align = {"C": i32, "PH": i32, "PW": i32, "sampling_ratio": i32, "NL": "constexpr", "ALIGNED": "constexpr", **blk}

    def levels(n, *fields):
        return tuple((f,) * n for f in fields)

    def align_fwd(n, dtype, has_levels):
        sig = {
            "levels": levels(n, f"*{dtype}", *[i32] * 7, f32),
            "rois_ptr": "*fp32",
            "lvl_ptr": "*i64" if has_levels else "constexpr",
            "out_ptr": f"*{dtype}",
            **align,
        }
        constexprs = {"NL": n, "ALIGNED": n == 1, "BLOCK_C": BLOCK_C, **({} if has_levels else {"lvl_ptr": None})}
        return _roi_align_fwd_kernel, sig, constexprs

    def align_bwd(n, gdtype, has_levels, deterministic):
        dst, flags = ("*i64", "*i32") if deterministic else ("*fp32", "*fp32")
        sig = {
            "g_ptr": f"*{gdtype}",
            **gs,
            "levels": levels(n, dst, flags, i32, i32, i32, f32),
            "rois_ptr": "*fp32",
            "lvl_ptr": "*i64" if has_levels else "constexpr",
            "scale_ptr": "*fp64" if deterministic else "constexpr",
            **align,
            "DETERMINISTIC": "constexpr",
        }
        constexprs = {
            "NL": n,
            "ALIGNED": n != 1,
            "DETERMINISTIC": deterministic,
            "BLOCK_C": BLOCK_C,
            **({} if has_levels else {"lvl_ptr": None}),
            **({} if deterministic else {"scale_ptr": None}),
        }
        return _roi_align_bwd_kernel, sig, constexprs

    def pool_bwd(deterministic):
        dst, flags = ("*i64", "*i32") if deterministic else ("*fp32", "*fp32")
        sig = {
            "g_ptr": "*fp32",
            "x_ptr": "*fp32",
            "rois_ptr": "*fp32",
            "gin_ptr": dst,
            "flags_ptr": flags,
            "scale_ptr": "*fp64" if deterministic else "constexpr",
            **x,
            **gs,
            **common,
            "DETERMINISTIC": "constexpr",
            **blk,
        }
        constexprs = {
            "DETERMINISTIC": deterministic,
            "BLOCK_C": BLOCK_C,
            **({} if deterministic else {"scale_ptr": None}),
        }
        return _roi_pool_bwd_kernel, sig, constexprs

    return [
        align_fwd(1, "fp32", False),
        align_fwd(4, "bf16", True),
        align_bwd(1, "bf16", False, False),
        align_bwd(1, "fp32", False, True),
        align_bwd(4, "fp32", True, False),
        align_bwd(4, "fp16", True, True),
        (
            _roi_pool_fwd_kernel,
            {"x_ptr": "*fp16", "rois_ptr": "*fp32", "out_ptr": "*fp16", **x, **common, **blk},
            {"BLOCK_C": BLOCK_C},
        ),
        pool_bwd(False),
        pool_bwd(True),
    ]
