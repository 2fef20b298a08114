"""Route torchvision's ops and detection building blocks through visionops.

``patch_torchvision()`` replaces, for models built before or inside it (the class methods of existing instances are
patched, not only the module functions):

* ``torchvision.ops`` ``nms``, ``batched_nms``, ``box_iou``, ``roi_align``, ``roi_pool`` (also where
  torchvision's own modules imported them: ``ops.boxes``, ``ops.roi_align``, ``ops.roi_pool``,
  ``models.detection.roi_heads``), and ``MultiScaleRoIAlign.forward`` (one multi-level kernel);
* ``models.detection.anchor_utils.AnchorGenerator.forward`` (one launch for all levels and images);
* ``models.detection._utils.BoxCoder`` ``encode``/``encode_single``/``decode``/``decode_single``.

Use it as a context manager, or call it and later ``unpatch()``; leaving restores torchvision exactly (the original
objects are put back). Patches nest: each ``unpatch()`` undoes the most recent ``patch_torchvision()``.
"""

import contextlib
import importlib
import sys
from typing import List
from unittest import mock

_ACTIVE: List["TorchvisionPatch"] = []


def _anchor_forward(self, image_list, feature_maps):
    from visionops.ops.anchors import anchors_for_images

    return anchors_for_images(self.cell_anchors, image_list, feature_maps)


def _multiscale_forward(self, x, boxes, image_shapes):
    from visionops.ops.poolers import multi_scale_roi_align, setup_scales

    features = [v for k, v in x.items() if k in self.featmap_names]
    scales, mapper = setup_scales(features, image_shapes, self.canonical_scale, self.canonical_level)
    self.scales, self.map_levels = scales, mapper  # as torchvision's forward leaves them
    return multi_scale_roi_align(features, boxes, self.output_size, self.sampling_ratio, scales, mapper)


def _encode_single(self, reference_boxes, proposals):
    from visionops.ops.box_coder import encode_boxes

    return encode_boxes(reference_boxes, proposals, self.weights)


def _decode_single(self, rel_codes, boxes):
    from visionops.ops.box_coder import decode_boxes

    return decode_boxes(rel_codes, boxes.to(rel_codes.dtype), self.weights, self.bbox_xform_clip)


def _targets():
    """(object, attribute, replacement) for everything patch_torchvision routes."""
    import torchvision  # noqa: F401
    import torchvision.models.detection._utils as det_utils
    import torchvision.models.detection.anchor_utils as anchor_utils
    import torchvision.models.detection.roi_heads as roi_heads
    import torchvision.ops.boxes as tv_boxes
    import torchvision.ops.poolers as poolers

    import visionops
    from visionops.ops.box_coder import BoxCoder

    tv_ops = sys.modules["torchvision.ops"]
    roi_align_mod = importlib.import_module("torchvision.ops.roi_align")
    roi_pool_mod = importlib.import_module("torchvision.ops.roi_pool")
    functions = {"nms": visionops.nms, "batched_nms": visionops.batched_nms, "box_iou": visionops.box_iou}
    targets = [(owner, name, fn) for name, fn in functions.items() for owner in (tv_ops, tv_boxes)]
    targets += [
        (tv_ops, "roi_align", visionops.roi_align),
        (roi_align_mod, "roi_align", visionops.roi_align),
        (roi_heads, "roi_align", visionops.roi_align),
        (poolers, "roi_align", visionops.roi_align),
        (tv_ops, "roi_pool", visionops.roi_pool),
        (roi_pool_mod, "roi_pool", visionops.roi_pool),
        (poolers.MultiScaleRoIAlign, "forward", _multiscale_forward),
        (anchor_utils.AnchorGenerator, "forward", _anchor_forward),
        (det_utils.BoxCoder, "encode_single", _encode_single),
        (det_utils.BoxCoder, "decode_single", _decode_single),
        (det_utils.BoxCoder, "encode", BoxCoder.encode),
        (det_utils.BoxCoder, "decode", BoxCoder.decode),
    ]
    return targets


class TorchvisionPatch:
    """The patches applied by one ``patch_torchvision()`` call; a context manager that undoes them on exit."""

    def __init__(self):
        self._stack = contextlib.ExitStack()
        for owner, name, replacement in _targets():
            self._stack.enter_context(mock.patch.object(owner, name, replacement))
        _ACTIVE.append(self)

    @property
    def active(self) -> bool:
        return self in _ACTIVE

    def stop(self) -> None:
        """Undo this patch (and, first, any made after it: patches unwind in reverse order)."""
        while self in _ACTIVE:
            last = _ACTIVE.pop()
            last._stack.close()

    def __enter__(self) -> "TorchvisionPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def patch_torchvision() -> TorchvisionPatch:
    """Route torchvision's nms / batched_nms / box_iou / roi_align / roi_pool / MultiScaleRoIAlign and the detection
    AnchorGenerator and BoxCoder through visionops. Returns a context manager; ``unpatch()`` also undoes it."""
    return TorchvisionPatch()


def unpatch() -> None:
    """Undo the most recent ``patch_torchvision()`` still active (no-op when none is)."""
    if _ACTIVE:
        _ACTIVE[-1].stop()
