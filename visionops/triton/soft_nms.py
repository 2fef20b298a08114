"""Triton soft-NMS: soft_nms and batched_soft_nms (math: visionops/reference/nms.py, csrc/ops/common/soft_nms.h).

One program per class (one for soft_nms) loops over the selections: each step streams the compact list of alive
boxes in BLOCK-sized chunks, decays their scores by the kept box, writes the survivors to the other half of a
ping-pong list (order kept: an exclusive cumsum per chunk) and finds the next maximum on the way (ties: the lowest
input index). The decay method is a tl.constexpr. IoU uses visionops/triton/nms.py's formula in the boxes' opmath
type without FMA contraction; weights, scores and comparisons are float64, so results match the C++ kernels.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from visionops import _registry as registry
from visionops.triton.nms import _iou

BLOCK = 128


@triton.jit
def _weight(iou, iou_threshold, sigma, METHOD: tl.constexpr):
    if METHOD == 0:  # hard
        w = tl.where(iou > iou_threshold, 0.0, 1.0).to(tl.float64)
    elif METHOD == 1:  # linear
        w = tl.where(iou > iou_threshold, 1.0 - iou, 1.0)
    else:  # gaussian: exp(-0) is exactly 1
        w = tl.where(iou == 0.0, 1.0, tl.exp(-(iou * iou) / sigma))
    return w


@triton.jit
def _better(best_s, best_p, s, p, alive):
    """The running maximum (score, position) updated with a chunk: highest score, ties to the lowest position."""
    cand = tl.where(alive, s, float("-inf"))
    cm = tl.max(cand, 0)
    cp = tl.min(tl.where(alive & (s == cm), p.to(tl.int64), 2**62), 0)
    found = tl.max(alive.to(tl.int32), 0) > 0
    take = found & ((best_p < 0) | (cm > best_s) | ((cm == best_s) & (cp < best_p)))
    return tl.where(take, cm, best_s), tl.where(take, cp, best_p)


@triton.jit
def soft_nms_kernel(
    boxes_ptr,  # [n, 4] opmath, class-major (input order within a class)
    scores_ptr,  # [n] float64, same order
    starts_ptr,  # [classes + 1] int64: class c holds rows [starts[c], starts[c + 1])
    params_ptr,  # float64 (iou_threshold, sigma, score_threshold)
    work_ptr,  # [n] float64 current scores
    list_ptr,  # [2n] int64 ping-pong lists of alive rows
    out_pos_ptr,  # [n] int64: class c's kept rows at [starts[c], starts[c] + count[c]), in selection order
    out_score_ptr,  # [n] float64 their scores at selection
    count_ptr,  # [classes] int64
    n,
    METHOD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    seg = tl.program_id(0)
    start = tl.load(starts_ptr + seg)
    end = tl.load(starts_ptr + seg + 1)
    iou_threshold = tl.load(params_ptr)
    sigma = tl.load(params_ptr + 1)
    score_threshold = tl.load(params_ptr + 2)
    ar = tl.arange(0, BLOCK)
    best_s = tl.load(params_ptr) * 0.0
    best_p = start * 0 - 1
    m = start * 0
    for c in range(start, end, BLOCK):
        p = (c + ar).to(tl.int64)
        valid = p < end
        s = tl.load(scores_ptr + p, mask=valid, other=0.0)
        alive = valid & (s >= score_threshold)
        tl.store(work_ptr + p, s, mask=valid)
        slot = tl.cumsum(alive.to(tl.int64), 0) - 1
        tl.store(list_ptr + start + m + slot, p, mask=alive)
        best_s, best_p = _better(best_s, best_p, s, p, alive)
        m += tl.sum(alive.to(tl.int64), 0)
    k = start * 0
    parity = start * 0
    while m > 0:
        tl.debug_barrier()  # the previous step's list and scores, written by other threads
        kp = best_p
        tl.store(out_pos_ptr + start + k, kp)
        tl.store(out_score_ptr + start + k, best_s)
        k += 1
        kx1 = tl.load(boxes_ptr + kp * 4 + 0)
        ky1 = tl.load(boxes_ptr + kp * 4 + 1)
        kx2 = tl.load(boxes_ptr + kp * 4 + 2)
        ky2 = tl.load(boxes_ptr + kp * 4 + 3)
        src = list_ptr + parity * n + start
        dst = list_ptr + (1 - parity) * n + start
        best_s = best_s * 0.0
        best_p = start * 0 - 1
        new_m = start * 0
        for c in range(0, m, BLOCK):
            j = c + ar
            valid = j < m
            p = tl.load(src + j, mask=valid, other=0)
            bx1 = tl.load(boxes_ptr + p * 4 + 0, mask=valid, other=0.0)
            by1 = tl.load(boxes_ptr + p * 4 + 1, mask=valid, other=0.0)
            bx2 = tl.load(boxes_ptr + p * 4 + 2, mask=valid, other=0.0)
            by2 = tl.load(boxes_ptr + p * 4 + 3, mask=valid, other=0.0)
            iou = _iou(kx1, ky1, kx2, ky2, bx1, by1, bx2, by2).to(tl.float64)
            s = tl.load(work_ptr + p, mask=valid, other=0.0) * _weight(iou, iou_threshold, sigma, METHOD)
            alive = valid & (p != kp) & (s >= score_threshold)
            tl.store(work_ptr + p, s, mask=alive)
            slot = tl.cumsum(alive.to(tl.int64), 0) - 1
            tl.store(dst + new_m + slot, p, mask=alive)
            best_s, best_p = _better(best_s, best_p, s, p, alive)
            new_m += tl.sum(alive.to(tl.int64), 0)
        m = new_m
        parity = 1 - parity
    tl.store(count_ptr + seg, k)


def _run(boxes: Tensor, scores: Tensor, idxs, params, method: int):
    """(order, out_pos, out_score, counts, starts) for the classes of idxs (one class when None)."""
    n, dev = boxes.shape[0], boxes.device
    if idxs is None:
        order = torch.arange(n, device=dev)
        starts = torch.tensor([0, n], dtype=torch.long, device=dev)
    else:
        cls, order = torch.sort(idxs.long(), stable=True)  # class-major, input order within a class
        _, counts = torch.unique_consecutive(cls, return_counts=True)
        starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    classes = starts.numel() - 1
    ftype = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    rows = boxes[order].to(ftype).contiguous()
    s = scores[order].to(torch.float64).contiguous()
    p = torch.tensor(params, dtype=torch.float64, device=dev)
    work = torch.empty(n, dtype=torch.float64, device=dev)
    lists = torch.empty(2 * n, dtype=torch.long, device=dev)
    out_pos = torch.empty(n, dtype=torch.long, device=dev)
    out_score = torch.empty(n, dtype=torch.float64, device=dev)
    count = torch.zeros(classes, dtype=torch.long, device=dev)
    args = (rows, s, starts, p, work, lists, out_pos, out_score, count, n)
    soft_nms_kernel[(classes,)](*args, METHOD=method, BLOCK=BLOCK, enable_fp_fusion=False)
    return order, out_pos, out_score, count, starts


@registry.triton_op("soft_nms")
def triton_soft_nms(
    boxes: Tensor, scores: Tensor, iou_threshold: float, sigma: float, score_threshold: float, method: int
) -> tuple[Tensor, Tensor]:
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device), scores.new_empty(0)
    order, pos, s, count, _ = _run(boxes, scores, None, (iou_threshold, sigma, score_threshold), method)
    k = int(count[0])  # one sync: the output size
    return order[pos[:k]], s[:k].to(scores.dtype)


@registry.triton_op("batched_soft_nms")
def triton_batched_soft_nms(
    boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, sigma: float, score_threshold: float, method: int
) -> tuple[Tensor, Tensor]:
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device), scores.new_empty(0)
    order, pos, s, count, starts = _run(boxes, scores, idxs, (iou_threshold, sigma, score_threshold), method)
    slot = torch.arange(n, device=boxes.device)
    cls = torch.searchsorted(starts, slot, right=True) - 1
    rank = slot - starts[cls]
    sel = torch.nonzero(rank < count[cls]).flatten()  # class-major, selection order within a class
    rank, s = rank[sel], s[sel]
    by_rank = torch.sort(rank, stable=True).indices  # (rank, class)
    final = by_rank[torch.sort(s[by_rank], descending=True, stable=True).indices]  # (score desc, rank, class)
    return order[pos[sel[final]]], s[final].to(scores.dtype)


def compile_specs():
    """(kernel, signature, constexprs) of every kernel here, for the sm_90 compile check in CI."""
    sig = {
        "boxes_ptr": "*fp32",
        "scores_ptr": "*fp64",
        "starts_ptr": "*i64",
        "params_ptr": "*fp64",
        "work_ptr": "*fp64",
        "list_ptr": "*i64",
        "out_pos_ptr": "*i64",
        "out_score_ptr": "*fp64",
        "count_ptr": "*i64",
        "n": "i64",
        "METHOD": "constexpr",
        "BLOCK": "constexpr",
    }
    return [(soft_nms_kernel, sig, {"METHOD": m, "BLOCK": BLOCK}) for m in (0, 1, 2)] + [
        (soft_nms_kernel, {**sig, "boxes_ptr": "*fp64"}, {"METHOD": 2, "BLOCK": BLOCK})
    ]
