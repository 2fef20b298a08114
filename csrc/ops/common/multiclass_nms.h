#pragma once
// Fixed-shape multiclass NMS, shared by the CPU and CUDA kernels (the definition: visionops/reference/nms.py,
// multiclass_nms).
//
// Per image, a candidate is a (box n, class c) pair with score > score_threshold, compared in the scores' dtype
// (the threshold rounded to it first, as `scores > score_threshold` in PyTorch). Candidates are visited by
// decreasing score, ties by class then box index (the class-major flat index f = c * N + n). Greedy NMS keeps the
// first max_per_class survivors of each class: a walk per (image, class) that stops once it has kept them (the boxes
// greedy NMS keeps come in score order, so later ones can never displace them). The per-image result is the best
// max_total of the C x max_per_class survivors. Class-agnostic: one walk per image tests each candidate against
// every box kept so far, whatever its class, and accepts a kept box while its class holds fewer than
// max_per_class accepted ones; it stops at max_total accepted.
// IoU: box_iou_pair in the boxes' opmath type without FMA, the kept box first, compared in double (as nms).
#include <cstdint>

#include <ATen/core/Tensor.h>

#include "ops/common/box_iou.h"

namespace visionops {

// Whether `cand` (with its area) is suppressed by one kept box: IoU(kept, cand) > thr, box_iou_pair's operations
// in its order. Most pairs are disjoint: their IoU is 0 (or NaN, for a zero union), above no threshold >= 0, so the
// division is skipped for them.
template <typename T>
VISIONOPS_HOST_DEVICE inline bool mcnms_suppresses(const T* kept, T kept_area, const T* cand, T cand_area, double thr) {
  const T w = max_first(T(0), sub_rn(min_first(kept[2], cand[2]), max_first(kept[0], cand[0])));
  const T h = max_first(T(0), sub_rn(min_first(kept[3], cand[3]), max_first(kept[1], cand[1])));
  const T inter = mul_rn(w, h);
  if (inter == T(0) && thr >= 0) return false;
  return static_cast<double>(inter / sub_rn(add_rn(kept_area, cand_area), inter)) > thr;
}

// The argument checks both backends run (the Python wrapper raises the same errors first).
inline void check_multiclass_nms_args(const at::Tensor& boxes, const at::Tensor& scores, int64_t max_per_class,
                                      int64_t max_total) {
  TORCH_CHECK_TYPE(scores.is_floating_point(), "multiclass_nms: scores must be a floating-point tensor, got ",
                   scores.scalar_type());
  TORCH_CHECK_VALUE(scores.dim() == 3, "multiclass_nms: scores must have shape [B, N, C], got ", scores.sizes());
  TORCH_CHECK_TYPE(boxes.scalar_type() == scores.scalar_type(), "multiclass_nms: boxes must have the scores' dtype ",
                   scores.scalar_type(), ", got ", boxes.scalar_type());
  const bool shared =
      boxes.dim() == 3 && boxes.size(0) == scores.size(0) && boxes.size(1) == scores.size(1) && boxes.size(2) == 4;
  const bool per_class = boxes.dim() == 4 && boxes.size(0) == scores.size(0) && boxes.size(1) == scores.size(1) &&
                         boxes.size(2) == scores.size(2) && boxes.size(3) == 4;
  TORCH_CHECK_VALUE(shared || per_class, "multiclass_nms: boxes must have shape [B, N, 4] or [B, N, C, 4] for scores ",
                    "of shape [B, N, C] = ", scores.sizes(), ", got ", boxes.sizes());
  TORCH_CHECK_VALUE(boxes.device() == scores.device(), "multiclass_nms: boxes and scores must be on one device, got ",
                    boxes.device(), " and ", scores.device());
  TORCH_CHECK_VALUE(max_per_class >= 1, "multiclass_nms: max_per_class must be >= 1, got ", max_per_class);
  TORCH_CHECK_VALUE(max_total >= 1, "multiclass_nms: max_total must be >= 1, got ", max_total);
}

}  // namespace visionops
