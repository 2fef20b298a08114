// C++ entry points for libtorch users: one typed call through the dispatcher per torch.ops.visionops schema
// (csrc/ops/*.cpp), so the CPU or CUDA kernel of the inputs' device runs, exactly as torch.ops.visionops.* from
// Python. Link the visionops CMake target.
//
// These are the forward kernels and the backward ops as plain functions: autograd is registered from Python
// (torch.library.register_autograd in visionops/ops/), so in a C++-only program these calls do not record a graph.
// For gradients in C++, call the backward ops (the _*_backward functions) yourself, or wrap a forward/backward pair
// in a torch::autograd::Function.
//
// Each signature is checked against the registered kernels' at the first call (findSchemaOrThrow + typed):
// tests/cpp/consumer.cpp calls every one. SymInt arguments are taken as int64_t, as the kernels are.
#pragma once
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/Tensor.h>

namespace visionops {

namespace detail {
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}
using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
}  // namespace detail

// NMS family (torchvision.ops.nms, batched_nms, box_iou). Boxes are (x1, y1, x2, y2).

// Greedy NMS: indices of the kept boxes by decreasing score.
inline at::Tensor nms(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  static const auto handle = detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("visionops::nms");
  return handle.call(boxes, scores, iou_threshold);
}

// Per-category NMS, exact for any coordinates and category ids.
inline at::Tensor batched_nms(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                              double iou_threshold) {
  static const auto handle =
      detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>("visionops::batched_nms");
  return handle.call(boxes, scores, idxs, iou_threshold);
}

// Pairwise IoU [N, M].
inline at::Tensor box_iou(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  static const auto handle = detail::op<at::Tensor(const at::Tensor&, const at::Tensor&)>("visionops::box_iou");
  return handle.call(boxes1, boxes2);
}

// Gradients of box_iou with respect to boxes1 and boxes2, given grad [N, M].
inline detail::TensorPair _box_iou_backward(const at::Tensor& grad, const at::Tensor& boxes1,
                                            const at::Tensor& boxes2) {
  static const auto handle = detail::op<detail::TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "visionops::_box_iou_backward");
  return handle.call(grad, boxes1, boxes2);
}

// Soft-NMS (Bodla et al. 2017; mmcv's soft_nms with offset 0): (indices of the kept boxes in selection order, their
// scores when selected). method: 0 hard, 1 linear, 2 gaussian (visionops/reference/nms.py soft_nms).
inline detail::TensorPair soft_nms(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold,
                                   double sigma, double score_threshold, int64_t method) {
  static const auto handle =
      detail::op<detail::TensorPair(const at::Tensor&, const at::Tensor&, double, double, double, int64_t)>(
          "visionops::soft_nms");
  return handle.call(boxes, scores, iou_threshold, sigma, score_threshold, method);
}

// Soft-NMS per category; all categories by decreasing score (ties: selection rank, then category).
inline detail::TensorPair batched_soft_nms(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                                           double iou_threshold, double sigma, double score_threshold, int64_t method) {
  static const auto handle =
      detail::op<detail::TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, double,
                                    int64_t)>("visionops::batched_soft_nms");
  return handle.call(boxes, scores, idxs, iou_threshold, sigma, score_threshold, method);
}

// RoI ops (torchvision.ops.roi_align, roi_pool, MultiScaleRoIAlign). rois: [K, 5] rows of
// (batch index, x1, y1, x2, y2); outputs [K, C, pooled_height, pooled_width].

inline at::Tensor roi_align(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                            int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  static const auto handle =
      detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, double, int64_t, int64_t, int64_t, bool)>(
          "visionops::roi_align");
  return handle.call(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned);
}

// Gradient of roi_align with respect to an input of shape [batch_size, channels, height, width].
inline at::Tensor _roi_align_backward(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                      int64_t pooled_height, int64_t pooled_width, int64_t batch_size, int64_t channels,
                                      int64_t height, int64_t width, int64_t sampling_ratio, bool aligned) {
  static const auto handle =
      detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, double, int64_t, int64_t, int64_t, int64_t, int64_t,
                            int64_t, int64_t, bool)>("visionops::_roi_align_backward");
  return handle.call(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width,
                     sampling_ratio, aligned);
}

