"""Two-stage detectors on visionops' ops, with a ``backend="pytorch"`` twin: Fast R-CNN and Faster R-CNN.

Girshick, "Fast R-CNN" (ICCV 2015): given proposals, RoIPool on one feature map, two fully connected layers, class
scores and per-class box deltas. Ren et al., "Faster R-CNN" (NeurIPS 2015), in the structure of torchvision's
``fasterrcnn_resnet50_fpn`` at small widths: a region proposal network over an FPN (anchors, objectness, box deltas,
per-level top-k, NMS), RoIAlign over the FPN levels (``MultiScaleRoIAlign``) and the same box head. Training follows
torchvision: torchvision's ``Matcher`` on ``box_iou``, balanced positive / negative sampling (drawn from a
``torch.Generator``), binary cross-entropy and smooth-L1 for the RPN, cross-entropy and smooth-L1 for the box head.

``"visionops"`` runs anchors, box coding, IoU, box filtering, NMS and RoI pooling on visionops; ``"pytorch"`` runs
torchvision's ``AnchorGenerator``, ``BoxCoder``, ``box_iou``, ``remove_small_boxes``, ``batched_nms``, ``roi_pool``,
``roi_align`` and ``MultiScaleRoIAlign``. Mask R-CNN: ``mask_rcnn.py``. Conventions: visionops/models/README.md.
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
from visionops.models.data import random_boxes
from visionops.models.detection.common import (
    BETWEEN_THRESHOLDS,
    FPN,
    XFORM_CLIP,
    Backbone,
    batch_images,
    decode_pytorch,
    match_anchors,
    sample_balanced,
)

__all__ = ["DEFAULT_OPTIONS", "FastRCNN", "FasterRCNN", "jittered_proposals"]

_RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # torchvision's box coder weights: RPN and box head
_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
Size = Tuple[int, int]


# ---- the op table: the only lines the two backends do not share ---------------------------------------------------


class _Ops(NamedTuple):
    anchor_generator: Callable[..., nn.Module]  # (sizes, aspect_ratios) -> torchvision-style AnchorGenerator
    decode: Callable[[Tensor, Tensor, Sequence[float], Size], Tensor]  # deltas [N, 4K], boxes [N, 4] -> clipped boxes
    encode: Callable[[Tensor, Tensor, Sequence[float]], Tensor]  # (gt boxes [N, 4], boxes [N, 4]) -> targets [N, 4]
    box_iou: Callable[[Tensor, Tensor], Tensor]
    filter_boxes: Callable[[Tensor, Tensor, float, float], Tensor]  # indices with score >= t and sides >= min_size
    batched_nms: Callable[[Tensor, Tensor, Tensor, float], Tensor]
    roi_pool: Callable[..., Tensor]  # torchvision.ops.roi_pool's signature
    roi_align: Callable[..., Tensor]  # torchvision.ops.roi_align's signature
    multi_scale_roi_align: Callable[..., nn.Module]  # (featmap_names, output_size, sampling_ratio, canonical_scale=)


def _filter_pytorch(boxes: Tensor, scores: Tensor, score_threshold: float, min_size: float) -> Tensor:
    keep = torchvision.ops.remove_small_boxes(boxes, min_size)  # torchvision's RPN filter
    return keep[scores[keep] >= score_threshold]


_OPS: Dict[str, _Ops] = {
    "visionops": _Ops(
        anchor_generator=visionops.AnchorGenerator,
        decode=lambda d, b, w, size: visionops.decode_boxes(d, b, w, XFORM_CLIP, size),
        encode=visionops.encode_boxes,
        box_iou=visionops.box_iou,
        filter_boxes=visionops.filter_boxes,
        batched_nms=visionops.batched_nms,
        roi_pool=visionops.roi_pool,
        roi_align=visionops.roi_align,
        multi_scale_roi_align=visionops.MultiScaleRoIAlign,
    ),
    "pytorch": _Ops(
        anchor_generator=TVAnchorGenerator,
        decode=decode_pytorch,
        encode=lambda gt, b, w: tv_det_utils.BoxCoder(w).encode_single(gt, b),
        box_iou=torchvision.ops.box_iou,
        filter_boxes=_filter_pytorch,
        batched_nms=torchvision.ops.batched_nms,
        roi_pool=torchvision.ops.roi_pool,
        roi_align=torchvision.ops.roi_align,
        multi_scale_roi_align=torchvision.ops.MultiScaleRoIAlign,
    ),
}


# ---- proposals for Fast R-CNN ----------------------------------------------------------------------------------------


def jittered_proposals(
    targets: List[Dict[str, Tensor]],
    image_sizes: Sequence[Size],
    *,
    per_box: int = 16,
    num_random: int = 32,
    jitter: float = 0.15,
    generator: Optional[torch.Generator] = None,
) -> List[Tensor]:
    """Training proposals for Fast R-CNN, one Tensor[K, 4] per image: ``per_box`` copies of every ground-truth box
    with its centre moved and its sides scaled by ``jitter`` times a standard normal (relative to its size), plus
    ``num_random`` random boxes (sides at least 4 px), clipped to the image (H, W); drawn from ``generator``."""
    out = []
    for t, (h, w) in zip(targets, image_sizes):
        gt = t["boxes"]
        wh = (gt[:, 2:] - gt[:, :2]).repeat_interleave(per_box, 0)
        centre = ((gt[:, 2:] + gt[:, :2]) / 2).repeat_interleave(per_box, 0)
        noise = torch.randn(len(wh), 4, generator=generator, dtype=gt.dtype).to(gt.device) * jitter
        centre, wh = centre + noise[:, :2] * wh, wh * noise[:, 2:].exp()
        rand = random_boxes(num_random, (h, w), min_size=min(4.0, h, w), generator=generator).to(gt)
        boxes = torchvision.ops.clip_boxes_to_image(torch.cat([centre - wh / 2, centre + wh / 2], 1), (h, w))
        boxes = torch.cat([boxes, rand])
        out.append(boxes[((boxes[:, 2:] - boxes[:, :2]) >= 1).all(1)])
    return out


def check_targets(targets, num_images: int, masks: bool = False) -> None:
    """ValueError naming ``targets`` unless it is one dict {boxes [G, 4], labels [G] (, masks [G, H, W])} per image."""
    if not isinstance(targets, (list, tuple)) or len(targets) != num_images:
        raise ValueError(f"training mode needs targets: a list of one dict per image ({num_images} images)")
    keys = ("boxes", "labels", "masks") if masks else ("boxes", "labels")
    for t in targets:
        if not isinstance(t, dict) or any(not isinstance(t.get(k), Tensor) for k in keys):
            raise ValueError(f"each element of targets must be a dict with tensors {keys}")
        g = len(t["boxes"])
        if t["boxes"].shape != (g, 4) or t["labels"].shape != (g,):
            raise ValueError(
                f"targets: boxes must be [G, 4] and labels [G], got {list(t['boxes'].shape)}, {list(t['labels'].shape)}"
            )
        if masks and (t["masks"].dim() != 3 or len(t["masks"]) != g):
            raise ValueError(f"targets: masks must be [G, H, W] with G = {g}, got {list(t['masks'].shape)}")


# ---- the box head, shared by Fast and Faster R-CNN -------------------------------------------------------------------


class RoIHeads(nn.Module):
    """torchvision's ``RoIHeads`` box branch: ``TwoMLPHead`` (fc6, fc7) and ``FastRCNNPredictor`` (cls_score,
    bbox_pred), training-sample selection, ``fastrcnn_loss`` and ``postprocess_detections``; pooling is the caller's."""

    def __init__(self, ops: _Ops, in_features: int, representation: int, num_classes: int, options: dict) -> None:
        super().__init__()
        self.fc6, self.fc7 = nn.Linear(in_features, representation), nn.Linear(representation, representation)
        self.cls_score = nn.Linear(representation, num_classes)
        self.bbox_pred = nn.Linear(representation, num_classes * 4)
        self._ops, self.num_classes = ops, num_classes
        self.fg, self.bg = options["box_fg_iou_thresh"], options["box_bg_iou_thresh"]
        self.batch_size, self.fraction = options["box_batch_size_per_image"], options["box_positive_fraction"]
        self.score_thresh, self.nms_thresh = options["box_score_thresh"], options["box_nms_thresh"]
        self.detections = options["box_detections_per_img"]

    def forward(self, pooled: Tensor) -> Tuple[Tensor, Tensor]:
        x = F.relu(self.fc7(F.relu(self.fc6(pooled.flatten(1)))))
        return self.cls_score(x), self.bbox_pred(x)

    def select_training_samples(
        self, proposals: List[Tensor], targets: List[Dict[str, Tensor]], generator: torch.Generator
    ) -> Tuple[List[Tensor], List[Tensor], Tensor, Tensor]:
        """Per image the sampled proposals (ground-truth boxes added), their matched ground-truth index, and over
        the batch their class labels (0 background) and box regression targets."""
        out_props, out_matched, out_labels, out_targets = [], [], [], []
        for props, t in zip(proposals, targets):
            gt, gt_labels = t["boxes"].to(props), t["labels"]
            props = torch.cat([props, gt])
            if len(gt):
                matched = match_anchors(self._ops.box_iou(gt, props), self.fg, self.bg, False)
                labels = gt_labels[matched.clamp(min=0)]
                labels[matched < 0] = 0
                labels[matched == BETWEEN_THRESHOLDS] = -1
            else:
                matched = torch.zeros(len(props), dtype=torch.int64, device=props.device)
                labels = torch.zeros(len(props), dtype=torch.int64, device=props.device)
            pos, neg = sample_balanced(labels, self.batch_size, self.fraction, generator)
            keep = torch.cat([pos, neg])
            props, matched = props[keep], matched[keep].clamp(min=0)
            matched_gt = gt[matched] if len(gt) else torch.zeros_like(props)
            out_props.append(props)
            out_matched.append(matched)
            out_labels.append(labels[keep])
            out_targets.append(self._ops.encode(matched_gt, props, _BOX_WEIGHTS))
        return out_props, out_matched, torch.cat(out_labels), torch.cat(out_targets)

    def loss(self, logits: Tensor, deltas: Tensor, labels: Tensor, targets: Tensor) -> Dict[str, Tensor]:
        """torchvision's ``fastrcnn_loss``: cross-entropy over the samples, smooth-L1 (beta 1/9) of the positives'
        deltas for their class, summed and divided by the number of samples."""
        pos = (labels > 0).nonzero().squeeze(1)
        box = deltas.reshape(len(deltas), -1, 4)[pos, labels[pos]]
        box_loss = F.smooth_l1_loss(box, targets[pos], beta=1 / 9, reduction="sum") / max(1, labels.numel())
        return {"loss_classifier": F.cross_entropy(logits, labels), "loss_box_reg": box_loss}

    def postprocess(
        self, logits: Tensor, deltas: Tensor, proposals: List[Tensor], sizes: List[Size]
    ) -> List[Dict[str, Tensor]]:
        """torchvision's ``postprocess_detections``: per-class boxes decoded and clipped, softmax scores, background
        dropped, score >= threshold and sides >= 0.01, NMS per class, the best ``box_detections_per_img``."""
        k = self.num_classes
        scores = F.softmax(logits, -1).split([len(p) for p in proposals])
        deltas = deltas.split([len(p) for p in proposals])
        out = []
        for props, d, s, size in zip(proposals, deltas, scores, sizes):
            boxes = self._ops.decode(d, props, _BOX_WEIGHTS, size).reshape(-1, k, 4)[:, 1:].reshape(-1, 4)
            labels = torch.arange(1, k, device=s.device).repeat(len(props))
            s = s[:, 1:].reshape(-1)
            keep = self._ops.filter_boxes(boxes, s, self.score_thresh, 1e-2)
            boxes, s, labels = boxes[keep], s[keep], labels[keep]
            keep = self._ops.batched_nms(boxes, s, labels, self.nms_thresh)[: self.detections]
            out.append({"boxes": boxes[keep], "scores": s[keep], "labels": labels[keep]})
        return out


