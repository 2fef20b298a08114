"""visionops: C++/CUDA/Triton kernels for classic computer-vision networks, torchvision-compatible.

Every op is registered in the dispatcher as ``torch.ops.visionops.<name>`` and exposed here with torchvision's
Python signature plus a keyword-only ``backend=`` ("auto", "cpp", "triton", "reference").
"""
from visionops._version import __version__
from visionops._extension import build_info  # loads _C: registers the C++/CUDA kernels
from visionops.ops import batched_nms, box_iou, nms
import visionops.triton  # noqa: F401,E402  (registers the Triton ops when triton is installed)

__all__ = ["__version__", "build_info", "nms", "batched_nms", "box_iou"]
from visionops.ops import AnchorGenerator, DefaultBoxGenerator, cell_anchors, grid_anchors  # noqa: E402
from visionops.ops import BoxCoder, decode_boxes, encode_boxes, filter_boxes  # noqa: E402
from visionops.ops import box_area, box_convert, clip_boxes_to_image, remove_small_boxes  # noqa: E402

__all__ += ["AnchorGenerator", "DefaultBoxGenerator", "cell_anchors", "grid_anchors", "BoxCoder", "decode_boxes",
            "encode_boxes", "filter_boxes", "box_area", "box_convert", "clip_boxes_to_image", "remove_small_boxes"]
