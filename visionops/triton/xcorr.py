"""Triton kernels of the SiamFC cross-correlation family (math: visionops/reference/xcorr.py), each its own custom op:
``visionops::triton_xcorr``, ``triton_depthwise_xcorr`` and their backwards.

One kernel per direction serves both ops, SUM_CHANNELS (xcorr) a compile-time parameter, as in the C++ kernels:

* forward: a program per (batch b, tile of BLOCK_P output positions[, block of BLOCK_C channels for depthwise]),
  looping over channel blocks (xcorr: all of them) and the Hz x Wz taps, accumulating [BLOCK_P, BLOCK_C] products of
  x with z's tap row; xcorr reduces over the channel axis once at the end.
* grad_z: a program per (z batch b', tap (i, j), channel block) reducing g * x over the output positions, and over
  the batch when z is broadcast (Bz == 1), in a loop inside the program.
* grad_x: the gather form, a program per (b, tile of x positions, channel block) summing g[y - i, x - j] * z[i, j]
  over the valid taps.

No atomics: every output element is reduced in one program in a fixed order, so results are deterministic. Tensors
are read through their strides (channels_last and strided inputs in place, a broadcast z with batch stride 0);
pointers advance by adding strides so that no 32-bit product of a loop index and a stride can overflow. Products
accumulate in float32 (float64 for float64 inputs) and are rounded once to the inputs' dtype; xcorr's out_scale is
applied in the kernel, or for float64 by a second pass (a Triton float argument is float32). Output memory formats are
the fake kernels' (visionops/ops/xcorr.py).
"""

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from visionops import _registry as registry

_TILE = 2048  # BLOCK_P * BLOCK_C elements of a program's accumulator
_MAX_BLOCK_C = 32


@triton.jit
def _positions(tile, n, width, BLOCK_P: tl.constexpr):
    """Flat positions of a tile (and their mask) split into (row, column) of a plane `width` wide."""
    ps = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    return ps // width, ps % width, ps < n


# A program's tile is [BLOCK_P, BLOCK_C] when channels are the inner axis in memory (channels_last, C_INNER) and
# [BLOCK_C, BLOCK_P] otherwise, so that a warp's threads run along the axis that is contiguous and loads coalesce.


@triton.jit
def _p(v, C_INNER: tl.constexpr):
    """A vector over the tile's positions, broadcastable over the tile."""
    if C_INNER:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _c(v, C_INNER: tl.constexpr):
    """A vector over the tile's channels, broadcastable over the tile."""
    if C_INNER:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _tile_zeros(F64: tl.constexpr, C_INNER: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    acc_t = tl.float64 if F64 else tl.float32
    if C_INNER:
        return tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_t)
    else:
        return tl.zeros([BLOCK_C, BLOCK_P], dtype=acc_t)


@triton.jit
def _sum_channels(acc, C_INNER: tl.constexpr):
    if C_INNER:
        return tl.sum(acc, axis=1)
    else:
        return tl.sum(acc, axis=0)


@triton.jit
def _sum_positions(acc, C_INNER: tl.constexpr):
    if C_INNER:
        return tl.sum(acc, axis=0)
    else:
        return tl.sum(acc, axis=1)


