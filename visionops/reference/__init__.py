"""Pure-PyTorch implementations: the documented math, the test oracle and the fallback backend."""

from visionops.reference.anchors import cell_anchors, grid_anchors, grid_anchors_op
from visionops.reference.box_coder import decode_boxes, encode_boxes, filter_boxes
from visionops.reference.conv import conv2d, conv3d
from visionops.reference.nms import batched_nms, batched_soft_nms, box_iou, nms, soft_nms
from visionops.reference.roi import multi_scale_roi_align, roi_align, roi_pool
from visionops.reference.xcorr import depthwise_xcorr, xcorr

__all__ = [
    "nms",
    "batched_nms",
    "box_iou",
    "soft_nms",
    "batched_soft_nms",
    "roi_align",
    "roi_pool",
    "multi_scale_roi_align",
    "cell_anchors",
    "grid_anchors",
    "grid_anchors_op",
    "decode_boxes",
    "encode_boxes",
    "filter_boxes",
    "xcorr",
    "depthwise_xcorr",
    "conv2d",
    "conv3d",
]
