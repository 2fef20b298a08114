// Schemas of soft-NMS (Bodla et al. 2017), part of the NMS family. Kernels: ops/cpu/soft_nms_kernel.cpp,
// ops/cuda/soft_nms_kernel.cu (one kernel each, the decay method a compile-time parameter); math:
// ops/common/soft_nms.h and visionops/reference/nms.py; fake kernels and autocast: visionops/ops/nms.py.
// method: 0 hard, 1 linear, 2 gaussian (mmcv's numbering; the Python wrappers map the names).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(visionops, m) {
  m.def(
      "soft_nms(Tensor boxes, Tensor scores, float iou_threshold, float sigma, float score_threshold, int method) "
      "-> (Tensor, Tensor)");
  m.def(
      "batched_soft_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold, float sigma, "
      "float score_threshold, int method) -> (Tensor, Tensor)");
}
