"""Triton RoIAlign / RoIPool, forward and backward, each wrapped as its own custom op.

Same math as visionops/reference/roi.py and csrc/ops/common/roi_{align,pool}.h, evaluated in float32. One program
per (RoI, bin) and block of channels: the RoI geometry and each sample's taps are scalar work shared by the channel
block; features are read through their strides, so channels_last input is read in place. Backward kernels add into
a float32 buffer with atomics (cast to the gradient's dtype afterwards). As on CUDA, a RoI whose batch index is out
of range yields zeros and no gradient (checking it would need a device sync).

RoIPool keeps no argmax: the backward finds each bin's maximum again with the forward's rule (first strict maximum,
NaN never wins), as the C++ kernels do.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from visionops.ops._autograd import refuse_double_backward
from visionops.triton._math import div_rn

FLT_MAX = tl.constexpr(3.4028234663852886e38)
BLOCK_C = 64  # channels per program
MAX_GRID = tl.constexpr(65536)  # adaptive sampling grid cap per axis (csrc/ops/common/roi_align.h)


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
    w_hi = v - lo.to(tl.float32)
    return lo, hi, 1.0 - w_hi, w_hi, valid


@triton.jit
def _roi_align_fwd_kernel(x_ptr, rois_ptr, out_ptr, B, C, H, W, sxb, sxc, sxh, sxw, spatial_scale, PH, PW,
                          sampling_ratio, ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    k = pid // (PH * PW)
    ph = (pid // PW) % PH
    pw = pid % PW
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    b, sh, sw, bh, bw, gh, gw = _align_geom(rois_ptr, k, spatial_scale, PH, PW, sampling_ratio, ALIGNED)
    ok = (b >= 0) & (b < B)
    base = x_ptr + tl.where(ok, b, 0) * sxb + cs.to(tl.int64) * sxc
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for iy in range(0, gh):
        y = sh + ph * bh + div_rn((iy + 0.5) * bh, gh)
        ylo, yhi, hy, ly, vy = _axis(y, H)
        for ix in range(0, gw):
            x = sw + pw * bw + div_rn((ix + 0.5) * bw, gw)
            xlo, xhi, hx, lx, vx = _axis(x, W)
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
def _roi_align_bwd_kernel(g_ptr, rois_ptr, gin_ptr, B, C, H, W, sgk, sgc, sgh, sgw, spatial_scale, PH, PW,
                          sampling_ratio, ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    k = pid // (PH * PW)
    ph = (pid // PW) % PH
    pw = pid % PW
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    b, sh, sw, bh, bw, gh, gw = _align_geom(rois_ptr, k, spatial_scale, PH, PW, sampling_ratio, ALIGNED)
    ok = (b >= 0) & (b < B)
    count = (gh * gw).to(tl.float32)
    g = tl.load(g_ptr + k.to(tl.int64) * sgk + cs * sgc + ph * sgh + pw * sgw, mask=cmask, other=0.0)
    g = g.to(tl.float32)
    base = gin_ptr + (tl.where(ok, b, 0) * C + cs.to(tl.int64)) * H * W
    for iy in range(0, gh):
        y = sh + ph * bh + div_rn((iy + 0.5) * bh, gh)
        ylo, yhi, hy, ly, vy = _axis(y, H)
        for ix in range(0, gw):
            x = sw + pw * bw + div_rn((ix + 0.5) * bw, gw)
            xlo, xhi, hx, lx, vx = _axis(x, W)
            m = tl.where(vy & vx & ok, cmask, False)  # (block & scalar mask trips the interpreter)
            tl.atomic_add(base + ylo * W + xlo, div_rn(g * (hy * hx), count), mask=m)
            tl.atomic_add(base + ylo * W + xhi, div_rn(g * (hy * lx), count), mask=m)
            tl.atomic_add(base + yhi * W + xlo, div_rn(g * (ly * hx), count), mask=m)
            tl.atomic_add(base + yhi * W + xhi, div_rn(g * (ly * lx), count), mask=m)


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
    """Max and argmax (h * W + w, -1 if nothing beats the initial value) over the bin, per channel."""
    empty = (h1 <= h0) | (w1 <= w0)
    best = tl.zeros([BLOCK_C], dtype=tl.float32) + tl.where(empty, 0.0, -FLT_MAX)
    arg = tl.zeros([BLOCK_C], dtype=tl.int32) - 1
    for h in range(h0, h1):
        for w in range(w0, w1):
            v = tl.load(x_ptr + cs.to(tl.int64) * sxc + h * sxh + w * sxw, mask=cmask, other=0.0).to(tl.float32)
            gt = v > best  # strict: the first maximum wins; NaN never does
            best = tl.where(gt, v, best)
            arg = tl.where(gt, h * W + w, arg)
    return best, arg


@triton.jit
def _roi_pool_fwd_kernel(x_ptr, rois_ptr, out_ptr, B, C, H, W, sxb, sxc, sxh, sxw, spatial_scale, PH, PW,
                         BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    k = pid // (PH * PW)
    ph = (pid // PW) % PH
    pw = pid % PW
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    b, h0, h1, w0, w1 = _pool_bin(rois_ptr, k, spatial_scale, PH, PW, ph, pw, H, W)
    ok = (b >= 0) & (b < B)
    h1 = tl.where(ok, h1, h0)
    best, arg = _pool_max(x_ptr + tl.where(ok, b, 0) * sxb, cs, cmask, sxc, sxh, sxw, h0, h1, w0, w1, W, BLOCK_C)
    tl.store(out_ptr + ((k.to(tl.int64) * C + cs) * PH + ph) * PW + pw, best, mask=cmask)


@triton.jit
def _roi_pool_bwd_kernel(g_ptr, x_ptr, rois_ptr, gin_ptr, B, C, H, W, sxb, sxc, sxh, sxw, sgk, sgc, sgh, sgw,
                         spatial_scale, PH, PW, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    k = pid // (PH * PW)
    ph = (pid // PW) % PH
    pw = pid % PW
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    b, h0, h1, w0, w1 = _pool_bin(rois_ptr, k, spatial_scale, PH, PW, ph, pw, H, W)
    ok = (b >= 0) & (b < B)
    h1 = tl.where(ok, h1, h0)
    bs = tl.where(ok, b, 0)
    best, arg = _pool_max(x_ptr + bs * sxb, cs, cmask, sxc, sxh, sxw, h0, h1, w0, w1, W, BLOCK_C)
    g = tl.load(g_ptr + k.to(tl.int64) * sgk + cs * sgc + ph * sgh + pw * sgw, mask=cmask, other=0.0)
    dst = gin_ptr + (bs * C + cs.to(tl.int64)) * H * W + tl.maximum(arg, 0)
    tl.atomic_add(dst, g.to(tl.float32), mask=cmask & (arg >= 0))


# ---- custom ops ------------------------------------------------------------------------------------------------


def _grid(k, ph, pw, c):
    return (k * ph * pw, triton.cdiv(c, BLOCK_C))


def _rois32(rois: Tensor) -> Tensor:
    return rois.to(torch.float32).contiguous()


@torch.library.custom_op("visionops::triton_roi_align", mutates_args=())
def triton_roi_align(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                     sampling_ratio: int, aligned: bool) -> Tensor:
    B, C, H, W = input.shape
    K = rois.shape[0]
    out = input.new_empty((K, C, pooled_height, pooled_width))
    if out.numel() == 0:
        return out
    _roi_align_fwd_kernel[_grid(K, pooled_height, pooled_width, C)](
        input, _rois32(rois), out, B, C, H, W, *input.stride(), spatial_scale, pooled_height, pooled_width,
        sampling_ratio, ALIGNED=bool(aligned), BLOCK_C=BLOCK_C)
    return out


@torch.library.custom_op("visionops::triton_roi_align_backward", mutates_args=())
def triton_roi_align_backward(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int,
                              batch_size: int, channels: int, height: int, width: int, sampling_ratio: int,
                              aligned: bool) -> Tensor:
    gin = torch.zeros((batch_size, channels, height, width), dtype=torch.float32, device=grad.device)
    K = rois.shape[0]
    if K > 0 and gin.numel() > 0:
        _roi_align_bwd_kernel[_grid(K, pooled_height, pooled_width, channels)](
            grad, _rois32(rois), gin, batch_size, channels, height, width, *grad.stride(), spatial_scale,
            pooled_height, pooled_width, sampling_ratio, ALIGNED=bool(aligned), BLOCK_C=BLOCK_C)
    return gin.to(grad.dtype)


@torch.library.custom_op("visionops::triton_roi_pool", mutates_args=())
def triton_roi_pool(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                    pooled_width: int) -> Tensor:
    B, C, H, W = input.shape
    K = rois.shape[0]
    out = input.new_empty((K, C, pooled_height, pooled_width))
    if out.numel() == 0:
        return out
    _roi_pool_fwd_kernel[_grid(K, pooled_height, pooled_width, C)](
        input, _rois32(rois), out, B, C, H, W, *input.stride(), spatial_scale, pooled_height, pooled_width,
        BLOCK_C=BLOCK_C)
    return out


@torch.library.custom_op("visionops::triton_roi_pool_backward", mutates_args=())
def triton_roi_pool_backward(grad: Tensor, input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                             pooled_width: int) -> Tensor:
    B, C, H, W = input.shape
    gin = torch.zeros((B, C, H, W), dtype=torch.float32, device=grad.device)
    K = rois.shape[0]
    if K > 0 and gin.numel() > 0:
        _roi_pool_bwd_kernel[_grid(K, pooled_height, pooled_width, C)](
            grad, input, _rois32(rois), gin, B, C, H, W, *input.stride(), *grad.stride(), spatial_scale,
            pooled_height, pooled_width, BLOCK_C=BLOCK_C)
    return gin.to(grad.dtype)


@triton_roi_align.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@triton_roi_align_backward.register_fake
def _(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width, sampling_ratio,
      aligned):
    return grad.new_empty((batch_size, channels, height, width))


@triton_roi_pool.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width):
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@triton_roi_pool_backward.register_fake
def _(grad, input, rois, spatial_scale, pooled_height, pooled_width):
    return grad.new_empty(input.shape)


def _align_setup(ctx, inputs, output):
    input, rois, spatial_scale, ph, pw, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.args = (spatial_scale, ph, pw, *input.shape, sampling_ratio, aligned)


def _align_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    return (triton_roi_align_backward(grad, rois, *ctx.args),) + (None,) * 6


def _pool_setup(ctx, inputs, output):
    input, rois, spatial_scale, ph, pw = inputs
    ctx.save_for_backward(input, rois)
    ctx.args = (spatial_scale, ph, pw)


def _pool_backward(ctx, grad):
    input, rois = ctx.saved_tensors
    return (triton_roi_pool_backward(grad, input, rois, *ctx.args),) + (None,) * 4


triton_roi_align.register_autograd(_align_backward, setup_context=_align_setup)
triton_roi_pool.register_autograd(_pool_backward, setup_context=_pool_setup)
refuse_double_backward(triton_roi_align_backward, "roi_align")
refuse_double_backward(triton_roi_pool_backward, "roi_pool")


def compile_specs():
    """(kernel, signature, constexprs) of every kernel here, for an sm_90 compile check without a GPU."""
    i32, f32 = "i32", "fp32"
    x = {"B": i32, "C": i32, "H": i32, "W": i32, "sxb": i32, "sxc": i32, "sxh": i32, "sxw": i32}
    common = {"spatial_scale": f32, "PH": i32, "PW": i32}
    blk = {"BLOCK_C": "constexpr"}
    return [
        (_roi_align_fwd_kernel, {"x_ptr": "*fp32", "rois_ptr": "*fp32", "out_ptr": "*fp32", **x, **common,
                                 "sampling_ratio": i32, "ALIGNED": "constexpr", **blk},
         {"BLOCK_C": BLOCK_C, "ALIGNED": True}),
        (_roi_align_bwd_kernel, {"g_ptr": "*bf16", "rois_ptr": "*fp32", "gin_ptr": "*fp32", "B": i32, "C": i32,
                                 "H": i32, "W": i32, "sgk": i32, "sgc": i32, "sgh": i32, "sgw": i32, **common,
                                 "sampling_ratio": i32, "ALIGNED": "constexpr", **blk},
         {"BLOCK_C": BLOCK_C, "ALIGNED": False}),
        (_roi_pool_fwd_kernel, {"x_ptr": "*fp16", "rois_ptr": "*fp32", "out_ptr": "*fp16", **x, **common, **blk},
         {"BLOCK_C": BLOCK_C}),
        (_roi_pool_bwd_kernel, {"g_ptr": "*fp32", "x_ptr": "*fp32", "rois_ptr": "*fp32", "gin_ptr": "*fp32", **x,
                                "sgk": i32, "sgc": i32, "sgh": i32, "sgw": i32, **common, **blk},
         {"BLOCK_C": BLOCK_C}),
    ]
