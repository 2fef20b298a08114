"""Route torchvision's ops and detection building blocks through visionops.

``patch_torchvision()`` replaces, for models built before or inside it (the class methods of existing instances are
patched, not only the module functions):

* ``torchvision.ops`` ``nms``, ``batched_nms``, ``box_iou``, ``roi_align``, ``roi_pool`` (also where
  torchvision's own modules imported them: ``ops.boxes``, ``ops.roi_align``, ``ops.roi_pool``, ``ops.poolers``,
  ``models.detection.roi_heads``), and ``MultiScaleRoIAlign.forward`` (one multi-level kernel);
* ``models.detection.anchor_utils.AnchorGenerator.forward`` (one launch for all levels and images);
* ``models.detection._utils.BoxCoder`` ``encode_single``/``decode_single`` (``encode``/``decode`` call them).

The replacements (visionops/_dropin.py) keep torchvision's signatures, are scriptable with ``torch.jit.script``,
export with ``torch.onnx.export``, and hand inputs visionops has no kernel for (quantized tensors, integer features)
to torchvision's own implementation; docs/dropin.md lists what runs where.

Use it as a context manager, or call it and later ``unpatch()``; leaving restores torchvision exactly (the original
objects are put back). Patches nest: each ``unpatch()`` undoes the most recent ``patch_torchvision()``.
"""

import contextlib
import importlib
import sys
from typing import List
from unittest import mock

_ACTIVE: List["TorchvisionPatch"] = []


def _targets():
    """(object, attribute, replacement) for everything patch_torchvision routes."""
    import torchvision.models.detection._utils as det_utils
    import torchvision.models.detection.anchor_utils as anchor_utils
    import torchvision.models.detection.roi_heads as roi_heads
    import torchvision.ops.boxes as tv_boxes
    import torchvision.ops.poolers as poolers

    from visionops import _dropin

    tv_ops = sys.modules["torchvision.ops"]
    roi_align_mod = importlib.import_module("torchvision.ops.roi_align")
    roi_pool_mod = importlib.import_module("torchvision.ops.roi_pool")
    targets = [
        (owner, name, getattr(_dropin, name))
        for name in ("nms", "batched_nms", "box_iou")
        for owner in (tv_ops, tv_boxes)
    ]
    targets += [(owner, "roi_align", _dropin.roi_align) for owner in (tv_ops, roi_align_mod, roi_heads, poolers)]
    targets += [(owner, "roi_pool", _dropin.roi_pool) for owner in (tv_ops, roi_pool_mod)]
    targets += [
        (poolers.MultiScaleRoIAlign, "forward", _dropin.multiscale_roi_align_forward),
        (anchor_utils.AnchorGenerator, "forward", _dropin.anchor_generator_forward),
        (det_utils.BoxCoder, "encode_single", _dropin.box_coder_encode_single),
        (det_utils.BoxCoder, "decode_single", _dropin.box_coder_decode_single),
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
