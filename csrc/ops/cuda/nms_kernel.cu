// CUDA kernels of the NMS family. NMS: sort (by class, then score), an IoU bitmask over 64x64 tiles, and a
// single-block greedy gather over the mask, all on the GPU (the mask never goes to the host).
//
// Mask layout: row i (in sorted order) stores `W` 64-bit words; word w covers the columns of block rb(i) + w.
// For batched NMS, a row block only needs the blocks up to the end of its last class, so W is the widest such band
// (N * W bits: about N^2 / num_classes for balanced classes, instead of N^2). Plain NMS is one class (W = all).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/common/box_iou.h"
#include "ops/cuda/launch.cuh"

namespace visionops {
namespace {

constexpr int kBlock = 64;  // boxes per tile = bits per mask word
using u64 = unsigned long long;

template <typename T>
__global__ void nms_mask_kernel(const T* __restrict__ boxes, const int64_t* __restrict__ cls,
                                const int64_t* __restrict__ band, int64_t n, int64_t W, double thr,
                                u64* __restrict__ mask) {
  const int64_t rb = blockIdx.x, w = blockIdx.y, cb = rb + w;
  if (w >= band[rb]) return;  // outside this row block's band: never read
  __shared__ T col[kBlock * 4];
  __shared__ T col_area[kBlock];
  __shared__ int64_t col_cls[kBlock];
  const int64_t col0 = cb * kBlock;
  const int cols = static_cast<int>((n - col0 < kBlock ? n - col0 : kBlock));
  if (threadIdx.x < cols) {
    const T* p = boxes + 4 * (col0 + threadIdx.x);
    for (int d = 0; d < 4; ++d) col[4 * threadIdx.x + d] = p[d];
    col_area[threadIdx.x] = box_area(p[0], p[1], p[2], p[3]);
    col_cls[threadIdx.x] = cls ? cls[col0 + threadIdx.x] : 0;
  }
  __syncthreads();
  const int64_t i = rb * kBlock + threadIdx.x;
  if (i >= n) return;
  const T* a = boxes + 4 * i;
  const T area_a = box_area(a[0], a[1], a[2], a[3]);
  const int64_t ci = cls ? cls[i] : 0;
  const int start = (cb == rb) ? threadIdx.x + 1 : 0;  // only later (lower-scored) boxes
  u64 bits = 0;
  for (int j = start; j < cols; ++j) {
    if (col_cls[j] == ci && static_cast<double>(box_iou_pair(a, area_a, col + 4 * j, col_area[j])) > thr)
      bits |= 1ULL << j;
  }
  mask[i * W + w] = bits;
}

// One block walks the row blocks in order: thread 0 resolves the 64 rows of a block against the `removed` bits,
// then all threads OR the kept rows' masks into `removed` for the later column blocks.
__global__ void nms_gather_kernel(const u64* __restrict__ mask, const int64_t* __restrict__ band,
                                  const int64_t* __restrict__ rank, int64_t n, int64_t W, u64* removed,
                                  bool* __restrict__ keep_by_rank) {
  __shared__ u64 diag[kBlock];
  __shared__ u64 kept_bits;
  const int64_t col_blocks = (n + kBlock - 1) / kBlock;
  for (int64_t rb = 0; rb < col_blocks; ++rb) {
    const int64_t row0 = rb * kBlock;
    const int rows = static_cast<int>((n - row0 < kBlock ? n - row0 : kBlock));
    if (threadIdx.x < rows) diag[threadIdx.x] = mask[(row0 + threadIdx.x) * W];
    __syncthreads();
    if (threadIdx.x == 0) {
      u64 rem = removed[rb], kb = 0;
      for (int k = 0; k < rows; ++k) {
        if (!((rem >> k) & 1ULL)) {
          kb |= 1ULL << k;
          rem |= diag[k];
        }
      }
      kept_bits = kb;
    }
    __syncthreads();
    const u64 kb = kept_bits;
    if (threadIdx.x < rows) keep_by_rank[rank[row0 + threadIdx.x]] = (kb >> threadIdx.x) & 1ULL;
    for (int64_t w = 1 + threadIdx.x; w < band[rb]; w += blockDim.x) {
      u64 acc = 0;
      for (u64 m = kb; m; m &= m - 1) acc |= mask[(row0 + __ffsll(static_cast<long long>(m)) - 1) * W + w];
      if (acc) removed[rb + w] |= acc;
    }
    __syncthreads();
  }
}

at::Tensor nms_cuda_impl(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor* idxs, double thr) {
  const c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, 0, /*descending=*/true));
  const int64_t col_blocks = (n + kBlock - 1) / kBlock;
  at::Tensor rank, sorted_order, cls, band;
  int64_t W = col_blocks;
  if (idxs) {  // stable sort by class keeps decreasing score within each class
    auto [cls_sorted, by_class] = idxs->to(at::kLong).index_select(0, order).sort(true, 0, false);
    rank = by_class.contiguous();
    sorted_order = order.index_select(0, rank);
    cls = cls_sorted.contiguous();
    // End of the class of each row block's last row, as a number of column blocks past the row block.
    const at::Tensor last_rows =
        at::arange(col_blocks, order.options()).mul_(kBlock).add_(kBlock - 1).clamp_max_(n - 1);
    const at::Tensor seg_end = at::searchsorted(cls, cls.index_select(0, last_rows), false, /*right=*/true);
    band = seg_end.add(kBlock - 1).div_(kBlock, "floor").sub_(at::arange(col_blocks, order.options())).contiguous();
    W = band.max().item<int64_t>();  // one sync: sizes the mask
  } else {
    rank = at::arange(n, order.options());
    sorted_order = order;
    band = at::arange(col_blocks, 0, -1, order.options());
  }
  TORCH_CHECK(W <= 65535, "nms: too many boxes in one class for the CUDA kernel (", n, ")");
  at::Tensor keep_by_rank = at::zeros({n}, boxes.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "nms_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor sorted = boxes.index_select(0, sorted_order).to(c10::CppTypeToScalarType<T>::value).contiguous();
    at::Tensor mask = at::empty({n, W}, boxes.options().dtype(at::kLong));
    at::Tensor removed = at::zeros({col_blocks}, boxes.options().dtype(at::kLong));
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(W));
    nms_mask_kernel<T><<<grid, kBlock, 0, stream>>>(sorted.data_ptr<T>(), idxs ? cls.data_ptr<int64_t>() : nullptr,
                                                    band.data_ptr<int64_t>(), n, W, thr,
                                                    reinterpret_cast<u64*>(mask.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    nms_gather_kernel<<<1, 1024, 0, stream>>>(
        reinterpret_cast<const u64*>(mask.data_ptr<int64_t>()), band.data_ptr<int64_t>(), rank.data_ptr<int64_t>(), n,
        W, reinterpret_cast<u64*>(removed.data_ptr<int64_t>()), keep_by_rank.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return order.masked_select(keep_by_rank);
}

at::Tensor nms_kernel(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "nms: boxes must have shape [N, 4], got ", boxes.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0), "nms: scores must have shape [N]");
  return nms_cuda_impl(boxes, scores, nullptr, iou_threshold);
}

at::Tensor batched_nms_kernel(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                              double iou_threshold) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "batched_nms: boxes must have shape [N, 4], got ", boxes.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0) && idxs.sizes() == scores.sizes(),
              "batched_nms: scores and idxs must have shape [N] matching boxes");
  return nms_cuda_impl(boxes, scores, &idxs, iou_threshold);
}

