"""visionops: C++/CUDA/Triton kernels for classic computer-vision networks, torchvision-compatible.

Every op is registered in the dispatcher as ``torch.ops.visionops.<name>`` and exposed here with torchvision's
Python signature plus a keyword-only ``backend=`` ("auto", "cpp", "triton", "reference").
"""
from visionops._version import __version__
from visionops._extension import build_info  # loads _C: registers the C++/CUDA kernels
from visionops.ops import batched_nms, box_iou, nms

__all__ = ["__version__", "build_info", "nms", "batched_nms", "box_iou"]
from visionops.ops import RoIAlign, RoIPool, roi_align, roi_pool  # noqa: E402

__all__ += ["roi_align", "roi_pool", "RoIAlign", "RoIPool"]
from visionops.ops import MultiScaleRoIAlign  # noqa: E402

__all__ += ["MultiScaleRoIAlign"]