// MultiScaleRoIAlign in one call: RoI k is pooled from features[levels[k]] ([K] int64) at scales[levels[k]].
inline at::Tensor multi_scale_roi_align(at::TensorList features, const at::Tensor& rois, const at::Tensor& levels,
                                        at::ArrayRef<double> scales, int64_t pooled_height, int64_t pooled_width,
                                        int64_t sampling_ratio, bool aligned) {
  static const auto handle =
      detail::op<at::Tensor(at::TensorList, const at::Tensor&, const at::Tensor&, at::ArrayRef<double>, int64_t,
                            int64_t, int64_t, bool)>("visionops::multi_scale_roi_align");
  return handle.call(features, rois, levels, scales, pooled_height, pooled_width, sampling_ratio, aligned);
}

// Gradients of multi_scale_roi_align, one per level; feature_shapes holds each level's [N, C, H, W] in turn.
inline std::vector<at::Tensor> _multi_scale_roi_align_backward(const at::Tensor& grad, const at::Tensor& rois,
                                                               const at::Tensor& levels, at::ArrayRef<double> scales,
                                                               int64_t pooled_height, int64_t pooled_width,
                                                               at::IntArrayRef feature_shapes, int64_t sampling_ratio,
                                                               bool aligned) {
  static const auto handle =
      detail::op<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::ArrayRef<double>,
                                         int64_t, int64_t, at::IntArrayRef, int64_t, bool)>(
          "visionops::_multi_scale_roi_align_backward");
  return handle.call(grad, rois, levels, scales, pooled_height, pooled_width, feature_shapes, sampling_ratio, aligned);
}

// RoIPool; unlike torchvision it returns no argmax: the backward takes the input and finds each bin's maximum again.
inline at::Tensor roi_pool(const at::Tensor& input, const at::Tensor& rois, double spatial_scale, int64_t pooled_height,
                           int64_t pooled_width) {
  static const auto handle =
      detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, double, int64_t, int64_t)>("visionops::roi_pool");
  return handle.call(input, rois, spatial_scale, pooled_height, pooled_width);
}

inline at::Tensor _roi_pool_backward(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& rois,
                                     double spatial_scale, int64_t pooled_height, int64_t pooled_width) {
  static const auto handle =
      detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t, int64_t)>(
          "visionops::_roi_pool_backward");
  return handle.call(grad, input, rois, spatial_scale, pooled_height, pooled_width);
}

// Anchors and box coding (torchvision.models.detection's AnchorGenerator and BoxCoder).

// Anchors of every level, [num_images, sum_l H_l * W_l * A_l, 4] of `dtype`, in torchvision's order. cell_anchors
// [sum_l A_l, 4] (float32, float64 for dtype = float64), level l owning num_cell_anchors[l] rows; grid_sizes:
// (H_0, W_0, H_1, W_1, ...); strides: (sh_0, sw_0, ...).
inline at::Tensor grid_anchors(const at::Tensor& cell_anchors, at::IntArrayRef num_cell_anchors,
                               at::IntArrayRef grid_sizes, at::ArrayRef<double> strides, double offset,
                               int64_t num_images, at::ScalarType dtype) {
  static const auto handle =
      detail::op<at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::ArrayRef<double>, double, int64_t,
                            at::ScalarType)>("visionops::grid_anchors");
  return handle.call(cell_anchors, num_cell_anchors, grid_sizes, strides, offset, num_images, dtype);
}

// deltas [N, 4K], anchors [N, 4] -> boxes [N, 4K]; image_size = {} or {H, W} to clip in the same pass.
inline at::Tensor decode_boxes(const at::Tensor& deltas, const at::Tensor& anchors, at::ArrayRef<double> weights,
                               double bbox_xform_clip, at::ArrayRef<double> image_size) {
  static const auto handle =
      detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, at::ArrayRef<double>, double, at::ArrayRef<double>)>(
          "visionops::decode_boxes");
  return handle.call(deltas, anchors, weights, bbox_xform_clip, image_size);
}

// Gradients of decode_boxes with respect to deltas and anchors.
inline detail::TensorPair _decode_boxes_backward(const at::Tensor& grad, const at::Tensor& deltas,
                                                 const at::Tensor& anchors, at::ArrayRef<double> weights,
                                                 double bbox_xform_clip, at::ArrayRef<double> image_size) {
  static const auto handle =
      detail::op<detail::TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::ArrayRef<double>,
                                    double, at::ArrayRef<double>)>("visionops::_decode_boxes_backward");
  return handle.call(grad, deltas, anchors, weights, bbox_xform_clip, image_size);
}

