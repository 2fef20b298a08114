// Schema of Matrix NMS (SOLOv2, Wang et al. 2020), part of the NMS family. Kernels: ops/cpu/matrix_nms_kernel.cpp,
// ops/cuda/matrix_nms_kernel.cu (the host steps shared in ops/common/matrix_nms.h); math: ops/common/matrix_nms.h
// and visionops/reference/nms.py; fake kernel and autocast: visionops/ops/nms.py.
// boxes_or_masks: boxes [N, 4] or binary masks [N, H, W]; kernel: "gaussian" or "linear"; max_num -1: all.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(visionops, m) {
  m.def(
      "matrix_nms(Tensor boxes_or_masks, Tensor scores, Tensor labels, str kernel, float sigma, "
      "float score_threshold, int max_num) -> (Tensor, Tensor)");
}