@triton.jit
def _xcorr_fwd_kernel(
    z_ptr,
    x_ptr,
    out_ptr,
    C,
    Hz,
    Wz,
    Ho,
    Wo,
    p_tiles,
    szb,
    szc,
    szh,
    szw,
    sxb,
    sxc,
    sxh,
    sxw,
    sob,
    soc,
    soh,
    sow,
    scale,
    SUM_CHANNELS: tl.constexpr,
    F64: tl.constexpr,
    C_INNER: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """grid (B * p_tiles, 1 if SUM_CHANNELS else channel blocks); szb is 0 for a broadcast z."""
    acc_t = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    b = (pid // p_tiles).to(tl.int64)
    u, v, pmask = _positions(pid % p_tiles, Ho * Wo, Wo, BLOCK_P)
    u = u.to(tl.int64)
    v = v.to(tl.int64)
    x_pos = _p(x_ptr + b * sxb + u * sxh + v * sxw, C_INNER)
    if SUM_CHANNELS:
        c_lo = 0
        c_hi = C
    else:
        c_lo = tl.program_id(1) * BLOCK_C
        c_hi = c_lo + BLOCK_C
    acc = _tile_zeros(F64, C_INNER, BLOCK_P, BLOCK_C)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < C
        m = _p(pmask, C_INNER) & _c(cmask, C_INNER)
        xi = x_pos + _c(cs.to(tl.int64) * sxc, C_INNER)
        zi = z_ptr + b * szb + cs.to(tl.int64) * szc
        for _i in range(Hz):
            xj = xi
            zj = zi
            for _j in range(Wz):
                xv = tl.load(xj, mask=m, other=0.0).to(acc_t)
                zv = tl.load(zj, mask=cmask, other=0.0).to(acc_t)
                acc += xv * _c(zv, C_INNER)
                xj += sxw
                zj += szw
            xi += sxh
            zi += szh
    ty = out_ptr.dtype.element_ty
    o = out_ptr + b * sob + u * soh + v * sow
    if SUM_CHANNELS:
        tl.store(o, (_sum_channels(acc, C_INNER) * scale).to(ty), mask=pmask)
    else:
        cs = c_lo + tl.arange(0, BLOCK_C)
        m = _p(pmask, C_INNER) & _c(cs < C, C_INNER)
        tl.store(_p(o, C_INNER) + _c(cs.to(tl.int64) * soc, C_INNER), acc.to(ty), mask=m)


@triton.jit
def _xcorr_grad_z_kernel(
    g_ptr,
    x_ptr,
    gz_ptr,
    C,
    Hz,
    Wz,
    Ho,
    Wo,
    n_batch,
    sgb,
    sgc,
    sgh,
    sgw,
    sxb,
    sxc,
    sxh,
    sxw,
    sdb,
    sdc,
    sdh,
    sdw,
    scale,
    SUM_CHANNELS: tl.constexpr,
    F64: tl.constexpr,
    C_INNER: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """grid (Bz * Hz * Wz, channel blocks): gz[b', c, i, j] = sum over the n_batch images b' + k (k < n_batch: all B
    of them when z is broadcast, else 1) and output positions (u, v) of g[b, c or 0, u, v] * x[b, c, u + i, v + j]."""
    acc_t = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    bz = (pid // (Hz * Wz)).to(tl.int64)
    i = ((pid // Wz) % Hz).to(tl.int64)
    j = (pid % Wz).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    b0 = bz * n_batch
    g_b = g_ptr + b0 * sgb
    x_b = x_ptr + b0 * sxb + i * sxh + j * sxw + _c(cs.to(tl.int64) * sxc, C_INNER)
    n = Ho * Wo
    acc = _tile_zeros(F64, C_INNER, BLOCK_P, BLOCK_C)
    for _k in range(n_batch):
        for tile in range(0, tl.cdiv(n, BLOCK_P)):
            u, v, pmask = _positions(tile, n, Wo, BLOCK_P)
            u = u.to(tl.int64)
            v = v.to(tl.int64)
            m = _p(pmask, C_INNER) & _c(cmask, C_INNER)
            if SUM_CHANNELS:
                gv = _p(tl.load(g_b + u * sgh + v * sgw, mask=pmask, other=0.0).to(acc_t), C_INNER)
            else:
                gp = g_b + _p(u * sgh + v * sgw, C_INNER) + _c(cs.to(tl.int64) * sgc, C_INNER)
                gv = tl.load(gp, mask=m, other=0.0).to(acc_t)
            xv = tl.load(x_b + _p(u * sxh + v * sxw, C_INNER), mask=m, other=0.0).to(acc_t)
            acc += gv * xv
        g_b += sgb
        x_b += sxb
    res = _sum_positions(acc, C_INNER)
    if SUM_CHANNELS:
        res = res * scale
    dst = gz_ptr + bz * sdb + i * sdh + j * sdw + cs.to(tl.int64) * sdc
    tl.store(dst, res.to(gz_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _xcorr_grad_x_kernel(
    g_ptr,
    z_ptr,
    gx_ptr,
    C,
    Hz,
    Wz,
    Hx,
    Wx,
    Ho,
    Wo,
    p_tiles,
    sgb,
    sgc,
    sgh,
    sgw,
    szb,
    szc,
    szh,
    szw,
    sdb,
    sdc,
    sdh,
    sdw,
    scale,
    SUM_CHANNELS: tl.constexpr,
    F64: tl.constexpr,
    C_INNER: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """grid (B * p_tiles, channel blocks): gx[b, c, y, x] = sum over taps (i, j) with (y - i, x - j) an output
    position of g[b, c or 0, y - i, x - j] * z[b', c, i, j]; szb is 0 for a broadcast z."""
    acc_t = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    b = (pid // p_tiles).to(tl.int64)
    y, x, pmask = _positions(pid % p_tiles, Hx * Wx, Wx, BLOCK_P)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    # g at (y - i, x - j): start at tap (0, 0) and step back one row / column per tap.
    gi = g_ptr + b * sgb + y.to(tl.int64) * sgh + x.to(tl.int64) * sgw
    if not SUM_CHANNELS:
        gi = _p(gi, C_INNER) + _c(cs.to(tl.int64) * sgc, C_INNER)
    zi = z_ptr + b * szb + cs.to(tl.int64) * szc
    acc = _tile_zeros(F64, C_INNER, BLOCK_P, BLOCK_C)
    u = y
    for _i in range(Hz):
        row_ok = pmask & (u >= 0) & (u < Ho)
        gj = gi
        zj = zi
        v = x
        for _j in range(Wz):
            ok = row_ok & (v >= 0) & (v < Wo)
            zv = tl.load(zj, mask=cmask, other=0.0).to(acc_t)
            if SUM_CHANNELS:
                gv = _p(tl.load(gj, mask=ok, other=0.0).to(acc_t), C_INNER)
            else:
                gv = tl.load(gj, mask=_p(ok, C_INNER) & _c(cmask, C_INNER), other=0.0).to(acc_t)
            acc += gv * _c(zv, C_INNER)
            gj -= sgw
            zj += szw
            v -= 1
        gi -= sgh
        zi += szh
        u -= 1
    if SUM_CHANNELS:
        acc = acc * scale
    dst = _p(gx_ptr + b * sdb + y.to(tl.int64) * sdh + x.to(tl.int64) * sdw, C_INNER)
    dst += _c(cs.to(tl.int64) * sdc, C_INNER)
    tl.store(dst, acc.to(gx_ptr.dtype.element_ty), mask=_p(pmask, C_INNER) & _c(cmask, C_INNER))


# ---- launchers and custom ops ------------------------------------------


def _out_format(t: Tensor) -> torch.memory_format:
    """The fake kernels' rule (visionops/ops/xcorr.py): channels_last when t is and is not also plainly contiguous."""
    cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _channels_inner(t: Tensor) -> bool:
    """Whether t's channels are closer in memory than its columns (channels_last): the tile's inner axis."""
    return t.stride(1) < t.stride(3)


def _blocks(positions: int, channels: int) -> Tuple[int, int]:
    """(BLOCK_P, BLOCK_C): up to 32 channels, the rest of a _TILE-element tile for positions."""
    block_c = min(triton.next_power_of_2(max(channels, 1)), _MAX_BLOCK_C)
    return min(triton.next_power_of_2(positions), _TILE // block_c), block_c


def _scale(out_scale: float, dtype: torch.dtype) -> Tuple[float, float]:
    """(the kernel's scale, the scale applied afterwards): Triton passes a float argument as float32, so float64
    results are scaled by a second, elementwise pass in float64 (the reference's rounding) when out_scale is not 1."""
    return (1.0, out_scale) if dtype == torch.float64 else (out_scale, 1.0)


def _batch_stride(z: Tensor, x: Tensor) -> int:
    """z's batch stride, 0 when one exemplar serves every image (Bz == 1)."""
    return z.stride(0) if z.shape[0] == x.shape[0] else 0


def _check_limits(sum_channels: bool, x: Tensor, programs: int, block_c: int) -> None:
    """The kernels' limits, refused by name: a plane's positions are int32 flat indices (offsets into the tensors are
    int64), and a CUDA grid takes at most 2^31 - 1 programs on its first axis and 65535 on its second."""
    op = "xcorr" if sum_channels else "depthwise_xcorr"
    _, C, Hx, Wx = x.shape
    if Hx * Wx > 2**31 - 1 - _TILE:
        raise ValueError(f"{op}: x's H * W must be below 2^31 for the Triton backend, got {Hx} x {Wx}")
    if programs > 2**31 - 1:
        raise ValueError(f"{op}: x has too many images x positions for one Triton launch, got {list(x.shape)}")
    if triton.cdiv(C, block_c) > 65535:
        raise ValueError(f"{op}: x must have at most {65535 * block_c} channels for the Triton backend, got {C}")


def _forward(z: Tensor, x: Tensor, out_scale: float, sum_channels: bool) -> Tensor:
    B, C, Hx, Wx = x.shape
    Ho, Wo = Hx - z.shape[2] + 1, Wx - z.shape[3] + 1
    fmt = torch.contiguous_format if sum_channels else _out_format(x)
    shape = (B, 1 if sum_channels else C, Ho, Wo)
    if B * shape[1] * Ho * Wo == 0:
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    block_p, block_c = _blocks(Ho * Wo, C)
    p_tiles = triton.cdiv(Ho * Wo, block_p)
    _check_limits(sum_channels, x, B * p_tiles, block_c)  # before the output is allocated
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    scale, post = _scale(out_scale, x.dtype)
    _xcorr_fwd_kernel[(B * p_tiles, 1 if sum_channels else triton.cdiv(C, block_c))](
        z,
        x,
        out,
        C,
        z.shape[2],
        z.shape[3],
        Ho,
        Wo,
        p_tiles,
        _batch_stride(z, x),
        *z.stride()[1:],
        *x.stride(),
        *out.stride(),
        scale,
        SUM_CHANNELS=sum_channels,
        F64=x.dtype == torch.float64,
        C_INNER=_channels_inner(x),
        BLOCK_P=block_p,
        BLOCK_C=block_c,
    )
    return out if post == 1.0 else out.mul_(post)


def _backward(grad: Tensor, z: Tensor, x: Tensor, out_scale: float, sum_channels: bool) -> Tuple[Tensor, Tensor]:
    B, C, Hx, Wx = x.shape
    Bz, _, Hz, Wz = z.shape
    Ho, Wo = Hx - Hz + 1, Wx - Wz + 1
    torch._check(
        tuple(grad.shape) == (B, 1 if sum_channels else C, Ho, Wo),
        lambda: f"grad must have the output's shape, got {list(grad.shape)}",
    )
    gz = torch.empty_like(z, memory_format=_out_format(z))
    gx = torch.empty_like(x, memory_format=_out_format(x))
    if B == 0 or C == 0:
        return gz.zero_(), gx  # a broadcast z summed over no images
    g = grad.to(x.dtype)
    f64 = x.dtype == torch.float64
    c_inner = _channels_inner(x)  # g and gx follow x's layout in the usual case
    scale, post = _scale(out_scale, x.dtype)
    block_p, block_c = _blocks(Ho * Wo, C)
    _check_limits(sum_channels, x, Bz * Hz * Wz, block_c)
    _xcorr_grad_z_kernel[(Bz * Hz * Wz, triton.cdiv(C, block_c))](
        g,
        x,
        gz,
        C,
        Hz,
        Wz,
        Ho,
        Wo,
        B // Bz,
        *g.stride(),
        *x.stride(),
        *gz.stride(),
        scale,
        SUM_CHANNELS=sum_channels,
        F64=f64,
        C_INNER=c_inner,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
    )
    block_p, block_c = _blocks(Hx * Wx, C)
    p_tiles = triton.cdiv(Hx * Wx, block_p)
    _check_limits(sum_channels, x, B * p_tiles, block_c)
    _xcorr_grad_x_kernel[(B * p_tiles, triton.cdiv(C, block_c))](
        g,
        z,
        gx,
        C,
        Hz,
        Wz,
        Hx,
        Wx,
        Ho,
        Wo,
        p_tiles,
        *g.stride(),
        _batch_stride(z, x),
        *z.stride()[1:],
        *gx.stride(),
        scale,
        SUM_CHANNELS=sum_channels,
        F64=f64,
        C_INNER=c_inner,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
    )
    return (gz, gx) if post == 1.0 else (gz.mul_(post), gx.mul_(post))


@registry.triton_op("xcorr")
def triton_xcorr(z: Tensor, x: Tensor, out_scale: float = 1.0) -> Tensor:
    """Same contract as ``torch.ops.visionops.xcorr``."""
    return _forward(z, x, out_scale, True)


@registry.triton_op("xcorr", backward=True)
def triton_xcorr_backward(grad: Tensor, z: Tensor, x: Tensor, out_scale: float) -> Tuple[Tensor, Tensor]:
    return _backward(grad, z, x, out_scale, True)


@registry.triton_op("depthwise_xcorr")
def triton_depthwise_xcorr(z: Tensor, x: Tensor) -> Tensor:
    """Same contract as ``torch.ops.visionops.depthwise_xcorr``."""
    return _forward(z, x, 1.0, False)


@registry.triton_op("depthwise_xcorr", backward=True)
def triton_depthwise_xcorr_backward(grad: Tensor, z: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
    return _backward(grad, z, x, 1.0, False)


def compile_specs():
    """(kernel, signature, constexprs) of every kernel here, for an sm_90 compile check without a GPU: each kernel in
    both variants (xcorr, depthwise), both tile orientations and every dtype (float64 accumulating in float64)."""
    kernels = (  # kernel, pointers, sizes, stride groups (each b, c, h, w), (positions, channels) of its blocks
        (_xcorr_fwd_kernel, ("z_ptr", "x_ptr", "out_ptr"), ("C", "Hz", "Wz", "Ho", "Wo", "p_tiles"), "zxo", (289, 256)),
        (_xcorr_grad_z_kernel, ("g_ptr", "x_ptr", "gz_ptr"), ("C", "Hz", "Wz", "Ho", "Wo", "n_batch"), "gxd", (289, 3)),
        (
            _xcorr_grad_x_kernel,
            ("g_ptr", "z_ptr", "gx_ptr"),
            ("C", "Hz", "Wz", "Hx", "Wx", "Ho", "Wo", "p_tiles"),
            "gzd",
            (484, 256),
        ),
    )
    out = []
    for dtype in ("fp32", "fp16", "bf16", "fp64"):
        for sum_channels in (True, False):
            for c_inner in (False, True):
                for kernel, ptrs, sizes, groups, (positions, channels) in kernels:
                    sig = {p: f"*{dtype}" for p in ptrs}
                    sig.update({s: "i32" for s in sizes})
                    sig.update({f"s{g}{a}": "i32" for g in groups for a in "bchw"})
                    sig["scale"] = "fp32"
                    block_p, block_c = _blocks(positions, channels)
                    constexprs = dict(
                        SUM_CHANNELS=sum_channels,
                        F64=dtype == "fp64",
                        C_INNER=c_inner,
                        BLOCK_P=block_p,
                        BLOCK_C=block_c,
                    )
                    sig.update({k: "constexpr" for k in constexprs})
                    out.append((kernel, sig, constexprs))
    return out
