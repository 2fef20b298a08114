"""Pieces the detectors share: the tiny backbone, the FPN, torchvision's anchor/proposal ``Matcher`` and sampler, and
the per-image NMS loop of the ``"pytorch"`` backends.

Conventions: visionops/models/README.md.
"""

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection import _utils as tv_det_utils
from torch import Tensor, nn

__all__ = [
    "BELOW_LOW_THRESHOLD",
    "BETWEEN_THRESHOLDS",
    "FPN",
    "Backbone",
    "batch_images",
    "match_anchors",
    "XFORM_CLIP",
    "decode_pytorch",
    "multiclass_nms_pytorch",
    "sample_balanced",
]


# ---- matching ----------------------------------------------------------------------------------------------------

BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS = -1, -2


def match_anchors(iou: Tensor, high: float = 0.5, low: float = 0.4, allow_low_quality_matches: bool = True) -> Tensor:
    """torchvision's ``Matcher`` on an IoU matrix [G, N] (ground truth x anchors), in plain torch ops: per anchor the
    index of its best ground-truth box, -1 below ``low``, -2 in [low, high); with ``allow_low_quality_matches`` each
    ground-truth box also keeps the anchors that overlap it best (ties included), whatever their IoU."""
    if iou.shape[0] == 0:
        return torch.full((iou.shape[1],), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=iou.device)
    best, matches = iou.max(dim=0)
    all_matches = matches.clone()
    matches[best < low] = BELOW_LOW_THRESHOLD
    matches[(best >= low) & (best < high)] = BETWEEN_THRESHOLDS
    if allow_low_quality_matches:
        best_per_gt = iou.max(dim=1, keepdim=True).values
        anchors_of_best = (iou == best_per_gt).nonzero()[:, 1]
        matches[anchors_of_best] = all_matches[anchors_of_best]
    return matches


def sample_balanced(
    labels: Tensor, batch_size: int, positive_fraction: float, generator: Optional[torch.Generator]
) -> Tuple[Tensor, Tensor]:
    """torchvision's ``BalancedPositiveNegativeSampler`` for one image, drawing from ``generator`` (a CPU generator)
    instead of the global RNG: indices of up to ``batch_size * positive_fraction`` positives (label >= 1) and of
    negatives (label 0) filling the rest of ``batch_size``, each a random subset; labels -1 are ignored."""
    positive = (labels >= 1).nonzero().squeeze(1)
    negative = (labels == 0).nonzero().squeeze(1)
    num_pos = min(positive.numel(), int(batch_size * positive_fraction))
    num_neg = min(negative.numel(), batch_size - num_pos)
    pos = torch.randperm(positive.numel(), generator=generator)[:num_pos].to(labels.device)
    neg = torch.randperm(negative.numel(), generator=generator)[:num_neg].to(labels.device)
    return positive[pos], negative[neg]


