"""visionops: C++/CUDA/Triton kernels for classic computer-vision networks, torchvision-compatible.

Every op is registered in the dispatcher as ``torch.ops.visionops.<name>`` and exposed here with torchvision's
Python signature plus a keyword-only ``backend=`` ("auto", "cpp", "triton", "reference").
"""
from visionops._version import __version__
from visionops._extension import build_info  # loads _C: registers the C++/CUDA kernels
from visionops.ops import (AnchorGenerator, BoxCoder, DefaultBoxGenerator, MultiScaleRoIAlign, RoIAlign, RoIPool,
                           batched_nms, box_area, box_convert, box_iou, cell_anchors, clip_boxes_to_image,
                           decode_boxes, encode_boxes, filter_boxes, grid_anchors, nms, remove_small_boxes,
                           roi_align, roi_pool)
import visionops.triton  # noqa: F401,E402  (registers the Triton ops when triton is installed)
from visionops.compat import patch_torchvision, unpatch  # noqa: E402

__all__ = [
    "__version__", "build_info", "patch_torchvision", "unpatch",
    # NMS family
    "nms", "batched_nms", "box_iou",
    # RoI ops
    "roi_align", "roi_pool", "RoIAlign", "RoIPool", "MultiScaleRoIAlign",
    # anchors and box coding
    "AnchorGenerator", "DefaultBoxGenerator", "cell_anchors", "grid_anchors", "BoxCoder", "decode_boxes",
    "encode_boxes", "filter_boxes", "box_area", "box_convert", "clip_boxes_to_image", "remove_small_boxes",
]
