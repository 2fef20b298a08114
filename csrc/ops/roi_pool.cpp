// Schemas of RoIPool. Kernels: ops/cpu/roi_pool_kernel.cpp, ops/cuda/roi_pool_kernel.cu; fake kernels, autograd:
// visionops/ops/roi.py.
//
// Unlike torchvision::roi_pool, the forward returns no argmax tensor (an int64 tensor twice the output's size): the
// backward takes the input and finds each bin's maximum again with the same rule (ops/common/roi_pool.h).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(visionops, m) {
  m.def(
      "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) -> Tensor");
  m.def(
      "_roi_pool_backward(Tensor grad, Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width) -> Tensor");
}
