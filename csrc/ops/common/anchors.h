#pragma once
// Anchor grid math shared by the CPU and CUDA kernels (formula: visionops/reference/anchors.py).
//
//   anchor[l, y, x, a] = (sx + c[a, 0], sy + c[a, 1], sx + c[a, 2], sy + c[a, 3])
//   sx = (x + offset) * stride_w[l],  sy = (y + offset) * stride_h[l]
//
// The shift is formed in double and rounded once to T: for torchvision's integer strides and offset 0 it is the
// exact integer torchvision computes in int64 before promoting, so the float32 result is bit-identical.
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "ops/common/macros.h"

namespace visionops {

// Per-level description, filled on the host and read by every backend.
struct AnchorLevel {
  int64_t start;       // first output row of the level, in anchors
  int64_t height;      // grid rows
  int64_t width;       // grid columns
  int64_t cell_start;  // first cell anchor of the level
  int64_t num_cells;   // cell anchors per location
  double stride_h;
  double stride_w;
};

template <typename T>
VISIONOPS_HOST_DEVICE inline T anchor_shift(int64_t i, double offset, double stride) {
  return static_cast<T>((static_cast<double>(i) + offset) * stride);
}

// Writes the 4 coordinates of one anchor. `cell` points at the cell anchor's (x1, y1, x2, y2).
template <typename T, typename out_t>
VISIONOPS_HOST_DEVICE inline void write_anchor(T sx, T sy, const T* cell, out_t* out) {
  out[0] = static_cast<out_t>(add_rn(sx, cell[0]));
  out[1] = static_cast<out_t>(add_rn(sy, cell[1]));
  out[2] = static_cast<out_t>(add_rn(sx, cell[2]));
  out[3] = static_cast<out_t>(add_rn(sy, cell[3]));
}

// Host side, shared by the CPU and CUDA entries: validates the arguments and lays the levels out. Returns the total
// anchors per image.
inline int64_t plan_anchor_levels(const at::Tensor& cells, at::IntArrayRef num_cells, at::IntArrayRef grid_sizes,
                                  at::ArrayRef<double> strides, int64_t num_images, at::ScalarType dtype,
                                  std::vector<AnchorLevel>& levels) {
  const int64_t L = static_cast<int64_t>(num_cells.size());
  TORCH_CHECK(cells.dim() == 2 && cells.size(1) == 4, "grid_anchors: cell_anchors must have shape [A, 4], got ",
              cells.sizes());
  TORCH_CHECK(at::isFloatingType(dtype), "grid_anchors: dtype must be a floating type, got ", dtype);
  const auto want = dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(cells.scalar_type() == want, "grid_anchors: cell_anchors must be ", want, " for dtype ", dtype, ", got ",
              cells.scalar_type());
  TORCH_CHECK(static_cast<int64_t>(grid_sizes.size()) == 2 * L && static_cast<int64_t>(strides.size()) == 2 * L,
              "grid_anchors: grid_sizes and strides need 2 entries per level (", L, " levels), got ", grid_sizes.size(),
              " and ", strides.size());
  TORCH_CHECK(num_images >= 0, "grid_anchors: num_images must be >= 0, got ", num_images);
  levels.clear();
  int64_t start = 0, cell_start = 0;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(num_cells[l] >= 0 && grid_sizes[2 * l] >= 0 && grid_sizes[2 * l + 1] >= 0,
                "grid_anchors: sizes must be non-negative at level ", l);
    levels.push_back(AnchorLevel{start, grid_sizes[2 * l], grid_sizes[2 * l + 1], cell_start, num_cells[l],
                                 strides[2 * l], strides[2 * l + 1]});
    start += grid_sizes[2 * l] * grid_sizes[2 * l + 1] * num_cells[l];
    cell_start += num_cells[l];
  }
  TORCH_CHECK(cell_start == cells.size(0), "grid_anchors: num_cell_anchors sums to ", cell_start,
              " but cell_anchors has ", cells.size(0), " rows");
  return start;
}

}  // namespace visionops
