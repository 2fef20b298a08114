// Schema of anchor generation. Kernels: ops/cpu/anchors_kernel.cpp, ops/cuda/anchors_kernel.cu, and the Triton op in
// visionops/triton/anchors.py; fake kernel and Python API: visionops/ops/anchors.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(visionops, m) {
  // cell_anchors: [sum_l A_l, 4] in float32 (float64 for dtype=float64), level l owning num_cell_anchors[l] rows;
  // grid_sizes: (H_0, W_0, H_1, W_1, ...); strides: (sh_0, sw_0, ...). Returns [num_images, sum_l H_l*W_l*A_l, 4]
  // of `dtype`, every level in one pass, in torchvision's order (level, row-major location, cell anchor).
  m.def(
      "grid_anchors(Tensor cell_anchors, int[] num_cell_anchors, int[] grid_sizes, float[] strides, float offset, "
      "int num_images, ScalarType dtype) -> Tensor");
}
