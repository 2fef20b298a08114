"""Triton kernels of the convolution family (math: visionops/reference/conv.py), each its own custom op:
``visionops::triton_conv2d``, ``triton_conv3d`` and their backwards.

Every direction is an implicit GEMM over one group (the grid's last axis), the input never unfolded nor transposed:

* forward: M = batch x output positions, N = Cout/groups, K = Cin/groups x taps. A[m, k] is the input element the
  output position m sees through tap k (zero outside the padded input), B[k, n] the weight.
* grad_input (dgrad): the transposed convolution in gather form. M = batch x input positions, N = Cin/groups,
  K = Cout/groups x taps; A[m, k] is grad at the output position o with o * stride - padding + tap * dilation equal to
  the input position, taken only where that o is integral (stride divides the distance) and in range.
* grad_weight (wgrad): M = Cout/groups, N = Cin/groups x taps, K = batch x output positions, reduced in a fixed order
  inside a program; when too few tiles would keep the GPU busy, K is split into a fixed number of partial sums (a
  function of the shape only), added in a fixed order by a second kernel. No atomics: results are deterministic.
  grad_bias is reduced from the same grad tiles by the programs holding the first N tile.

Depthwise convolutions (groups = Cin = Cout) take a per-channel stencil kernel instead for the forward and grad_input
(a tile of positions x channels, tap by tap): as a GEMM they would leave all but one row or column of every
tensor-core tile empty.

K is walked in one of two orders, a compile-time choice: tap by tap with a block of channels inside (TAP_OUTER, when
a group has enough channels to fill a block: the tap's positions and bounds are computed once per tap), or over
the flattened (tap, channel) index, which keeps blocks full for depthwise and thin groups.

2D is 3D with depth 1: 2D tensors are passed as [B, C, 1, H, W] views, so one set of kernels serves both ops.
Tensors are read and written through their strides (NCHW, channels_last, channels_last_3d and any other strides in
place); offsets are formed in int64. tl.dot accumulates in float32 (float64 for float64 inputs, which sm_90 runs on
its float64 tensor cores) and the result is rounded once to the inputs' dtype; float32 products are exact ("ieee"
precision, no TF32). Output memory formats are the fake kernels' (the output follows the input, grad_weight the
weight). Tile shapes come from four fixed configurations per kernel picked by a shape heuristic (:func:`_tiles`).
"""

import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from visionops import _registry as registry

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) by the GEMM's N (forward, dgrad) or M and N (wgrad) sizes
_CONFIGS = ((32, 16, 32, 4), (64, 32, 32, 4), (128, 64, 32, 4), (128, 128, 32, 8))
# wgrad: at least this many K elements per split, and at most _MAX_SPLIT splits; tiles wanted to fill the GPU
_MIN_K_PER_SPLIT = 4096
_MAX_SPLIT = 32
_TARGET_TILES = 264  # two waves of an H100 / H200 (132 SMs)


@triton.jit
def _split3(r, S1, S2):
    """r = ((a * S1) + b) * S2 + c -> (a, b, c)."""
    c = r % S2
    t = r // S2
    return t // S1, t % S1, c


@triton.jit
def _split4(r, S1, S2, S3):
    """r = ((a * S1 + b) * S2 + c) * S3 + d -> (a, b, c, d)."""
    d = r % S3
    a, b, c = _split3(r // S3, S1, S2)
    return a, b, c, d


@triton.jit
def _block(pid, BLOCK: tl.constexpr):
    """Flat indices [pid * BLOCK, (pid + 1) * BLOCK) in int64: an axis over batch x positions can pass 2^31 (a
    program id is int32, and so would be the product)."""
    return pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _unpack4(r, S1, S2, S3):
    """_split4 of a flat index r (int64 when the axis can pass 2^31), the parts as int32: each is below its own size,
    so the per-tap arithmetic stays 32-bit and only the offsets it feeds are widened."""
    a, b, c, d = _split4(r, S1, S2, S3)
    return a.to(tl.int32), b.to(tl.int32), c.to(tl.int32), d.to(tl.int32)


@triton.jit
def _mma(acc, a, b, F64: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # see _upcast(): the same exact products, as float32
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if F64:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float64)
    else:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float32)


@triton.jit
def _tap_in(o, k, st, pa, di, size):
    """Input coordinate o * st - pa + k * di that output coordinate o reads through tap k, and whether it is inside."""
    i = o * st - pa + k * di
    return i, (i >= 0) & (i < size)


