#pragma once
// Argument checks of every RoI entry (roi_align, multi_scale_roi_align, roi_pool and their backwards) on every
// backend: written once so that the CPU and CUDA kernels refuse the same inputs with the same errors. The Python
// wrappers check first (visionops/ops/_checks.py); these guard direct torch.ops and C++ (visionops.h) calls.
// Checks that read tensor data (batch and level indices in range) need a device sync on CUDA: only the CPU kernels
// make them; on CUDA an out-of-range index gives zeros and no gradient.
#include <cstddef>
#include <cstdint>
#include <limits>
#include <ostream>

#include <ATen/core/Tensor.h>

namespace visionops {

// What one RoI call gets, as the checks see it.
struct RoIArgs {
  const char* op;          // the op's name: every message starts with it
  const at::Tensor& rois;  // [K, 5]: (batch index, x1, y1, x2, y2)
  int64_t pooled_h, pooled_w;
  at::ArrayRef<double> scales;          // one spatial scale per feature level
  const at::Tensor* levels = nullptr;   // multi-level ops: RoI k reads level levels[k] ([K], int64)
  at::TensorList features = {};         // the input levels (forwards; roi_pool's backward reads its input)
  at::IntArrayRef feature_shapes = {};  // roi_align's backwards get the levels' sizes only, [N, C, H, W] each
  const at::Tensor* grad = nullptr;     // backwards: [K, C, PH, PW]
};

constexpr size_t kAnyLevelCount = std::numeric_limits<size_t>::max();

// The argument name of feature level l in messages; formatted only when a check fails.
struct LevelName {
  bool multi;
  size_t l;
};
inline std::ostream& operator<<(std::ostream& os, const LevelName& n) {
  return n.multi ? os << "features[" << n.l << "]" : os << "input";
}

// max_levels: the most levels the backend's kernel takes in one call.
inline void check_roi_args(const RoIArgs& a, size_t max_levels = kAnyLevelCount) {
  const char* op = a.op;
  const at::Tensor& rois = a.rois;
  TORCH_CHECK_VALUE(rois.dim() == 2 && rois.size(1) == 5, op, ": rois must have shape [K, 5], got ", rois.sizes());
  TORCH_CHECK_TYPE(rois.is_floating_point(), op, ": rois must be a floating-point tensor, got ", rois.scalar_type());
  TORCH_CHECK_VALUE(a.pooled_h > 0 && a.pooled_w > 0, op, ": output_size must be positive, got (", a.pooled_h, ", ",
                    a.pooled_w, ")");
  const int64_t K = rois.size(0);
  const bool multi = a.levels != nullptr;
  TORCH_CHECK_VALUE(a.feature_shapes.size() % 4 == 0, op, ": feature_shapes must hold 4 sizes per level, got ",
                    a.feature_shapes.size());
  const size_t n = a.features.empty() ? a.feature_shapes.size() / 4 : a.features.size();
  TORCH_CHECK_VALUE(n >= 1, op, ": need at least one feature level");
  TORCH_CHECK_VALUE(n <= max_levels, op, ": at most ", max_levels, " feature levels per call on ", rois.device().type(),
                    ", got ", n);
  TORCH_CHECK_VALUE(a.scales.size() == n, op, ": need one spatial scale per feature level (", n, "), got ",
                    a.scales.size());
  if (multi) {
    const at::Tensor& lv = *a.levels;
    TORCH_CHECK_VALUE(lv.dim() == 1 && lv.size(0) == K, op, ": levels must have shape [K] = [", K, "], got ",
                      lv.sizes());
    TORCH_CHECK_TYPE(lv.scalar_type() == at::kLong, op, ": levels must be an int64 tensor, got ", lv.scalar_type());
    TORCH_CHECK_VALUE(lv.device() == rois.device(), op, ": levels must be on the device of rois (", rois.device(),
                      "), got ", lv.device());
  }
  int64_t C = 0;
  for (size_t l = 0; l < n; ++l) {
    const LevelName name{multi, l};
    at::IntArrayRef s;
    if (!a.features.empty()) {
      const at::Tensor& f = a.features[l];
      TORCH_CHECK_VALUE(f.dim() == 4, op, ": ", name, " must have shape [N, C, H, W], got ", f.sizes());
      TORCH_CHECK_TYPE(f.is_floating_point(), op, ": ", name, " must be a floating-point tensor, got ",
                       f.scalar_type());
      TORCH_CHECK_TYPE(f.scalar_type() == a.features[0].scalar_type(), op, ": ", name, " must have the dtype of ",
                       "features[0] (", a.features[0].scalar_type(), "), got ", f.scalar_type());
      TORCH_CHECK_VALUE(f.device() == rois.device(), op, ": ", name, " must be on the device of rois (", rois.device(),
                        "), got ", f.device());
      s = f.sizes();
    } else {
      s = a.feature_shapes.slice(4 * l, 4);
      TORCH_CHECK_VALUE(s[0] >= 0 && s[1] >= 0 && s[2] >= 0 && s[3] >= 0, op, ": ", name,
                        " sizes must be non-negative, got ", s);
    }
    if (l == 0) C = s[1];
    TORCH_CHECK_VALUE(s[1] == C, op, ": all feature levels must have the same channels (", C, "), ", name, " has ",
                      s[1]);
    TORCH_CHECK_VALUE(K == 0 || (s[2] > 0 && s[3] > 0), op, ": ", name, " must have a non-empty feature map, got ", s);
  }
  if (a.grad) {
    const at::Tensor& g = *a.grad;
    TORCH_CHECK_VALUE(
        g.dim() == 4 && g.size(0) == K && g.size(1) == C && g.size(2) == a.pooled_h && g.size(3) == a.pooled_w, op,
        ": grad must have shape [K, C, PH, PW] = [", K, ", ", C, ", ", a.pooled_h, ", ", a.pooled_w, "], got ",
        g.sizes());
    TORCH_CHECK_TYPE(g.is_floating_point(), op, ": grad must be a floating-point tensor, got ", g.scalar_type());
    if (!a.features.empty())
      TORCH_CHECK_TYPE(g.scalar_type() == a.features[0].scalar_type(), op, ": grad must have the dtype of input (",
                       a.features[0].scalar_type(), "), got ", g.scalar_type());
    TORCH_CHECK_VALUE(g.device() == rois.device(), op, ": grad must be on the device of rois (", rois.device(),
                      "), got ", g.device());
  }
}

// roi_pool (grad = nullptr) and _roi_pool_backward: one level, and the backward reads the input too.
inline void check_roi_pool_args(const char* op, const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                int64_t pooled_h, int64_t pooled_w, const at::Tensor* grad = nullptr) {
  RoIArgs args{op, rois, pooled_h, pooled_w, spatial_scale};
  args.features = input;
  args.grad = grad;
  check_roi_args(args);
}

}  // namespace visionops
