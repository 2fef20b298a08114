"""Mask R-CNN on visionops' ops, with a ``backend="pytorch"`` twin.

He et al., "Mask R-CNN" (ICCV 2017), in the structure of torchvision's ``maskrcnn_resnet50_fpn`` at small widths:
the Faster R-CNN of ``rcnn.py`` plus a mask branch, a 14x14 ``MultiScaleRoIAlign`` over P3-P5, four 3x3 convolutions,
a 2x2 transposed convolution to 28x28 and one mask logit per class; the loss is torchvision's ``maskrcnn_loss``
(binary cross-entropy of the ground-truth class's mask against the ground-truth mask cut out of the image with
``roi_align``, as ``project_masks_on_boxes``), and inference pastes each detection's 28x28 mask into the image.

``"visionops"`` pools with ``visionops.MultiScaleRoIAlign`` and cuts the mask targets with ``visionops.roi_align``;
``"pytorch"`` with torchvision's. Conventions: visionops/models/README.md.
"""

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionops.models.detection.rcnn import FasterRCNN, Size

__all__ = ["MaskRCNN", "paste_masks"]


def paste_masks(masks: Tensor, boxes: Tensor, size: Size, chunk: int = 32) -> Tensor:
    """Masks [D, M, M] (probabilities over each box) resampled into the image: [D, 1, H, W], bilinear, zero outside
    the boxes (the role of torchvision's ``paste_masks_in_image``, all boxes at once)."""
    h, w = size
    out = masks.new_zeros(len(masks), 1, h, w)
    ys = torch.arange(h, dtype=masks.dtype, device=masks.device) + 0.5
    xs = torch.arange(w, dtype=masks.dtype, device=masks.device) + 0.5
    for start in range(0, len(masks), chunk):  # bounds the [chunk, H, W, 2] sampling grid
        b = boxes[start : start + chunk].to(masks.dtype)
        wh = (b[:, 2:] - b[:, :2]).clamp(min=1e-3)
        gx = (xs[None] - b[:, 0:1]) / wh[:, 0:1] * 2 - 1  # [d, W], -1..1 across the box
        gy = (ys[None] - b[:, 1:2]) / wh[:, 1:2] * 2 - 1
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)
        m = masks[start : start + chunk, None]
        out[start : start + chunk] = F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out


class MaskRCNN(FasterRCNN):
    """A small Mask R-CNN with torchvision's detection interface: :class:`FasterRCNN`'s, plus

    * eval: each image's dict has ``masks`` [D, 1, H, W], float probabilities in 0..1 (threshold at 0.5 for
      binary masks) over the image's own size;
    * training: each target has ``masks`` [G, H, W] (uint8, bool or float 0/1, the image's size), and the losses
      ``loss_mask`` too.

    Options: :class:`FasterRCNN`'s, and ``mask_width`` (default 32), the mask head's channels.
    """

    mask_size = 14  # RoIAlign output; the predicted masks are twice as large
    _without = ()

    def _build_extra(self) -> None:
        width, k = self.options["mask_width"], self.num_classes
        self.mask_roi_pool = self._ops.multi_scale_roi_align(
            ["0", "1", "2"], self.mask_size, 2, canonical_scale=self.options["canonical_scale"]
        )
        chans = [self.options["width"]] + [width] * 4
        self.mask_head = nn.Sequential(*(m for i in range(4) for m in (nn.Conv2d(chans[i], width, 3, 1, 1), nn.ReLU())))
        self.mask_upsample = nn.ConvTranspose2d(width, width, 2, 2)
        self.mask_logits = nn.Conv2d(width, k, 1)

    def _masks(self, fmaps: Dict[str, Tensor], padded: List[Size], boxes: List[Tensor]) -> Tensor:
        x = self.mask_head(self.mask_roi_pool(fmaps, boxes, padded))
        return self.mask_logits(F.relu(self.mask_upsample(x)))  # [sum D, K, 28, 28]

    def _extra_losses(self, fmaps, padded, proposals, matched, labels, targets) -> Dict[str, Tensor]:
        """torchvision's ``maskrcnn_loss`` on the positive proposals."""
        labels = labels.split([len(p) for p in proposals])
        pos = [(lab > 0).nonzero().squeeze(1) for lab in labels]
        boxes = [p[i] for p, i in zip(proposals, pos)]
        logits = self._masks(fmaps, padded, boxes)
        m = logits.shape[-1]
        cut = []
        for t, b, mi in zip(targets, boxes, (mt[i] for mt, i in zip(matched, pos))):
            gt = t["masks"][:, None].to(b.dtype)
            rois = torch.cat([mi[:, None].to(b.dtype), b], 1)  # the matched ground truth's mask is the "image"
            cut.append(self._ops.roi_align(gt, rois, (m, m), 1.0) if len(b) else b.new_zeros(0, 1, m, m))
        mask_targets = torch.cat(cut)[:, 0]
        pos_labels = torch.cat([lab[i] for lab, i in zip(labels, pos)])
        if len(pos_labels) == 0:
            return {"loss_mask": logits.sum() * 0}
        chosen = logits[torch.arange(len(pos_labels), device=logits.device), pos_labels]
        return {"loss_mask": F.binary_cross_entropy_with_logits(chosen, mask_targets)}

    def _extra_outputs(self, fmaps, padded, detections, sizes) -> List[Dict[str, Tensor]]:
        logits = self._masks(fmaps, padded, [d["boxes"] for d in detections])
        labels = torch.cat([d["labels"] for d in detections])
        probs = logits[torch.arange(len(labels), device=logits.device), labels].sigmoid()
        for d, p, size in zip(detections, probs.split([len(d["boxes"]) for d in detections]), sizes):
            d["masks"] = paste_masks(p, d["boxes"], size)
        return detections
