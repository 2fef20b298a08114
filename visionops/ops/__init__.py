"""The public op wrappers, one module per family: argument checks, docstrings with shapes, modules, and the family's
declarations in the op registry (visionops/_registry.py). Each family module lists its public names in __all__."""

import visionops.ops.anchors as _anchors
import visionops.ops.box_coder as _box_coder
import visionops.ops.boxes as _boxes
import visionops.ops.nms as _nms
import visionops.ops.poolers as _poolers
import visionops.ops.roi as _roi
from visionops.ops.anchors import *  # noqa: F401,F403
from visionops.ops.box_coder import *  # noqa: F401,F403
from visionops.ops.boxes import *  # noqa: F401,F403
from visionops.ops.nms import *  # noqa: F401,F403
from visionops.ops.poolers import *  # noqa: F401,F403
from visionops.ops.roi import *  # noqa: F401,F403

__all__ = [*_nms.__all__, *_roi.__all__, *_poolers.__all__, *_anchors.__all__, *_box_coder.__all__, *_boxes.__all__]
