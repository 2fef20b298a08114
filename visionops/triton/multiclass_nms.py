"""Triton fixed-shape multiclass NMS (definition: visionops/reference/nms.py, multiclass_nms; the same pipeline as
csrc/ops/cuda/multiclass_nms_kernel.cu).

ATen sorts every segment's masked scores (a segment is an (image, class), or an image when class-agnostic; scores at
or below the threshold become -inf, so a segment's candidates are the head of its order, by decreasing score, ties by
class-major position). One Triton program per segment walks its candidates: each is tested against the boxes kept so
far, streamed in BLOCK-sized chunks from a scratch list, and the walk stops once the segment has accepted its
limit (max_per_class; max_total when class-agnostic, where a per-class counter in registers applies the class cap
while every kept box keeps suppressing). A fixed-size ATen sort then merges the per-class survivors. Nothing reads
a device value on the host: every shape follows from the input shapes and max_total.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from visionops import _registry as registry
from visionops.triton.nms import _iou

BLOCK = 64  # kept boxes tested per step


@triton.jit
def mcnms_walk_kernel(
    order_ptr,  # [S, L] int64: each segment's positions by decreasing score
    count_ptr,  # [S] int64: its candidates (the head of its order)
    boxes_ptr,  # contiguous [B, N, 4] or [B, N, C, 4], opmath type
    thr_ptr,  # [1] float64 iou_threshold
    kept_ptr,  # [S, KCAP, 4] scratch: the boxes kept so far
    sel_ptr,  # [S, OUT] int64: accepted candidates as class-major flat indices c * N + n
    sel_count_ptr,  # [S] int64
    L,
    N,
    C,
    KCAP,
    OUT,
    max_per_class,
    AGNOSTIC: tl.constexpr,
    SHARED_BOXES: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    cnt = tl.load(count_ptr + s)
    thr = tl.load(thr_ptr)
    ar = tl.arange(0, BLOCK)
    ar_c = tl.arange(0, BLOCK_C)
    per_class = tl.zeros([BLOCK_C], dtype=tl.int64)  # accepted per class (class-agnostic walk)
    if AGNOSTIC:
        img = s
    else:
        img = s // C
    i = cnt * 0
    nk = cnt * 0
    acc = cnt * 0
    while (i < cnt) & (acc < OUT):
        p = tl.load(order_ptr + s * L + i)
        if AGNOSTIC:
            c = p // N
            n = p % N
        else:
            c = s % C
            n = p
        if SHARED_BOXES:
            off = (img * N + n) * 4
        else:
            off = ((img * N + n) * C + c) * 4
        bx1 = tl.load(boxes_ptr + off + 0)
        by1 = tl.load(boxes_ptr + off + 1)
        bx2 = tl.load(boxes_ptr + off + 2)
        by2 = tl.load(boxes_ptr + off + 3)
        hits = cnt * 0
        for k0 in range(0, nk, BLOCK):
            k = k0 + ar
            m = k < nk
            row = kept_ptr + (s * KCAP + k) * 4
            kx1 = tl.load(row + 0, mask=m, other=0.0)
            ky1 = tl.load(row + 1, mask=m, other=0.0)
            kx2 = tl.load(row + 2, mask=m, other=0.0)
            ky2 = tl.load(row + 3, mask=m, other=0.0)
            iou = _iou(kx1, ky1, kx2, ky2, bx1, by1, bx2, by2)  # the kept box first, as nms
            hits += tl.sum(((iou.to(tl.float64) > thr) & m).to(tl.int64), 0)
        keep = hits == 0
        dst = kept_ptr + (s * KCAP + nk) * 4
        tl.store(dst + 0, bx1, mask=keep)
        tl.store(dst + 1, by1, mask=keep)
        tl.store(dst + 2, bx2, mask=keep)
        tl.store(dst + 3, by2, mask=keep)
        tl.debug_barrier()  # the next candidate's chunks read this row, written by another thread
        nk += keep.to(tl.int64)
        if AGNOSTIC:
            # a kept box past its class's cap is not output but still suppresses later candidates
            mine = ar_c == c
            take = keep & (tl.sum(tl.where(mine, per_class, 0), 0) < max_per_class)
            per_class = tl.where(mine & take, per_class + 1, per_class)
        else:
            take = keep
        tl.store(sel_ptr + s * OUT + acc, c * N + n, mask=take)
        acc += take.to(tl.int64)
        i += 1
    tl.store(sel_count_ptr + s, acc)


def _walk(boxes, scores, iou_threshold, score_threshold, max_per_class, max_total, class_agnostic):
    """(sel [S, OUT] flat indices c * N + n, sel_count [S]) of every segment's accepted candidates in score order."""
    batch, n, c = scores.shape
    dev = scores.device
    ftype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    valid = scores > score_threshold  # [B, N, C], compared in the scores' dtype (as the reference)
    keys = torch.where(valid, scores, float("-inf")).transpose(1, 2)  # [B, C, N]: class-major
    if class_agnostic:
        segments, length, out = batch, c * n, max_total
        keys, count = keys.reshape(batch, c * n), valid.sum((1, 2))
        kcap = length
    else:
        segments, length, out = batch * c, n, min(max_per_class, n)
        keys, count = keys.reshape(batch * c, n), valid.sum(1).reshape(-1)
        kcap = out
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices.contiguous()
    thr = torch.full((1,), iou_threshold, dtype=torch.float64, device=dev)  # a fill: no host-to-device copy
    kept = torch.empty((segments, kcap, 4), dtype=ftype, device=dev)
    sel = torch.empty((segments, out), dtype=torch.long, device=dev)
    sel_count = torch.empty(segments, dtype=torch.long, device=dev)
    mcnms_walk_kernel[(segments,)](
        order,
        count.contiguous(),
        boxes.to(ftype).contiguous(),
        thr,
        kept,
        sel,
        sel_count,
        length,
        n,
        c,
        kcap,
        out,
        max_per_class,
        AGNOSTIC=class_agnostic,
        SHARED_BOXES=boxes.dim() == 3,
        BLOCK=BLOCK,
        BLOCK_C=triton.next_power_of_2(c) if class_agnostic else 1,
        enable_fp_fusion=False,
    )
    return sel, sel_count


