// Schema of the fixed-shape multiclass NMS (part of the NMS family). Kernels: ops/cpu/multiclass_nms_kernel.cpp,
// ops/cuda/multiclass_nms_kernel.cu; math: ops/common/multiclass_nms.h and visionops/reference/nms.py; fake kernel
// and autocast: visionops/ops/nms.py. Every output has a shape fixed by the input shapes and max_total, so the op
// needs no host synchronisation (torch.compile, torch.export, CUDA graphs).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(visionops, m) {
  m.def(
      "multiclass_nms(Tensor boxes, Tensor scores, float iou_threshold, float score_threshold, int max_per_class, "
      "int max_total, bool class_agnostic) -> (Tensor, Tensor, Tensor, Tensor)");
}
