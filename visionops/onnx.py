"""ONNX export of visionops' detection ops, as torchvision exports its own.

``torch.onnx.export`` meets ``visionops::nms``, ``batched_nms``, ``roi_align`` and ``roi_pool`` in a graph and writes
the standard ONNX operators torchvision's ops become:

==========================  ===========================================================================
op                          ONNX
==========================  ===========================================================================
``nms``                     ``NonMaxSuppression`` (boxes and scores cast to float32, no output cap)
``batched_nms``             torchvision's coordinate offset (each class shifted by ``max(boxes) + 1``),
                            then ``NonMaxSuppression``: what ``torchvision.ops.batched_nms`` exports
``roi_align``               ``RoiAlign`` (opset >= 16: ``aligned`` as ``half_pixel``; opset 11-15: aligned=False only)
``roi_pool``                ``MaxRoiPool``
``multi_scale_roi_align``   (default exporter only) one ``RoiAlign`` per level over all RoIs, each RoI keeping its
                            level's result
==========================  ===========================================================================

As in torchvision's translations, a ``sampling_ratio`` <= 0 (adaptive) is written as ONNX's 0, which is adaptive
too. Both exporters are covered: the TorchScript one (``dynamo=False``) through
``torch.onnx.register_custom_op_symbolic``, registered at ``import visionops``; the default one (``dynamo=True``)
through onnxscript's torchlib registry, registered when torch loads that registry (so that ``import visionops``
does not import onnxscript).
"""

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Sequence

import torch

_TORCHLIB_REGISTRATION = "onnxscript.function_libs.torch_lib.registration"
_INT64_MAX = 0x7FFFFFFFFFFFFFFF


def _warn_adaptive(sampling_ratio: int) -> int:
    if sampling_ratio < 0:
        warnings.warn(
            "ONNX export of roi_align: sampling_ratio < 0 is written as 0 (ONNX's adaptive sampling)", stacklevel=3
        )
        return 0
    return sampling_ratio


# ---- TorchScript exporter (dynamo=False) ------------------------------------------------------------------------