@registry.triton_op("multiclass_nms")
def triton_multiclass_nms(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    score_threshold: float,
    max_per_class: int,
    max_total: int,
    class_agnostic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, n, c = scores.shape
    dev = scores.device
    if scores.numel() == 0:
        return (
            boxes.new_zeros((batch, max_total, 4)),
            scores.new_zeros((batch, max_total)),
            torch.full((batch, max_total), -1, dtype=torch.long, device=dev),
            torch.zeros(batch, dtype=torch.long, device=dev),
        )
    sel, sel_count = _walk(boxes, scores, iou_threshold, score_threshold, max_per_class, max_total, class_agnostic)
    flat_scores = scores.reshape(batch, n * c)
    if class_agnostic:
        f, num = sel, sel_count
    else:
        # merge: the C x max_per_class survivors of an image, a fixed-size stable sort (ties: class, then rank)
        out = sel.shape[1]
        ok = (torch.arange(out, device=dev) < sel_count[:, None]).reshape(batch, c * out)
        f = torch.where(ok, sel.reshape(batch, c * out), 0)
        key = torch.where(ok, flat_scores.gather(1, (f % n) * c + f // n), float("-inf"))
        f = f.gather(1, torch.sort(key, dim=1, descending=True, stable=True).indices[:, :max_total])
        if f.shape[1] < max_total:
            f = torch.nn.functional.pad(f, (0, max_total - f.shape[1]))
        num = sel_count.reshape(batch, c).sum(1).clamp(max=max_total)
    valid = torch.arange(max_total, device=dev) < num[:, None]
    f = torch.where(valid, f, 0)
    cls, idx = f // n, f % n
    rows = idx if boxes.dim() == 3 else idx * c + cls
    out_boxes = boxes.reshape(batch, -1, 4).gather(1, rows[..., None].expand(-1, -1, 4))
    out_scores = flat_scores.gather(1, idx * c + cls)
    return (
        torch.where(valid[..., None], out_boxes, 0),
        torch.where(valid, out_scores, 0),
        torch.where(valid, cls, -1),
        num,
    )


def compile_specs():
    """(kernel, signature, constexprs) of every kernel here, for the sm_90 compile check in CI."""
    sig = {
        "order_ptr": "*i64",
        "count_ptr": "*i64",
        "boxes_ptr": "*fp32",
        "thr_ptr": "*fp64",
        "kept_ptr": "*fp32",
        "sel_ptr": "*i64",
        "sel_count_ptr": "*i64",
        "L": "i64",
        "N": "i64",
        "C": "i64",
        "KCAP": "i64",
        "OUT": "i64",
        "max_per_class": "i64",
        "AGNOSTIC": "constexpr",
        "SHARED_BOXES": "constexpr",
        "BLOCK": "constexpr",
        "BLOCK_C": "constexpr",
    }
    f64 = {**sig, "boxes_ptr": "*fp64", "kept_ptr": "*fp64"}
    return [
        (mcnms_walk_kernel, sig, {"AGNOSTIC": False, "SHARED_BOXES": True, "BLOCK": BLOCK, "BLOCK_C": 1}),
        (mcnms_walk_kernel, sig, {"AGNOSTIC": True, "SHARED_BOXES": False, "BLOCK": BLOCK, "BLOCK_C": 128}),
        (mcnms_walk_kernel, f64, {"AGNOSTIC": True, "SHARED_BOXES": True, "BLOCK": BLOCK, "BLOCK_C": 128}),
    ]
