#pragma once
// RoIPool per-element math, shared by the CPU and CUDA kernels (formulas: visionops/reference/roi.py).
//
// The RoI is rounded to feature-map cells: start = round(x1 * scale), end = round(x2 * scale), size =
// max(end - start + 1, 1). Bin p covers cells [floor(p * size / pooled), ceil((p + 1) * size / pooled)) offset by
// start and clipped to the map; an empty bin outputs 0 with argmax -1.
#include <cmath>
#include <cstdint>

#include "ops/common/macros.h"

namespace visionops {

// Cell coordinates are clamped to +-2^40 before the int cast: torchvision's cast of a NaN/huge coordinate is
// undefined behaviour; a NaN coordinate gives an empty RoI here (see roi_pool_geom).
template <typename T>
VISIONOPS_HOST_DEVICE inline int64_t roi_pool_cell(T v) {
  const T r = round(v);
  const T lim = static_cast<T>(1099511627776.0);
  return static_cast<int64_t>(r < -lim ? -lim : (r > lim ? lim : r));
}

template <typename T>
struct RoIPoolGeom {
  int64_t batch;
  int64_t start_h, start_w;
  T bin_h, bin_w;
  bool valid;  // false for NaN coordinates: every bin is empty
};

template <typename T, typename R>
VISIONOPS_HOST_DEVICE inline RoIPoolGeom<T> roi_pool_geom(const R* roi, T spatial_scale, int64_t pooled_h,
                                                          int64_t pooled_w) {
  RoIPoolGeom<T> g;
  const T b = static_cast<T>(roi[0]);
  g.batch = (b > T(-9.0e18) && b < T(9.0e18)) ? static_cast<int64_t>(b) : -1;
  const T x1 = static_cast<T>(roi[1]) * spatial_scale, y1 = static_cast<T>(roi[2]) * spatial_scale;
  const T x2 = static_cast<T>(roi[3]) * spatial_scale, y2 = static_cast<T>(roi[4]) * spatial_scale;
  g.valid = x1 == x1 && y1 == y1 && x2 == x2 && y2 == y2;
  g.start_w = roi_pool_cell(x1);
  g.start_h = roi_pool_cell(y1);
  const int64_t w = roi_pool_cell(x2) - g.start_w + 1, h = roi_pool_cell(y2) - g.start_h + 1;
  g.bin_h = static_cast<T>(h > 1 ? h : 1) / static_cast<T>(pooled_h);
  g.bin_w = static_cast<T>(w > 1 ? w : 1) / static_cast<T>(pooled_w);
  return g;
}

// Cells [lo, hi) of bin p along one axis, clipped to [0, size).
template <typename T>
VISIONOPS_HOST_DEVICE inline void roi_pool_bin(int64_t start, T bin, int64_t p, int64_t size, int64_t& lo,
                                               int64_t& hi) {
  lo = static_cast<int64_t>(floor(static_cast<T>(p) * bin)) + start;
  hi = static_cast<int64_t>(ceil(static_cast<T>(p + 1) * bin)) + start;
  lo = lo < 0 ? 0 : (lo > size ? size : lo);
  hi = hi < 0 ? 0 : (hi > size ? size : hi);
}

}  // namespace visionops
