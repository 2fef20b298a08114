// Schemas of the NMS family. Kernels: ops/cpu/nms_kernel.cpp, ops/cuda/nms_kernel.cu; fake kernels, autograd and
// autocast: visionops/ops/nms.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(visionops, m) {
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor");
  m.def("batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");
  m.def("box_iou(Tensor boxes1, Tensor boxes2) -> Tensor");
  m.def("_box_iou_backward(Tensor grad, Tensor boxes1, Tensor boxes2) -> (Tensor, Tensor)");
}