template <typename scalar_t>
__global__ void box_iou_kernel_impl(const scalar_t* __restrict__ b1, const scalar_t* __restrict__ b2, int64_t n,
                                    int64_t m, scalar_t* __restrict__ out) {
  using T = at::opmath_type<scalar_t>;
  VISIONOPS_KERNEL_LOOP(int64_t, idx, n * m) {
    const int64_t i = idx / m, j = idx % m;
    const T a[4] = {T(b1[4 * i]), T(b1[4 * i + 1]), T(b1[4 * i + 2]), T(b1[4 * i + 3])};
    const T b[4] = {T(b2[4 * j]), T(b2[4 * j + 1]), T(b2[4 * j + 2]), T(b2[4 * j + 3])};
    out[idx] =
        static_cast<scalar_t>(box_iou_pair(a, box_area(a[0], a[1], a[2], a[3]), b, box_area(b[0], b[1], b[2], b[3])));
  }
}

at::Tensor box_iou_kernel(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  TORCH_CHECK(boxes1.dim() == 2 && boxes1.size(1) == 4, "box_iou: boxes1 must have shape [N, 4]");
  TORCH_CHECK(boxes2.dim() == 2 && boxes2.size(1) == 4, "box_iou: boxes2 must have shape [M, 4]");
  const c10::cuda::CUDAGuard guard(boxes1.device());
  const at::Tensor a = boxes1.contiguous(), b = boxes2.contiguous();
  at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "box_iou_cuda", [&] {
    box_iou_kernel_impl<scalar_t><<<blocks_for(out.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), a.size(0), b.size(0), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// One thread per box of one side, summing over the other side: deterministic, no atomics. A thread does a whole
// row of work and boxes are few (hundreds to thousands), so blocks are half the usual size to reach more SMs.
constexpr int kSideThreads = 128;

template <typename scalar_t>
__global__ void box_iou_backward_side_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ own,
                                             const scalar_t* __restrict__ other, int64_t n, int64_t m,
                                             bool own_is_first, scalar_t* __restrict__ out) {
  using T = at::opmath_type<scalar_t>;
  VISIONOPS_KERNEL_LOOP(int64_t, i, n) {
    T acc[4] = {0, 0, 0, 0}, unused[4];
    const T a[4] = {T(own[4 * i]), T(own[4 * i + 1]), T(own[4 * i + 2]), T(own[4 * i + 3])};
    for (int64_t j = 0; j < m; ++j) {
      const T b[4] = {T(other[4 * j]), T(other[4 * j + 1]), T(other[4 * j + 2]), T(other[4 * j + 3])};
      if (own_is_first) box_iou_pair_backward(a, b, T(g[i * m + j]), acc, unused);
      else box_iou_pair_backward(b, a, T(g[j * n + i]), unused, acc);
    }
    for (int d = 0; d < 4; ++d) out[4 * i + d] = static_cast<scalar_t>(acc[d]);
  }
}

std::tuple<at::Tensor, at::Tensor> box_iou_backward_kernel(const at::Tensor& grad, const at::Tensor& boxes1,
                                                           const at::Tensor& boxes2) {
  const c10::cuda::CUDAGuard guard(boxes1.device());
  const at::Tensor g = grad.contiguous(), a = boxes1.contiguous(), b = boxes2.contiguous();
  at::Tensor ga = at::zeros_like(a), gb = at::zeros_like(b);
  if (g.numel() == 0) return {ga, gb};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "box_iou_backward_cuda", [&] {
    const int64_t n = a.size(0), m = b.size(0);
    box_iou_backward_side_kernel<scalar_t><<<blocks_for(n, kSideThreads), kSideThreads, 0, stream>>>(
        g.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), n, m, true, ga.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    box_iou_backward_side_kernel<scalar_t><<<blocks_for(m, kSideThreads), kSideThreads, 0, stream>>>(
        g.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), m, n, false, gb.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ga, gb};
}

}  // namespace
}  // namespace visionops

TORCH_LIBRARY_IMPL(visionops, CUDA, m) {
  m.impl("nms", TORCH_FN(visionops::nms_kernel));
  m.impl("batched_nms", TORCH_FN(visionops::batched_nms_kernel));
  m.impl("box_iou", TORCH_FN(visionops::box_iou_kernel));
  m.impl("_box_iou_backward", TORCH_FN(visionops::box_iou_backward_kernel));
}
