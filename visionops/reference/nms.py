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