# ---- the region proposal network ------------------------------------------------------------------------------------


class RPN(nn.Module):
    """torchvision's ``RegionProposalNetwork`` with its ``RPNHead`` (a shared 3x3 conv, 1x1 objectness and deltas)."""

    def __init__(self, ops: _Ops, width: int, options: dict) -> None:
        super().__init__()
        sizes = tuple(tuple(s) for s in options["anchor_sizes"])
        self.anchor_generator = ops.anchor_generator(sizes, (tuple(options["aspect_ratios"]),) * len(sizes))
        a = self.anchor_generator.num_anchors_per_location()[0]
        self.conv = nn.Conv2d(width, width, 3, 1, 1)
        self.cls_logits, self.bbox_pred = nn.Conv2d(width, a, 1), nn.Conv2d(width, 4 * a, 1)
        self._ops, self.o = ops, options

    def forward(
        self,
        feats: List[Tensor],
        padded: Size,
        sizes: List[Size],
        targets: Optional[List[Dict[str, Tensor]]],
        generator: torch.Generator,
    ) -> Tuple[List[Tensor], Dict[str, Tensor]]:
        objectness, deltas = [], []
        for f in feats:
            t = F.relu(self.conv(f))
            b, _, h, w = t.shape
            objectness.append(self.cls_logits(t).permute(0, 2, 3, 1).reshape(b, -1))  # (location, anchor) order
            deltas.append(self.bbox_pred(t).view(b, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4))
        per_level = [o.shape[1] for o in objectness]
        objectness, deltas = torch.cat(objectness, 1), torch.cat(deltas, 1)
        # Every image has the same anchors: the strides come from the padded batch, as torchvision's.
        grid = [(int(f.shape[-2]), int(f.shape[-1])) for f in feats]
        strides = [(padded[0] // gh, padded[1] // gw) for gh, gw in grid]
        anchors = torch.cat(self.anchor_generator.grid_anchors(grid, strides)).to(deltas.dtype)
        levels = torch.repeat_interleave(
            torch.arange(len(per_level), device=deltas.device), torch.tensor(per_level, device=deltas.device)
        )
        mode = "train" if self.training else "test"
        pre, post = self.o[f"rpn_pre_nms_top_n_{mode}"], self.o[f"rpn_post_nms_top_n_{mode}"]
        proposals = []
        for i, size in enumerate(sizes):
            obj = objectness[i].detach()
            # per level, the pre_nms_top_n best anchors
            top = [o.topk(min(pre, len(o))).indices + s for o, s in zip(obj.split(per_level), _starts(per_level))]
            top = torch.cat(top)
            boxes = self._ops.decode(deltas[i].detach()[top], anchors[top], _RPN_WEIGHTS, size)
            scores, lv = obj[top].sigmoid(), levels[top]
            keep = self._ops.filter_boxes(boxes, scores, 0.0, 1e-3)
            boxes, scores, lv = boxes[keep], scores[keep], lv[keep]
            keep = self._ops.batched_nms(boxes, scores, lv, self.o["rpn_nms_thresh"])[:post]
            proposals.append(boxes[keep])
        losses = {} if targets is None else self.loss(objectness, deltas, anchors, targets, generator)
        return proposals, losses

    def loss(
        self, objectness: Tensor, deltas: Tensor, anchors: Tensor, targets: List[Dict[str, Tensor]], generator
    ) -> Dict[str, Tensor]:
        """torchvision's RPN loss: anchors matched at IoU 0.7 / 0.3 (low-quality matches allowed), a balanced sample
        per image; BCE over the sample, smooth-L1 (beta 1/9) of the positives, both divided by the sample size."""
        sampled_logits, sampled_labels, box_losses = [], [], []
        for i, t in enumerate(targets):
            gt = t["boxes"].to(deltas)
            if len(gt):
                matched = match_anchors(
                    self._ops.box_iou(gt, anchors), self.o["rpn_fg_iou_thresh"], self.o["rpn_bg_iou_thresh"]
                )
            else:
                matched = torch.full((len(anchors),), -1, dtype=torch.int64, device=anchors.device)
            labels = (matched >= 0).to(torch.int64)
            labels[matched == BETWEEN_THRESHOLDS] = -1
            pos, neg = sample_balanced(
                labels, self.o["rpn_batch_size_per_image"], self.o["rpn_positive_fraction"], generator
            )
            sample = torch.cat([pos, neg])
            sampled_logits.append(objectness[i][sample])
            sampled_labels.append(labels[sample].to(deltas))
            reg = self._ops.encode(gt[matched[pos]], anchors[pos], _RPN_WEIGHTS)
            box_losses.append(F.smooth_l1_loss(deltas[i][pos], reg, beta=1 / 9, reduction="sum"))
        logits, labels = torch.cat(sampled_logits), torch.cat(sampled_labels)
        n = max(1, labels.numel())
        return {
            "loss_objectness": F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / n,
            "loss_rpn_box_reg": sum(box_losses) / n,
        }


def _starts(counts: List[int]) -> List[int]:
    return [sum(counts[:i]) for i in range(len(counts))]


# ---- the networks ----------------------------------------------------------------------------------------------------

# torchvision's FasterRCNN defaults, scaled to small images: anchors 16-128 px on strides 8-64, fewer proposals
# (images of ~128x128 have ~1000 anchors) and 128 sampled RoIs per image (a few objects each)
DEFAULT_OPTIONS = dict(
    width=64,
    representation_size=256,
    anchor_sizes=((16,), (32,), (64,), (128,)),
    aspect_ratios=(0.5, 1.0, 2.0),
    rpn_pre_nms_top_n_train=1000,
    rpn_pre_nms_top_n_test=500,
    rpn_post_nms_top_n_train=500,
    rpn_post_nms_top_n_test=300,
    rpn_nms_thresh=0.7,
    rpn_fg_iou_thresh=0.7,
    rpn_bg_iou_thresh=0.3,
    rpn_batch_size_per_image=256,
    rpn_positive_fraction=0.5,
    box_score_thresh=0.05,
    box_nms_thresh=0.5,
    box_detections_per_img=100,
    box_fg_iou_thresh=0.5,
    box_bg_iou_thresh=0.5,
    box_batch_size_per_image=128,
    box_positive_fraction=0.25,
    canonical_scale=112,
    mask_width=32,
)


class _TwoStage(nn.Module):
    """What Fast and Faster R-CNN share: options, normalisation, backbone + FPN, the box head, initialisation."""

    size_divisible = 32
    _finest_only = False
    _without = ("mask_",)  # prefixes of the options this network has no part for

    @classmethod
    def option_names(cls) -> set:
        """The keyword options this network takes (defaults: ``rcnn.DEFAULT_OPTIONS``)."""
        return {k for k in DEFAULT_OPTIONS if not k.startswith(cls._without)}

    def __init__(self, num_classes: int, backend: str, generator: Optional[torch.Generator], options: dict) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (background included), got {num_classes!r}")
        self.backend = check_backend(backend)
        self._ops = _OPS[backend]
        unknown = set(options) - self.option_names()
        if unknown:
            raise TypeError(f"unknown options for {type(self).__name__}: {sorted(unknown)}")
        self.options = o = {**DEFAULT_OPTIONS, **options}
        self.num_classes, width = num_classes, o["width"]
        self.backbone = Backbone()
        self.fpn = FPN((64, 96, 128), width, finest_only=self._finest_only)
        self.roi_heads = RoIHeads(self._ops, width * 49, o["representation_size"], num_classes, o)
        self.register_buffer("image_mean", torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1), persistent=False)
        # Sampling draws from the generator that drew the weights (a private one seeded 0 without it), never from
        # the global RNG: two models built from equal generators sample alike.
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """torchvision's initialisations drawn from ``generator``: convolutions Kaiming-normal (fan-out), the RPN
        normal(0, 0.01); fc6 / fc7 as ``nn.Linear``; the classifier normal(0, 0.01), the box regressor
        normal(0, 0.001) (Detectron's); zero biases."""
        for name, m in self.named_modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                if name.startswith("rpn."):
                    m.weight.normal_(0.0, 0.01, generator=generator)
                else:
                    fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
                    if isinstance(m, nn.ConvTranspose2d):
                        fan_out = m.weight.shape[1] * m.weight[0, 0].numel()
                    m.weight.normal_(0.0, math.sqrt(2.0 / fan_out), generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                if name.endswith("cls_score") or name.endswith("bbox_pred"):
                    m.weight.normal_(0.0, 0.01 if name.endswith("cls_score") else 0.001, generator=generator)
                else:
                    m.weight.uniform_(-bound, bound, generator=generator)
                m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
                m.reset_running_stats()

    def _apply(self, fn, recurse=True):
        # Anchor generators keep their cell anchors in a plain list (no buffers: the state_dict has no anchors).
        super()._apply(fn, recurse)
        gen = getattr(getattr(self, "rpn", None), "anchor_generator", None)
        if gen is not None:
            gen.cell_anchors = [fn(c) for c in gen.cell_anchors]
        return self

    def _prepare(self, images, targets, masks: bool = False) -> Tuple[Tensor, List[Size]]:
        x, sizes = batch_images(images, self.image_mean, self.image_std, self.size_divisible)
        if self.training:
            check_targets(targets, len(sizes), masks)
        return x, sizes


class FastRCNN(_TwoStage):
    """A small Fast R-CNN with torchvision's detection interface, on given proposals.

    * ``model(images, proposals=proposals)`` in eval mode: ``images`` a list of float tensors [3, H_i, W_i] in 0..1
      (or a batched tensor [B, 3, H, W]), ``proposals`` one Tensor[K_i, 4] (x1, y1, x2, y2) per image; returns one
      ``{"boxes": [D, 4], "labels": [D], "scores": [D]}`` per image, best first.
    * ``model(images, targets, proposals=proposals)`` in training mode: ``targets`` one ``{"boxes": [G, 4],
      "labels": [G]}`` per image (labels 1..num_classes - 1, 0 is the background); returns ``{"loss_classifier",
      "loss_box_reg"}``. :func:`jittered_proposals` makes training proposals from the targets.

    The backbone and FPN are Faster R-CNN's; RoIPool (7x7) reads the finest FPN level (stride 8). Options (keyword):
    ``width``, ``representation_size`` and the ``box_*`` options of :class:`FasterRCNN`; ``generator`` draws the
    initial weights and the proposal samples.
    """

    _finest_only = True
    _without = ("mask_", "rpn_", "anchor_", "aspect_", "canonical_")

    def __init__(
        self, num_classes: int, *, backend: str = "visionops", generator: Optional[torch.Generator] = None, **options
    ) -> None:
        super().__init__(num_classes, backend, generator, options)
        self.reset_parameters(generator)

    def forward(
        self,
        images: Union[Tensor, List[Tensor]],
        targets: Optional[List[Dict[str, Tensor]]] = None,
        *,
        proposals: Optional[List[Tensor]] = None,
    ):
        if not self.training and isinstance(images, (Tensor, list, tuple)) and len(images) == 0:
            return []
        x, sizes = self._prepare(images, targets)
        if not isinstance(proposals, (list, tuple)) or len(proposals) != len(sizes):
            raise ValueError(f"proposals must be a list of one Tensor[K, 4] per image ({len(sizes)} images)")
        if any(not isinstance(p, Tensor) or p.dim() != 2 or p.shape[1] != 4 for p in proposals):
            raise ValueError("proposals must be a list of one Tensor[K, 4] per image")
        proposals = [p.to(x) for p in proposals]
        feat = self.fpn(self.backbone(x))[0]
        if self.training:
            proposals, _, labels, reg = self.roi_heads.select_training_samples(proposals, targets, self.generator)
        pooled = self._ops.roi_pool(feat, proposals, (7, 7), 1.0 / 8)
        logits, deltas = self.roi_heads(pooled)
        if self.training:
            return self.roi_heads.loss(logits, deltas, labels, reg)
        return self.roi_heads.postprocess(logits, deltas, proposals, sizes)


class FasterRCNN(_TwoStage):
    """A small Faster R-CNN (FPN) with torchvision's detection interface.

    * ``model(images)`` in eval mode: ``images`` a list of float tensors [3, H_i, W_i] in 0..1 (or a batched tensor
      [B, 3, H, W]); returns one ``{"boxes": [D, 4], "labels": [D], "scores": [D]}`` per image, boxes (x1, y1, x2,
      y2) in the image's pixels, best first.
    * ``model(images, targets)`` in training mode: ``targets`` one ``{"boxes": [G, 4], "labels": [G]}`` per image
      (labels 1..num_classes - 1, 0 is the background; G may be 0); returns ``{"loss_classifier", "loss_box_reg",
      "loss_objectness", "loss_rpn_box_reg"}``.

    ``num_classes`` counts the background, as torchvision's. Images are normalised with ImageNet's mean and std and
    padded at the bottom and right to a multiple of 32 (no resizing). The backbone is a five-stage convolutional net;
    the FPN gives P3-P6 (strides 8-64; ``width`` channels) to the RPN, one anchor size per level
    (``anchor_sizes``, ``aspect_ratios``), and P3-P5 to a 7x7 ``MultiScaleRoIAlign`` (a box of side
    ``canonical_scale`` reads P4). Options (keyword; defaults in ``rcnn.DEFAULT_OPTIONS``) are torchvision's
    ``FasterRCNN`` arguments of the same names, with ``rpn_*_top_n_*`` per level before NMS and per image after.
    ``generator`` draws the initial weights and, in training, the anchor and proposal samples.
    """

    def __init__(
        self, num_classes: int, *, backend: str = "visionops", generator: Optional[torch.Generator] = None, **options
    ) -> None:
        super().__init__(num_classes, backend, generator, options)
        o = self.options
        self.rpn = RPN(self._ops, o["width"], o)
        self.box_roi_pool = self._ops.multi_scale_roi_align(["0", "1", "2"], 7, 2, canonical_scale=o["canonical_scale"])
        self._build_extra()
        self.reset_parameters(generator)

    def _build_extra(self) -> None:
        pass

    def forward(self, images: Union[Tensor, List[Tensor]], targets: Optional[List[Dict[str, Tensor]]] = None):
        if not self.training and isinstance(images, (Tensor, list, tuple)) and len(images) == 0:
            return []
        x, sizes = self._prepare(images, targets, masks=hasattr(self, "mask_head"))
        feats = self.fpn(self.backbone(x))
        fmaps = {str(i): f for i, f in enumerate(feats[:3])}
        padded = [(int(x.shape[-2]), int(x.shape[-1]))] * len(sizes)  # the pooler's scales from the padded batch
        proposals, losses = self.rpn(feats, padded[0], sizes, targets if self.training else None, self.generator)
        if self.training:
            proposals, matched, labels, reg = self.roi_heads.select_training_samples(proposals, targets, self.generator)
        logits, deltas = self.roi_heads(self.box_roi_pool(fmaps, proposals, padded))
        if self.training:
            losses.update(self.roi_heads.loss(logits, deltas, labels, reg))
            losses.update(self._extra_losses(fmaps, padded, proposals, matched, labels, targets))
            return losses
        detections = self.roi_heads.postprocess(logits, deltas, proposals, sizes)
        return self._extra_outputs(fmaps, padded, detections, sizes)

    def _extra_losses(self, fmaps, padded, proposals, matched, labels, targets) -> Dict[str, Tensor]:
        return {}

    def _extra_outputs(self, fmaps, padded, detections, sizes) -> List[Dict[str, Tensor]]:
        return detections
