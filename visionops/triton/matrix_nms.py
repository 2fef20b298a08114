"""Triton Matrix NMS (math: visionops/reference/nms.py matrix_nms; host steps as csrc/ops/common/matrix_nms.h).

The inputs are ordered label-major, by decreasing score within a label, and start[j] is the first position of j's
label: pairs (i, j) with start[j] <= i < j are the same-label, higher-scored ones. One program per BLOCK_J positions
j walks the rows i from the label start of its first position in [BLOCK_I, BLOCK_J] tiles, two launches of one
kernel: comp (column maxima of IoU), then decay (column minima of f(iou) / f(comp_i), capped at 1). Box IoU uses
visionops/triton/nms.py's formula in the boxes' opmath type; mask IoU reads the intersections (a matmul of the
flattened masks per label) and the areas. f, the ratios and the decayed scores are float64, as in the C++ kernels.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from visionops import _registry as registry
from visionops.triton._math import div_rn
from visionops.triton.nms import _iou

BLOCK_I = 32
BLOCK_J = 64


@triton.jit
def matrix_nms_kernel(
    src_ptr,  # boxes: [4, n] coordinate planes (opmath); masks: [n, n] float32 intersections
    area_ptr,  # masks: [n] float32 areas (boxes: unused)
    start_ptr,  # [n] int64 first position of each position's label
    params_ptr,  # [1] float64 sigma
    fcomp_ptr,  # [n] float64 f(comp_i): written by the comp pass, read by the decay pass
    decay_ptr,  # [n] float64 decay_j
    n,
    MASKS: tl.constexpr,
    GAUSSIAN: tl.constexpr,
    DECAY: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    first = tl.program_id(0).to(tl.int64) * BLOCK_J
    j = first + tl.arange(0, BLOCK_J)
    jm = j < n
    sj = tl.load(start_ptr + j, mask=jm, other=n)
    last = tl.minimum(first + BLOCK_J, n) - 1  # rows i < last suffice: i < j <= last
    lo = tl.load(start_ptr + first)
    sigma = tl.load(params_ptr)
    if MASKS:
        area_j = tl.load(area_ptr + j, mask=jm, other=0.0)
    else:
        bx1 = tl.load(src_ptr + j, mask=jm, other=0.0)[None, :]
        by1 = tl.load(src_ptr + n + j, mask=jm, other=0.0)[None, :]
        bx2 = tl.load(src_ptr + 2 * n + j, mask=jm, other=0.0)[None, :]
        by2 = tl.load(src_ptr + 3 * n + j, mask=jm, other=0.0)[None, :]
    comp = tl.zeros([BLOCK_J], dtype=tl.float64)
    d = tl.full([BLOCK_J], 1.0, dtype=tl.float64)
    for i0 in range(lo, last, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        im = i < last
        valid = im[:, None] & (i[:, None] >= sj[None, :]) & (i[:, None] < j[None, :])
        if MASKS:
            inter = tl.load(src_ptr + i[:, None] * n + j[None, :], mask=valid, other=0.0)
            area_i = tl.load(area_ptr + i, mask=im, other=0.0)
            iou = div_rn(inter, (area_i[:, None] + area_j[None, :]) - inter)
        else:
            ax1 = tl.load(src_ptr + i, mask=im, other=0.0)[:, None]
            ay1 = tl.load(src_ptr + n + i, mask=im, other=0.0)[:, None]
            ax2 = tl.load(src_ptr + 2 * n + i, mask=im, other=0.0)[:, None]
            ay2 = tl.load(src_ptr + 3 * n + i, mask=im, other=0.0)[:, None]
            iou = _iou(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2)
        x = tl.where(valid & (iou > 0), iou, 0.0).to(tl.float64)  # NaN and -0 count as 0
        if DECAY:
            if GAUSSIAN:
                f = tl.exp(-(sigma * (x * x)))
            else:
                f = 1.0 - x
            fi = tl.load(fcomp_ptr + i, mask=im, other=1.0)
            r = f / fi[:, None]
            # zero IoUs give ratios >= 1 (or inf, NaN for f(comp_i) = 0): none of them lowers the capped minimum
            d = tl.minimum(d, tl.min(tl.where(r < 1.0, r, 1.0), 0))
        else:
            comp = tl.maximum(comp, tl.max(x, 0))
    if DECAY:
        tl.store(decay_ptr + j, d, mask=jm)
    else:
        if GAUSSIAN:
            fc = tl.exp(-(sigma * (comp * comp)))
        else:
            fc = 1.0 - comp
        tl.store(fcomp_ptr + j, fc, mask=jm)


@registry.triton_op("matrix_nms")
def triton_matrix_nms(
    boxes_or_masks: Tensor,
    scores: Tensor,
    labels: Tensor,
    kernel: str,
    sigma: float,
    score_threshold: float,
    max_num: int,
) -> tuple[Tensor, Tensor]:
    n = scores.shape[0]
    device = scores.device
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=device), scores.new_empty(0)
    order = torch.sort(scores, descending=True, stable=True).indices
    ranked_labels = labels[order].long()
    rank = torch.sort(ranked_labels, stable=True).indices
    perm = order[rank]  # label-major, by decreasing score within a label
    lab = ranked_labels[rank]
    pos = torch.arange(n, device=device)
    first = torch.where(torch.cat([lab.new_ones(1, dtype=torch.bool), lab[1:] != lab[:-1]]), pos, 0)
    start = torch.cummax(first, 0).values.contiguous()
    masks = boxes_or_masks.dim() == 3
    if masks:
        flat = boxes_or_masks[perm].reshape(n, -1).float()
        src = torch.empty(n, n, dtype=torch.float32, device=device)
        g0 = 0
        for c in torch.unique_consecutive(lab, return_counts=True)[1].tolist():
            if c > 1:  # only the diagonal blocks (same label) are read: one matmul per label
                src[g0 : g0 + c, g0 : g0 + c] = flat[g0 : g0 + c] @ flat[g0 : g0 + c].T
            g0 += c
        area = flat.sum(1).contiguous()
    else:
        b = boxes_or_masks[perm]
        src = b.to(torch.float64 if b.dtype == torch.float64 else torch.float32).T.contiguous()
        area = src  # unused
    params = torch.tensor([sigma], dtype=torch.float64, device=device)
    fcomp = torch.empty(n, dtype=torch.float64, device=device)
    decay = torch.empty_like(fcomp)
    grid = (triton.cdiv(n, BLOCK_J),)
    for decay_pass in (False, True):
        matrix_nms_kernel[grid](
            src,
            area,
            start,
            params,
            fcomp,
            decay,
            n,
            MASKS=masks,
            GAUSSIAN=kernel == "gaussian",
            DECAY=decay_pass,
            BLOCK_I=BLOCK_I,
            BLOCK_J=BLOCK_J,
        )
    decayed = scores[perm].double() * decay
    by_rank = torch.empty_like(decayed).index_copy_(0, rank, decayed)  # rank order: ties keep it
    sel = torch.nonzero(by_rank >= score_threshold).flatten()
    best = torch.sort(by_rank[sel], descending=True, stable=True).indices
    if max_num >= 0:
        best = best[:max_num]
    sel = sel[best]
    return order[sel], by_rank[sel].to(scores.dtype)


def compile_specs():
    """(kernel, signature, constexprs) of every kernel here, for the sm_90 compile check in CI."""
    sig = {
        "src_ptr": "*fp32",
        "area_ptr": "*fp32",
        "start_ptr": "*i64",
        "params_ptr": "*fp64",
        "fcomp_ptr": "*fp64",
        "decay_ptr": "*fp64",
        "n": "i64",
        "MASKS": "constexpr",
        "GAUSSIAN": "constexpr",
        "DECAY": "constexpr",
        "BLOCK_I": "constexpr",
        "BLOCK_J": "constexpr",
    }
    blocks = {"BLOCK_I": BLOCK_I, "BLOCK_J": BLOCK_J}
    specs = [
        (matrix_nms_kernel, sig, {"MASKS": m, "GAUSSIAN": g, "DECAY": d, **blocks})
        for m in (False, True)
        for g in (False, True)
        for d in (False, True)
    ]
    specs.append(
        (
            matrix_nms_kernel,
            {**sig, "src_ptr": "*fp64", "area_ptr": "*fp64"},
            {"MASKS": False, "GAUSSIAN": True, "DECAY": True, **blocks},
        )
    )
    return specs