// reference_boxes [N, 4], proposals [N, 4] -> regression targets [N, 4] (dx, dy, dw, dh).
inline at::Tensor encode_boxes(const at::Tensor& reference_boxes, const at::Tensor& proposals,
                               at::ArrayRef<double> weights) {
  static const auto handle =
      detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, at::ArrayRef<double>)>("visionops::encode_boxes");
  return handle.call(reference_boxes, proposals, weights);
}

// Indices of the boxes with score >= score_threshold and both sides >= min_size.
inline at::Tensor filter_boxes(const at::Tensor& boxes, const at::Tensor& scores, double score_threshold,
                               double min_size) {
  static const auto handle =
      detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, double, double)>("visionops::filter_boxes");
  return handle.call(boxes, scores, score_threshold, min_size);
}

// SiamFC cross-correlation (visionops.xcorr, depthwise_xcorr). z [Bz, C, Hz, Wz] (Bz == B or 1), x [B, C, Hx, Wx].

// out_scale * sum over channels and taps of z slid over x: [B, 1, Hx - Hz + 1, Wx - Wz + 1].
inline at::Tensor xcorr(const at::Tensor& z, const at::Tensor& x, double out_scale = 1.0) {
  static const auto handle = detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("visionops::xcorr");
  return handle.call(z, x, out_scale);
}

// Gradients of xcorr with respect to z and x, given grad [B, 1, Ho, Wo].
inline detail::TensorPair _xcorr_backward(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& x,
                                          double out_scale) {
  static const auto handle =
      detail::op<detail::TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
          "visionops::_xcorr_backward");
  return handle.call(grad, z, x, out_scale);
}

// Each channel of z slid over the same channel of x: [B, C, Hx - Hz + 1, Wx - Wz + 1].
inline at::Tensor depthwise_xcorr(const at::Tensor& z, const at::Tensor& x) {
  static const auto handle = detail::op<at::Tensor(const at::Tensor&, const at::Tensor&)>("visionops::depthwise_xcorr");
  return handle.call(z, x);
}

// Gradients of depthwise_xcorr with respect to z and x, given grad [B, C, Ho, Wo].
inline detail::TensorPair _depthwise_xcorr_backward(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& x) {
  static const auto handle = detail::op<detail::TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "visionops::_depthwise_xcorr_backward");
  return handle.call(grad, z, x);
}

// Convolution (visionops.conv2d, conv3d; F.conv2d / F.conv3d semantics, symmetric zero padding). input
// [B, Cin, *spatial], weight [Cout, Cin / groups, *kernel], bias [Cout] or none; stride, padding and dilation have 2
// (conv2d) or 3 (conv3d) values. The output follows the input's memory format (channels-last or contiguous).

inline at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  static const auto handle =
      detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::IntArrayRef,
                            at::IntArrayRef, at::IntArrayRef, int64_t)>("visionops::conv2d");
  return handle.call(input, weight, bias, stride, padding, dilation, groups);
}

// (grad_input, grad_weight, grad_bias) of conv2d given grad (the output's shape); an entry whose output_mask is
// false comes back as an empty tensor of shape [0].
inline detail::TensorTriple _conv2d_backward(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                             int64_t groups, std::array<bool, 3> output_mask) {
  static const auto handle =
      detail::op<detail::TensorTriple(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                      at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 3>)>(
          "visionops::_conv2d_backward");
  return handle.call(grad, input, weight, stride, padding, dilation, groups, output_mask);
}

inline at::Tensor conv3d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  static const auto handle =
      detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::IntArrayRef,
                            at::IntArrayRef, at::IntArrayRef, int64_t)>("visionops::conv3d");
  return handle.call(input, weight, bias, stride, padding, dilation, groups);
}

inline detail::TensorTriple _conv3d_backward(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                             int64_t groups, std::array<bool, 3> output_mask) {
  static const auto handle =
      detail::op<detail::TensorTriple(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                      at::IntArrayRef, at::IntArrayRef, int64_t, std::array<bool, 3>)>(
          "visionops::_conv3d_backward");
  return handle.call(grad, input, weight, stride, padding, dilation, groups, output_mask);
}

// What the library was built against: "version=...;torch=...;cuda=0|1;cuda_arches=...;roi_align_max_levels=8;
// roi_align_max_grid=65536".
inline std::string build_info() {
  static const auto handle = detail::op<std::string()>("visionops::_build_info");
  return handle.call();
}

}  // namespace visionops
