"""Reference NMS family (pure PyTorch). Kernels cite these formulas.

IoU of boxes a, b given as (x1, y1, x2, y2), evaluated in float32 for half inputs (float64 stays float64)::

    inter = max(0, min(x2a, x2b) - max(x1a, x1b)) * max(0, min(y2a, y2b) - max(y1a, y1b))
    iou   = inter / (area_a + area_b - inter),  area = (x2 - x1) * (y2 - y1)

Greedy NMS visits boxes by decreasing score (stable for ties) and drops a box when its IoU with an already kept
box is > iou_threshold (compared in float64, as torchvision's CPU kernel compares with a double threshold).
"""

import torch
from torch import Tensor


def _opmath(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _pair_iou(kept: Tensor, others: Tensor) -> Tensor:
    """IoU of one box `kept` [4] with `others` [M, 4], kept box as the first operand (torchvision's order)."""
    xx1 = torch.maximum(kept[0], others[:, 0])
    yy1 = torch.maximum(kept[1], others[:, 1])
    xx2 = torch.minimum(kept[2], others[:, 2])
    yy2 = torch.minimum(kept[3], others[:, 3])
    inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
    area_k = (kept[2] - kept[0]) * (kept[3] - kept[1])
    area_o = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / (area_k + area_o - inter)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS, O(N * kept); returns int64 indices of kept boxes by decreasing score."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = _opmath(boxes)[order]
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        iou = _pair_iou(b[i], b[i + 1 :]).double()
        suppressed[i + 1 :] |= iou > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS run independently per value of idxs (a loop over classes: exact for any coordinates and class ids)."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    keep = []
    for c in torch.unique(idxs):
        members = torch.nonzero(idxs == c).flatten()
        keep.append(members[nms(boxes[members], scores[members], iou_threshold)])
    keep = torch.sort(torch.cat(keep)).values  # input order first, so ties keep it (as torchvision's stable sort)
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU [N, M], differentiable; computed in float32 for half inputs and returned in the input dtype."""
    a, b = _opmath(boxes1), _opmath(boxes2)
    area1 = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area2 = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return (inter / (area1[:, None] + area2[None, :] - inter)).to(boxes1.dtype)


# ---- soft-NMS ---------------------------------------------------------------------------------------------------

SOFT_NMS_METHODS = {"hard": 0, "linear": 1, "gaussian": 2}  # the schema's int (mmcv's numbering; mmcv: "naive")


def _soft_nms_method(method) -> int:
    return SOFT_NMS_METHODS[method] if isinstance(method, str) else int(method)


def _soft_nms_weight(iou: Tensor, method: int, iou_threshold: float, sigma: float) -> Tensor:
    if method == 0:  # hard: plain NMS (the score becomes 0)
        return torch.where(iou > iou_threshold, 0.0, 1.0).to(iou)
    if method == 1:  # linear
        return torch.where(iou > iou_threshold, 1 - iou, 1.0)
    return torch.exp(-(iou * iou) / sigma)  # gaussian (iou_threshold unused)


def _soft_nms_scores(boxes, scores, iou_threshold, sigma, score_threshold, method):
    """Soft-NMS returning (keep, float64 scores at selection), for soft_nms and batched_soft_nms."""
    method = _soft_nms_method(method)
    b = _opmath(boxes)
    s = scores.detach().to(torch.float64).clone()
    alive = s >= score_threshold  # boxes starting below the threshold are never kept (NaN scores neither)
    keep, kept = [], []
    while bool(alive.any()):
        idx = torch.nonzero(alive).flatten()  # increasing input index
        sa = s[idx]
        i = int(idx[int(torch.nonzero(sa == sa.max())[0, 0])])  # highest score, ties: lowest input index
        keep.append(i)
        kept.append(s[i].clone())
        alive[i] = False
        others = idx[idx != i]
        iou = _pair_iou(b[i], b[others]).double()  # IoU in the boxes' opmath type, weight and scores in float64
        s[others] = s[others] * _soft_nms_weight(iou, method, iou_threshold, sigma)
        alive[others] = s[others] >= score_threshold
    device = boxes.device
    keep_t = torch.tensor(keep, dtype=torch.long, device=device)
    kept_t = torch.stack(kept) if kept else torch.zeros(0, dtype=torch.float64, device=device)
    return keep_t, kept_t


def soft_nms(boxes: Tensor, scores: Tensor, iou_threshold: float, sigma: float, score_threshold: float, method):
    """Soft-NMS (Bodla et al. 2017), mmcv's ``soft_nms`` with offset=0. Returns (keep, new_scores).

    Repeatedly keep the alive box with the highest current score (ties: the lowest input index), then decay the score
    of every other alive box b by a weight of iou = IoU(kept, b)::

        hard      w = 0 if iou > iou_threshold else 1        (plain NMS for score_threshold > 0)
        linear    w = 1 - iou if iou > iou_threshold else 1
        gaussian  w = exp(-iou**2 / sigma)                   (iou_threshold unused)

    A box is alive while its score is >= score_threshold (checked on the input scores too). IoU is computed in the
    boxes' precision (float32 for float32/float16/bfloat16, float64 for float64); the weights, the decayed scores and
    the comparisons in float64. ``keep`` (int64) is in selection order, ``new_scores`` (the scores' dtype) the
    scores at selection. ``method``: 0/"hard", 1/"linear", 2/"gaussian".
    """
    keep, kept = _soft_nms_scores(boxes, scores, iou_threshold, sigma, score_threshold, method)
    return keep, kept.to(scores.dtype)


def batched_soft_nms(
    boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, sigma: float, score_threshold: float, method
):
    """Soft-NMS independently per value of ``idxs``; the kept boxes of all classes by decreasing new score (compared
    in float64), ties by selection rank within their class, then by class (ascending ``idxs``)."""
    keeps, kepts, ranks = [], [], []
    for c in torch.unique(idxs):  # ascending: the class order of ties
        members = torch.nonzero(idxs == c).flatten()
        keep, kept = _soft_nms_scores(boxes[members], scores[members], iou_threshold, sigma, score_threshold, method)
        keeps.append(members[keep])
        kepts.append(kept)
        ranks.append(torch.arange(len(keep), device=boxes.device))
    if not keeps:
        return torch.zeros(0, dtype=torch.long, device=boxes.device), scores.new_zeros(0)
    keep, kept, rank = torch.cat(keeps), torch.cat(kepts), torch.cat(ranks)
    # class-major now: a stable sort by rank gives (rank, class), a stable sort by decreasing score on top of it
    # gives (score desc, rank, class)
    by_rank = torch.sort(rank, stable=True).indices
    order = by_rank[torch.sort(kept[by_rank], descending=True, stable=True).indices]
    return keep[order], kept[order].to(scores.dtype)


# ---- Matrix NMS -------------------------------------------------------------------------------------------------

MATRIX_NMS_KERNELS = ("gaussian", "linear")


def _matrix_nms_iou(boxes_or_masks: Tensor) -> Tensor:
    """Pairwise IoU [N, N], row i the first operand; NaN (0 / 0) and -0 become 0. Boxes in their opmath type; masks
    in float32 from one matmul of the flattened masks (areas are their sums)."""
    if boxes_or_masks.dim() == 3:
        flat = boxes_or_masks.reshape(boxes_or_masks.shape[0], -1).float()
        inter = flat @ flat.T
        area = flat.sum(1)
        iou = inter / ((area[:, None] + area[None, :]) - inter)
    else:
        b = _opmath(boxes_or_masks)
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        lt = torch.maximum(b[:, None, :2], b[None, :, :2])
        rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
        wh = (rb - lt).clamp(min=0)
        inter = wh[..., 0] * wh[..., 1]
        iou = inter / ((area[:, None] + area[None, :]) - inter)
    return torch.where(iou > 0, iou, torch.zeros_like(iou))


def _matrix_nms_f(x: Tensor, kernel: str, sigma: float) -> Tensor:
    return torch.exp(-(sigma * (x * x))) if kernel == "gaussian" else 1.0 - x


def matrix_nms(
    boxes_or_masks: Tensor,
    scores: Tensor,
    labels: Tensor,
    kernel: str,
    sigma: float,
    score_threshold: float,
    max_num: int,
):
    """Matrix NMS (SOLOv2, Wang et al. 2020): every score decayed at once. Returns (keep, new_scores).

    With the boxes (or masks) ranked by decreasing score (stable) and iou the pairwise IoU (NaN counted as 0)::

        comp_i  = max over higher-ranked k with label_k == label_i of iou[k, i]        (0 when none)
        decay_j = min(1, min over higher-ranked i with label_i == label_j of f(iou[i, j]) / f(comp_i))
        f(x)    = exp(-sigma * x**2)  ("gaussian")  or  1 - x  ("linear")

    A NaN ratio (0 / 0, "linear" with comp_i = iou[i, j] = 1) is ignored. The decayed score is score_j * decay_j in
    float64; ``keep`` holds the input indices whose decayed score is >= score_threshold, by decreasing decayed score
    (ties by rank), at most ``max_num`` of them (-1: all); ``new_scores`` their decayed scores in the scores' dtype.
    Box IoU is computed in the boxes' precision (float32 for float32/float16/bfloat16), mask IoU in float32 from the
    intersection matmul; the rest in float64. This builds the N x N matrices: it is the definition, not a kernel.
    """
    n = scores.shape[0]
    device = scores.device
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=device), scores.new_zeros(0)
    order = torch.sort(scores, descending=True, stable=True).indices
    iou = _matrix_nms_iou(boxes_or_masks[order]).double()
    lab = labels[order]
    pair = (lab[:, None] == lab[None, :]) & torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
    comp = torch.where(pair, iou, 0.0).amax(0)
    ratio = _matrix_nms_f(iou, kernel, sigma) / _matrix_nms_f(comp, kernel, sigma)[:, None]
    ratio = torch.where(pair & ~ratio.isnan(), ratio, torch.inf)
    decay = ratio.amin(0).clamp(max=1.0)
    new = scores[order].double() * decay
    sel = torch.nonzero(new >= score_threshold).flatten()
    best = torch.sort(new[sel], descending=True, stable=True).indices
    if max_num >= 0:
        best = best[:max_num]
    sel = sel[best]
    return order[sel], new[sel].to(scores.dtype)


# ---- multiclass NMS (fixed shape) -------------------------------------------------------------------------------


def _rank_in_class(cls: Tensor) -> Tensor:
    """For each entry of ``cls``, how many earlier entries have the same class."""
    order = torch.sort(cls, stable=True).indices
    sorted_cls = cls[order]
    first = torch.searchsorted(sorted_cls, sorted_cls)
    rank = torch.empty_like(cls)
    rank[order] = torch.arange(len(cls), device=cls.device) - first
    return rank


def multiclass_nms(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    score_threshold: float,
    max_per_class: int,
    max_total: int,
    class_agnostic: bool,
):
    """Fixed-shape multiclass NMS on a batch, one image at a time (this implementation synchronises; the kernels
    do not). boxes [B, N, 4] (shared by the classes) or [B, N, C, 4], scores [B, N, C].

    Per image: the candidates are the (box n, class c) pairs with score > score_threshold (compared in the scores'
    dtype, as ``scores > score_threshold``), ordered by decreasing score, ties by class then box index. Greedy NMS
    (:func:`nms`, IoU > iou_threshold suppresses) runs per class, or over all candidates when ``class_agnostic`` (a
    candidate is then tested against every box NMS kept before it, whatever the class caps below later drop). Of the
    kept candidates, in that order, the first ``max_per_class`` of each class stay, and of those the first
    ``max_total``.

    Returns (boxes [B, max_total, 4] in the boxes' dtype, scores [B, max_total] in the scores' dtype, classes
    [B, max_total] int64, num_detections [B] int64); rows past num_detections are 0 (classes -1).
    """
    batch, n, c = scores.shape
    dev = scores.device
    out_boxes = boxes.new_zeros((batch, max_total, 4))
    out_scores = scores.new_zeros((batch, max_total))
    out_classes = torch.full((batch, max_total), -1, dtype=torch.long, device=dev)
    num = torch.zeros(batch, dtype=torch.long, device=dev)
    for b in range(batch):
        s = scores[b].t()  # [C, N]: nonzero lists candidates class-major, the order of ties
        cls, idx = torch.nonzero(s > score_threshold, as_tuple=True)
        sc = s[cls, idx]
        bx = boxes[b, idx] if boxes.dim() == 3 else boxes[b, idx, cls]
        if class_agnostic:
            keep = nms(bx, sc, iou_threshold)
        else:
            keep = batched_nms(bx, sc, cls, iou_threshold)
        keep = keep[_rank_in_class(cls[keep]) < max_per_class][:max_total]
        k = len(keep)
        out_boxes[b, :k] = bx[keep]
        out_scores[b, :k] = sc[keep]
        out_classes[b, :k] = cls[keep]
        num[b] = k
    return out_boxes, out_scores, out_classes, num
