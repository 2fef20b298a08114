"""Thin reference networks built on visionops' public ops, each runnable on torchvision / plain PyTorch ops too.

Subpackages, one per network family (see README.md in this folder for the conventions every model follows):

* ``visionops.models.detection``    two-stage detectors (Fast/Faster/Mask R-CNN), SSD, RetinaNet
* ``visionops.models.siamfc``       SiamFC tracker
* ``visionops.models.segmentation`` DeepLab
* ``visionops.models.video``        C3D, two-stream networks
* ``visionops.models.data``         generated data sets

Conventions: built from the public ``visionops.*`` API only; a ``backend="visionops" | "pytorch"`` keyword whose
"pytorch" path uses torchvision / plain PyTorch ops and nothing of ours; parameters independent of the backend (a
state_dict moves between the two); random sampling takes a ``torch.Generator``.
"""

from typing import Tuple

BACKENDS: Tuple[str, ...] = ("visionops", "pytorch")


def check_backend(backend: str) -> str:
    """The model backend, validated: "visionops" (our ops) or "pytorch" (torchvision / plain PyTorch ops)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend
