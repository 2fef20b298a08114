"""Detection networks on visionops' ops, with a ``backend="pytorch"`` twin: RetinaNet.

Lin et al., "Focal Loss for Dense Object Detection" (ICCV 2017), in the structure of torchvision's
``torchvision.models.detection.RetinaNet`` at small widths: a five-stage convolutional backbone, an FPN over strides
8-64 (P3-P6, P6 from P5), shared class and box subnets, three scales x three aspect ratios of anchors per level, the
sigmoid focal loss with an L1 box loss on torchvision's ``Matcher`` (IoU >= 0.5 foreground, < 0.4 background, low
quality matches allowed), and multi-class NMS for the detections.

``"visionops"`` runs anchors, box coding, IoU and NMS on visionops (``visionops.AnchorGenerator``,
``visionops.decode_boxes`` / ``encode_boxes``, ``visionops.box_iou``, ``visionops.multiclass_nms``); ``"pytorch"``
runs torchvision's ``AnchorGenerator``, ``BoxCoder``, ``box_iou`` and the per-image loop around ``batched_nms``.

Shared backbone, FPN and matcher: ``common.py``. Conventions: visionops/models/README.md.
"""

import math
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import _utils as tv_det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator

import visionops
from visionops.models import check_backend
from visionops.models.detection.common import (
    BETWEEN_THRESHOLDS,
    FPN,
    XFORM_CLIP,
    Backbone,
    decode_pytorch,
    match_anchors,
    multiclass_nms_pytorch,
)

__all__ = ["RetinaNet", "retinanet_anchor_sizes"]

_WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # torchvision's RetinaNet box coder weights


# ---- the op table: the only lines the two backends do not share ---------------------------------------------------


class _Ops(NamedTuple):
    anchor_generator: Callable[..., nn.Module]  # (sizes, aspect_ratios) -> torchvision-style AnchorGenerator
    decode: Callable[[Tensor, Tensor, Tuple[int, int]], Tensor]  # (deltas [N, 4], anchors [N, 4], (H, W)) -> boxes
    encode: Callable[[Tensor, Tensor], Tensor]  # (gt boxes [N, 4], anchors [N, 4]) -> regression targets [N, 4]
    box_iou: Callable[[Tensor, Tensor], Tensor]
    # (boxes [B, N, 4], scores [B, N, K], iou, score_threshold, max_per_class, max_total) -> the four fixed tensors
    multiclass_nms: Callable[..., Tuple[Tensor, Tensor, Tensor, Tensor]]


_OPS: Dict[str, _Ops] = {
    "visionops": _Ops(
        anchor_generator=visionops.AnchorGenerator,
        decode=lambda d, a, size: visionops.decode_boxes(d, a, _WEIGHTS, XFORM_CLIP, size),
        encode=lambda gt, a: visionops.encode_boxes(gt, a, _WEIGHTS),
        box_iou=visionops.box_iou,
        multiclass_nms=lambda *args: visionops.multiclass_nms(*args, class_agnostic=False),
    ),
    "pytorch": _Ops(
        anchor_generator=TVAnchorGenerator,
        decode=lambda d, a, size: decode_pytorch(d, a, _WEIGHTS, size),
        encode=lambda gt, a: tv_det_utils.BoxCoder(_WEIGHTS).encode_single(gt, a),
        box_iou=torchvision.ops.box_iou,
        multiclass_nms=multiclass_nms_pytorch,
    ),
}


# ---- the network ----------------------------------------------------------------------------------------------------


def retinanet_anchor_sizes(base: int = 16, levels: int = 4) -> Tuple[Tuple[float, ...], ...]:
    """torchvision's RetinaNet anchor sizes (x, x 2^(1/3), x 2^(2/3)) with x doubling per level from ``base``."""
    return tuple(tuple(base * 2**l * 2 ** (i / 3) for i in range(3)) for l in range(levels))


class Head(nn.Module):
    """A RetinaNet subnet: ``depth`` 3x3 conv + ReLU, then a 3x3 conv to ``num_anchors * per_anchor`` channels,
    shared by every level; output [B, sum_l H_l W_l A, per_anchor] in the anchors' order (level, location, anchor)."""

    def __init__(self, width: int, num_anchors: int, per_anchor: int, depth: int = 2) -> None:
        super().__init__()
        self.conv = nn.Sequential(*(m for _ in range(depth) for m in (nn.Conv2d(width, width, 3, 1, 1), nn.ReLU())))
        self.out = nn.Conv2d(width, num_anchors * per_anchor, 3, 1, 1)
        self.num_anchors, self.per_anchor = num_anchors, per_anchor

    def forward(self, feats: List[Tensor]) -> Tensor:
        outs = []
        for f in feats:
            y = self.out(self.conv(f))
            b, _, h, w = y.shape
            y = y.view(b, self.num_anchors, self.per_anchor, h, w).permute(0, 3, 4, 1, 2)
            outs.append(y.reshape(b, h * w * self.num_anchors, self.per_anchor))
        return torch.cat(outs, 1)


