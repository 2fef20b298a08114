"""Reference box coding (pure PyTorch), torchvision's detection ``BoxCoder`` math. Kernels cite these formulas.

Decode delta (dx, dy, dw, dh) against anchor (x1, y1, x2, y2) with weights (wx, wy, ww, wh) and clip c::

    w = x2 - x1,  h = y2 - y1,  cx = x1 + 0.5 * w,  cy = y1 + 0.5 * h
    dx' = dx / wx,  dy' = dy / wy,  dw' = min(dw / ww, c),  dh' = min(dh / wh, c)
    pcx = dx' * w + cx,  pcy = dy' * h + cy,  pw = exp(dw') * w,  ph = exp(dh') * h
    box = (pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph)
    optionally clamped to [0, W] x [0, H] (torch.clamp: gradients pass where lo <= v <= hi)

Encode reference box g against proposal e::

    t = (wx * (gcx - ecx) / ew,  wy * (gcy - ecy) / eh,  ww * log(gw / ew),  wh * log(gh / eh))

Computed in float32 for float16/bfloat16 inputs (torchvision computes in the input dtype), float64 stays float64.
"""

from typing import Optional, Sequence

import torch
from torch import Tensor


def _opmath(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def decode_boxes(
    deltas: Tensor,
    anchors: Tensor,
    weights: Sequence[float],
    bbox_xform_clip: float,
    image_size: Optional[Sequence[float]] = None,
) -> Tensor:
    """image_size: (H, W) to clip to, or None / [] (the op's schema) for no clipping."""
    d, a = _opmath(deltas), _opmath(anchors)
    wx, wy, ww, wh = weights
    widths = (a[:, 2] - a[:, 0])[:, None]
    heights = (a[:, 3] - a[:, 1])[:, None]
    ctr_x = a[:, 0, None] + 0.5 * widths
    ctr_y = a[:, 1, None] + 0.5 * heights
    dx, dy = d[:, 0::4] / wx, d[:, 1::4] / wy
    dw = torch.clamp(d[:, 2::4] / ww, max=bbox_xform_clip)
    dh = torch.clamp(d[:, 3::4] / wh, max=bbox_xform_clip)
    pcx, pcy = dx * widths + ctr_x, dy * heights + ctr_y
    hw, hh = 0.5 * (torch.exp(dw) * widths), 0.5 * (torch.exp(dh) * heights)
    x1, y1, x2, y2 = pcx - hw, pcy - hh, pcx + hw, pcy + hh
    if image_size is not None and len(image_size) == 2:
        h, w = image_size
        x1, x2 = x1.clamp(0, w), x2.clamp(0, w)
        y1, y2 = y1.clamp(0, h), y2.clamp(0, h)
    return torch.stack((x1, y1, x2, y2), dim=2).flatten(1).to(deltas.dtype)


def encode_boxes(reference_boxes: Tensor, proposals: Tensor, weights: Sequence[float]) -> Tensor:
    r, q = _opmath(reference_boxes), _opmath(proposals)
    wx, wy, ww, wh = weights
    ew, eh = q[:, 2] - q[:, 0], q[:, 3] - q[:, 1]
    ecx, ecy = q[:, 0] + 0.5 * ew, q[:, 1] + 0.5 * eh
    gw, gh = r[:, 2] - r[:, 0], r[:, 3] - r[:, 1]
    gcx, gcy = r[:, 0] + 0.5 * gw, r[:, 1] + 0.5 * gh
    t = torch.stack((wx * (gcx - ecx) / ew, wy * (gcy - ecy) / eh, ww * torch.log(gw / ew), wh * torch.log(gh / eh)), 1)
    return t.to(reference_boxes.dtype)


def filter_boxes(boxes: Tensor, scores: Tensor, score_threshold: float, min_size: float) -> Tensor:
    """Indices of boxes with score >= score_threshold and both sides >= min_size (compared in the boxes' dtype)."""
    ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (scores.to(boxes.dtype) >= score_threshold) & (ws >= min_size) & (hs >= min_size)
    return torch.where(keep)[0]
