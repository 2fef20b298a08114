"""Thin op wrappers: argument checks, docstrings with shapes, fake kernels, autograd and autocast registrations."""
from visionops.ops.anchors import AnchorGenerator, DefaultBoxGenerator, cell_anchors, grid_anchors
from visionops.ops.box_coder import BoxCoder, decode_boxes, encode_boxes, filter_boxes
from visionops.ops.boxes import box_area, box_convert, clip_boxes_to_image, remove_small_boxes
from visionops.ops.nms import batched_nms, box_iou, nms
from visionops.ops.poolers import MultiScaleRoIAlign
from visionops.ops.roi import RoIAlign, RoIPool, roi_align, roi_pool

__all__ = ["nms", "batched_nms", "box_iou", "roi_align", "roi_pool", "RoIAlign", "RoIPool", "MultiScaleRoIAlign",
           "AnchorGenerator", "DefaultBoxGenerator", "cell_anchors", "grid_anchors", "BoxCoder", "decode_boxes",
           "encode_boxes", "filter_boxes", "box_area", "box_convert", "clip_boxes_to_image", "remove_small_boxes"]
