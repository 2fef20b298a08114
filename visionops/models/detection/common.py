"""Pieces the detectors share: the tiny backbone, the FPN and torchvision's anchor/proposal ``Matcher``.

Conventions: visionops/models/README.md.
"""

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BELOW_LOW_THRESHOLD", "BETWEEN_THRESHOLDS", "FPN", "Backbone", "match_anchors"]


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

    def __init__(self, in_channels: Sequence[int], width: int) -> None:
        super().__init__()
        self.inner = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.layer = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in in_channels)
        self.p6 = nn.Conv2d(width, width, 3, 2, 1)

    def forward(self, feats: List[Tensor]) -> List[Tensor]:
        last = self.inner[-1](feats[-1])
        outs = [self.layer[-1](last)]
        for i in range(len(feats) - 2, -1, -1):
            lateral = self.inner[i](feats[i])
            last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, self.layer[i](last))
        return outs + [self.p6(outs[-1])]
