"""SSD on visionops' ops, with a ``backend="pytorch"`` twin.

Liu et al., "SSD: Single Shot MultiBox Detector" (ECCV 2016), in the structure of torchvision's
``torchvision.models.detection.SSD`` at small widths: the tiny backbone's strides 8, 16 and 32 (the first
L2-normalised with a learned scale, as conv4_3) plus extra stride-2 blocks (1x1 reduction, 3x3 stride 2) for the
coarser maps, one 3x3 class convolution and one 3x3 box convolution per feature map, default boxes of growing scale
per map, torchvision's ``SSDMatcher`` (IoU >= 0.5, plus each ground-truth box's best default box), box coding with
weights (10, 10, 5, 5), the smooth-L1 box loss and the softmax cross-entropy over the positives and the hardest
negatives (three per positive), and multi-class NMS for the detections.

``"visionops"`` runs default boxes, box coding, IoU and NMS on visionops (``visionops.DefaultBoxGenerator``,
``visionops.encode_boxes`` / ``decode_boxes``, ``visionops.box_iou``, ``visionops.multiclass_nms``); ``"pytorch"``
runs torchvision's ``DefaultBoxGenerator``, ``BoxCoder``, ``box_iou`` and the per-image loop around ``batched_nms``.

Shared backbone and matcher: ``common.py``. Conventions: visionops/models/README.md.
"""

import math
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import _utils as tv_det_utils
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator as TVDefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

import visionops
from visionops.models import check_backend
from visionops.models.detection.common import (
    XFORM_CLIP,
    Backbone,
    decode_pytorch,
    match_anchors,
    multiclass_nms_pytorch,
)

__all__ = ["SSD", "hard_negative_mask", "ssd_match"]

_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # torchvision's SSD box coder weights


# ---- the op table: the only lines the two backends do not share ---------------------------------------------------


class _Ops(NamedTuple):
    default_boxes: Callable[..., nn.Module]  # (aspect_ratios, min_ratio, max_ratio, scales) -> DefaultBoxGenerator
    decode: Callable[[Tensor, Tensor, Tuple[int, int]], Tensor]  # (deltas [N, 4], boxes [N, 4], (H, W)) -> boxes
    encode: Callable[[Tensor, Tensor], Tensor]  # (gt boxes [N, 4], default boxes [N, 4]) -> targets [N, 4]
    box_iou: Callable[[Tensor, Tensor], Tensor]
    # (boxes [B, N, 4], scores [B, N, K], iou, score_threshold, max_per_class, max_total) -> the four fixed tensors
    multiclass_nms: Callable[..., Tuple[Tensor, Tensor, Tensor, Tensor]]


_OPS: Dict[str, _Ops] = {
    "visionops": _Ops(
        default_boxes=visionops.DefaultBoxGenerator,
        decode=lambda d, a, size: visionops.decode_boxes(d, a, _WEIGHTS, XFORM_CLIP, size),
        encode=lambda gt, a: visionops.encode_boxes(gt, a, _WEIGHTS),
        box_iou=visionops.box_iou,
        multiclass_nms=lambda *args: visionops.multiclass_nms(*args, class_agnostic=False),
    ),
    "pytorch": _Ops(
        default_boxes=TVDefaultBoxGenerator,
        decode=lambda d, a, size: decode_pytorch(d, a, _WEIGHTS, size),
        encode=lambda gt, a: tv_det_utils.BoxCoder(_WEIGHTS).encode_single(gt, a),
        box_iou=torchvision.ops.box_iou,
        multiclass_nms=multiclass_nms_pytorch,
    ),
}


# ---- matching and hard-negative mining (plain torch, shared) -------------------------------------------------------


