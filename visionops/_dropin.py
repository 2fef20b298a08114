"""The functions and methods ``patch_torchvision()`` installs in torchvision (see visionops/compat.py, docs/dropin.md).

Each has torchvision's exact signature and is scriptable: ``torch.jit.script`` compiles the branch below
``torch.jit.is_scripting()``, which calls ``torch.ops.visionops.*`` directly (a scripted model saved with
``torch.jit.save`` needs ``import visionops`` before ``torch.jit.load``, as torchvision's ops need
``import torchvision``). In eager mode they call the visionops wrappers, except for inputs visionops has no kernel for
(quantized or non-floating tensors), which go to torchvision's own implementation, and, while ``torch.onnx.export``
runs, for the detection building blocks whose visionops ops have no ONNX translation (AnchorGenerator, BoxCoder, and
MultiScaleRoIAlign on the TorchScript exporter): torchvision's Python, whose graph is made of roi_align and plain
tensor operations, then exports.

This module imports torchvision; ``import visionops`` does not import it.
"""

import sys
from typing import Union

import torch
import torchvision.models.detection._utils as _tv_det_utils
import torchvision.models.detection.anchor_utils as _tv_anchor_utils
import torchvision.ops.boxes as _tv_boxes
import torchvision.ops.poolers as _tv_poolers
from torch import Tensor
from torch.jit.annotations import BroadcastingList2
from torch.nn.modules.utils import _pair
from torchvision.models.detection.image_list import ImageList

import visionops.ops  # noqa: F401  (the submodules below; their names are shadowed by functions in the package)
from visionops import _registry

_vo_anchors = sys.modules["visionops.ops.anchors"]
_vo_box_coder = sys.modules["visionops.ops.box_coder"]
_vo_nms = sys.modules["visionops.ops.nms"]
_vo_poolers = sys.modules["visionops.ops.poolers"]
_vo_roi = sys.modules["visionops.ops.roi"]

_ROI_ALIGN_MODULE = sys.modules["torchvision.ops.roi_align"]
_ROI_POOL_MODULE = sys.modules["torchvision.ops.roi_pool"]

# torchvision's own implementations, captured before any patch replaces them.
_tv_nms = _tv_boxes.nms
_tv_batched_nms = _tv_boxes.batched_nms
_tv_box_iou = _tv_boxes.box_iou
_tv_roi_align = _ROI_ALIGN_MODULE.roi_align
_tv_roi_pool = _ROI_POOL_MODULE.roi_pool
_tv_multiscale_forward = _tv_poolers.MultiScaleRoIAlign.forward
_tv_anchor_forward = _tv_anchor_utils.AnchorGenerator.forward
_tv_encode_single = _tv_det_utils.BoxCoder.encode_single
_tv_decode_single = _tv_det_utils.BoxCoder.decode_single
_tv_filter_input = _tv_poolers._filter_input
_tv_setup_scales = _tv_poolers._setup_scales
_tv_convert_to_roi_format = _tv_poolers._convert_to_roi_format
_tv_multiscale_roi_align = _tv_poolers._multiscale_roi_align

# TorchScript cannot read an int global, so the scripted MultiScaleRoIAlign spells the levels one launch takes
# (kMaxRoIAlignLevels, csrc/ops/common/roi_align.h) as a literal; this keeps the two in step.
if _registry.limit("roi_align_max_levels") != 8:
    raise ImportError("visionops._dropin: update the literal 8 (roi_align_max_levels) in multiscale_roi_align_forward")
_VO_AXIS_ALIGNED = ("xyxy", "xywh", "cxcywh")


def _vo_unsupported(*tensors) -> bool:
    """True when a tensor argument has no visionops kernel: quantized, or not floating point."""
    return any(isinstance(t, Tensor) and (t.is_quantized or not t.is_floating_point()) for t in tensors)


def _vo_roi_tensors(input, boxes) -> list:
    return [input] + (list(boxes) if isinstance(boxes, (list, tuple)) else [boxes])


def _vo_rois(boxes: Union[Tensor, list[Tensor]]) -> Tensor:
    """torchvision's check_roi_boxes_shape and convert_boxes_to_roi_format, for the scripted path."""
    if isinstance(boxes, torch.Tensor):
        torch._assert(boxes.size(1) == 5, "The boxes tensor shape is not correct as Tensor[K, 5]")
        return boxes
    rois = []
    for i, b in enumerate(boxes):
        torch._assert(b.size(1) == 4, "The shape of the tensor in the boxes list is not correct as List[Tensor[L, 4]]")
        rois.append(torch.cat([torch.full_like(b[:, :1], i), b], dim=1))
    return torch.cat(rois, dim=0)


def _vo_upcast(t: Tensor) -> Tensor:
    if t.is_floating_point():
        return t if t.dtype == torch.float32 or t.dtype == torch.float64 else t.float()
    return t if t.dtype == torch.int32 or t.dtype == torch.int64 else t.int()


