#pragma once
// Matrix NMS (SOLOv2) shared by the CPU and CUDA kernels; the definition is visionops/reference/nms.py matrix_nms.
//
// Rank the boxes (or masks) by decreasing score (stable). Only boxes of the same label interact, so the host steps
// below order them label-major (score order within a label) and give each position j the first position start[j]
// of its label's run: every pair the kernels visit is (i, j) with start[j] <= i < j, i the higher-scored. Then
//   comp_i  = max over start[i] <= k < i of iou(k, i)                      (0 when none)
//   decay_j = min(1, min over start[j] <= i < j of f(iou(i, j)) / f(comp_i))
//   f(x)    = exp(-sigma * x^2) (gaussian) or 1 - x (linear)
// A NaN IoU (0 / 0: empty masks, zero-area boxes) counts as 0, and a NaN ratio (0 / 0: linear, identical boxes)
// never lowers decay_j. Box IoU is box_iou_pair in the boxes' opmath type, mask IoU inter / (area_i + area_j -
// inter) in float32 from a matmul per label (exact for binary masks); f, the ratios, the decayed scores and their
// comparisons are float64. The kernels run two passes over the pairs (comp, then decay), never materialising the N x N
// matrices for boxes.
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cummax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/unique_consecutive.h>

#include "ops/common/box_iou.h"

