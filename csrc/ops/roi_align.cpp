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
  // MultiScaleRoIAlign in one kernel: RoI k is pooled from features[levels[k]] at scales[levels[k]]. The backward
  // gets the levels' sizes flattened, 4 per level.
  m.def(
      "multi_scale_roi_align(Tensor[] features, Tensor rois, Tensor levels, float[] scales, SymInt pooled_height, "
      "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "_multi_scale_roi_align_backward(Tensor grad, Tensor rois, Tensor levels, float[] scales, "
      "SymInt pooled_height, SymInt pooled_width, SymInt[] feature_shapes, int sampling_ratio, bool aligned) "
      "-> Tensor[]");
}
