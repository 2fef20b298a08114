"""Thin op wrappers: argument checks, docstrings with shapes, fake kernels, autograd and autocast registrations."""
from visionops.ops.nms import batched_nms, box_iou, nms

__all__ = ["nms", "batched_nms", "box_iou"]
from visionops.ops.roi import RoIAlign, RoIPool, roi_align, roi_pool  # noqa: E402

__all__ += ["roi_align", "roi_pool", "RoIAlign", "RoIPool"]
from visionops.ops.poolers import MultiScaleRoIAlign  # noqa: E402

__all__ += ["MultiScaleRoIAlign"]
