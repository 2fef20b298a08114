"""Triton MultiScaleRoIAlign: every RoI pooled from its FPN level in one launch, forward and backward.

The RoIAlign kernels of visionops/triton/roi.py take the feature levels as kernel arguments (up to MAX_LEVELS) and
each RoI picks its own from the ``levels`` tensor, as the CUDA ``visionops::multi_scale_roi_align`` does. The
backward scatters every level's gradient in the same launch (fixed-point, bit-identical run to run, under
``torch.use_deterministic_algorithms(True)``). Each level gets its own buffer rather than a view of one flat buffer,
because a custom op's outputs may not alias each other. A level index or batch index out of range gives zeros and
no gradient.
"""
from typing import List

import torch
from torch import Tensor

from visionops.ops.poolers import register_multi_scale_roi_align
from visionops.triton.roi import MAX_LEVELS, align_backward, align_forward


def _check(op: str, rois: Tensor, levels: Tensor, scales: List[float], shapes: List[List[int]]) -> None:
    """The C++ op's argument checks (csrc/ops/cuda/roi_align_kernel.cu), as ValueError."""
    if not 1 <= len(shapes) <= MAX_LEVELS or len(scales) != len(shapes):
        raise ValueError(f"{op}: need 1 to {MAX_LEVELS} feature levels and one spatial scale per level, got "
                         f"{len(shapes)} levels and {len(scales)} scales")
    if rois.dim() != 2 or rois.shape[1] != 5 or not rois.is_floating_point():
        raise ValueError(f"{op}: rois must be a floating-point tensor of shape [K, 5], got {list(rois.shape)}")
    if levels.dim() != 1 or levels.shape[0] != rois.shape[0] or levels.dtype != torch.int64 or \
            levels.device != rois.device:
        raise ValueError(f"{op}: levels must be an int64 tensor of shape [K] on the rois' device, got "
                         f"{levels.dtype} {list(levels.shape)} on {levels.device}")
    if any(len(s) != 4 or s[1] != shapes[0][1] or s[2] <= 0 or s[3] <= 0 for s in shapes):
        raise ValueError(f"{op}: every feature level must have shape [N, C, H, W] with the same C and H, W > 0, got "
                         f"{shapes}")


@torch.library.custom_op("visionops::triton_multi_scale_roi_align", mutates_args=())
def triton_multi_scale_roi_align(features: List[Tensor], rois: Tensor, levels: Tensor, scales: List[float],
                                 pooled_height: int, pooled_width: int, sampling_ratio: int,
                                 aligned: bool) -> Tensor:
    _check("triton_multi_scale_roi_align", rois, levels, scales, [list(f.shape) for f in features])
    if any(f.dtype != features[0].dtype or f.device != rois.device for f in features):
        raise ValueError("triton_multi_scale_roi_align: all feature levels must have one dtype, on the rois' device")
    return align_forward(features, rois, levels, scales, pooled_height, pooled_width, sampling_ratio, aligned)


@torch.library.custom_op("visionops::triton_multi_scale_roi_align_backward", mutates_args=())
def triton_multi_scale_roi_align_backward(grad: Tensor, rois: Tensor, levels: Tensor, scales: List[float],
                                          pooled_height: int, pooled_width: int, feature_shapes: List[int],
                                          sampling_ratio: int, aligned: bool) -> List[Tensor]:
    """feature_shapes: [B, C, H, W] of every level, concatenated."""
    shapes = [feature_shapes[i:i + 4] for i in range(0, len(feature_shapes), 4)]
    _check("triton_multi_scale_roi_align_backward", rois, levels, scales, shapes)
    if list(grad.shape) != [rois.shape[0], shapes[0][1], pooled_height, pooled_width]:
        raise ValueError(f"triton_multi_scale_roi_align_backward: grad must have shape [K, C, PH, PW], got "
                         f"{list(grad.shape)}")
    return align_backward(grad, rois, levels, scales, pooled_height, pooled_width, shapes, sampling_ratio, aligned)


register_multi_scale_roi_align(triton_multi_scale_roi_align, triton_multi_scale_roi_align_backward)
