// CPU kernel of grid_anchors: every level of the anchor grid in one pass (math: ops/common/anchors.h).
//
// Work is split by grid location across all levels at once. Each chunk is written for the first image and copied,
// still hot in cache, to the other images: all images share the padded batch size, so their anchors are equal, but
// each image keeps its own memory.
#include <cstring>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/common/anchors.h"
#include "ops/cpu/alloc.h"

namespace visionops {

namespace {

template <typename scalar_t>
void grid_anchors_forward_kernel_impl(const at::opmath_type<scalar_t>* cells, const std::vector<AnchorLevel>& levels,
                                      double offset, int64_t total, int64_t num_images, scalar_t* out) {
  using T = at::opmath_type<scalar_t>;
  // Work is split by grid location across all levels (not by row: the finest level holds most of the rows' work,
  // so a row split leaves threads idle). Levels are stored one after another, so any range of locations maps to
  // one contiguous range of anchors, which is then copied to the other images in one memcpy.
  std::vector<int64_t> loc_start{0};
  for (const auto& lv : levels) loc_start.push_back(loc_start.back() + lv.height * lv.width);
  at::parallel_for(0, loc_start.back(), 4096, [&](int64_t begin, int64_t end) {
    size_t l = 0;
    while (begin >= loc_start[l + 1]) ++l;
    const int64_t first = levels[l].start + (begin - loc_start[l]) * levels[l].num_cells;
    int64_t last = first;
    for (int64_t g = begin; g < end; ++g) {
      while (g >= loc_start[l + 1]) ++l;
      const AnchorLevel& lv = levels[l];
      const int64_t local = g - loc_start[l], y = local / lv.width, x = local - y * lv.width, A = lv.num_cells;
      const T* c = cells + 4 * lv.cell_start;
      const T sy = anchor_shift<T>(y, offset, lv.stride_h), sx = anchor_shift<T>(x, offset, lv.stride_w);
      scalar_t* dst = out + 4 * (lv.start + local * A);
      for (int64_t a = 0; a < A; ++a) write_anchor(sx, sy, c + 4 * a, dst + 4 * a);
      last = lv.start + (local + 1) * A;
    }
    const size_t bytes = sizeof(scalar_t) * 4 * (last - first);
    for (int64_t i = 1; i < num_images; ++i) std::memcpy(out + 4 * (total * i + first), out + 4 * first, bytes);
  });
}

at::Tensor grid_anchors_forward_kernel(const at::Tensor& cell_anchors, at::IntArrayRef num_cells,
                                       at::IntArrayRef grid_sizes, at::ArrayRef<double> strides, double offset,
                                       int64_t num_images, at::ScalarType dtype) {
  std::vector<AnchorLevel> levels;
  const int64_t total = plan_anchor_levels(cell_anchors, num_cells, grid_sizes, strides, num_images, dtype, levels);
  at::Tensor out = empty_output({num_images, total, 4}, cell_anchors.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const at::Tensor cells = cell_anchors.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "grid_anchors_cpu", [&] {
    grid_anchors_forward_kernel_impl<scalar_t>(cells.data_ptr<at::opmath_type<scalar_t>>(), levels, offset, total,
                                               num_images, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace visionops

TORCH_LIBRARY_IMPL(visionops, CPU, m) {
  m.impl("grid_anchors", TORCH_FN(visionops::grid_anchors_forward_kernel));
}
