#pragma once
// Soft-NMS math shared by the CPU and CUDA kernels (the definition: visionops/reference/nms.py, soft_nms).
//
// Each step keeps the alive box with the highest current score (ties: the lowest input index), then multiplies the
// score of every other alive box b by a weight of iou = IoU(kept, b):
//   hard      w = iou > iou_threshold ? 0 : 1           (plain NMS when score_threshold > 0)
//   linear    w = iou > iou_threshold ? 1 - iou : 1
//   gaussian  w = exp(-iou^2 / sigma)                   (iou_threshold unused)
// and drops b once its score is no longer >= score_threshold (so NaN scores drop). IoU is box_iou_pair in the
// boxes' opmath type (float for float/half, as nms and mmcv), the weight, the scores and the comparisons in double.
// The method is a template parameter of one kernel (pytorch_scatter's reduction dispatch), so the branch on it is
// resolved at compile time.
#include <cmath>
#include <cstdint>

#include <ATen/core/Tensor.h>

#include "ops/common/box_iou.h"

namespace visionops {

enum class SoftNmsMethod : int64_t { kHard = 0, kLinear = 1, kGaussian = 2 };

struct SoftNmsParams {
  double iou_threshold, sigma, score_threshold;
};

template <SoftNmsMethod M>
VISIONOPS_HOST_DEVICE inline double soft_nms_weight(double iou, const SoftNmsParams& p) {
  if constexpr (M == SoftNmsMethod::kHard) {
    return iou > p.iou_threshold ? 0.0 : 1.0;
  } else if constexpr (M == SoftNmsMethod::kLinear) {
    return iou > p.iou_threshold ? 1.0 - iou : 1.0;
  } else {
    // exp(-0) is exactly 1 in every libm: skipping the call for disjoint boxes changes nothing (NaN still calls).
    if (iou == 0.0) return 1.0;
#if defined(__CUDA_ARCH__)
    return ::exp(-(iou * iou) / p.sigma);
#else
    return std::exp(-(iou * iou) / p.sigma);
#endif
  }
}

// A decayed box stays alive while its score is >= score_threshold (NaN fails: the box drops).
VISIONOPS_HOST_DEVICE inline bool soft_nms_alive(double score, const SoftNmsParams& p) {
  return score >= p.score_threshold;
}

// Runs `body` with `kMethod` bound to the method as a constant expression, as AT_DISPATCH_* binds scalar_t:
//   VISIONOPS_DISPATCH_SOFT_NMS_METHOD(method, [&] { kernel<scalar_t, kMethod>(...); });
#define VISIONOPS_DISPATCH_SOFT_NMS_METHOD(method, ...)                                              \
  [&] {                                                                                              \
    switch (static_cast<::visionops::SoftNmsMethod>(method)) {                                       \
      case ::visionops::SoftNmsMethod::kHard: {                                                      \
        static constexpr ::visionops::SoftNmsMethod kMethod = ::visionops::SoftNmsMethod::kHard;     \
        return __VA_ARGS__();                                                                        \
      }                                                                                              \
      case ::visionops::SoftNmsMethod::kLinear: {                                                    \
        static constexpr ::visionops::SoftNmsMethod kMethod = ::visionops::SoftNmsMethod::kLinear;   \
        return __VA_ARGS__();                                                                        \
      }                                                                                              \
      default: {                                                                                     \
        static constexpr ::visionops::SoftNmsMethod kMethod = ::visionops::SoftNmsMethod::kGaussian; \
        return __VA_ARGS__();                                                                        \
      }                                                                                              \
    }                                                                                                \
  }()

// The argument checks of both entries on every backend (the Python wrappers check first; these guard direct
// torch.ops and C++ calls). idxs: nullptr for soft_nms.
inline void check_soft_nms_args(const char* op, const at::Tensor& boxes, const at::Tensor& scores,
                                const at::Tensor* idxs, double sigma, int64_t method) {
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 4, op, ": boxes must have shape [N, 4], got ", boxes.sizes());
  TORCH_CHECK_TYPE(boxes.is_floating_point(), op, ": boxes must be a floating-point tensor, got ", boxes.scalar_type());
  TORCH_CHECK_VALUE(scores.dim() == 1 && scores.size(0) == boxes.size(0), op,
                    ": scores must have shape [N] matching boxes [", boxes.size(0), ", 4], got ", scores.sizes());
  TORCH_CHECK_TYPE(scores.is_floating_point(), op, ": scores must be a floating-point tensor, got ",
                   scores.scalar_type());
  if (idxs) {
    TORCH_CHECK_VALUE(idxs->dim() == 1 && idxs->size(0) == boxes.size(0), op,
                      ": idxs must have shape [N] matching boxes [", boxes.size(0), ", 4], got ", idxs->sizes());
    TORCH_CHECK_TYPE(!idxs->is_floating_point() && !idxs->is_complex() && idxs->scalar_type() != at::kBool, op,
                     ": idxs must be an integer tensor, got ", idxs->scalar_type());
  }
  TORCH_CHECK_VALUE(sigma > 0, op, ": sigma must be > 0, got ", sigma);
  TORCH_CHECK_VALUE(method >= 0 && method <= 2, op, ": method must be 0 (hard), 1 (linear) or 2 (gaussian), got ",
                    method);
}

}  // namespace visionops