def ssd_match(iou: Tensor, threshold: float = 0.5) -> Tensor:
    """torchvision's ``SSDMatcher`` on an IoU matrix [G, N] (ground truth x default boxes): per default box the
    index of its best ground-truth box, or -1 below ``threshold``; each ground-truth box also takes its best default
    box (its first one on ties) whatever the IoU, the later ground-truth box winning when two pick the same one."""
    matches = match_anchors(iou, threshold, threshold, allow_low_quality_matches=False)
    if iou.shape[0] == 0:
        return matches
    best = iou.argmax(dim=1)
    # A scatter with "amax" instead of torchvision's indexed assignment: the same winner (the last ground-truth box)
    # without relying on the order in which duplicate indices are written.
    forced = torch.full_like(matches, -1).scatter_reduce(0, best, torch.arange(len(best), device=iou.device), "amax")
    return torch.where(forced >= 0, forced, matches)


def hard_negative_mask(cls_loss: Tensor, foreground: Tensor, neg_to_pos_ratio: float = 3.0) -> Tensor:
    """torchvision's SSD hard-negative mining: per image (row of ``cls_loss`` [B, N]) the ``neg_to_pos_ratio`` x
    (number of foreground) background boxes of highest loss, as a mask [B, N]. Equal losses rank by index (a stable
    sort), so the choice is deterministic; when an image has fewer background boxes than that, all of them."""
    neg_loss = cls_loss.detach().masked_fill(foreground, -math.inf)
    order = neg_loss.argsort(dim=1, descending=True, stable=True)
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    num_negative = neg_to_pos_ratio * foreground.sum(1, keepdim=True)
    return (rank < num_negative) & ~foreground


# ---- the network ----------------------------------------------------------------------------------------------------


def _xavier_(module: nn.Module, generator: Optional[torch.Generator]) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight, generator=generator)
            nn.init.zeros_(m.bias)


class ScoringHead(nn.Module):
    """torchvision's ``SSDScoringHead``: one 3x3 convolution per feature map to ``num_anchors * per_anchor``
    channels; output [B, sum_l H_l W_l A_l, per_anchor] in the default boxes' order (map, location, box)."""

    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int], per_anchor: int) -> None:
        super().__init__()
        self.module_list = nn.ModuleList(
            nn.Conv2d(c, a * per_anchor, 3, padding=1) for c, a in zip(in_channels, num_anchors)
        )
        self.num_anchors, self.per_anchor = list(num_anchors), per_anchor

    def forward(self, feats: List[Tensor]) -> Tensor:
        outs = []
        for conv, a, f in zip(self.module_list, self.num_anchors, feats):
            y = conv(f)
            b, _, h, w = y.shape
            outs.append(
                y.view(b, a, self.per_anchor, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * a, self.per_anchor)
            )
        return torch.cat(outs, 1)


class SSDHead(nn.Module):
    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.classification_head = ScoringHead(in_channels, num_anchors, num_classes)
        self.regression_head = ScoringHead(in_channels, num_anchors, 4)

    def forward(self, feats: List[Tensor]) -> Tuple[Tensor, Tensor]:
        return self.classification_head(feats), self.regression_head(feats)


