"""Pure-PyTorch implementations: the documented math, the test oracle and the fallback backend."""
from visionops.reference.nms import batched_nms, box_iou, nms

__all__ = ["nms", "batched_nms", "box_iou"]
from visionops.reference.roi import roi_align, roi_pool  # noqa: E402

__all__ += ["roi_align", "roi_pool"]
