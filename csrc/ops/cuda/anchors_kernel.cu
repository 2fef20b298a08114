// CUDA kernel of grid_anchors: one launch for every level and every image (math: ops/common/anchors.h).
// One thread per anchor of the first image; it stores the same anchor to every image's slice.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/common/anchors.h"
#include "ops/cuda/launch.cuh"

namespace visionops {
namespace {

constexpr int kMaxLevels = 32;  // level table travels as a kernel argument (32 * 56 bytes, well under 4 KB)

struct LevelTable {
  AnchorLevel level[kMaxLevels];
  int count;
};

template <typename scalar_t>
__global__ void grid_anchors_forward_kernel_impl(const at::opmath_type<scalar_t>* __restrict__ cells,
                                                 const LevelTable table, double offset, int64_t total,
                                                 int64_t num_images, scalar_t* __restrict__ out) {
  using T = at::opmath_type<scalar_t>;
  VISIONOPS_KERNEL_LOOP(int64_t, idx, total) {
    int l = 0;
    while (l + 1 < table.count && idx >= table.level[l + 1].start) ++l;
    const AnchorLevel& lv = table.level[l];
    const int64_t r = idx - lv.start, loc = r / lv.num_cells, a = r - loc * lv.num_cells;
    const int64_t y = loc / lv.width, x = loc - y * lv.width;
    const T sx = anchor_shift<T>(x, offset, lv.stride_w), sy = anchor_shift<T>(y, offset, lv.stride_h);
    scalar_t v[4];
    write_anchor(sx, sy, cells + 4 * (lv.cell_start + a), v);
    for (int64_t i = 0; i < num_images; ++i) {
      scalar_t* o = out + 4 * (i * total + idx);
      o[0] = v[0], o[1] = v[1], o[2] = v[2], o[3] = v[3];
    }
  }
}

at::Tensor grid_anchors_forward_kernel(const at::Tensor& cell_anchors, at::IntArrayRef num_cells,
                                       at::IntArrayRef grid_sizes, at::ArrayRef<double> strides, double offset,
                                       int64_t num_images, at::ScalarType dtype) {
  std::vector<AnchorLevel> levels;
  const int64_t total = plan_anchor_levels(cell_anchors, num_cells, grid_sizes, strides, num_images, dtype, levels);
  TORCH_CHECK(static_cast<int>(levels.size()) <= kMaxLevels, "grid_anchors: at most ", kMaxLevels,
              " levels on CUDA, got ", levels.size());
  const c10::cuda::CUDAGuard guard(cell_anchors.device());
  at::Tensor out = at::empty({num_images, total, 4}, cell_anchors.options().dtype(dtype));
  if (out.numel() == 0) return out;
  LevelTable table{};
  table.count = static_cast<int>(levels.size());
  for (size_t l = 0; l < levels.size(); ++l) table.level[l] = levels[l];
  const at::Tensor cells = cell_anchors.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "grid_anchors_cuda", [&] {
    grid_anchors_forward_kernel_impl<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        cells.data_ptr<at::opmath_type<scalar_t>>(), table, offset, total, num_images, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace visionops

TORCH_LIBRARY_IMPL(visionops, CUDA, m) {
  m.impl("grid_anchors", TORCH_FN(visionops::grid_anchors_forward_kernel));
}