class SSD(nn.Module):
    """A small SSD with torchvision's detection interface.

    * ``model(images)`` in eval mode: ``images`` a list of float tensors [3, H_i, W_i] in 0..1 (or a batched tensor
      [B, 3, H, W]); returns one ``{"boxes": [D, 4], "scores": [D], "labels": [D]}`` per image, boxes (x1, y1, x2,
      y2) in the image's pixels, best first.
    * ``model(images, targets)`` in training mode: ``targets`` one ``{"boxes": [G, 4], "labels": [G]}`` per image
      (labels in 1..num_classes-1, G may be 0); returns ``{"bbox_regression": smooth-L1 loss, "classification":
      cross-entropy}``, each summed over the batch and divided by its number of matched default boxes, as
      torchvision's.
    * ``model(images, fixed_shape=True)``: ``images`` a tensor [B, 3, H, W]; returns ``(boxes [B, max_total, 4],
      scores [B, max_total], labels [B, max_total], num_detections [B])`` (rows past num_detections zero, labels -1).

    ``num_classes`` counts the background, class 0, as torchvision's SSD. Images are normalised with ImageNet's mean
    and std inside the model and are not resized (a list of different sizes is padded at the bottom and right to
    the largest); the default boxes scale with the (padded) batch. The feature maps are the backbone's strides 8, 16
    and 32 (``widths``: its five stages) and ``extra_blocks`` more, each halving the previous; ``aspect_ratios``
    has one list per map (default ``[2]`` for the first and last two, ``[2, 3]`` between, as SSD300), and the
    default box scales run from ``min_ratio`` to ``max_ratio`` of the image (or are given as ``scales``), as
    ``DefaultBoxGenerator``. Detections: softmax scores, every (box, class >= 1) above ``score_threshold`` enters NMS
    per class at ``iou_threshold``; each class keeps its best ``max_per_class``, each image its best ``max_total``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        backend: str = "visionops",
        widths: Sequence[int] = (16, 32, 64, 96, 128),
        extra_blocks: int = 2,
        aspect_ratios: Optional[Sequence[Sequence[float]]] = None,
        min_ratio: float = 0.15,
        max_ratio: float = 0.9,
        scales: Optional[Sequence[float]] = None,
        score_threshold: float = 0.01,
        iou_threshold: float = 0.45,
        max_per_class: int = 200,
        max_total: int = 200,
        match_threshold: float = 0.5,
        neg_to_pos_ratio: float = 3.0,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (the background counts), got {num_classes!r}")
        if len(widths) != 5:
            raise ValueError(f"widths must give the backbone's 5 stage widths, got {tuple(widths)}")
        if extra_blocks < 0:
            raise ValueError(f"extra_blocks must be >= 0, got {extra_blocks}")
        if not neg_to_pos_ratio > 0:
            raise ValueError(f"neg_to_pos_ratio must be > 0, got {neg_to_pos_ratio}")
        self.backend = check_backend(backend)
        self._ops = _OPS[backend]
        self.num_classes = num_classes
        num_maps = 3 + extra_blocks
        if aspect_ratios is None:
            aspect_ratios = [[2.0] if k == 0 or k >= num_maps - 2 else [2.0, 3.0] for k in range(num_maps)]
        aspect_ratios = [[float(r) for r in rs] for rs in aspect_ratios]
        if len(aspect_ratios) != num_maps:
            raise ValueError(f"aspect_ratios must have one list per feature map ({num_maps}), got {len(aspect_ratios)}")
        scales = None if scales is None else [float(s) for s in scales]
        if scales is not None and len(scales) != num_maps + 1:
            raise ValueError(f"scales must have one more entry than feature maps ({num_maps + 1}), got {len(scales)}")
        self.anchor_generator = self._ops.default_boxes(aspect_ratios, min_ratio, max_ratio, scales)
        self.backbone = Backbone(widths)
        width = widths[-1]
        self.scale_weight = nn.Parameter(torch.full((widths[2],), 20.0))  # conv4_3's L2 normalisation scale
        self.extras = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, width // 2, 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(width // 2, width, 3, 2, 1),
                nn.ReLU(inplace=True),
            )
            for _ in range(extra_blocks)
        )
        in_channels = [widths[2], widths[3], widths[4]] + [width] * extra_blocks
        self.head = SSDHead(in_channels, self.anchor_generator.num_anchors_per_location(), num_classes)
        self.register_buffer("image_mean", torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1), persistent=False)
        self.score_threshold, self.iou_threshold = float(score_threshold), float(iou_threshold)
        self.max_per_class, self.max_total = int(max_per_class), int(max_total)
        self.match_threshold, self.neg_to_pos_ratio = float(match_threshold), float(neg_to_pos_ratio)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """torchvision's SSD initialisation for the extra blocks and the heads (Xavier-uniform, zero biases), the
        L2 scale at 20, the backbone Kaiming-normal fan-out; drawn from ``generator``."""
        for m in self.backbone.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_out), generator=generator)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
                m.reset_running_stats()
        self.scale_weight.fill_(20.0)
        _xavier_(self.extras, generator)
        _xavier_(self.head, generator)

    # -- shared stages ------------------------------------------------------------------------------------------------

    def _normalise(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor [B, 3, H, W], got {images.dtype} {list(images.shape)}")
        return (images - self.image_mean) / self.image_std

    def _batch(self, images: Union[Tensor, List[Tensor]]) -> Tuple[Tensor, List[Tuple[int, int]]]:
        """Normalised images as one tensor [B, 3, H, W] (padded to the largest), and each image's own (H, W)."""
        if isinstance(images, Tensor):
            return self._normalise(images), [(int(images.shape[-2]), int(images.shape[-1]))] * len(images)
        if not isinstance(images, (list, tuple)) or not all(
            isinstance(i, Tensor) and i.dim() == 3 and i.shape[0] == 3 and i.is_floating_point() for i in images
        ):
            raise ValueError("images must be a float tensor [B, 3, H, W] or a list of float tensors [3, H, W]")
        sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        h, w = (max(s[d] for s in sizes) for d in (0, 1))
        x = images[0].new_zeros(len(images), 3, h, w)
        for i, img in enumerate(images):
            x[i, :, : img.shape[1], : img.shape[2]] = (img - self.image_mean) / self.image_std
        return x, sizes

    def _features(self, x: Tensor) -> List[Tensor]:
        feats = self.backbone(x)
        feats[0] = self.scale_weight.view(1, -1, 1, 1) * F.normalize(feats[0])
        y = feats[-1]
        for block in self.extras:
            y = block(y)
            feats.append(y)
        return feats

    def _head_outputs(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Class logits [B, N, K], box deltas [B, N, 4] and the default boxes [N, 4] (the same for every image)."""
        feats = self._features(x)
        logits, deltas = self.head(feats)
        # The generators return one copy per entry of image_sizes; one is enough (and keeps the batch size free).
        boxes = self.anchor_generator(ImageList(x, [tuple(x.shape[-2:])]), feats)[0]
        return logits, deltas, boxes

    # -- forward ------------------------------------------------------------------------------------------------------

    def forward(
        self,
        images: Union[Tensor, List[Tensor]],
        targets: Optional[List[Dict[str, Tensor]]] = None,
        *,
        fixed_shape: bool = False,
    ):
        if fixed_shape:
            if not isinstance(images, Tensor):
                raise TypeError("fixed_shape=True takes a batched tensor images [B, 3, H, W]")
            return self.detect(images)
        if self.training:
            self._check_targets(images, targets)
        elif isinstance(images, (list, tuple)) and len(images) == 0:
            return []
        x, sizes = self._batch(images)
        if not self.training and not sizes:
            return []
        logits, deltas, boxes = self._head_outputs(x)
        if self.training:
            return self.loss(logits, deltas, boxes, targets)
        decoded = torch.stack([self._ops.decode(deltas[i], boxes, sizes[i]) for i in range(len(sizes))])
        out = self._postprocess(decoded, logits)
        return [
            {"boxes": out[0][i, :n], "scores": out[1][i, :n], "labels": out[2][i, :n]}
            for i, n in enumerate(out[3].tolist())
        ]

    def _postprocess(self, boxes: Tensor, logits: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        scores = logits.softmax(-1)[..., 1:]  # the background competes in the softmax, not in NMS
        out = self._ops.multiclass_nms(
            boxes, scores, self.iou_threshold, self.score_threshold, self.max_per_class, self.max_total
        )
        return out[0], out[1], torch.where(out[2] >= 0, out[2] + 1, out[2]), out[3]

    def detect(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The fixed-shape forward (``fixed_shape=True``) of a batch [B, 3, H, W]: boxes [B, max_total, 4], scores
        [B, max_total], labels [B, max_total] (-1 past the detections), num_detections [B]; no host sync."""
        x = self._normalise(images)  # not _batch: its per-image list would pin the batch size under torch.compile
        logits, deltas, boxes = self._head_outputs(x)
        b, n = deltas.shape[:2]
        flat = boxes.unsqueeze(0).expand(b, n, 4).reshape(-1, 4)
        decoded = self._ops.decode(deltas.reshape(-1, 4), flat, (int(x.shape[-2]), int(x.shape[-1]))).view(b, n, 4)
        return self._postprocess(decoded, logits)

    # -- training -----------------------------------------------------------------------------------------------------

    def _check_targets(self, images, targets) -> None:
        n = len(images) if isinstance(images, (Tensor, list, tuple)) else -1
        if not isinstance(targets, (list, tuple)) or len(targets) != n:
            raise ValueError("training mode needs targets: a list of one dict {boxes, labels} per image")
        if n == 0:
            raise ValueError("images must hold at least one image in training mode")
        for i, t in enumerate(targets):
            if not isinstance(t, dict):
                raise ValueError(f"targets[{i}] must be a dict {{boxes, labels}}, got {type(t).__name__}")
            boxes, labels = t.get("boxes"), t.get("labels")
            if not (
                isinstance(boxes, Tensor) and boxes.is_floating_point() and boxes.dim() == 2 and boxes.shape[1] == 4
            ):
                raise ValueError(f"targets[{i}]['boxes'] must be a float tensor [G, 4]")
            if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != boxes.shape[:1]:
                raise ValueError(f"targets[{i}]['labels'] must be an int64 tensor [G] (G = {len(boxes)} boxes)")
            if len(labels) and not bool(((labels >= 1) & (labels < self.num_classes)).all()):
                raise ValueError(f"targets[{i}]['labels'] must be in 1..{self.num_classes - 1} (0 is the background)")
            if bool((boxes[:, 2:] <= boxes[:, :2]).any()):
                raise ValueError(f"targets[{i}]['boxes'] must have x2 > x1 and y2 > y1")

    def loss(
        self, logits: Tensor, deltas: Tensor, boxes: Tensor, targets: List[Dict[str, Tensor]]
    ) -> Dict[str, Tensor]:
        """torchvision's SSD losses: the smooth-L1 loss of the matched default boxes' deltas, and the cross-entropy
        of the matched boxes and of the hardest ``neg_to_pos_ratio`` x as many background boxes per image
        (:func:`hard_negative_mask`), each summed over the batch and divided by its matched boxes (at least 1)."""
        box_losses, cls_targets = [], []
        for i, t in enumerate(targets):
            gt = t["boxes"].to(deltas)
            if len(gt):
                matched = ssd_match(self._ops.box_iou(gt, boxes), self.match_threshold)
            else:
                matched = torch.full((len(boxes),), -1, dtype=torch.int64, device=boxes.device)
            fg = (matched >= 0).nonzero().squeeze(1)
            target = self._ops.encode(gt[matched[fg]], boxes[fg])
            box_losses.append(F.smooth_l1_loss(deltas[i, fg], target, reduction="sum"))
            cls_target = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
            cls_target[fg] = t["labels"].to(boxes.device)[matched[fg]]
            cls_targets.append(cls_target)
        cls_target = torch.stack(cls_targets)
        foreground = cls_target > 0
        cls_loss = F.cross_entropy(logits.flatten(0, 1), cls_target.flatten(), reduction="none").view_as(cls_target)
        negatives = hard_negative_mask(cls_loss, foreground, self.neg_to_pos_ratio)
        n = max(1, int(foreground.sum()))
        return {
            "bbox_regression": torch.stack(box_losses).sum() / n,
            "classification": (cls_loss[foreground].sum() + cls_loss[negatives].sum()) / n,
        }
