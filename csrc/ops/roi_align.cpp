// Schemas of RoIAlign. Kernels: ops/cpu/roi_align_kernel.cpp, ops/cuda/roi_align_kernel.cu; fake kernels,
// autograd and autocast: visionops/ops/roi.py. Same signatures as torchvision::roi_align.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(visionops, m) {
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
      "int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, "
      "bool aligned) -> Tensor");
}
