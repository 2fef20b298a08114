#pragma once
// The four RoIAlign entries (roi_align, _roi_align_backward, multi_scale_roi_align, _multi_scale_roi_align_backward)
// for any backend. Each backend writes the multi-level kernels once; the single-level op is their one-level case
// (levels = nullptr: every RoI reads level 0). The entries check the arguments (ops/common/roi_checks.h) and adapt
// the schemas' arguments, so the CPU and CUDA kernels get identical, validated calls.
//
// Kernels provides:
//   static constexpr size_t kMaxLevels;  // feature levels one call takes
//   static at::Tensor forward(const char* op, at::TensorList features, const at::Tensor& rois,
//                             const at::Tensor* levels, at::ArrayRef<double> scales, int64_t pooled_h,
//                             int64_t pooled_w, int64_t sampling_ratio, bool aligned);
//   static std::vector<at::Tensor> backward(const char* op, const at::Tensor& grad, const at::Tensor& rois,
//                                           const at::Tensor* levels, at::ArrayRef<double> scales,
//                                           int64_t pooled_h, int64_t pooled_w, at::IntArrayRef feature_shapes,
//                                           int64_t sampling_ratio, bool aligned);  // one gradient per level
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "ops/common/roi_checks.h"

namespace visionops {

template <typename Kernels>
struct RoIAlignEntries {
  static at::Tensor roi_align(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                              int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
    const double scales[1] = {spatial_scale};
    return forward("roi_align", input, rois, nullptr, scales, pooled_height, pooled_width, sampling_ratio, aligned);
  }

  static at::Tensor roi_align_backward(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                       int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
                                       int64_t channels, int64_t height, int64_t width, int64_t sampling_ratio,
                                       bool aligned) {
    const double scales[1] = {spatial_scale};
    const int64_t shape[4] = {batch_size, channels, height, width};
    return backward("_roi_align_backward", grad, rois, nullptr, scales, pooled_height, pooled_width, shape,
                    sampling_ratio, aligned)[0];
  }

  static at::Tensor multi_scale_roi_align(at::TensorList features, const at::Tensor& rois, const at::Tensor& levels,
                                          at::ArrayRef<double> scales, int64_t pooled_height, int64_t pooled_width,
                                          int64_t sampling_ratio, bool aligned) {
    return forward("multi_scale_roi_align", features, rois, &levels, scales, pooled_height, pooled_width,
                   sampling_ratio, aligned);
  }

  static std::vector<at::Tensor> multi_scale_roi_align_backward(const at::Tensor& grad, const at::Tensor& rois,
                                                                const at::Tensor& levels, at::ArrayRef<double> scales,
                                                                int64_t pooled_height, int64_t pooled_width,
                                                                at::IntArrayRef feature_shapes, int64_t sampling_ratio,
                                                                bool aligned) {
    return backward("_multi_scale_roi_align_backward", grad, rois, &levels, scales, pooled_height, pooled_width,
                    feature_shapes, sampling_ratio, aligned);
  }

 private:
  static at::Tensor forward(const char* op, at::TensorList features, const at::Tensor& rois, const at::Tensor* levels,
                            at::ArrayRef<double> scales, int64_t ph, int64_t pw, int64_t sampling_ratio, bool aligned) {
    RoIArgs args{op, rois, ph, pw, scales};
    args.levels = levels;
    args.features = features;
    check_roi_args(args, Kernels::kMaxLevels);
    return Kernels::forward(op, features, rois, levels, scales, ph, pw, sampling_ratio, aligned);
  }

  static std::vector<at::Tensor> backward(const char* op, const at::Tensor& grad, const at::Tensor& rois,
                                          const at::Tensor* levels, at::ArrayRef<double> scales, int64_t ph, int64_t pw,
                                          at::IntArrayRef shapes, int64_t sampling_ratio, bool aligned) {
    RoIArgs args{op, rois, ph, pw, scales};
    args.levels = levels;
    args.feature_shapes = shapes;
    args.grad = &grad;
    check_roi_args(args, Kernels::kMaxLevels);
    return Kernels::backward(op, grad, rois, levels, scales, ph, pw, shapes, sampling_ratio, aligned);
  }
};

}  // namespace visionops
