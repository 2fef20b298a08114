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
  int64_t batch;  // batch index as read from the RoI (range-checked by the caller)
  T start_h, start_w;
  T bin_h, bin_w;
  int64_t grid_h, grid_w;  // samples per bin along each axis (0 for a NaN/inverted RoI: no samples)
  T count;                 // samples per bin, at least 1 (the forward divides by it)
};

// Largest adaptive grid per axis. torchvision's int cast of ceil(size / pooled) is undefined behaviour for a NaN,
// infinite or huge RoI; here a non-finite size gives no samples (zeros) and a huge one is capped. Python reads it
// as roi_align_max_grid in _build_info() (ops/build_info.cpp) rather than restating it.
constexpr int64_t kMaxRoIAlignGrid = 1 << 16;

// Feature levels one multi-level RoIAlign call takes on CUDA: the level table travels by value as a kernel argument.
// The CPU kernel keeps its levels in a std::vector and takes any number (capping it would refuse direct calls that
// work today for no gain). visionops.ops.poolers sends at most this many levels to the kernels and loops over
// levels beyond; it reads the value as roi_align_max_levels in _build_info() (ops/build_info.cpp).
constexpr int kMaxRoIAlignLevels = 8;

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
// path then (roi_align_bin_taps does).
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

// Every cell bin (ph, pw) of RoI g reads, with its weight: calls tap(y, x, w) with w the sum of the bin's bilinear
// weights on cell (y, x) (not yet divided by g.count). Zero weights are skipped. A bin whose samples touch at most
// kRoIAlignBinSpan cells per axis (nearly every bin at detection scales) passes each cell once, with its separable
// weight wy * wx: 4 to 9 cells for a 2x2 sampling grid instead of 16 taps. A wider bin passes each sample's taps
// (a cell can then come more than once). The CPU taps, the CUDA forward (reads) and the CUDA backward (atomics)
// all go through here.
template <typename T, typename F>
VISIONOPS_HOST_DEVICE inline void roi_align_bin_taps(const RoIAlignGeom<T>& g, int64_t ph, int64_t pw, int64_t H,
                                                     int64_t W, F&& tap) {
  int64_t fy, fx;
  T wy[kRoIAlignBinSpan], wx[kRoIAlignBinSpan];
  if (roi_align_bin_axis(g.start_h, g.bin_h, ph, g.grid_h, H, fy, wy) &&
      roi_align_bin_axis(g.start_w, g.bin_w, pw, g.grid_w, W, fx, wx)) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int a = 0; a < kRoIAlignBinSpan; ++a) {
      if (wy[a] == T(0)) continue;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int b = 0; b < kRoIAlignBinSpan; ++b) {
        const T w = wy[a] * wx[b];
        if (w != T(0)) tap(fy + a, fx + b, w);
      }
    }
    return;
  }
  for (int64_t iy = 0; iy < g.grid_h; ++iy) {
    int64_t ylo, yhi;
    T hy, ly;
    if (!bilinear_axis(roi_align_sample(g.start_h, g.bin_h, ph, iy, g.grid_h), H, ylo, yhi, hy, ly)) continue;
    for (int64_t ix = 0; ix < g.grid_w; ++ix) {
      int64_t xlo, xhi;
      T hx, lx;
      if (!bilinear_axis(roi_align_sample(g.start_w, g.bin_w, pw, ix, g.grid_w), W, xlo, xhi, hx, lx)) continue;
      const T w[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
      const int64_t ys[4] = {ylo, ylo, yhi, yhi}, xs[4] = {xlo, xhi, xlo, xhi};
      for (int j = 0; j < 4; ++j)
        if (w[j] != T(0)) tap(ys[j], xs[j], w[j]);
    }
  }
}

}  // namespace visionops
