#pragma once
// IoU of two (x1, y1, x2, y2) boxes, torchvision's float formula (see visionops/reference/nms.py):
//   inter = max(0, min(x2a, x2b) - max(x1a, x1b)) * max(0, min(y2a, y2b) - max(y1a, y1b))
//   iou   = inter / (area_a + area_b - inter)
// Evaluated in T (float for half inputs, double for double) without FMA contraction.
#include "ops/common/macros.h"

namespace visionops {

template <typename T>
VISIONOPS_HOST_DEVICE inline T box_area(T x1, T y1, T x2, T y2) {
  return mul_rn(sub_rn(x2, x1), sub_rn(y2, y1));
}

// `a` is the higher-scored (kept) box: the operand order reproduces torchvision's NaN behaviour.
template <typename T>
VISIONOPS_HOST_DEVICE inline T box_iou_pair(const T* a, T area_a, const T* b, T area_b) {
  const T xx1 = max_first(a[0], b[0]);
  const T yy1 = max_first(a[1], b[1]);
  const T xx2 = min_first(a[2], b[2]);
  const T yy2 = min_first(a[3], b[3]);
  const T w = max_first(T(0), sub_rn(xx2, xx1));
  const T h = max_first(T(0), sub_rn(yy2, yy1));
  const T inter = mul_rn(w, h);
  return inter / sub_rn(add_rn(area_a, area_b), inter);
}

}  // namespace visionops

namespace visionops {

// d iou / d (a, b) for one pair, scaled by `g`; matches autograd through torchvision's box_iou formula
// (maximum/minimum split the gradient on ties; clamp(min=0) passes none at 0, as torch 2.14). Accumulates into
// ga[4], gb[4].
template <typename T>
VISIONOPS_HOST_DEVICE inline void box_iou_pair_backward(const T* a, const T* b, T g, T* ga, T* gb) {
  const T area_a = (a[2] - a[0]) * (a[3] - a[1]);
  const T area_b = (b[2] - b[0]) * (b[3] - b[1]);
  const T w_raw = (a[2] < b[2] ? a[2] : b[2]) - (a[0] > b[0] ? a[0] : b[0]);
  const T h_raw = (a[3] < b[3] ? a[3] : b[3]) - (a[1] > b[1] ? a[1] : b[1]);
  const T w = w_raw > T(0) ? w_raw : T(0);
  const T h = h_raw > T(0) ? h_raw : T(0);
  const T inter = w * h;
  const T uni = area_a + area_b - inter;
  const T g_inter = g * (uni + inter) / (uni * uni);
  const T g_area = -g * inter / (uni * uni);
  const T g_w = w_raw > T(0) ? g_inter * h : T(0);
  const T g_h = h_raw > T(0) ? g_inter * w : T(0);
  // area terms
  ga[0] -= g_area * (a[3] - a[1]);
  ga[2] += g_area * (a[3] - a[1]);
  ga[1] -= g_area * (a[2] - a[0]);
  ga[3] += g_area * (a[2] - a[0]);
  gb[0] -= g_area * (b[3] - b[1]);
  gb[2] += g_area * (b[3] - b[1]);
  gb[1] -= g_area * (b[2] - b[0]);
  gb[3] += g_area * (b[2] - b[0]);
  // intersection: the upper corner is an elementwise minimum, the lower one a maximum; ties split in half.
  for (int d = 0; d < 2; ++d) {
    const T gd = d == 0 ? g_w : g_h;
    const int lo = d, hi = d + 2;
    if (a[hi] < b[hi]) ga[hi] += gd;
    else if (b[hi] < a[hi]) gb[hi] += gd;
    else {
      ga[hi] += gd / 2;
      gb[hi] += gd / 2;
    }
    if (a[lo] > b[lo]) ga[lo] -= gd;
    else if (b[lo] > a[lo]) gb[lo] -= gd;
    else {
      ga[lo] -= gd / 2;
      gb[lo] -= gd / 2;
    }
  }
}

}  // namespace visionops