def _register_torchscript() -> None:
    from torch.onnx import symbolic_opset11 as opset11
    from torch.onnx.symbolic_helper import parse_args

    float_t = torch.onnx.TensorProtoDataType.FLOAT

    def const(g, value, dtype=torch.long):
        return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

    def nms_of(g, boxes, scores, iou_threshold):
        boxes = opset11.unsqueeze(g, g.op("Cast", boxes, to_i=float_t), 0)
        scores = opset11.unsqueeze(g, opset11.unsqueeze(g, g.op("Cast", scores, to_i=float_t), 0), 0)
        out = g.op("NonMaxSuppression", boxes, scores, const(g, [sys.maxsize]), const(g, [iou_threshold], torch.float))
        return opset11.squeeze(g, opset11.select(g, out, 1, const(g, [2])), 1)

    @parse_args("v", "v", "f")
    def nms(g, boxes, scores, iou_threshold):
        return nms_of(g, boxes, scores, iou_threshold)

    @parse_args("v", "v", "v", "f")
    def batched_nms(g, boxes, scores, idxs, iou_threshold):
        top = g.op("Add", g.op("ReduceMax", boxes, keepdims_i=0), g.op("CastLike", const(g, 1.0, torch.float), boxes))
        offsets = g.op("Mul", g.op("CastLike", idxs, boxes), top)
        return nms_of(g, g.op("Add", boxes, opset11.unsqueeze(g, offsets, 1)), scores, iou_threshold)

    def split_rois(g, rois):
        ids = opset11.squeeze(g, opset11.select(g, rois, 1, const(g, [0])), 1)
        return opset11.select(g, rois, 1, const(g, [1, 2, 3, 4])), g.op("Cast", ids, to_i=7)  # 7: INT64

    @parse_args("v", "v", "f", "i", "i", "i", "i")
    def roi_align_opset11(g, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
        if aligned:
            raise torch.onnx.errors.SymbolicValueError(
                "visionops::roi_align with aligned=True needs opset_version >= 16", input
            )
        boxes, ids = split_rois(g, rois)
        return g.op(
            "RoiAlign",
            input,
            boxes,
            ids,
            spatial_scale_f=spatial_scale,
            output_height_i=pooled_height,
            output_width_i=pooled_width,
            sampling_ratio_i=_warn_adaptive(sampling_ratio),
        )

    @parse_args("v", "v", "f", "i", "i", "i", "i")
    def roi_align_opset16(g, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
        boxes, ids = split_rois(g, rois)
        return g.op(
            "RoiAlign",
            input,
            boxes,
            ids,
            coordinate_transformation_mode_s="half_pixel" if aligned else "output_half_pixel",
            spatial_scale_f=spatial_scale,
            output_height_i=pooled_height,
            output_width_i=pooled_width,
            sampling_ratio_i=_warn_adaptive(sampling_ratio),
        )

    @parse_args("v", "v", "f", "i", "i")
    def roi_pool(g, input, rois, spatial_scale, pooled_height, pooled_width):
        return g.op(
            "MaxRoiPool", input, rois, pooled_shape_i=(pooled_height, pooled_width), spatial_scale_f=spatial_scale
        )

    register = torch.onnx.register_custom_op_symbolic
    register("visionops::nms", nms, 11)
    register("visionops::batched_nms", batched_nms, 11)
    register("visionops::roi_align", roi_align_opset11, 11)
    register("visionops::roi_align", roi_align_opset16, 16)
    register("visionops::roi_pool", roi_pool, 11)


# ---- default exporter (dynamo=True): onnxscript torchlib translations -------------------------------------------


def _register_torchlib() -> None:
    from onnxscript.function_libs.torch_lib.registration import torch_op
    from onnxscript.onnx_opset import opset18 as op
    from onnxscript.onnx_types import FLOAT, INT64

    def nms_of(boxes, scores, iou_threshold):
        boxes = op.Unsqueeze(op.Cast(boxes, to=FLOAT.dtype), [0])
        scores = op.Unsqueeze(op.Cast(scores, to=FLOAT.dtype), [0, 1])
        out = op.NonMaxSuppression(boxes, scores, _INT64_MAX, iou_threshold)
        return op.Reshape(op.Slice(out, starts=[2], ends=[3], axes=[1]), [-1])

    @torch_op("visionops::nms", trace_only=True)
    def visionops_nms(boxes, scores, iou_threshold: float):
        return nms_of(boxes, scores, iou_threshold)

    @torch_op("visionops::batched_nms", trace_only=True)
    def visionops_batched_nms(boxes, scores, idxs, iou_threshold: float):
        top = op.Add(op.ReduceMax(boxes, keepdims=0), op.CastLike(1.0, boxes))
        offsets = op.Mul(op.CastLike(idxs, boxes), top)
        return nms_of(op.Add(boxes, op.Unsqueeze(offsets, [1])), scores, iou_threshold)

    def split_rois_of(rois):
        """[K, 5] rows of (batch index, x1, y1, x2, y2) -> (boxes [K, 4], batch indices [K] int64)."""
        ids = op.Cast(op.Squeeze(op.Slice(rois, starts=[0], ends=[1], axes=[1]), [1]), to=INT64.dtype)
        return op.Slice(rois, starts=[1], ends=[5], axes=[1]), ids

    def roi_align_of(feature, boxes, ids, scale: float, pooled_height: int, pooled_width: int, sr: int, aligned: bool):
        return op.RoiAlign(
            feature,
            boxes,
            ids,
            coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
            spatial_scale=scale,
            output_height=pooled_height,
            output_width=pooled_width,
            sampling_ratio=sr,
        )

    @torch_op("visionops::roi_align", trace_only=True)
    def visionops_roi_align(
        input, rois, spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int, aligned: bool
    ):
        sr = _warn_adaptive(sampling_ratio)
        return roi_align_of(input, *split_rois_of(rois), spatial_scale, pooled_height, pooled_width, sr, aligned)

    @torch_op("visionops::multi_scale_roi_align", trace_only=True)
    def visionops_multi_scale_roi_align(
        features,
        rois,
        levels,
        scales: Sequence[float],
        pooled_height: int,
        pooled_width: int,
        sampling_ratio: int,
        aligned: bool,
    ):
        # every RoI pooled from every level, then each keeps its own level's result: the same values as one
        # RoiAlign per level over that level's RoIs, without data-dependent gathers
        sr = _warn_adaptive(sampling_ratio)
        boxes, ids = split_rois_of(rois)
        out = None
        for level, (feature, scale) in enumerate(zip(features, scales)):
            pooled = roi_align_of(feature, boxes, ids, scale, pooled_height, pooled_width, sr, aligned)
            if out is None:
                out = pooled
            else:
                here = op.Reshape(op.Equal(levels, op.CastLike(level, levels)), [-1, 1, 1, 1])
                out = op.Where(here, pooled, out)
        return out

    @torch_op("visionops::roi_pool", trace_only=True)
    def visionops_roi_pool(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int):
        return op.MaxRoiPool(input, rois, pooled_shape=(pooled_height, pooled_width), spatial_scale=spatial_scale)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``_register_torchlib`` right after onnxscript's torchlib registry module is first imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TORCHLIB_REGISTRATION:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_torchlib()

        spec.loader.exec_module = exec_then_register
        return spec


def register() -> None:
    """Register the translations for both exporters (``import visionops`` does this)."""
    try:
        _register_torchscript()
    except (ImportError, AttributeError):  # a torch without the TorchScript exporter: nothing to register there
        pass
    if _TORCHLIB_REGISTRATION in sys.modules:
        _register_torchlib()
    elif importlib.util.find_spec("onnxscript") is not None:
        sys.meta_path.insert(0, _RegisterAfterImport())
