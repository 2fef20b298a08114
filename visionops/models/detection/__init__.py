"""Detection networks on visionops' ops, each with a ``backend="pytorch"`` twin on torchvision's ops.

One module per network, sharing ``common.py`` (the tiny backbone, the FPN, the anchor matcher):

* ``retinanet``  RetinaNet (Lin et al. 2017)
* ``rcnn``       Fast R-CNN (Girshick 2015) and Faster R-CNN (Ren et al. 2015)
* ``mask_rcnn``  Mask R-CNN (He et al. 2017)
* ``ssd``        SSD (Liu et al. 2016)

Conventions: visionops/models/README.md.
"""

from visionops.models.detection.common import FPN, Backbone, match_anchors
from visionops.models.detection.retinanet import RetinaNet, retinanet_anchor_sizes
from visionops.models.detection.rcnn import FasterRCNN, FastRCNN, jittered_proposals
from visionops.models.detection.mask_rcnn import MaskRCNN
from visionops.models.detection.ssd import SSD

__all__ = ["FPN", "Backbone", "RetinaNet", "match_anchors", "retinanet_anchor_sizes"]
__all__ += ["FastRCNN", "FasterRCNN", "MaskRCNN", "SSD", "jittered_proposals"]
