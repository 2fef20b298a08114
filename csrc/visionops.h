// C++ entry points for libtorch users: typed calls through the dispatcher, so the CPU or CUDA kernel of the
// inputs' device runs, exactly as torch.ops.visionops.* from Python. Link the visionops CMake target.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace visionops {

namespace detail {
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}
}  // namespace detail

// Greedy NMS (torchvision.ops.nms): indices of kept boxes by decreasing score.
inline at::Tensor nms(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  static const auto handle = detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("visionops::nms");
  return handle.call(boxes, scores, iou_threshold);
}

// Per-category NMS (torchvision.ops.batched_nms), exact for any coordinates and category ids.
inline at::Tensor batched_nms(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                              double iou_threshold) {
  static const auto handle =
      detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>("visionops::batched_nms");
  return handle.call(boxes, scores, idxs, iou_threshold);
}

// Pairwise IoU [N, M] (torchvision.ops.box_iou).
inline at::Tensor box_iou(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  static const auto handle = detail::op<at::Tensor(const at::Tensor&, const at::Tensor&)>("visionops::box_iou");
  return handle.call(boxes1, boxes2);
}

}  // namespace visionops