def batch_images(
    images: Union[Tensor, List[Tensor]], mean: Tensor, std: Tensor, size_divisible: int
) -> Tuple[Tensor, List[Tuple[int, int]]]:
    """Images normalised with ``mean`` / ``std`` [3, 1, 1] and padded at the bottom and right into one tensor
    [B, 3, H, W] (H, W multiples of ``size_divisible``), and each image's own (H, W); no resizing."""
    if any(not i.is_floating_point() for i in images if isinstance(i, Tensor)):
        raise TypeError("images must be floating point (0..1)")
    if isinstance(images, Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a tensor [B, 3, H, W] or a list of [3, H, W], got {list(images.shape)}")
        x = (images - mean) / std
        sizes = [(int(images.shape[-2]), int(images.shape[-1]))] * len(images)
    else:
        if not isinstance(images, (list, tuple)) or not all(isinstance(i, Tensor) and i.dim() == 3 for i in images):
            raise TypeError("images must be a tensor [B, 3, H, W] or a list of tensors [3, H, W]")
        if not images or any(i.shape[0] != 3 for i in images):
            raise ValueError("images must be a non-empty list of tensors [3, H, W]")
        sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        h, w = (max(s[d] for s in sizes) for d in (0, 1))
        x = images[0].new_zeros(len(images), 3, h, w)
        for i, img in enumerate(images):
            x[i, :, : img.shape[1], : img.shape[2]] = (img - mean) / std
    d = size_divisible
    return F.pad(x, (0, -x.shape[-1] % d, 0, -x.shape[-2] % d)), sizes


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Backbone(nn.Module):
    """Five stride-2 stages (3x3 conv, BatchNorm, ReLU); returns C3, C4, C5 (strides 8, 16, 32)."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 96, 128)) -> None:
        super().__init__()
        chans = [3, *widths]
        self.stages = nn.ModuleList(_conv_bn(chans[i], chans[i + 1], 2) for i in range(len(widths)))

    def forward(self, x: Tensor) -> List[Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats[2:]


class FPN(nn.Module):
    """torchvision's FeaturePyramidNetwork (1x1 laterals, nearest top-down, 3x3 outputs) plus P6 from P5 (its
    ``LastLevelP6P7`` with one extra level)."""

    def __init__(self, in_channels: Sequence[int], width: int, finest_only: bool = False) -> None:
        super().__init__()
        self.inner = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        # finest_only: P3 alone (one feature map, as Fast R-CNN's), no output convolutions left unused
        outputs = 1 if finest_only else len(in_channels)
        self.layer = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(outputs))
        self.p6 = None if finest_only else nn.Conv2d(width, width, 3, 2, 1)

    def forward(self, feats: List[Tensor]) -> List[Tensor]:
        last = self.inner[-1](feats[-1])
        merged = [last]
        for i in range(len(feats) - 2, -1, -1):
            lateral = self.inner[i](feats[i])
            last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            merged.insert(0, last)
        outs = [layer(m) for layer, m in zip(self.layer, merged)]
        return outs if self.p6 is None else outs + [self.p6(outs[-1])]


# ---- post-processing -----------------------------------------------------------------------------------------------


XFORM_CLIP = math.log(1000.0 / 16)  # torchvision's bbox_xform_clip: the largest exp() a box coder applies


def decode_pytorch(deltas: Tensor, boxes: Tensor, weights: Sequence[float], image_size: Tuple[int, int]) -> Tensor:
    """The ``"pytorch"`` backends' decode: torchvision's ``BoxCoder.decode_single``, then ``clip_boxes_to_image``."""
    decoded = tv_det_utils.BoxCoder(weights, XFORM_CLIP).decode_single(deltas, boxes)
    return torchvision.ops.clip_boxes_to_image(decoded, image_size)


def multiclass_nms_pytorch(
    boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float, max_per_class: int, max_total: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The per-image loop torchvision users write, padded to visionops.multiclass_nms's fixed shapes: candidates
    above the score threshold, ``batched_nms`` per class, the best ``max_per_class`` of each class, the best
    ``max_total`` of the image."""
    b, _, k = scores.shape
    out_boxes = boxes.new_zeros(b, max_total, 4)
    out_scores = scores.new_zeros(b, max_total)
    out_classes = torch.full((b, max_total), -1, dtype=torch.int64, device=scores.device)
    num = torch.zeros(b, dtype=torch.int64, device=scores.device)
    for i in range(b):
        # the threshold compared in float64, as multiclass_nms (a float32 comparison rounds it to float32 first)
        anchor, cls = (scores[i].double() > score_threshold).nonzero(as_tuple=True)
        cand_boxes, cand_scores = boxes[i][anchor], scores[i][anchor, cls]
        keep = torchvision.ops.batched_nms(cand_boxes, cand_scores, cls, iou_threshold)  # by decreasing score
        per_class = [keep[cls[keep] == c][:max_per_class] for c in range(k)]
        keep = torch.cat(per_class)
        keep = keep[cand_scores[keep].argsort(descending=True, stable=True)][:max_total]
        n = keep.numel()
        out_boxes[i, :n], out_scores[i, :n], out_classes[i, :n] = cand_boxes[keep], cand_scores[keep], cls[keep]
        num[i] = n
    return out_boxes, out_scores, out_classes, num