def _vo_xyxy(boxes: Tensor, fmt: str) -> Tensor:
    if fmt == "xywh":
        return torch.cat([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], -1)
    if fmt == "cxcywh":
        return torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], -1)
    return boxes


def _vo_scripted_box_iou(boxes1: Tensor, boxes2: Tensor, fmt: str) -> Tensor:
    """torchvision's axis-aligned box_iou formula, for the scripted calls the kernel does not take (integer, mixed
    or half dtypes, batched boxes). Written here rather than calling torchvision's box_iou, whose rotated branch would
    make the scripted model need torchvision's ops to load."""
    if fmt != "xyxy" and fmt != "xywh" and fmt != "cxcywh":
        raise ValueError("patch_torchvision: scripted box_iou takes the formats xyxy, xywh and cxcywh, got " + fmt)
    boxes1, boxes2 = _vo_xyxy(boxes1, fmt), _vo_xyxy(boxes2, fmt)
    area1 = _vo_upcast(boxes1[..., 2:] - boxes1[..., :2]).prod(-1)
    area2 = _vo_upcast(boxes2[..., 2:] - boxes2[..., :2]).prod(-1)
    lt = torch.max(boxes1[..., None, :2], boxes2[..., None, :, :2])
    rb = torch.min(boxes1[..., None, 2:], boxes2[..., None, :, 2:])
    wh = _vo_upcast(rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[..., None] + area2[..., None, :] - inter)


# ---- torchvision.ops functions ------------------------------------------------------------------------------------


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    if not torch.jit.is_scripting():
        if _vo_unsupported(boxes, scores):
            return _tv_nms(boxes, scores, iou_threshold)
        return _vo_nms.nms(boxes, scores, iou_threshold)
    return torch.ops.visionops.nms(boxes, scores, iou_threshold)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    if not torch.jit.is_scripting():
        if _vo_unsupported(boxes, scores):
            return _tv_batched_nms(boxes, scores, idxs, iou_threshold)
        return _vo_nms.batched_nms(boxes, scores, idxs, iou_threshold)
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    return torch.ops.visionops.batched_nms(boxes, scores, idxs, iou_threshold)


def box_iou(boxes1: Tensor, boxes2: Tensor, fmt: str = "xyxy") -> Tensor:
    if not torch.jit.is_scripting():
        if (
            fmt not in _VO_AXIS_ALIGNED
            or not (isinstance(boxes1, Tensor) and isinstance(boxes2, Tensor))
            or boxes1.is_quantized
            or boxes2.is_quantized
            or boxes1.is_complex()
            or boxes2.is_complex()
            or boxes1.dtype == torch.bool
            or boxes2.dtype == torch.bool
            or boxes1.dim() < 2
            or boxes2.dim() < 2
        ):
            return _tv_box_iou(boxes1, boxes2, fmt)
        # torchvision promotes mixed dtypes, computes float16/bfloat16 in float32 (returning float32) and divides
        # integer intersections by unions (a default-dtype result): integers are computed here in float64.
        common = torch.promote_types(boxes1.dtype, boxes2.dtype)
        if not common.is_floating_point:
            iou = _vo_nms.box_iou(boxes1.double(), boxes2.double(), fmt)
            return iou.to(torch.get_default_dtype())
        common = torch.float32 if common in (torch.float16, torch.bfloat16) else common
        return _vo_nms.box_iou(boxes1.to(common), boxes2.to(common), fmt)
    if (
        fmt == "xyxy"
        and boxes1.dim() == 2
        and boxes2.dim() == 2
        and boxes1.dtype == boxes2.dtype
        and (boxes1.dtype == torch.float32 or boxes1.dtype == torch.float64)
    ):
        return torch.ops.visionops.box_iou(boxes1, boxes2)
    return _vo_scripted_box_iou(boxes1, boxes2, fmt)