class RetinaNet(nn.Module):
    """A small RetinaNet with torchvision's detection interface.

    * ``model(images)`` in eval mode: ``images`` a list of float tensors [3, H_i, W_i] in 0..1 (or a batched tensor
      [B, 3, H, W]); returns one ``{"boxes": [D, 4], "scores": [D], "labels": [D]}`` per image, boxes (x1, y1, x2,
      y2) in the image's pixels, best first.
    * ``model(images, targets)`` in training mode: ``targets`` one ``{"boxes": [G, 4], "labels": [G]}`` per image;
      returns ``{"classification": focal loss, "bbox_regression": L1 loss}``, each averaged over the images and
      normalised by their foreground anchors, as torchvision's.
    * ``model(images, fixed_shape=True)``: ``images`` a tensor [B, 3, H, W]; returns ``(boxes [B, max_total, 4],
      scores [B, max_total], labels [B, max_total], num_detections [B])`` (rows past num_detections zero, labels -1),
      whatever the content. With the visionops backend this forward exports with ``torch.export`` with a dynamic
      batch dimension, runs under ``torch.compile(fullgraph=True)`` and can be captured in a CUDA graph.

    ``num_classes`` counts the logits; as torchvision's RetinaNet, a label is the index of its logit (keep 0 unused
    for torchvision-style data whose labels start at 1). Images are normalised with ImageNet's mean and std and padded
    at the bottom and right to a multiple of 32 (no resizing): detections are in input pixels, clipped to each image.
    Detections: every (anchor, class) scoring above ``score_threshold`` enters NMS per class at ``iou_threshold``;
    each class keeps its best ``max_per_class``, each image its best ``max_total``.
    """

    size_divisible = 32

    def __init__(
        self,
        num_classes: int,
        backend: str = "visionops",
        *,
        width: int = 64,
        anchor_sizes: Optional[Sequence[Sequence[float]]] = None,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        score_threshold: float = 0.05,
        iou_threshold: float = 0.5,
        max_per_class: int = 100,
        max_total: int = 100,
        fg_iou_threshold: float = 0.5,
        bg_iou_threshold: float = 0.4,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backend = check_backend(backend)
        self._ops = _OPS[backend]
        self.num_classes = num_classes
        sizes = tuple(tuple(s) for s in (anchor_sizes or retinanet_anchor_sizes()))
        if len(sizes) != 4:
            raise ValueError(f"anchor_sizes must have 4 levels (P3-P6), got {len(sizes)}")
        self.anchor_generator = self._ops.anchor_generator(sizes, (tuple(aspect_ratios),) * len(sizes))
        num_anchors = self.anchor_generator.num_anchors_per_location()[0]
        self.backbone = Backbone()
        self.fpn = FPN((64, 96, 128), width)
        self.classification_head = Head(width, num_anchors, num_classes)
        self.regression_head = Head(width, num_anchors, 4)
        self.register_buffer("image_mean", torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1), persistent=False)
        self.score_threshold, self.iou_threshold = float(score_threshold), float(iou_threshold)
        self.max_per_class, self.max_total = int(max_per_class), int(max_total)
        self.fg_iou_threshold, self.bg_iou_threshold = float(fg_iou_threshold), float(bg_iou_threshold)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """torchvision's RetinaNet initialisation (heads normal(0, 0.01), zero biases, the classifier's bias at the
        prior probability 0.01; backbone Kaiming-normal fan-out), drawn from ``generator``."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                if name.startswith(("classification_head", "regression_head")):
                    m.weight.normal_(0.0, 0.01, generator=generator)
                else:
                    fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                    m.weight.normal_(0.0, math.sqrt(2.0 / fan_out), generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
                m.reset_running_stats()
        self.classification_head.out.bias.fill_(-math.log((1 - 0.01) / 0.01))

    # -- shared stages ------------------------------------------------------------------------------------------------

    def _batch(self, images: Union[Tensor, List[Tensor]]) -> Tuple[Tensor, List[Tuple[int, int]]]:
        """Normalised images padded to one tensor [B, 3, H, W] (multiples of 32), and each image's own (H, W)."""
        if isinstance(images, Tensor):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"images must be a tensor [B, 3, H, W] or a list of [3, H, W], got {images.shape}")
            x = (images - self.image_mean) / self.image_std
            sizes = [(int(images.shape[-2]), int(images.shape[-1]))] * len(images)
        else:
            if not isinstance(images, (list, tuple)) or not all(isinstance(i, Tensor) and i.dim() == 3 for i in images):
                raise TypeError("images must be a tensor [B, 3, H, W] or a list of tensors [3, H, W]")
            sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
            h, w = (max(s[d] for s in sizes) for d in (0, 1))
            x = images[0].new_zeros(len(images), 3, h, w)
            for i, img in enumerate(images):
                x[i, :, : img.shape[1], : img.shape[2]] = (img - self.image_mean) / self.image_std
        d = self.size_divisible
        pad_h, pad_w = -x.shape[-2] % d, -x.shape[-1] % d
        return F.pad(x, (0, pad_w, 0, pad_h)), sizes

    def _head_outputs(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Class logits [B, N, K], box deltas [B, N, 4] and the anchors [N, 4] of one image (the same for all)."""
        feats = self.fpn(self.backbone(x))
        # Every image has the same anchors (torchvision's strides come from the padded batch). The generator's
        # forward returns one tensor per image, a list as long as the batch, which pins the batch size under
        # torch.export; its grid_anchors method (torchvision's too) gives the anchors once, per level.
        h, w = x.shape[-2:]
        grid_sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in feats]
        strides = [(int(h) // gh, int(w) // gw) for gh, gw in grid_sizes]
        anchors = torch.cat(self.anchor_generator.grid_anchors(grid_sizes, strides)).to(x.dtype)
        return self.classification_head(feats), self.regression_head(feats), anchors

    def _apply(self, fn, recurse=True):
        # The generators keep their cell anchors in a plain list (not buffers: the state_dict has no anchors), so
        # .to() / .double() / .cuda() must move them here, as they move buffers.
        super()._apply(fn, recurse)
        gen = self.anchor_generator
        gen.cell_anchors = [fn(c) for c in gen.cell_anchors]
        return self

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
        if not self.training and isinstance(images, (list, tuple)) and len(images) == 0:
            return []
        x, sizes = self._batch(images)
        if self.training:
            if targets is None or len(targets) != len(sizes):
                raise ValueError("training mode needs targets: one dict {boxes, labels} per image")
            logits, deltas, anchors = self._head_outputs(x)
            return self.loss(logits, deltas, anchors, targets)
        logits, deltas, anchors = self._head_outputs(x)
        boxes = torch.stack([self._ops.decode(deltas[i], anchors, sizes[i]) for i in range(len(sizes))])
        out = self._ops.multiclass_nms(boxes, logits.sigmoid(), *self._nms_args())
        return [
            {"boxes": out[0][i, :n], "scores": out[1][i, :n], "labels": out[2][i, :n]}
            for i, n in enumerate(out[3].tolist())
        ]

    def _nms_args(self) -> Tuple[float, float, int, int]:
        return self.iou_threshold, self.score_threshold, self.max_per_class, self.max_total

    def detect(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The fixed-shape forward (``fixed_shape=True``) of a batch [B, 3, H, W]: boxes [B, max_total, 4], scores
        [B, max_total], labels [B, max_total] (-1 past the detections), num_detections [B]."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a tensor [B, 3, H, W], got {list(images.shape)}")
        h, w = images.shape[-2:]
        x = F.pad((images - self.image_mean) / self.image_std, (0, -w % 32, 0, -h % 32))
        logits, deltas, anchors = self._head_outputs(x)
        b, n = deltas.shape[:2]
        flat_anchors = anchors.unsqueeze(0).expand(b, n, 4).reshape(-1, 4)
        boxes = self._ops.decode(deltas.reshape(-1, 4), flat_anchors, (int(h), int(w))).view(b, n, 4)
        return self._ops.multiclass_nms(boxes, logits.sigmoid(), *self._nms_args())

    # -- training -----------------------------------------------------------------------------------------------------

    def loss(
        self, logits: Tensor, deltas: Tensor, anchors: Tensor, targets: List[Dict[str, Tensor]]
    ) -> Dict[str, Tensor]:
        """torchvision's RetinaNet losses: per image the sigmoid focal loss (alpha 0.25, gamma 2) over the anchors
        not between the thresholds and the L1 loss of the foreground anchors' box deltas, each divided by the
        number of foreground anchors (at least 1), then averaged over the images."""
        cls_losses, box_losses = [], []
        for i, t in enumerate(targets):
            gt_boxes, gt_labels = t["boxes"].to(deltas), t["labels"]
            matched = match_anchors(
                self._ops.box_iou(gt_boxes, anchors.to(deltas)), self.fg_iou_threshold, self.bg_iou_threshold
            )
            fg = (matched >= 0).nonzero().squeeze(1)
            num_fg = max(1, fg.numel())
            cls_target = torch.zeros_like(logits[i])
            cls_target[fg, gt_labels[matched[fg]]] = 1.0
            valid = matched != BETWEEN_THRESHOLDS
            focal = torchvision.ops.sigmoid_focal_loss(logits[i][valid], cls_target[valid], reduction="sum")
            cls_losses.append(focal / num_fg)
            reg_target = self._ops.encode(gt_boxes[matched[fg]], anchors[fg].to(deltas))
            box_losses.append(F.l1_loss(deltas[i][fg], reg_target, reduction="sum") / num_fg)
        n = len(targets)
        return {"classification": sum(cls_losses) / n, "bbox_regression": sum(box_losses) / n}