namespace visionops {

// iou > 0 ? iou : 0, so that NaN (and -0 from inverted boxes) become 0.
template <typename T>
VISIONOPS_HOST_DEVICE inline T matrix_nms_clean_iou(T iou) {
  return iou > T(0) ? iou : T(0);
}

template <bool kGaussian>
VISIONOPS_HOST_DEVICE inline double matrix_nms_f(double x, double sigma) {
  if constexpr (kGaussian) {
#if defined(__CUDA_ARCH__)
    return ::exp(-(sigma * (x * x)));
#else
    return std::exp(-(sigma * (x * x)));
#endif
  } else {
    return 1.0 - x;
  }
}

// IoU of sorted boxes i (higher-scored, first operand as nms) and j, from [4, N] coordinate planes.
template <typename T>
struct MatrixNmsBoxes {
  const T* planes;
  int64_t n;
  VISIONOPS_HOST_DEVICE inline T iou(int64_t i, int64_t j) const {
    const T a[4] = {planes[i], planes[n + i], planes[2 * n + i], planes[3 * n + i]};
    const T b[4] = {planes[j], planes[n + j], planes[2 * n + j], planes[3 * n + j]};
    return matrix_nms_clean_iou(box_iou_pair(a, box_area(a[0], a[1], a[2], a[3]), b, box_area(b[0], b[1], b[2], b[3])));
  }
};

// IoU of sorted masks i and j from the intersection matrix (row i) and the areas.
struct MatrixNmsMasks {
  const float* inter;
  const float* area;
  int64_t n;
  VISIONOPS_HOST_DEVICE inline float iou(int64_t i, int64_t j) const {
    const float in = inter[i * n + j];
    return matrix_nms_clean_iou(in / sub_rn(add_rn(area[i], area[j]), in));
  }
};

inline bool matrix_nms_gaussian(const char* op, const std::string& kernel) {
  TORCH_CHECK_VALUE(kernel == "gaussian" || kernel == "linear", op,
                    ": kernel must be \"gaussian\" or \"linear\", got \"", kernel, "\"");
  return kernel == "gaussian";
}

inline void check_matrix_nms_args(const char* op, const at::Tensor& boxes_or_masks, const at::Tensor& scores,
                                  const at::Tensor& labels, const std::string& kernel, double sigma) {
  const at::Tensor& b = boxes_or_masks;
  TORCH_CHECK_VALUE((b.dim() == 2 && b.size(1) == 4) || b.dim() == 3, op,
                    ": boxes_or_masks must be boxes [N, 4] or masks [N, H, W], got ", b.sizes());
  TORCH_CHECK_TYPE(b.is_floating_point() || (b.dim() == 3 && b.scalar_type() == at::kBool), op,
                   ": boxes_or_masks must be floating point (masks: or bool), got ", b.scalar_type());
  TORCH_CHECK_VALUE(scores.dim() == 1 && scores.size(0) == b.size(0), op,
                    ": scores must have shape [N] with N = ", b.size(0), ", got ", scores.sizes());
  TORCH_CHECK_TYPE(scores.is_floating_point(), op, ": scores must be a floating-point tensor, got ",
                   scores.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == b.size(0), op,
                    ": labels must have shape [N] with N = ", b.size(0), ", got ", labels.sizes());
  TORCH_CHECK_TYPE(!labels.is_floating_point() && !labels.is_complex() && labels.scalar_type() != at::kBool, op,
                   ": labels must be an integer tensor, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(!matrix_nms_gaussian(op, kernel) || sigma > 0, op,
                    ": sigma must be > 0 for the gaussian kernel, got ", sigma);
  TORCH_CHECK_VALUE(b.device() == scores.device() && b.device() == labels.device(), op,
                    ": boxes_or_masks, scores and labels must be on one device");
}

// The matrix_nms entry for any backend: sorting, the label-major order, the mask matmul and the final selection are
// ATen calls; the two passes over the pairs are the backend's. Kernels provides
//   template <typename T, bool kMasks, bool kGaussian>
//   static void decay(const at::Tensor& src, const at::Tensor& area, const at::Tensor& start, double sigma,
//                     at::Tensor& fcomp, at::Tensor& decay);
// src: [4, N] box planes of type T, or (kMasks, T = float) the [N, N] intersections with area [N]; start [N] int64;
// fcomp, decay [N] float64 (fcomp_i = f(comp_i), scratch written by the first pass).
template <typename Kernels>
std::tuple<at::Tensor, at::Tensor> matrix_nms_entry(const at::Tensor& boxes_or_masks, const at::Tensor& scores,
                                                    const at::Tensor& labels, const std::string& kernel, double sigma,
                                                    double score_threshold, int64_t max_num) {
  constexpr const char* op = "matrix_nms";
  check_matrix_nms_args(op, boxes_or_masks, scores, labels, kernel, sigma);
  const bool gaussian = matrix_nms_gaussian(op, kernel);
  const int64_t n = scores.size(0);
  const auto long_opts = scores.options().dtype(at::kLong);
  if (n == 0) return {at::empty({0}, long_opts), at::empty({0}, scores.options())};

  const at::Tensor order = std::get<1>(at::sort(scores, /*stable=*/true, 0, /*descending=*/true));
  const at::Tensor ranked_labels = labels.index_select(0, order).to(at::kLong);
  const at::Tensor rank = std::get<1>(at::sort(ranked_labels, /*stable=*/true, 0, /*descending=*/false));
  const at::Tensor perm = order.index_select(0, rank);  // label-major, by decreasing score within a label
  const at::Tensor lab = ranked_labels.index_select(0, rank);
  const at::Tensor pos = at::arange(n, long_opts);
  at::Tensor first = pos.narrow(0, 1, n - 1).masked_fill(lab.narrow(0, 1, n - 1).eq(lab.narrow(0, 0, n - 1)), 0);
  const at::Tensor start = std::get<0>(at::cummax(at::cat({pos.narrow(0, 0, 1), first}), 0)).contiguous();

  at::Tensor fcomp = at::empty({n}, scores.options().dtype(at::kDouble));
  at::Tensor decay = at::empty({n}, fcomp.options());
  at::Tensor src, area;
  const bool masks = boxes_or_masks.dim() == 3;
  if (masks) {
    const at::Tensor flat = boxes_or_masks.index_select(0, perm).reshape({n, -1}).to(at::kFloat);
    // Only the diagonal blocks (same label) are read: one matmul per label instead of the N x N product.
    src = at::empty({n, n}, flat.options());
    const at::Tensor counts = std::get<2>(at::unique_consecutive(lab, false, true)).cpu();
    int64_t g0 = 0;
    for (int64_t c : c10::ArrayRef<int64_t>(counts.data_ptr<int64_t>(), counts.numel())) {
      if (c > 1) {
        const at::Tensor rows = flat.narrow(0, g0, c);
        src.narrow(0, g0, c).narrow(1, g0, c).copy_(at::mm(rows, rows.t()));
      }
      g0 += c;
    }
    area = at::mv(flat, at::ones({flat.size(1)}, flat.options()));  // a BLAS call: faster than sum(1) here
    if (gaussian) Kernels::template decay<float, true, true>(src, area, start, sigma, fcomp, decay);
    else Kernels::template decay<float, true, false>(src, area, start, sigma, fcomp, decay);
  } else {
    const bool dbl = boxes_or_masks.scalar_type() == at::kDouble;
    src = boxes_or_masks.index_select(0, perm).to(dbl ? at::kDouble : at::kFloat).t().contiguous();
    if (dbl) {
      if (gaussian) Kernels::template decay<double, false, true>(src, area, start, sigma, fcomp, decay);
      else Kernels::template decay<double, false, false>(src, area, start, sigma, fcomp, decay);
    } else {
      if (gaussian) Kernels::template decay<float, false, true>(src, area, start, sigma, fcomp, decay);
      else Kernels::template decay<float, false, false>(src, area, start, sigma, fcomp, decay);
    }
  }

  // Decayed scores back in rank order, so that ties keep it (score, then input index).
  const at::Tensor decayed = scores.index_select(0, perm).to(at::kDouble).mul_(decay);
  const at::Tensor by_rank = at::empty({n}, decayed.options()).index_copy_(0, rank, decayed);
  at::Tensor sel = at::nonzero(by_rank.ge(score_threshold)).squeeze(1);
  at::Tensor best = std::get<1>(at::sort(by_rank.index_select(0, sel), /*stable=*/true, 0, /*descending=*/true));
  if (max_num >= 0 && best.size(0) > max_num) best = best.narrow(0, 0, max_num);
  sel = sel.index_select(0, best);
  return {order.index_select(0, sel), by_rank.index_select(0, sel).to(scores.scalar_type())};
}

}  // namespace visionops