def roi_align(
    input: Tensor,
    boxes: Union[Tensor, list[Tensor]],
    output_size: BroadcastingList2[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    if not torch.jit.is_scripting():
        if _vo_unsupported(*_vo_roi_tensors(input, boxes)):
            return _tv_roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
        return _vo_roi.roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    rois = _vo_rois(boxes)
    output_size = _pair(output_size)
    return torch.ops.visionops.roi_align(
        input, rois, spatial_scale, output_size[0], output_size[1], sampling_ratio, aligned
    )


def roi_pool(
    input: Tensor,
    boxes: Union[Tensor, list[Tensor]],
    output_size: BroadcastingList2[int],
    spatial_scale: float = 1.0,
) -> Tensor:
    if not torch.jit.is_scripting():
        if _vo_unsupported(*_vo_roi_tensors(input, boxes)):
            return _tv_roi_pool(input, boxes, output_size, spatial_scale)
        return _vo_roi.roi_pool(input, boxes, output_size, spatial_scale)
    rois = _vo_rois(boxes)
    output_size = _pair(output_size)
    return torch.ops.visionops.roi_pool(input, rois, spatial_scale, output_size[0], output_size[1])


# ---- detection building blocks (methods) --------------------------------------------------------------------------


def _eager_multiscale_forward(self, x, boxes, image_shapes):
    features = _tv_filter_input(x, self.featmap_names)
    # the TorchScript ONNX exporter has no translation of visionops::multi_scale_roi_align; the default one has
    torchscript_onnx = torch.onnx.is_in_onnx_export() and not torch.compiler.is_exporting()
    if torchscript_onnx or _vo_unsupported(*features, *boxes):
        return _tv_multiscale_forward(self, x, boxes, image_shapes)
    if self.scales is None or self.map_levels is None:
        self.scales, self.map_levels = _tv_setup_scales(
            features, image_shapes, self.canonical_scale, self.canonical_level
        )
    return _vo_poolers.multi_scale_roi_align(
        features, boxes, self.output_size, self.sampling_ratio, self.scales, self.map_levels
    )


def multiscale_roi_align_forward(
    self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
) -> Tensor:
    if not torch.jit.is_scripting():
        return _eager_multiscale_forward(self, x, boxes, image_shapes)
    x_filtered = _tv_filter_input(x, self.featmap_names)
    if self.scales is None or self.map_levels is None:
        self.scales, self.map_levels = _tv_setup_scales(
            x_filtered, image_shapes, self.canonical_scale, self.canonical_level
        )
    scales = self.scales
    mapper = self.map_levels
    if len(x_filtered) == 1 or len(x_filtered) > 8 or scales is None or mapper is None:
        return _tv_multiscale_roi_align(x_filtered, boxes, self.output_size, self.sampling_ratio, scales, mapper)
    rois = _tv_convert_to_roi_format(boxes)
    levels = mapper(boxes)
    return torch.ops.visionops.multi_scale_roi_align(
        x_filtered, rois, levels, scales, self.output_size[0], self.output_size[1], self.sampling_ratio, False
    )


def anchor_generator_forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
    if not torch.jit.is_scripting():
        if torch.onnx.is_in_onnx_export() or _vo_unsupported(*feature_maps):
            return _tv_anchor_forward(self, image_list, feature_maps)
        return _vo_anchors.anchors_for_images(self.cell_anchors, image_list, feature_maps)
    torch._assert(len(feature_maps) == len(self.cell_anchors), "one feature map per anchor level is needed")
    image_h = image_list.tensors.shape[-2]
    image_w = image_list.tensors.shape[-1]
    dtype, device = feature_maps[0].dtype, feature_maps[0].device
    grid: list[int] = []
    strides: list[float] = []
    for f in feature_maps:
        gh = f.shape[-2]
        gw = f.shape[-1]
        grid += [gh, gw]
        # torchvision's integer stride; an empty level has no anchors, whatever its stride
        strides += [float(image_h // gh) if gh > 0 else 0.0, float(image_w // gw) if gw > 0 else 0.0]
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    cells = torch.cat([c.to(dtype=opmath) for c in self.cell_anchors]).to(device)
    num_cells = [c.shape[0] for c in self.cell_anchors]
    out = torch.ops.visionops.grid_anchors(cells, num_cells, grid, strides, 0.0, len(image_list.image_sizes), dtype)
    return list(out.unbind(0))


def box_coder_encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
    if not torch.jit.is_scripting():
        if torch.onnx.is_in_onnx_export() or _vo_unsupported(reference_boxes, proposals):
            return _tv_encode_single(self, reference_boxes, proposals)
        return _vo_box_coder.encode_boxes(reference_boxes, proposals, self.weights)
    weights = [float(self.weights[0]), float(self.weights[1]), float(self.weights[2]), float(self.weights[3])]
    return torch.ops.visionops.encode_boxes(reference_boxes, proposals.to(reference_boxes.dtype), weights)


def box_coder_decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
    if not torch.jit.is_scripting():
        if torch.onnx.is_in_onnx_export() or _vo_unsupported(rel_codes, boxes):
            return _tv_decode_single(self, rel_codes, boxes)
        return _vo_box_coder.decode_boxes(rel_codes, boxes.to(rel_codes.dtype), self.weights, self.bbox_xform_clip)
    weights = [float(self.weights[0]), float(self.weights[1]), float(self.weights[2]), float(self.weights[3])]
    empty: list[float] = []
    return torch.ops.visionops.decode_boxes(rel_codes, boxes.to(rel_codes.dtype), weights, self.bbox_xform_clip, empty)


# torch.jit.script compiles a (non-Module) class's methods only if their __name__ is a key of the class __dict__.
for _fn, _name in (
    (multiscale_roi_align_forward, "forward"),
    (anchor_generator_forward, "forward"),
    (box_coder_encode_single, "encode_single"),
    (box_coder_decode_single, "decode_single"),
):
    _fn.__name__ = _name
del _fn, _name
