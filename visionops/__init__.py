"""visionops: C++/CUDA/Triton kernels for classic computer-vision networks, torchvision-compatible.

Every op is registered in the dispatcher as ``torch.ops.visionops.<name>`` and exposed here with torchvision's
Python signature plus a keyword-only ``backend=`` ("auto", "cpp", "triton", "reference").
"""

from visionops._version import __version__
from visionops._extension import build_info  # loads _C: registers the C++/CUDA kernels
from visionops import ops  # noqa: E402  (declares every op in the registry)
from visionops.ops import *  # noqa: E402,F401,F403  (the public ops: visionops.ops.__all__)
from visionops import nn  # noqa: E402,F401  (visionops.nn.Conv2d / Conv3d)
import visionops.triton  # noqa: E402,F401  (defines the Triton ops when triton is installed)
from visionops.compat import patch_torchvision, unpatch  # noqa: E402
from visionops import onnx as _onnx  # noqa: E402

_onnx.register()  # torch.onnx.export translations of nms, batched_nms, roi_align, roi_pool

__all__ = ["__version__", "build_info", "patch_torchvision", "unpatch", *ops.__all__]
