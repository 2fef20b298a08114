"""Triton NMS family: IoU bitmask + greedy gather (nms, batched_nms) and box_iou forward/backward.

Same algorithm and mask layout as csrc/ops/cuda/nms_kernel.cu (see its header): boxes sorted by (class, score),
64x64 tiles of IoU bits, one program walking the row blocks to gather the kept boxes. The IoU formula is
visionops/reference/nms.py's, evaluated in the boxes' float type (float32 for half inputs) without FMA contraction
and compared with the threshold in float64, so the result matches the C++ kernels bit for bit.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from visionops import _registry as registry
from visionops.triton._math import div_rn

BLOCK = 64  # boxes per tile = bits per mask word
GATHER_WORDS = 64  # mask words OR-ed per step of the gather


@triton.jit
def _max_first(a, b):
    return tl.where(a < b, b, a)  # keeps `a` when either is NaN, like the C++ max_first


@triton.jit
def _min_first(a, b):
    return tl.where(b < a, b, a)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _iou(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2):
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    w = _max_first(0.0, _min_first(ax2, bx2) - _max_first(ax1, bx1))
    h = _max_first(0.0, _min_first(ay2, by2) - _max_first(ay1, by1))
    inter = w * h
    return div_rn(inter, area_a + area_b - inter)


@triton.jit
def nms_mask_kernel(boxes_ptr, cls_ptr, band_ptr, thr_ptr, mask_ptr, n, W, HAS_CLS: tl.constexpr, BLOCK: tl.constexpr):
    rb = tl.program_id(0)
    w = tl.program_id(1)
    if w < tl.load(band_ptr + rb):
        rows = rb.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        cols = (rb + w).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        rmask = rows < n
        cmask = cols < n
        ax1 = tl.load(boxes_ptr + rows * 4 + 0, mask=rmask, other=0.0)[:, None]
        ay1 = tl.load(boxes_ptr + rows * 4 + 1, mask=rmask, other=0.0)[:, None]
        ax2 = tl.load(boxes_ptr + rows * 4 + 2, mask=rmask, other=0.0)[:, None]
        ay2 = tl.load(boxes_ptr + rows * 4 + 3, mask=rmask, other=0.0)[:, None]
        bx1 = tl.load(boxes_ptr + cols * 4 + 0, mask=cmask, other=0.0)[None, :]
        by1 = tl.load(boxes_ptr + cols * 4 + 1, mask=cmask, other=0.0)[None, :]
        bx2 = tl.load(boxes_ptr + cols * 4 + 2, mask=cmask, other=0.0)[None, :]
        by2 = tl.load(boxes_ptr + cols * 4 + 3, mask=cmask, other=0.0)[None, :]
        iou = _iou(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2)
        thr = tl.load(thr_ptr)
        hit = (iou.to(tl.float64) > thr) & (cols[None, :] > rows[:, None]) & cmask[None, :]
        if HAS_CLS:
            ci = tl.load(cls_ptr + rows, mask=rmask, other=0)
            cj = tl.load(cls_ptr + cols, mask=cmask, other=1)
            hit = hit & (ci[:, None] == cj[None, :])
        bit = tl.full([BLOCK], 1, tl.int64) << tl.arange(0, BLOCK).to(tl.int64)
        # Distinct powers of two: their sum is their bitwise OR (int64 wrap-around gives bit 63).
        word = tl.sum(tl.where(hit, bit[None, :], 0), axis=1)
        tl.store(mask_ptr + rows * W + w, word, mask=rmask)


@triton.jit
def nms_gather_kernel(
    mask_ptr, band_ptr, rank_ptr, removed_ptr, keep_ptr, n, W, col_blocks, BLOCK: tl.constexpr, WORDS: tl.constexpr
):
    k_ar = tl.arange(0, BLOCK)
    w_ar = tl.arange(0, WORDS)
    for rb in range(0, col_blocks):
        row0 = tl.cast(rb, tl.int64) * BLOCK  # int64: row * W indexes an [n, W] mask that can pass 2^31 words
        rows = row0 + k_ar.to(tl.int64)
        rmask = rows < n
        rem = tl.load(removed_ptr + rb)
        kept_bits = rem * 0
        # Greedy within the block, in score order: a row is kept unless a kept row (or an earlier block) removed it.
        for k in range(0, BLOCK):
            row = row0 + k
            alive = (((rem >> k) & 1) == 0) & (row < n)
            # a scalar load per step (the diagonal words are few and hot) instead of a cross-thread reduction
            diag_k = tl.load(mask_ptr + row * W, mask=alive, other=0)
            kept_bits = kept_bits | (alive.to(tl.int64) << k)
            rem = rem | diag_k
        kept = ((kept_bits >> k_ar.to(tl.int64)) & 1) != 0
        kept = kept & rmask
        rank = tl.load(rank_ptr + rows, mask=rmask, other=0)
        tl.store(keep_ptr + rank, kept.to(tl.int8), mask=rmask)
        band = tl.load(band_ptr + rb)
        for w0 in range(1, band, WORDS):
            ws = w0 + w_ar
            wmask = ws < band
            tile = tl.load(mask_ptr + rows[:, None] * W + ws[None, :], mask=kept[:, None] & wmask[None, :], other=0)
            acc = tl.reduce(tile, 0, _or)
            old = tl.load(removed_ptr + rb + ws, mask=wmask, other=0)
            tl.store(removed_ptr + rb + ws, old | acc, mask=wmask)
        tl.debug_barrier()  # the next block's row reads `removed` written by other threads


def _nms(boxes: Tensor, scores: Tensor, idxs, iou_threshold: float) -> Tensor:
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    col_blocks = triton.cdiv(n, BLOCK)
    blocks = torch.arange(col_blocks, device=boxes.device)
    if idxs is not None:
        cls, rank = torch.sort(idxs.long()[order], stable=True)
        sorted_order = order[rank]
        last_rows = (blocks * BLOCK + BLOCK - 1).clamp_max(n - 1)
        seg_end = torch.searchsorted(cls, cls[last_rows], right=True)
        band = torch.div(seg_end + BLOCK - 1, BLOCK, rounding_mode="floor") - blocks
        W = int(band.max())  # one sync: sizes the mask
    else:
        cls, rank, sorted_order = order, torch.arange(n, device=boxes.device), order
        band = col_blocks - blocks
        W = col_blocks
    if W > 65535:  # the mask kernel's second grid axis (65535 programs at most on CUDA)
        raise ValueError(
            f"{'batched_nms' if idxs is not None else 'nms'}: at most {65535 * BLOCK} boxes in one class for the "
            f"Triton backend, got {n} boxes"
        )
    ftype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    sorted_boxes = boxes[sorted_order].to(ftype).contiguous()
    thr = torch.tensor([iou_threshold], dtype=torch.float64, device=boxes.device)
    mask = torch.empty((n, W), dtype=torch.int64, device=boxes.device)
    nms_mask_kernel[(col_blocks, W)](
        sorted_boxes, cls, band, thr, mask, n, W, HAS_CLS=idxs is not None, BLOCK=BLOCK, enable_fp_fusion=False
    )
    removed = torch.zeros(col_blocks, dtype=torch.int64, device=boxes.device)
    keep = torch.zeros(n, dtype=torch.int8, device=boxes.device)
    nms_gather_kernel[(1,)](
        mask, band, rank.contiguous(), removed, keep, n, W, col_blocks, BLOCK=BLOCK, WORDS=GATHER_WORDS
    )
    return order[keep.bool()]


@registry.triton_op("nms")
def triton_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    return _nms(boxes, scores, None, iou_threshold)


@registry.triton_op("batched_nms")
def triton_batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    return _nms(boxes, scores, idxs, iou_threshold)


# ---- box_iou --------------------------------------------------------------------------------------------------


@triton.jit
def _load_box(ptr, idx, m):
    """One box coordinate vector each, in float32 (float64 stays float64, so gradcheck can run)."""
    x1 = tl.load(ptr + idx * 4 + 0, mask=m, other=0.0)
    y1 = tl.load(ptr + idx * 4 + 1, mask=m, other=0.0)
    x2 = tl.load(ptr + idx * 4 + 2, mask=m, other=0.0)
    y2 = tl.load(ptr + idx * 4 + 3, mask=m, other=0.0)
    if ptr.dtype.element_ty != tl.float64:
        x1, y1, x2, y2 = x1.to(tl.float32), y1.to(tl.float32), x2.to(tl.float32), y2.to(tl.float32)
    return x1, y1, x2, y2


@triton.jit
def box_iou_kernel(a_ptr, b_ptr, out_ptr, n, m, BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    ax1, ay1, ax2, ay2 = _load_box(a_ptr, rows, rows < n)
    bx1, by1, bx2, by2 = _load_box(b_ptr, cols, cols < m)
    iou = _iou(
        ax1[:, None], ay1[:, None], ax2[:, None], ay2[:, None], bx1[None, :], by1[None, :], bx2[None, :], by2[None, :]
    )
    out_mask = (rows < n)[:, None] & (cols < m)[None, :]
    tl.store(out_ptr + rows[:, None] * m + cols[None, :], iou.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _split(lhs_wins, rhs_wins, g):
    """Gradient of an elementwise max/min to its (lhs, rhs) operands: to the winner, halved on ties."""
    ga = tl.where(lhs_wins, g, tl.where(rhs_wins, 0.0, 0.5 * g))
    gb = tl.where(rhs_wins, g, tl.where(lhs_wins, 0.0, 0.5 * g))
    return ga, gb


@triton.jit
def _iou_grads(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2, g):
    """d iou * g w.r.t. both boxes, as csrc/ops/common/box_iou.h's box_iou_pair_backward."""
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    w_raw = tl.where(ax2 < bx2, ax2, bx2) - tl.where(ax1 > bx1, ax1, bx1)
    h_raw = tl.where(ay2 < by2, ay2, by2) - tl.where(ay1 > by1, ay1, by1)
    w = tl.where(w_raw > 0, w_raw, 0.0)
    h = tl.where(h_raw > 0, h_raw, 0.0)
    inter = w * h
    uni = area_a + area_b - inter
    g_inter = g * (uni + inter) / (uni * uni)
    g_area = -g * inter / (uni * uni)
    g_w = tl.where(w_raw > 0, g_inter * h, 0.0)
    g_h = tl.where(h_raw > 0, g_inter * w, 0.0)
    gax2, gbx2 = _split(ax2 < bx2, bx2 < ax2, g_w)
    gay2, gby2 = _split(ay2 < by2, by2 < ay2, g_h)
    gax1, gbx1 = _split(ax1 > bx1, bx1 > ax1, -g_w)
    gay1, gby1 = _split(ay1 > by1, by1 > ay1, -g_h)
    gax1 -= g_area * (ay2 - ay1)
    gax2 += g_area * (ay2 - ay1)
    gay1 -= g_area * (ax2 - ax1)
    gay2 += g_area * (ax2 - ax1)
    gbx1 -= g_area * (by2 - by1)
    gbx2 += g_area * (by2 - by1)
    gby1 -= g_area * (bx2 - bx1)
    gby2 += g_area * (bx2 - bx1)
    return gax1, gay1, gax2, gay2, gbx1, gby1, gbx2, gby2


@triton.jit
def box_iou_backward_kernel(
    grad_ptr, own_ptr, other_ptr, out_ptr, n, m, OWN_IS_FIRST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr
):
    """Gradient for a block of `own` boxes, summed over all `other` boxes (each program owns its rows)."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rmask = rows < n
    px1, py1, px2, py2 = _load_box(own_ptr, rows, rmask)
    acc0 = tl.zeros_like(px1)
    acc1 = tl.zeros_like(px1)
    acc2 = tl.zeros_like(px1)
    acc3 = tl.zeros_like(px1)
    px1, py1, px2, py2 = px1[:, None], py1[:, None], px2[:, None], py2[:, None]
    for c0 in range(0, m, BN):
        cols = c0 + tl.arange(0, BN).to(tl.int64)
        cmask = cols < m
        qx1, qy1, qx2, qy2 = _load_box(other_ptr, cols, cmask)
        qx1, qy1, qx2, qy2 = qx1[None, :], qy1[None, :], qx2[None, :], qy2[None, :]
        both = rmask[:, None] & cmask[None, :]
        if OWN_IS_FIRST:
            g = tl.load(grad_ptr + rows[:, None] * m + cols[None, :], mask=both, other=0.0).to(px1.dtype)
            g0, g1, g2, g3, _0, _1, _2, _3 = _iou_grads(px1, py1, px2, py2, qx1, qy1, qx2, qy2, g)
        else:
            g = tl.load(grad_ptr + cols[None, :] * n + rows[:, None], mask=both, other=0.0).to(px1.dtype)
            _0, _1, _2, _3, g0, g1, g2, g3 = _iou_grads(qx1, qy1, qx2, qy2, px1, py1, px2, py2, g)
        acc0 += tl.sum(tl.where(both, g0, 0.0), axis=1)
        acc1 += tl.sum(tl.where(both, g1, 0.0), axis=1)
        acc2 += tl.sum(tl.where(both, g2, 0.0), axis=1)
        acc3 += tl.sum(tl.where(both, g3, 0.0), axis=1)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + rows * 4 + 0, acc0.to(ty), mask=rmask)
    tl.store(out_ptr + rows * 4 + 1, acc1.to(ty), mask=rmask)
    tl.store(out_ptr + rows * 4 + 2, acc2.to(ty), mask=rmask)
    tl.store(out_ptr + rows * 4 + 3, acc3.to(ty), mask=rmask)


BM, BN = 32, 32


@registry.triton_op("box_iou")
def triton_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    a, b = boxes1.contiguous(), boxes2.contiguous()
    n, m = a.shape[0], b.shape[0]
    if triton.cdiv(m, BN) > 65535:  # the second grid axis (65535 programs at most on CUDA)
        raise ValueError(f"box_iou: boxes2 must have at most {65535 * BN} boxes for the Triton backend, got {m}")
    out = torch.empty((n, m), dtype=a.dtype, device=a.device)
    if out.numel():
        box_iou_kernel[(triton.cdiv(n, BM), triton.cdiv(m, BN))](a, b, out, n, m, BM=BM, BN=BN)
    return out


@registry.triton_op("box_iou", backward=True)
def triton_box_iou_backward(grad: Tensor, boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    g, a, b = grad.contiguous(), boxes1.contiguous(), boxes2.contiguous()
    n, m = a.shape[0], b.shape[0]
    ga, gb = torch.zeros_like(a), torch.zeros_like(b)
    if g.numel():
        box_iou_backward_kernel[(triton.cdiv(n, BM),)](g, a, b, ga, n, m, OWN_IS_FIRST=True, BM=BM, BN=BN)
        box_iou_backward_kernel[(triton.cdiv(m, BM),)](g, b, a, gb, m, n, OWN_IS_FIRST=False, BM=BM, BN=BN)
    return ga, gb


def compile_specs():
    """(kernel, signature, constexprs) of every kernel here, for the sm_90 compile check in CI."""
    f32 = {
        "boxes_ptr": "*fp32",
        "cls_ptr": "*i64",
        "band_ptr": "*i64",
        "thr_ptr": "*fp64",
        "mask_ptr": "*i64",
        "n": "i32",
        "W": "i32",
        "HAS_CLS": "constexpr",
        "BLOCK": "constexpr",
    }
    gather = {
        "mask_ptr": "*i64",
        "band_ptr": "*i64",
        "rank_ptr": "*i64",
        "removed_ptr": "*i64",
        "keep_ptr": "*i8",
        "n": "i32",
        "W": "i32",
        "col_blocks": "i32",
        "BLOCK": "constexpr",
        "WORDS": "constexpr",
    }
    iou = {
        "a_ptr": "*fp32",
        "b_ptr": "*fp32",
        "out_ptr": "*fp32",
        "n": "i32",
        "m": "i32",
        "BM": "constexpr",
        "BN": "constexpr",
    }
    bwd = {
        "grad_ptr": "*fp32",
        "own_ptr": "*fp32",
        "other_ptr": "*fp32",
        "out_ptr": "*fp32",
        "n": "i32",
        "m": "i32",
        "OWN_IS_FIRST": "constexpr",
        "BM": "constexpr",
        "BN": "constexpr",
    }
    return [
        (nms_mask_kernel, f32, {"HAS_CLS": 1, "BLOCK": BLOCK}),
        (nms_mask_kernel, {**f32, "boxes_ptr": "*fp64"}, {"HAS_CLS": 0, "BLOCK": BLOCK}),
        (nms_gather_kernel, gather, {"BLOCK": BLOCK, "WORDS": GATHER_WORDS}),
        (box_iou_kernel, iou, {"BM": BM, "BN": BN}),
        (box_iou_kernel, {**iou, "a_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16"}, {"BM": BM, "BN": BN}),
        (box_iou_backward_kernel, bwd, {"OWN_IS_FIRST": 1, "BM": BM, "BN": BN}),
        (box_iou_backward_kernel, bwd, {"OWN_IS_FIRST": 0, "BM": BM, "BN": BN}),
        (
            box_iou_backward_kernel,
            {k: v.replace("fp32", "fp64") for k, v in bwd.items()},
            {"OWN_IS_FIRST": 1, "BM": BM, "BN": BN},
        ),
    ]
