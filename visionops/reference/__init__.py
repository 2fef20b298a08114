"""Pure-PyTorch implementations: the documented math, the test oracle and the fallback backend."""
from visionops.reference.nms import batched_nms, box_iou, nms

__all__ = ["nms", "batched_nms", "box_iou"]
from visionops.reference.anchors import cell_anchors, grid_anchors  # noqa: E402
from visionops.reference.box_coder import decode_boxes, encode_boxes, filter_boxes  # noqa: E402

__all__ += ["cell_anchors", "grid_anchors", "decode_boxes", "encode_boxes", "filter_boxes"]
