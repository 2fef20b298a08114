"""Triton kernels of box coding (math: visionops/reference/box_coder.py), each its own custom op:
``visionops::triton_decode_boxes`` (+ ``triton_decode_boxes_backward``, also Triton), ``triton_encode_boxes`` and
``triton_filter_boxes`` (a Triton mask; torch.nonzero turns it into indices).

Computed in float32 (float64 for float64 inputs, so that gradcheck holds), rounded once to the input dtype.
"""

from typing import List, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from visionops import _registry as registry
from visionops.triton._math import div_rn

_BLOCK = 256


@triton.jit
def _load4(ptr, base, mask, F64: tl.constexpr):
    ct = tl.float64 if F64 else tl.float32
    a = tl.load(ptr + base, mask=mask, other=1.0).to(ct)
    b = tl.load(ptr + base + 1, mask=mask, other=1.0).to(ct)
    c = tl.load(ptr + base + 2, mask=mask, other=2.0).to(ct)
    d = tl.load(ptr + base + 3, mask=mask, other=2.0).to(ct)
    return a, b, c, d


@triton.jit
def _decode_boxes_kernel(
    d_ptr,
    a_ptr,
    out_ptr,
    total,
    k,
    wx,
    wy,
    ww,
    wh,
    clip,
    img_h,
    img_w,
    CLIP_IMAGE: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < total
    ax1, ay1, ax2, ay2 = _load4(a_ptr, 4 * (idx // k), valid, F64)
    d0, d1, d2, d3 = _load4(d_ptr, 4 * idx, valid, F64)
    w = ax2 - ax1
    h = ay2 - ay1
    cx = ax1 + 0.5 * w
    cy = ay1 + 0.5 * h
    dw = div_rn(d2, ww)
    dh = div_rn(d3, wh)
    dw = tl.where(dw > clip, clip, dw)  # keeps NaN, as torch.clamp
    dh = tl.where(dh > clip, clip, dh)
    pcx = div_rn(d0, wx) * w + cx
    pcy = div_rn(d1, wy) * h + cy
    hw = 0.5 * (tl.exp(dw) * w)
    hh = 0.5 * (tl.exp(dh) * h)
    x1 = pcx - hw
    y1 = pcy - hh
    x2 = pcx + hw
    y2 = pcy + hh
    if CLIP_IMAGE:
        x1 = tl.where(x1 < 0, 0.0, tl.where(x1 > img_w, img_w, x1))
        y1 = tl.where(y1 < 0, 0.0, tl.where(y1 > img_h, img_h, y1))
        x2 = tl.where(x2 < 0, 0.0, tl.where(x2 > img_w, img_w, x2))
        y2 = tl.where(y2 < 0, 0.0, tl.where(y2 > img_h, img_h, y2))
    ty = out_ptr.dtype.element_ty
    o = out_ptr + 4 * idx
    tl.store(o, x1.to(ty), mask=valid)
    tl.store(o + 1, y1.to(ty), mask=valid)
    tl.store(o + 2, x2.to(ty), mask=valid)
    tl.store(o + 3, y2.to(ty), mask=valid)


@triton.jit
def _decode_boxes_backward_kernel(
    g_ptr,
    d_ptr,
    a_ptr,
    gd_ptr,
    ga_ptr,
    n,
    k,
    wx,
    wy,
    ww,
    wh,
    clip,
    img_h,
    img_w,
    CLIP_IMAGE: tl.constexpr,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One lane per anchor, looping over its K deltas: the anchor gradient is a plain sum (no atomics).
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = i < n
    ax1, ay1, ax2, ay2 = _load4(a_ptr, 4 * i, valid, F64)
    w = ax2 - ax1
    h = ay2 - ay1
    acc0 = tl.zeros([BLOCK], dtype=w.dtype)
    acc1 = tl.zeros([BLOCK], dtype=w.dtype)
    acc2 = tl.zeros([BLOCK], dtype=w.dtype)
    acc3 = tl.zeros([BLOCK], dtype=w.dtype)
    for j in range(k):
        base = 4 * (i * k + j)
        d0, d1, d2, d3 = _load4(d_ptr, base, valid, F64)
        g0, g1, g2, g3 = _load4(g_ptr, base, valid, F64)
        dx = div_rn(d0, wx)
        dy = div_rn(d1, wy)
        dw_raw = div_rn(d2, ww)
        dh_raw = div_rn(d3, wh)
        ew = tl.exp(tl.where(dw_raw > clip, clip, dw_raw))
        eh = tl.exp(tl.where(dh_raw > clip, clip, dh_raw))
        if CLIP_IMAGE:
            pcx = dx * w + (ax1 + 0.5 * w)
            pcy = dy * h + (ay1 + 0.5 * h)
            hw = 0.5 * (ew * w)
            hh = 0.5 * (eh * h)
            x1 = pcx - hw
            y1 = pcy - hh
            x2 = pcx + hw
            y2 = pcy + hh
            g0 = tl.where((x1 >= 0) & (x1 <= img_w), g0, 0.0)
            g1 = tl.where((y1 >= 0) & (y1 <= img_h), g1, 0.0)
            g2 = tl.where((x2 >= 0) & (x2 <= img_w), g2, 0.0)
            g3 = tl.where((y2 >= 0) & (y2 <= img_h), g3, 0.0)
        g_pcx = g0 + g2
        g_pcy = g1 + g3
        g_pw = 0.5 * (g2 - g0)
        g_ph = 0.5 * (g3 - g1)
        ty = gd_ptr.dtype.element_ty
        tl.store(gd_ptr + base, div_rn(g_pcx * w, wx).to(ty), mask=valid)
        tl.store(gd_ptr + base + 1, div_rn(g_pcy * h, wy).to(ty), mask=valid)
        tl.store(gd_ptr + base + 2, tl.where(dw_raw <= clip, div_rn(g_pw * ew * w, ww), 0.0).to(ty), mask=valid)
        tl.store(gd_ptr + base + 3, tl.where(dh_raw <= clip, div_rn(g_ph * eh * h, wh), 0.0).to(ty), mask=valid)
        g_w = g_pcx * dx + g_pw * ew + 0.5 * g_pcx
        g_h = g_pcy * dy + g_ph * eh + 0.5 * g_pcy
        acc0 += g_pcx - g_w
        acc1 += g_pcy - g_h
        acc2 += g_w
        acc3 += g_h
    ty = ga_ptr.dtype.element_ty
    tl.store(ga_ptr + 4 * i, acc0.to(ty), mask=valid)
    tl.store(ga_ptr + 4 * i + 1, acc1.to(ty), mask=valid)
    tl.store(ga_ptr + 4 * i + 2, acc2.to(ty), mask=valid)
    tl.store(ga_ptr + 4 * i + 3, acc3.to(ty), mask=valid)


@triton.jit
def _encode_boxes_kernel(r_ptr, q_ptr, out_ptr, n, wx, wy, ww, wh, F64: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = i < n
    rx1, ry1, rx2, ry2 = _load4(r_ptr, 4 * i, valid, F64)
    qx1, qy1, qx2, qy2 = _load4(q_ptr, 4 * i, valid, F64)
    ew = qx2 - qx1
    eh = qy2 - qy1
    gw = rx2 - rx1
    gh = ry2 - ry1
    ty = out_ptr.dtype.element_ty
    o = out_ptr + 4 * i
    tl.store(o, div_rn(wx * ((rx1 + 0.5 * gw) - (qx1 + 0.5 * ew)), ew).to(ty), mask=valid)
    tl.store(o + 1, div_rn(wy * ((ry1 + 0.5 * gh) - (qy1 + 0.5 * eh)), eh).to(ty), mask=valid)
    tl.store(o + 2, (ww * tl.log(div_rn(gw, ew))).to(ty), mask=valid)
    tl.store(o + 3, (wh * tl.log(div_rn(gh, eh))).to(ty), mask=valid)


@triton.jit
def _filter_boxes_kernel(b_ptr, s_ptr, keep_ptr, n, thr, min_size, BLOCK: tl.constexpr):
    # thr and min_size arrive already rounded to the boxes' dtype (torchvision compares in that dtype).
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = i < n
    ty = b_ptr.dtype.element_ty
    x1 = tl.load(b_ptr + 4 * i, mask=valid, other=0.0).to(tl.float32)
    y1 = tl.load(b_ptr + 4 * i + 1, mask=valid, other=0.0).to(tl.float32)
    x2 = tl.load(b_ptr + 4 * i + 2, mask=valid, other=0.0).to(tl.float32)
    y2 = tl.load(b_ptr + 4 * i + 3, mask=valid, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + i, mask=valid, other=0.0).to(tl.float32)
    # Sides rounded to the boxes' dtype, as torch's elementwise subtraction in that dtype (exact for float32).
    w = (x2 - x1).to(ty).to(tl.float32)
    h = (y2 - y1).to(ty).to(tl.float32)
    keep = (s >= thr) & (w >= min_size) & (h >= min_size)
    tl.store(keep_ptr + i, keep.to(tl.int8), mask=valid)


def _grid(n):
    return (triton.cdiv(n, _BLOCK),)


@registry.triton_op("decode_boxes")
def triton_decode_boxes(
    deltas: Tensor, anchors: Tensor, weights: List[float], bbox_xform_clip: float, image_size: List[float]
) -> Tensor:
    """Same contract as ``torch.ops.visionops.decode_boxes``."""
    torch._check(deltas.dim() == 2 and deltas.shape[1] % 4 == 0, lambda: "deltas must have shape [N, 4*K]")
    torch._check(
        anchors.shape == (deltas.shape[0], 4) and anchors.dtype == deltas.dtype,
        lambda: "anchors must have shape [N, 4] and the dtype of deltas",
    )
    d, a = deltas.contiguous(), anchors.contiguous()
    out = torch.empty_like(d)
    if out.numel() == 0:
        return out
    n, k = d.shape[0], d.shape[1] // 4
    clip_img = len(image_size) == 2
    h, w = (float(image_size[0]), float(image_size[1])) if clip_img else (0.0, 0.0)
    _decode_boxes_kernel[_grid(n * k)](
        d,
        a,
        out,
        n * k,
        k,
        *map(float, weights),
        float(bbox_xform_clip),
        h,
        w,
        CLIP_IMAGE=clip_img,
        F64=d.dtype == torch.float64,
        BLOCK=_BLOCK,
    )
    return out


@registry.triton_op("decode_boxes", backward=True)
def triton_decode_boxes_backward(
    grad: Tensor, deltas: Tensor, anchors: Tensor, weights: List[float], bbox_xform_clip: float, image_size: List[float]
) -> Tuple[Tensor, Tensor]:
    g, d, a = grad.contiguous().to(deltas.dtype), deltas.contiguous(), anchors.contiguous()
    gd, ga = torch.empty_like(d), torch.empty_like(a)
    if d.numel() == 0:
        return gd, ga.zero_()
    n, k = d.shape[0], d.shape[1] // 4
    clip_img = len(image_size) == 2
    h, w = (float(image_size[0]), float(image_size[1])) if clip_img else (0.0, 0.0)
    _decode_boxes_backward_kernel[_grid(n)](
        g,
        d,
        a,
        gd,
        ga,
        n,
        k,
        *map(float, weights),
        float(bbox_xform_clip),
        h,
        w,
        CLIP_IMAGE=clip_img,
        F64=d.dtype == torch.float64,
        BLOCK=_BLOCK,
    )
    return gd, ga


@registry.triton_op("encode_boxes")
def triton_encode_boxes(reference_boxes: Tensor, proposals: Tensor, weights: List[float]) -> Tensor:
    """Same contract as ``torch.ops.visionops.encode_boxes``."""
    torch._check(
        reference_boxes.shape == proposals.shape and reference_boxes.dtype == proposals.dtype,
        lambda: "reference_boxes and proposals must have one shape [N, 4] and one dtype",
    )
    r, q = reference_boxes.contiguous(), proposals.contiguous()
    out = torch.empty_like(r)
    if out.numel() == 0:
        return out
    _encode_boxes_kernel[_grid(r.shape[0])](
        r, q, out, r.shape[0], *map(float, weights), F64=r.dtype == torch.float64, BLOCK=_BLOCK
    )
    return out


@registry.triton_op("filter_boxes")
def triton_filter_boxes(boxes: Tensor, scores: Tensor, score_threshold: float, min_size: float) -> Tensor:
    """Same contract as ``torch.ops.visionops.filter_boxes``."""
    b, s = boxes.contiguous(), scores.contiguous().to(boxes.dtype)
    n = b.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=b.device)
    keep = torch.empty(n, dtype=torch.int8, device=b.device)
    # Thresholds rounded to the boxes' dtype on the host, as torch does for a tensor-vs-scalar comparison.
    thr = torch.tensor(score_threshold, dtype=b.dtype).item()
    lo = torch.tensor(min_size, dtype=b.dtype).item()
    _filter_boxes_kernel[_grid(n)](b, s, keep, n, float(thr), float(lo), BLOCK=_BLOCK)
    return torch.nonzero(keep).view(-1)


def compile_specs():
    """(kernel, signature, constexprs) of each kernel, for an ahead-of-time compile check (sm_90)."""
    f = {"wx": "fp32", "wy": "fp32", "ww": "fp32", "wh": "fp32"}
    dec = {
        "d_ptr": "*fp32",
        "a_ptr": "*fp32",
        "out_ptr": "*fp32",
        "total": "i64",
        "k": "i64",
        **f,
        "clip": "fp32",
        "img_h": "fp32",
        "img_w": "fp32",
        "CLIP_IMAGE": "constexpr",
        "F64": "constexpr",
        "BLOCK": "constexpr",
    }
    dec_half = dict(dec, d_ptr="*fp16", a_ptr="*fp16", out_ptr="*fp16")
    bwd = {
        "g_ptr": "*fp32",
        "d_ptr": "*fp32",
        "a_ptr": "*fp32",
        "gd_ptr": "*fp32",
        "ga_ptr": "*fp32",
        "n": "i64",
        "k": "i64",
        **f,
        "clip": "fp32",
        "img_h": "fp32",
        "img_w": "fp32",
        "CLIP_IMAGE": "constexpr",
        "F64": "constexpr",
        "BLOCK": "constexpr",
    }
    enc = {
        "r_ptr": "*fp32",
        "q_ptr": "*fp32",
        "out_ptr": "*fp32",
        "n": "i64",
        **f,
        "F64": "constexpr",
        "BLOCK": "constexpr",
    }
    flt = {
        "b_ptr": "*fp32",
        "s_ptr": "*fp32",
        "keep_ptr": "*i8",
        "n": "i64",
        "thr": "fp32",
        "min_size": "fp32",
        "BLOCK": "constexpr",
    }
    return [
        (_decode_boxes_kernel, dec, {"CLIP_IMAGE": False, "F64": False, "BLOCK": _BLOCK}),
        (_decode_boxes_kernel, dec_half, {"CLIP_IMAGE": True, "F64": False, "BLOCK": _BLOCK}),
        (_decode_boxes_backward_kernel, bwd, {"CLIP_IMAGE": True, "F64": False, "BLOCK": _BLOCK}),
        (_encode_boxes_kernel, enc, {"F64": False, "BLOCK": _BLOCK}),
        (_filter_boxes_kernel, flt, {"BLOCK": _BLOCK}),
    ]
