#pragma once
// RoIAlign per-element math, shared by the CPU and CUDA kernels (formulas: visionops/reference/roi.py).
//
// A RoI (x1, y1, x2, y2) in image coordinates maps to the feature map as start = x1 * scale - offset
// (offset = 0.5 when aligned), size = (x2 - x1) * scale, at least 1 when not aligned. Each of the
// pooled_h x pooled_w bins averages grid_h x grid_w bilinear samples taken at the centres of a regular sub-grid;
// grid = sampling_ratio when > 0, else ceil(size / pooled). Everything is evaluated in T (the op-math type), in
// torchvision's operation order, so float32 results agree with torchvision's to rounding.
#include <cmath>
#include <cstdint>

#include "ops/common/macros.h"

namespace visionops {

template <typename T>
struct RoIAlignGeom {
  int64_t batch;     // batch index as read from the RoI (range-checked by the caller)
  T start_h, start_w;
  T bin_h, bin_w;
  int64_t grid_h, grid_w;  // samples per bin along each axis (0 for a NaN/inverted RoI: no samples)
  T count;                 // samples per bin, at least 1 (the forward divides by it)
};

// Largest adaptive grid per axis. torchvision's int cast of ceil(size / pooled) is undefined behaviour for a NaN,
// infinite or huge RoI; here a non-finite size gives no samples (zeros) and a huge one is capped.
constexpr int64_t kMaxRoIAlignGrid = 1 << 16;

// Cells per axis up to which a bin's weights are merged separably (roi_align_bin_axis); wider bins go per sample.
constexpr int kRoIAlignBinSpan = 4;

template <typename T>
VISIONOPS_HOST_DEVICE inline int64_t roi_align_grid(int sampling_ratio, T size, int64_t pooled) {
  if (sampling_ratio > 0) return sampling_ratio;
  const T g = ceil(size / static_cast<T>(pooled));
  if (!(g > T(0)) || g - g != T(0)) return 0;  // negative, zero, NaN or infinite size: no samples
  return g < static_cast<T>(kMaxRoIAlignGrid) ? static_cast<int64_t>(g) : kMaxRoIAlignGrid;
}

template <typename T, typename R>
VISIONOPS_HOST_DEVICE inline RoIAlignGeom<T> roi_align_geom(const R* roi, T spatial_scale, int64_t pooled_h,
                                                             int64_t pooled_w, int sampling_ratio, bool aligned) {
  RoIAlignGeom<T> g;
  const T b = static_cast<T>(roi[0]);
  // Truncated like torchvision's int cast; a NaN/inf index becomes -1, which the range check rejects.
  g.batch = (b > T(-9.0e18) && b < T(9.0e18)) ? static_cast<int64_t>(b) : -1;
  const T offset = aligned ? T(0.5) : T(0);
  g.start_w = static_cast<T>(roi[1]) * spatial_scale - offset;
  g.start_h = static_cast<T>(roi[2]) * spatial_scale - offset;
  const T end_w = static_cast<T>(roi[3]) * spatial_scale - offset;
  const T end_h = static_cast<T>(roi[4]) * spatial_scale - offset;
  T roi_w = end_w - g.start_w;
  T roi_h = end_h - g.start_h;
  if (!aligned) {  // torchvision's std::max(size, 1): keeps a NaN size NaN
    roi_w = roi_w < T(1) ? T(1) : roi_w;
    roi_h = roi_h < T(1) ? T(1) : roi_h;
  }
  g.bin_h = roi_h / static_cast<T>(pooled_h);
  g.bin_w = roi_w / static_cast<T>(pooled_w);
  g.grid_h = roi_align_grid(sampling_ratio, roi_h, pooled_h);
  g.grid_w = roi_align_grid(sampling_ratio, roi_w, pooled_w);
  const int64_t n = g.grid_h * g.grid_w;
  g.count = static_cast<T>(n > 0 ? n : 1);
  return g;
}

// Coordinate of sample i (0 <= i < grid) of bin p along one axis.
template <typename T>
VISIONOPS_HOST_DEVICE inline T roi_align_sample(T start, T bin, int64_t p, int64_t i, int64_t grid) {
  return start + static_cast<T>(p) * bin + static_cast<T>(static_cast<T>(i) + T(0.5)) * bin / static_cast<T>(grid);
}

// One axis of the bilinear interpolation: the two taps (lo, hi) and their weights (w_lo, w_hi). A sample outside
// [-1, size] (or NaN) has no taps: returns false. Coordinates in [-1, 0] clamp to 0, those past size - 1 to size - 1.
template <typename T>
VISIONOPS_HOST_DEVICE inline bool bilinear_axis(T v, int64_t size, int64_t& lo, int64_t& hi, T& w_lo, T& w_hi) {
  if (!(v >= T(-1)) || v > static_cast<T>(size)) return false;
  if (v <= T(0)) v = T(0);
  lo = static_cast<int64_t>(v);
  if (lo >= size - 1) {
    lo = hi = size - 1;
    v = static_cast<T>(lo);
  } else {
    hi = lo + 1;
  }
  w_hi = v - static_cast<T>(lo);
  w_lo = T(1) - w_hi;
  return true;
}

// Summed bilinear weights of one bin along one axis. The samples of a bin form a grid_h x grid_w lattice and a
// sample is valid when both its coordinates are, so the weight a bin gives cell (y, x) is separable:
// sum_iy sum_ix w(iy, y) w(ix, x) = wy[y] * wx[x]. Bins are small (a fraction of a cell to a few cells), so the
// cells they touch per axis are few: a kernel does (cells_y x cells_x) loads or atomics instead of 4 per sample.
// On return w[j] is the weight of cell first + j (0 for cells no sample touches; every cell with a weight is in
// [0, size)). Returns false, leaving w unspecified, when the samples touch kSpan cells or more: use the per-sample
// path (bilinear_taps) then.
template <int kSpan, typename T>
VISIONOPS_HOST_DEVICE inline bool roi_align_bin_axis(T start, T bin, int64_t p, int64_t grid, int64_t size,
                                                     int64_t& first, T (&w)[kSpan]) {
  int64_t lo_min = size, hi_max = -1;
  for (int64_t i = 0; i < grid; ++i) {
    int64_t lo, hi;
    T wl, wh;
    if (!bilinear_axis(roi_align_sample(start, bin, p, i, grid), size, lo, hi, wl, wh)) continue;
    lo_min = lo < lo_min ? lo : lo_min;
    hi_max = hi > hi_max ? hi : hi_max;
    if (hi_max - lo_min >= kSpan) return false;
  }
  first = lo_min;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < kSpan; ++j) w[j] = T(0);
  if (hi_max < 0) return true;  // no valid sample
  for (int64_t i = 0; i < grid; ++i) {
    int64_t lo, hi;
    T wl, wh;
    if (!bilinear_axis(roi_align_sample(start, bin, p, i, grid), size, lo, hi, wl, wh)) continue;
    // Unrolled selects instead of w[lo - first]: the array stays in registers on the GPU.
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j < kSpan; ++j) {
      if (first + j == lo) w[j] += wl;
      if (first + j == hi) w[j] += wh;
    }
  }
  return true;
}

// Full 2-D sample: four taps (y_lo,x_lo), (y_lo,x_hi), (y_hi,x_lo), (y_hi,x_hi) with torchvision's weights
// w1 = hy*hx, w2 = hy*lx, w3 = ly*hx, w4 = ly*lx. False when the sample lies outside the map (weights all zero).
template <typename T>
VISIONOPS_HOST_DEVICE inline bool bilinear_taps(T y, T x, int64_t height, int64_t width, int64_t pos[4], T w[4]) {
  int64_t ylo, yhi, xlo, xhi;
  T hy, ly, hx, lx;
  // torchvision tests y and x together before clamping; testing them separately is equivalent.
  if (!bilinear_axis(y, height, ylo, yhi, hy, ly) || !bilinear_axis(x, width, xlo, xhi, hx, lx)) return false;
  pos[0] = ylo * width + xlo;
  pos[1] = ylo * width + xhi;
  pos[2] = yhi * width + xlo;
  pos[3] = yhi * width + xhi;
  w[0] = hy * hx;
  w[1] = hy * lx;
  w[2] = ly * hx;
  w[3] = ly * lx;
  return true;
}

}  // namespace visionops
