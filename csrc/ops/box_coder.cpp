// Schemas of box coding. Kernels: ops/cpu/box_coder_kernel.cpp, ops/cuda/box_coder_kernel.cu, Triton ops in
// visionops/triton/box_coder.py; fake kernels, autograd and the Python API: visionops/ops/box_coder.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(visionops, m) {
  // deltas [N, 4K], anchors [N, 4] (same dtype) -> boxes [N, 4K]; image_size = () or (H, W) to clip in the same pass.
  m.def(
      "decode_boxes(Tensor deltas, Tensor anchors, float[] weights, float bbox_xform_clip, float[] image_size) "
      "-> Tensor");
  m.def(
      "_decode_boxes_backward(Tensor grad, Tensor deltas, Tensor anchors, float[] weights, float bbox_xform_clip, "
      "float[] image_size) -> (Tensor, Tensor)");
  // reference_boxes [N, 4], proposals [N, 4] -> targets [N, 4] (dx, dy, dw, dh).
  m.def("encode_boxes(Tensor reference_boxes, Tensor proposals, float[] weights) -> Tensor");
  // Indices of the boxes with score >= score_threshold and both sides >= min_size (data-dependent length).
  m.def("filter_boxes(Tensor boxes, Tensor scores, float score_threshold, float min_size) -> Tensor");
}