@triton.jit
def _tap_out(i, k, st, pa, di, size):
    """Output coordinate that reads input coordinate i through tap k, and whether it exists (integral, in range)."""
    num = i + pa - k * di
    o = num // st
    return o, (num >= 0) & (num % st == 0) & (o < size)


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    Cg, Cog, D, H, W, Do, Ho, Wo, KD, KH, KW, M,
    sxb, sxc, sxd, sxh, sxw,
    swo, swi, swd, swh, sww,
    sob, soc, sod, soh, sow, s_bias,
    st_d, st_h, st_w, pa_d, pa_h, pa_w, di_d, di_h, di_w,
    HAS_BIAS: tl.constexpr, TAP_OUTER: tl.constexpr, F64: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """grid (M tiles, N tiles, groups): out[b, g * Cog + n, od, oh, ow] for the tile's output positions m."""
    acc_t = tl.float64 if F64 else tl.float32
    g = tl.program_id(2)
    rm = _block(tl.program_id(0), BLOCK_M)
    mmask = rm < M
    b, od, oh, ow = _unpack4(rm, Do, Ho, Wo)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < Cog
    co = (g * Cog + rn).to(tl.int64)
    x_m = x_ptr + b.to(tl.int64) * sxb + (g * Cg).to(tl.int64) * sxc  # [BLOCK_M]
    w_n = w_ptr + co * swo  # [BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_t)
    T = KD * KH * KW
    if TAP_OUTER:
        for t in range(0, T):
            kd, kh, kw = _split3(t, KH, KW)
            idd, okd = _tap_in(od, kd, st_d, pa_d, di_d, D)
            ih, okh = _tap_in(oh, kh, st_h, pa_h, di_h, H)
            iw, okw = _tap_in(ow, kw, st_w, pa_w, di_w, W)
            ok = mmask & okd & okh & okw
            x_t = x_m + idd.to(tl.int64) * sxd + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            w_t = w_n + kd * swd + kh * swh + kw * sww
            for c0 in range(0, Cg, BLOCK_K):
                cs = c0 + tl.arange(0, BLOCK_K)
                cm = cs < Cg
                a = tl.load(x_t[:, None] + cs[None, :].to(tl.int64) * sxc, mask=ok[:, None] & cm[None, :], other=0.0)
                w = tl.load(w_t[None, :] + cs[:, None] * swi, mask=cm[:, None] & nmask[None, :], other=0.0)
                acc = _mma(acc, a, w, F64, UPCAST)
    else:
        for k0 in range(0, Cg * T, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < Cg * T
            cs = ks % Cg
            kd, kh, kw = _split3(ks // Cg, KH, KW)
            idd, okd = _tap_in(od[:, None], kd[None, :], st_d, pa_d, di_d, D)
            ih, okh = _tap_in(oh[:, None], kh[None, :], st_h, pa_h, di_h, H)
            iw, okw = _tap_in(ow[:, None], kw[None, :], st_w, pa_w, di_w, W)
            ok = mmask[:, None] & km[None, :] & okd & okh & okw
            x_off = cs[None, :].to(tl.int64) * sxc + idd.to(tl.int64) * sxd + ih.to(tl.int64) * sxh
            a = tl.load(x_m[:, None] + x_off + iw.to(tl.int64) * sxw, mask=ok, other=0.0)
            w_off = cs * swi + kd * swd + kh * swh + kw * sww
            w = tl.load(w_n[None, :] + w_off[:, None], mask=km[:, None] & nmask[None, :], other=0.0)
            acc = _mma(acc, a, w, F64, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co * s_bias, mask=nmask, other=0.0).to(acc_t)[None, :]
    o_m = b.to(tl.int64) * sob + od.to(tl.int64) * sod + oh.to(tl.int64) * soh + ow.to(tl.int64) * sow
    dst = out_ptr + o_m[:, None] + (co * soc)[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _conv_dgrad_kernel(
    g_ptr, w_ptr, gx_ptr,
    Cg, Cog, D, H, W, Do, Ho, Wo, KD, KH, KW, M,
    sgb, sgc, sgd, sgh, sgw,
    swo, swi, swd, swh, sww,
    sdb, sdc, sdd, sdh, sdw,
    st_d, st_h, st_w, pa_d, pa_h, pa_w, di_d, di_h, di_w,
    TAP_OUTER: tl.constexpr, F64: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """grid (M tiles, N tiles, groups): gx[b, g * Cg + n, id, ih, iw] = sum over the group's output channels co and the
    taps t that reach (id, ih, iw) from an output position o of g[b, co, o] * w[co, n, t]."""
    acc_t = tl.float64 if F64 else tl.float32
    grp = tl.program_id(2)
    rm = _block(tl.program_id(0), BLOCK_M)
    mmask = rm < M
    b, idd, ih, iw = _unpack4(rm, D, H, W)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < Cg
    ci = (grp * Cg + rn).to(tl.int64)
    g_m = g_ptr + b.to(tl.int64) * sgb + (grp * Cog).to(tl.int64) * sgc  # [BLOCK_M]
    w_n = w_ptr + (grp * Cog).to(tl.int64) * swo + rn * swi  # [BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_t)
    T = KD * KH * KW
    if TAP_OUTER:
        for t in range(0, T):
            kd, kh, kw = _split3(t, KH, KW)
            od, okd = _tap_out(idd, kd, st_d, pa_d, di_d, Do)
            oh, okh = _tap_out(ih, kh, st_h, pa_h, di_h, Ho)
            ow, okw = _tap_out(iw, kw, st_w, pa_w, di_w, Wo)
            ok = mmask & okd & okh & okw
            g_t = g_m + od.to(tl.int64) * sgd + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
            w_t = w_n + kd * swd + kh * swh + kw * sww
            for c0 in range(0, Cog, BLOCK_K):
                cs = c0 + tl.arange(0, BLOCK_K)
                cm = cs < Cog
                a = tl.load(g_t[:, None] + cs[None, :].to(tl.int64) * sgc, mask=ok[:, None] & cm[None, :], other=0.0)
                w = tl.load(w_t[None, :] + cs[:, None].to(tl.int64) * swo, mask=cm[:, None] & nmask[None, :], other=0.0)
                acc = _mma(acc, a, w, F64, UPCAST)
    else:
        for k0 in range(0, Cog * T, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < Cog * T
            cs = ks % Cog
            kd, kh, kw = _split3(ks // Cog, KH, KW)
            od, okd = _tap_out(idd[:, None], kd[None, :], st_d, pa_d, di_d, Do)
            oh, okh = _tap_out(ih[:, None], kh[None, :], st_h, pa_h, di_h, Ho)
            ow, okw = _tap_out(iw[:, None], kw[None, :], st_w, pa_w, di_w, Wo)
            ok = mmask[:, None] & km[None, :] & okd & okh & okw
            g_off = cs[None, :].to(tl.int64) * sgc + od.to(tl.int64) * sgd + oh.to(tl.int64) * sgh
            a = tl.load(g_m[:, None] + g_off + ow.to(tl.int64) * sgw, mask=ok, other=0.0)
            w_off = cs.to(tl.int64) * swo + kd * swd + kh * swh + kw * sww
            w = tl.load(w_n[None, :] + w_off[:, None], mask=km[:, None] & nmask[None, :], other=0.0)
            acc = _mma(acc, a, w, F64, UPCAST)
    d_m = b.to(tl.int64) * sdb + idd.to(tl.int64) * sdd + ih.to(tl.int64) * sdh + iw.to(tl.int64) * sdw
    dst = gx_ptr + d_m[:, None] + (ci * sdc)[None, :]
    tl.store(dst, acc.to(gx_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _conv_wgrad_kernel(
    g_ptr, x_ptr, gw_ptr, gb_ptr,
    Cg, Cog, D, H, W, Do, Ho, Wo, KD, KH, KW, K, k_per_split, n_split,
    sgb, sgc, sgd, sgh, sgw,
    sxb, sxc, sxd, sxh, sxw,
    sdo, sdi, sdd, sdh, sdw, sds,
    sbs,
    st_d, st_h, st_w, pa_d, pa_h, pa_w, di_d, di_h, di_w,
    WANT_W: tl.constexpr, WANT_BIAS: tl.constexpr, F64: tl.constexpr, UPCAST: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """grid (M tiles, N tiles, groups * n_split): gw[s, g * Cog + m, c, t] = sum over the split's share of the K batch
    x output positions of g[b, g * Cog + m, o] * x[b, g * Cg + c, o * stride - padding + t * dilation], and for the
    first N tile gb[s, g * Cog + m] = the same sum of g. gw / gb are partial buffers (stride sds / sbs per split) or,
    with one split, the results themselves. IDX64: K (+ BLOCK_K) passes 2^31, so the K loop indexes in int64 (a
    compile-time choice: the loop's index splits stay 32-bit for every smaller problem)."""
    acc_t = tl.float64 if F64 else tl.float32
    grp = tl.program_id(2) // n_split
    split = tl.program_id(2) % n_split
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < Cog
    co = (grp * Cog + rm).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    T = KD * KH * KW
    nmask = rn < Cg * T
    cn = rn // T
    kd, kh, kw = _split3(rn % T, KH, KW)
    g_m = g_ptr + co * sgc  # [BLOCK_M]
    x_n = x_ptr + (grp * Cg + cn).to(tl.int64) * sxc  # [BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_t)
    acc_b = tl.zeros([BLOCK_M], dtype=acc_t)
    bias_tile = tl.program_id(1) == 0
    if IDX64:
        k_lo = split.to(tl.int64) * k_per_split
    else:
        k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < k_hi
        b, od, oh, ow = _unpack4(ks, Do, Ho, Wo)
        g_off = b.to(tl.int64) * sgb + od.to(tl.int64) * sgd + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
        a = tl.load(g_m[:, None] + g_off[None, :], mask=mmask[:, None] & km[None, :], other=0.0)
        if WANT_BIAS:
            if bias_tile:
                acc_b += tl.sum(a.to(acc_t), axis=1)
        if WANT_W:
            idd, okd = _tap_in(od[:, None], kd[None, :], st_d, pa_d, di_d, D)
            ih, okh = _tap_in(oh[:, None], kh[None, :], st_h, pa_h, di_h, H)
            iw, okw = _tap_in(ow[:, None], kw[None, :], st_w, pa_w, di_w, W)
            ok = km[:, None] & nmask[None, :] & okd & okh & okw
            x_off = b[:, None].to(tl.int64) * sxb + idd.to(tl.int64) * sxd + ih.to(tl.int64) * sxh
            x = tl.load(x_n[None, :] + x_off + iw.to(tl.int64) * sxw, mask=ok, other=0.0)
            acc = _mma(acc, a, x, F64, UPCAST)
    if WANT_W:
        dst = gw_ptr + split.to(tl.int64) * sds + co[:, None] * sdo
        dst += (cn * sdi + kd * sdd + kh * sdh + kw * sdw)[None, :]
        tl.store(dst, acc.to(gw_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
    if WANT_BIAS:
        if bias_tile:
            tl.store(gb_ptr + split.to(tl.int64) * sbs + co, acc_b.to(gb_ptr.dtype.element_ty), mask=mmask)


@triton.jit
def _conv_depthwise_kernel(
    src_ptr, w_ptr, bias_ptr, dst_ptr,
    C, SD, SH, SW, D, H, W, KD, KH, KW, M,
    ssb, ssc, ssd, ssh, ssw,
    swc, swd, swh, sww,
    sdb, sdc, sdd, sdh, sdw, s_bias,
    st_d, st_h, st_w, pa_d, pa_h, pa_w, di_d, di_h, di_w,
    TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, F64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """grid (M tiles, channel tiles), M = batch x dst positions; one channel per group and per output channel (groups
    = Cin = Cout): a stencil per channel, tap by tap, without a GEMM's mostly empty tiles. Forward: src = input, dst =
    output, dst[b, c, o] = sum over taps t of src[b, c, o * stride - padding + t * dilation] * w[c, t] (+ bias).
    TRANSPOSED (grad_input): src = grad, dst = grad_input, summing over the taps that reach dst's position from an
    output position, as _conv_dgrad_kernel does."""
    acc_t = tl.float64 if F64 else tl.float32
    rm = _block(tl.program_id(0), BLOCK_M)
    mmask = rm < M
    b, pd, ph, pw = _unpack4(rm, D, H, W)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    src_m = src_ptr + b.to(tl.int64) * ssb  # [BLOCK_M]
    src_c = cs.to(tl.int64) * ssc  # [BLOCK_C]
    w_c = w_ptr + cs.to(tl.int64) * swc
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_t)
    for t in range(0, KD * KH * KW):
        kd, kh, kw = _split3(t, KH, KW)
        if TRANSPOSED:
            qd, okd = _tap_out(pd, kd, st_d, pa_d, di_d, SD)
            qh, okh = _tap_out(ph, kh, st_h, pa_h, di_h, SH)
            qw, okw = _tap_out(pw, kw, st_w, pa_w, di_w, SW)
        else:
            qd, okd = _tap_in(pd, kd, st_d, pa_d, di_d, SD)
            qh, okh = _tap_in(ph, kh, st_h, pa_h, di_h, SH)
            qw, okw = _tap_in(pw, kw, st_w, pa_w, di_w, SW)
        ok = mmask & okd & okh & okw
        src = src_m + qd.to(tl.int64) * ssd + qh.to(tl.int64) * ssh + qw.to(tl.int64) * ssw
        v = tl.load(src[:, None] + src_c[None, :], mask=ok[:, None] & cmask[None, :], other=0.0).to(acc_t)
        wv = tl.load(w_c + kd * swd + kh * swh + kw * sww, mask=cmask, other=0.0).to(acc_t)
        acc += v * wv[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cs.to(tl.int64) * s_bias, mask=cmask, other=0.0).to(acc_t)[None, :]
    d_m = b.to(tl.int64) * sdb + pd.to(tl.int64) * sdd + ph.to(tl.int64) * sdh + pw.to(tl.int64) * sdw
    dst = dst_ptr + d_m[:, None] + (cs.to(tl.int64) * sdc)[None, :]
    tl.store(dst, acc.to(dst_ptr.dtype.element_ty), mask=mmask[:, None] & cmask[None, :])


@triton.jit
def _sum_splits_kernel(
    part_ptr, out_ptr, n, n_split, S1, S2, S3, S4,
    so0, so1, so2, so3, so4,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """out[i] = sum over s of part[s, i] (splits added in order), part contiguous [n_split, n]; the flat index i is
    split over out's shape [*, S1, S2, S3, S4] to write through out's strides."""
    r = _block(tl.program_id(0), BLOCK)
    mask = r < n
    acc = tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty)
    p = part_ptr + r
    for _s in range(0, n_split):
        acc += tl.load(p, mask=mask, other=0.0)
        p += n
    i0, i1, i2, i3 = _split4(r // S4, S1, S2, S3)
    off = i0 * so0 + i1 * so1 + i2 * so2 + i3 * so3 + (r % S4) * so4
    tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---- launchers and custom ops ------------------------------------------

_WGRAD_CONFIGS = ((16, 32, 64, 4), (32, 64, 64, 4), (64, 64, 64, 4), (128, 128, 32, 8))


def _pick(configs, size: int, f64: bool) -> Tuple[int, int, int, int]:
    """The configuration for a GEMM side of ``size`` (16, 32, 64 or more); float64 stops at the third (its
    accumulator and operands take twice the registers)."""
    i = 0 if size <= 16 else 1 if size <= 32 else 2 if size <= 64 else 3
    return configs[min(i, 2) if f64 else i]


def _tiles(n: int, f64: bool) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the forward and dgrad GEMMs, whose N is a group's channel count:
    thin N (depthwise, small groups) gets narrow N tiles and the freed registers go to M."""
    return _pick(_CONFIGS, n, f64)


def _wgrad_tiles(m: int, f64: bool) -> Tuple[int, int, int, int]:
    """wgrad's tiles by its M (a group's output channels); its K (batch x positions) is long, hence BLOCK_K 64."""
    return _pick(_WGRAD_CONFIGS, m, f64)


def _splits(tiles: int, k: int, block_k: int, groups: int) -> Tuple[int, int]:
    """(number of K splits, K per split) of wgrad: one split when its tiles fill the GPU, else enough splits to
    reach _TARGET_TILES programs, each with at least _MIN_K_PER_SPLIT of K; a function of the shape only."""
    n = 1
    if tiles < _TARGET_TILES:
        n = max(1, min(_MAX_SPLIT, triton.cdiv(_TARGET_TILES, tiles), k // _MIN_K_PER_SPLIT, 65535 // groups))
    per = triton.cdiv(triton.cdiv(k, n), block_k) * block_k
    return triton.cdiv(k, per), per


def _upcast(dtype: torch.dtype) -> bool:
    """Whether tl.dot gets bfloat16 tiles as float32: only under TRITON_INTERPRET=1, whose tl.dot multiplies bfloat16
    tiles' raw bits as integers (triton 3.8). Products of bfloat16 values are exact in float32, so the sums are the
    compiled kernels' (bfloat16 MMA accumulating in float32)."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _format(t: Tensor) -> torch.memory_format:
    """The fake kernels' rule: channels-last when t is and is not also plainly contiguous."""
    cl = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return cl if t.is_contiguous(memory_format=cl) and not t.is_contiguous() else torch.contiguous_format


def _as3d(t: Tensor) -> Tensor:
    """A 2D op's [B, C, H, W] tensor as the [B, C, 1, H, W] view the kernels take (3D tensors unchanged)."""
    return t.unsqueeze(2) if t.dim() == 4 else t


def _geometry(stride: List[int], padding: List[int], dilation: List[int]) -> List[int]:
    """(stride, padding, dilation) as the kernels' nine scalars, 2D given depth stride 1, padding 0, dilation 1."""
    fill = 3 - len(stride)
    return [1] * fill + list(stride) + [0] * fill + list(padding) + [1] * fill + list(dilation)


def _out_shape(x: Tensor, w: Tensor, stride, padding, dilation) -> List[int]:
    sp = [
        (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1
        for i in range(len(stride))
    ]
    return [x.shape[0], w.shape[0], *sp]


def _depthwise(x: Tensor, w: Tensor, groups: int) -> bool:
    """Whether the per-channel stencil kernel serves the forward and grad_input (one channel in and out per group)."""
    return groups > 1 and x.shape[1] == groups and w.shape[0] == groups


def _depthwise_blocks(c: int) -> Tuple[int, int]:
    """(BLOCK_M, BLOCK_C) of the depthwise kernel: 32 channels when there are that many, else 16."""
    return (64, 32) if c >= 32 else (128, 16)


def _check_grid(x: Tensor, groups: int, channel_blocks: int) -> None:
    """CUDA grids take at most 65535 programs on their second and third axes (groups, channel blocks): past that the
    launch is refused here, naming the argument. Flat indices over batch x positions are int64 (_block)."""
    op = "conv2d" if x.dim() == 4 else "conv3d"
    if groups > 65535:
        raise ValueError(f"{op}: groups must be at most 65535 for the Triton backend, got {groups}")
    if channel_blocks > 65535:
        raise ValueError(f"{op}: too many channels per group for the Triton backend, got {list(x.shape)}")


def _launch_depthwise(src5: Tensor, w5: Tensor, bias: Optional[Tensor], dst5: Tensor, geometry, transposed: bool):
    c = dst5.shape[1]
    block_m, block_c = _depthwise_blocks(c)
    if triton.cdiv(c, block_c) > 65535:
        raise ValueError(
            f"depthwise conv: input must have at most {65535 * block_c} channels for the Triton backend, got {c}"
        )
    m = dst5.shape[0] * dst5.shape[2] * dst5.shape[3] * dst5.shape[4]
    _conv_depthwise_kernel[(triton.cdiv(m, block_m), triton.cdiv(c, block_c))](
        src5, w5, bias if bias is not None else dst5, dst5,
        c, *src5.shape[2:], *dst5.shape[2:], *w5.shape[2:], m,
        *src5.stride(), w5.stride(0), *w5.stride()[2:], *dst5.stride(), bias.stride(0) if bias is not None else 0,
        *geometry,
        TRANSPOSED=transposed, HAS_BIAS=bias is not None, F64=dst5.dtype == torch.float64,
        BLOCK_M=block_m, BLOCK_C=block_c,
    )  # fmt: skip


def _forward(x: Tensor, w: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int) -> Tensor:
    out = torch.empty(_out_shape(x, w, stride, padding, dilation), dtype=x.dtype, device=x.device)
    out = out.contiguous(memory_format=_format(x))
    if out.numel() == 0:
        return out
    x5, w5, o5 = _as3d(x), _as3d(w), _as3d(out)
    if _depthwise(x, w, groups):
        _launch_depthwise(x5, w5, bias, o5, _geometry(stride, padding, dilation), False)
        return out
    cg, cog = x.shape[1] // groups, w.shape[0] // groups
    f64 = x.dtype == torch.float64
    block_m, block_n, block_k, warps = _tiles(cog, f64)
    m = o5.shape[0] * o5.shape[2] * o5.shape[3] * o5.shape[4]
    grid = (triton.cdiv(m, block_m), triton.cdiv(cog, block_n), groups)
    _check_grid(x, groups, grid[1])
    _conv_fwd_kernel[grid](
        x5, w5, bias if bias is not None else out, out,
        cg, cog, *x5.shape[2:], *o5.shape[2:], *w5.shape[2:], m,
        *x5.stride(), *w5.stride(), *o5.stride(), bias.stride(0) if bias is not None else 0,
        *_geometry(stride, padding, dilation),
        HAS_BIAS=bias is not None, TAP_OUTER=cg >= block_k // 2, F64=f64, UPCAST=_upcast(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )  # fmt: skip
    return out


def _grad_input(g5: Tensor, x: Tensor, w: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    gx = torch.empty_like(x, memory_format=_format(x))
    if gx.numel() == 0:
        return gx
    x5, w5, d5 = _as3d(x), _as3d(w), _as3d(gx)
    if _depthwise(x, w, groups):
        _launch_depthwise(g5, w5, None, d5, _geometry(stride, padding, dilation), True)
        return gx
    cg, cog = x.shape[1] // groups, w.shape[0] // groups
    f64 = x.dtype == torch.float64
    block_m, block_n, block_k, warps = _tiles(cg, f64)
    m = x5.shape[0] * x5.shape[2] * x5.shape[3] * x5.shape[4]
    grid = (triton.cdiv(m, block_m), triton.cdiv(cg, block_n), groups)
    _check_grid(x, groups, grid[1])
    _conv_dgrad_kernel[grid](
        g5, w5, gx,
        cg, cog, *x5.shape[2:], *g5.shape[2:], *w5.shape[2:], m,
        *g5.stride(), *w5.stride(), *d5.stride(),
        *_geometry(stride, padding, dilation),
        TAP_OUTER=cog >= block_k // 2, F64=f64, UPCAST=_upcast(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )  # fmt: skip
    return gx


def _grad_weight_bias(
    g5: Tensor, x: Tensor, w: Tensor, stride, padding, dilation, groups: int, want_w: bool, want_b: bool
) -> Tuple[Tensor, Tensor]:
    gw = torch.empty_like(w, memory_format=_format(w)) if want_w else x.new_empty(0)  # outputs must not alias
    gb = x.new_empty(w.shape[0] if want_b else 0)
    k = g5.shape[0] * g5.shape[2] * g5.shape[3] * g5.shape[4]
    if k == 0:  # an empty sum
        return gw.zero_(), gb.zero_()
    want_w, want_b = gw.numel() > 0, gb.numel() > 0  # requested and not empty (no input or output channels)
    if not (want_w or want_b):
        return gw, gb
    x5, w5 = _as3d(x), _as3d(w)
    cg, cog = x.shape[1] // groups, w.shape[0] // groups
    taps = w5.shape[2] * w5.shape[3] * w5.shape[4]
    f64 = x.dtype == torch.float64
    block_m, block_n, block_k, warps = _wgrad_tiles(cog, f64)
    tiles = (triton.cdiv(cog, block_m), triton.cdiv(cg * taps, block_n) if want_w else 1)
    _check_grid(x, groups, tiles[1])
    n_split, per = _splits(tiles[0] * tiles[1] * groups, k, block_k, groups)
    if n_split == 1:
        gw_dst, gb_dst = (_as3d(gw) if want_w else gb), gb
        gw_strides, gb_stride = (*gw_dst.stride(), 0) if want_w else (0,) * 6, 0
    else:
        part_t = torch.float64 if f64 else torch.float32
        gw_dst = x.new_empty((n_split, *w5.shape) if want_w else (0,), dtype=part_t)
        gb_dst = x.new_empty((n_split, w.shape[0]) if want_b else (0,), dtype=part_t)
        gw_strides = (*gw_dst.stride()[1:], gw_dst.stride(0)) if want_w else (0,) * 6
        gb_stride = gb_dst.stride(0) if want_b else 0
    _conv_wgrad_kernel[(tiles[0], tiles[1], groups * n_split)](
        g5, x5, gw_dst, gb_dst,
        cg, cog, *x5.shape[2:], *g5.shape[2:], *w5.shape[2:], k, per, n_split,
        *g5.stride(), *x5.stride(), *gw_strides, gb_stride,
        *_geometry(stride, padding, dilation),
        WANT_W=want_w, WANT_BIAS=want_b, F64=f64, UPCAST=_upcast(x.dtype), IDX64=k + block_k >= 2**31,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )  # fmt: skip
    if n_split > 1:
        if want_w:
            _sum_splits(gw_dst, _as3d(gw))
        if want_b:
            _sum_splits(gb_dst, gb.view(-1, 1, 1, 1, 1))
    return gw, gb


def _sum_splits(part: Tensor, out5: Tensor) -> None:
    n = out5.numel()
    block = 1024
    _sum_splits_kernel[(triton.cdiv(n, block),)](
        part, out5, n, part.shape[0], *out5.shape[1:], *out5.stride(), BLOCK=block
    )


def _backward(grad, x, w, stride, padding, dilation, groups, output_mask) -> Tuple[Tensor, Tensor, Tensor]:
    torch._check(
        list(grad.shape) == _out_shape(x, w, stride, padding, dilation),
        lambda: (
            f"grad must have the output's shape {_out_shape(x, w, stride, padding, dilation)}, got {list(grad.shape)}"
        ),
    )
    g5 = _as3d(grad.to(x.dtype))
    want_x, want_w, want_b = output_mask
    gx = _grad_input(g5, x, w, stride, padding, dilation, groups) if want_x else x.new_empty(0)
    gw, gb = _grad_weight_bias(g5, x, w, stride, padding, dilation, groups, want_w, want_b)
    return gx, gw, gb


@registry.triton_op("conv2d")
def triton_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
) -> Tensor:
    """Same contract as ``torch.ops.visionops.conv2d``."""
    return _forward(input, weight, bias, stride, padding, dilation, groups)


@registry.triton_op("conv2d", backward=True)
def triton_conv2d_backward(
    grad: Tensor,
    input: Tensor,
    weight: Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    output_mask: List[bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward(grad, input, weight, stride, padding, dilation, groups, output_mask)


@registry.triton_op("conv3d")
def triton_conv3d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
) -> Tensor:
    """Same contract as ``torch.ops.visionops.conv3d``."""
    return _forward(input, weight, bias, stride, padding, dilation, groups)


@registry.triton_op("conv3d", backward=True)
def triton_conv3d_backward(
    grad: Tensor,
    input: Tensor,
    weight: Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    output_mask: List[bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward(grad, input, weight, stride, padding, dilation, groups, output_mask)


def compile_specs():
    """(kernel, signature, constexprs) of every kernel here for an sm_90 compile check without a GPU: each kernel in
    every dtype, the forward and dgrad in both K orders (the smallest tiles with the flattened order, the largest
    with the tap-by-tap one), wgrad with its largest tiles and with its smallest writing split partial sums, and
    (float32) without the bias or without the weight. Each compile takes seconds, hence not every combination."""
    geometry = [f"{p}_{a}" for p in ("st", "pa", "di") for a in "dhw"]
    sizes = ["Cg", "Cog", "D", "H", "W", "Do", "Ho", "Wo", "KD", "KH", "KW"]

    def sig(ptrs, dtype, ints, stride_groups, constexprs):
        s = {p: f"*{dtype}" for p in ptrs}
        s.update({n: "i32" for n in sizes + ints})
        s.update({f"s{g}{a}": "i32" for g in stride_groups for a in "bcdhw"})
        s.update({n: "i32" for n in geometry})
        s.update({k: "constexpr" for k in constexprs})
        return s

    out = []
    for dtype, torch_dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16),
                               ("fp64", torch.float64)):  # fmt: skip
        f64 = torch_dtype == torch.float64
        acc = "fp64" if f64 else "fp32"
        for size, tap_outer in ((16, False), (128, True)):
            block_m, block_n, block_k, _ = _tiles(size, f64)
            c = dict(TAP_OUTER=tap_outer, F64=f64, UPCAST=False, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
            s = sig(("x_ptr", "w_ptr", "bias_ptr", "out_ptr"), dtype, ["M"], "xo", ["HAS_BIAS", *c])
            s.update({f"sw{a}": "i32" for a in "oidhw"}, s_bias="i32")
            out.append((_conv_fwd_kernel, s, dict(HAS_BIAS=True, **c)))
            s = sig(("g_ptr", "w_ptr", "gx_ptr"), dtype, ["M"], "gd", c)
            s.update({f"sw{a}": "i32" for a in "oidhw"})
            out.append((_conv_dgrad_kernel, s, c))
        wgrad = [(128, True, True, dtype), (16, True, True, acc)]
        if dtype == "fp32":
            wgrad += [(64, True, False, dtype), (64, False, True, dtype)]
            wgrad += [(64, True, True, "idx64")]  # K past 2^31: an int64 K loop
        for size, want_w, want_b, part in wgrad:
            block_m, block_n, block_k, _ = _wgrad_tiles(size, f64)
            idx64 = part == "idx64"
            part = dtype if idx64 else part
            c = dict(WANT_W=want_w, WANT_BIAS=want_b, F64=f64, UPCAST=False, IDX64=idx64)
            c.update(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
            s = sig(("g_ptr", "x_ptr"), dtype, ["K", "k_per_split", "n_split"], "gx", c)
            if idx64:
                s.update(K="i64", sgb="i64", sxb="i64")
            s.update({"gw_ptr": f"*{part}", "gb_ptr": f"*{part}", "sbs": "i32"})
            s.update({f"sd{a}": "i32" for a in "oidhws"})
            out.append((_conv_wgrad_kernel, s, c))
        for transposed, (block_m, block_c) in ((False, _depthwise_blocks(16)), (True, _depthwise_blocks(32))):
            c = dict(TRANSPOSED=transposed, HAS_BIAS=not transposed, F64=f64, BLOCK_M=block_m, BLOCK_C=block_c)
            s = {p: f"*{dtype}" for p in ("src_ptr", "w_ptr", "bias_ptr", "dst_ptr")}
            s.update({n: "i32" for n in ["C", "SD", "SH", "SW", "D", "H", "W", "KD", "KH", "KW", "M", "s_bias"]})
            s.update({f"s{g}{a}": "i32" for g in "sd" for a in "bcdhw"})
            s.update({f"sw{a}": "i32" for a in "cdhw"})
            s.update({n: "i32" for n in geometry})
            s.update({k: "constexpr" for k in c})
            out.append((_conv_depthwise_kernel, s, c))
        s = {"part_ptr": f"*{acc}", "out_ptr": f"*{dtype}"}
        s.update({n: "i32" for n in ("n", "n_split", "S1", "S2", "S3", "S4", "so0", "so1", "so2", "so3", "so4")})
        s["BLOCK"] = "constexpr"
        out.append((_sum_splits_kernel, s, dict(BLOCK=1024)))
    return [(fn, {n: s[n] for n in fn.arg_names}, c) for fn, s, c in out]  # in argument order
