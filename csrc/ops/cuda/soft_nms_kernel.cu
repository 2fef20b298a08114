// CUDA kernels of soft-NMS: soft_nms and batched_soft_nms (math: ops/common/soft_nms.h).
//
// One block per class (one for soft_nms) runs every selection on the device, without a host sync per step: each
// step streams the list of alive boxes, decays their scores by the kept box, appends the survivors to the other half
// of a ping-pong list (warp-aggregated atomics: the list order is arbitrary, so ties are broken by position, which
// is the input order within a class) and reduces the next maximum block-wide. The decay method is a template
// parameter. Classes come from a stable sort of idxs on the device; one sync sizes the classes, one the output.
#include <limits>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/unique_consecutive.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/common/soft_nms.h"

namespace visionops {
namespace {

constexpr int kSingleThreads = 1024;  // soft_nms: one block for the whole image
constexpr int kClassThreads = 256;    // batched_soft_nms: one block per class

struct Best {
  double s;
  int64_t p;  // position (class-major order); -1: none
};

__device__ inline Best better(Best a, Best b) {
  return (b.p >= 0 && (a.p < 0 || b.s > a.s || (b.s == a.s && b.p < a.p))) ? b : a;
}

__device__ inline Best warp_best(Best v) {
  for (int off = 16; off > 0; off >>= 1) {
    const Best o{__shfl_down_sync(0xffffffffu, v.s, off), __shfl_down_sync(0xffffffffu, v.p, off)};
    v = better(v, o);
  }
  return v;
}

// The block's best (highest score, lowest position on ties), returned to every thread. Ends with a barrier.
__device__ Best block_best(Best v, double* sh_s, int64_t* sh_p) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_best(v);
  if (lane == 0) sh_s[warp] = v.s, sh_p[warp] = v.p;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? Best{sh_s[lane], sh_p[lane]} : Best{0.0, -1};
    v = warp_best(v);
    if (lane == 0) sh_s[32] = v.s, sh_p[32] = v.p;
  }
  __syncthreads();
  return Best{sh_s[32], sh_p[32]};
}

// Appends p to list (at an arbitrary slot) where `alive`; every lane of the warp must call it.
__device__ inline void append(bool alive, int64_t p, int64_t* list, unsigned long long* counter) {
  const unsigned mask = __ballot_sync(0xffffffffu, alive);
  const int lane = threadIdx.x % 32;
  unsigned long long base = 0;
  if (lane == 0 && mask) base = atomicAdd(counter, static_cast<unsigned long long>(__popc(mask)));
  base = __shfl_sync(0xffffffffu, base, 0);
  if (alive) list[base + __popc(mask & ((1u << lane) - 1u))] = p;
}

template <typename T, SoftNmsMethod M>
__global__ void soft_nms_kernel(const T* __restrict__ rows, const double* __restrict__ scores,
                                const int64_t* __restrict__ starts, SoftNmsParams prm, double* __restrict__ work,
                                int64_t* __restrict__ lists, int64_t* __restrict__ out_pos,
                                double* __restrict__ out_score, int64_t* __restrict__ counts, int64_t n) {
  __shared__ double sh_s[33];
  __shared__ int64_t sh_p[33];
  __shared__ unsigned long long counter;
  const int64_t start = starts[blockIdx.x], end = starts[blockIdx.x + 1];
  int64_t* src = lists + start;
  int64_t* dst = lists + n + start;
  if (threadIdx.x == 0) counter = 0;
  __syncthreads();
  Best loc{0.0, -1};
  for (int64_t base = start; base < end; base += blockDim.x) {
    const int64_t p = base + threadIdx.x;
    bool alive = false;
    if (p < end) {
      const double s = scores[p];
      work[p] = s;
      alive = soft_nms_alive(s, prm);
      if (alive) loc = better(loc, Best{s, p});
    }
    append(alive, p, src, &counter);
  }
  Best best = block_best(loc, sh_s, sh_p);
  int64_t m = static_cast<int64_t>(counter);
  int64_t k = 0;
  while (m > 0) {
    __syncthreads();  // every thread has read counter and the best
    const int64_t kp = best.p;
    if (threadIdx.x == 0) {
      out_pos[start + k] = kp;
      out_score[start + k] = best.s;
      counter = 0;
    }
    ++k;
    const T kb[4] = {rows[4 * kp], rows[4 * kp + 1], rows[4 * kp + 2], rows[4 * kp + 3]};
    const T k_area = box_area(kb[0], kb[1], kb[2], kb[3]);
    __syncthreads();  // counter reset
    loc = Best{0.0, -1};
    for (int64_t base = 0; base < m; base += blockDim.x) {
      const int64_t j = base + threadIdx.x;
      int64_t p = -1;
      bool alive = false;
      if (j < m) {
        p = src[j];
        const T* b = rows + 4 * p;
        const T bb[4] = {b[0], b[1], b[2], b[3]};
        const double iou = static_cast<double>(box_iou_pair(kb, k_area, bb, box_area(bb[0], bb[1], bb[2], bb[3])));
        const double s = work[p] * soft_nms_weight<M>(iou, prm);
        alive = p != kp && soft_nms_alive(s, prm);
        if (alive) {
          work[p] = s;
          loc = better(loc, Best{s, p});
        }
      }
      append(alive, p, dst, &counter);
    }
    best = block_best(loc, sh_s, sh_p);
    m = static_cast<int64_t>(counter);
    int64_t* t = src;
    src = dst;
    dst = t;
  }
  if (threadIdx.x == 0) counts[blockIdx.x] = k;
}

// Runs the kernel over the classes [starts[c], starts[c + 1]) of the rows `order` (class-major); returns the
// kept positions, their scores (double) and the per-class counts.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run(const at::Tensor& boxes, const at::Tensor& scores,
                                                   const at::Tensor* order, const at::Tensor& starts,
                                                   double iou_threshold, double sigma, double score_threshold,
                                                   int64_t method, int threads) {
  const int64_t n = boxes.size(0), classes = starts.size(0) - 1;
  TORCH_CHECK(classes <= std::numeric_limits<int32_t>::max(), "batched_soft_nms: too many classes (", classes, ")");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor s = (order ? scores.index_select(0, *order) : scores).to(at::kDouble).contiguous();
  at::Tensor work = at::empty({n}, s.options());
  at::Tensor lists = at::empty({2 * n}, starts.options());
  at::Tensor out_pos = at::empty({n}, starts.options());
  at::Tensor out_score = at::empty({n}, s.options());
  at::Tensor counts = at::zeros({classes}, starts.options());
  const SoftNmsParams prm{iou_threshold, sigma, score_threshold};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "soft_nms_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor rows =
        (order ? boxes.index_select(0, *order) : boxes).to(c10::CppTypeToScalarType<T>::value).contiguous();
    VISIONOPS_DISPATCH_SOFT_NMS_METHOD(method, [&] {
      soft_nms_kernel<T, kMethod><<<static_cast<unsigned>(classes), threads, 0, stream>>>(
          rows.data_ptr<T>(), s.data_ptr<double>(), starts.data_ptr<int64_t>(), prm, work.data_ptr<double>(),
          lists.data_ptr<int64_t>(), out_pos.data_ptr<int64_t>(), out_score.data_ptr<double>(),
          counts.data_ptr<int64_t>(), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out_pos, out_score, counts};
}

std::tuple<at::Tensor, at::Tensor> empty_result(const at::Tensor& boxes, const at::Tensor& scores) {
  return {at::empty({0}, boxes.options().dtype(at::kLong)), at::empty({0}, scores.options())};
}

std::tuple<at::Tensor, at::Tensor> soft_nms_kernel_entry(const at::Tensor& boxes, const at::Tensor& scores,
                                                         double iou_threshold, double sigma, double score_threshold,
                                                         int64_t method) {
  check_soft_nms_args("soft_nms", boxes, scores, nullptr, sigma, method);
  const c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t n = boxes.size(0);
  if (n == 0) return empty_result(boxes, scores);
  const at::Tensor starts = at::arange(0, n + 1, n, boxes.options().dtype(at::kLong));  // {0, n}
  auto [pos, s, counts] =
      run(boxes, scores, nullptr, starts, iou_threshold, sigma, score_threshold, method, kSingleThreads);
  const int64_t k = counts.item<int64_t>();  // one sync: the output size
  return {pos.slice(0, 0, k), s.slice(0, 0, k).to(scores.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> batched_soft_nms_kernel_entry(const at::Tensor& boxes, const at::Tensor& scores,
                                                                 const at::Tensor& idxs, double iou_threshold,
                                                                 double sigma, double score_threshold, int64_t method) {
  check_soft_nms_args("batched_soft_nms", boxes, scores, &idxs, sigma, method);
  const c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t n = boxes.size(0);
  if (n == 0) return empty_result(boxes, scores);
  // Class-major, input order within a class (stable sort); one sync sizes the classes.
  const auto [cls, order] = idxs.to(at::kLong).sort(/*stable=*/true, 0, /*descending=*/false);
  const at::Tensor sizes = std::get<2>(at::unique_consecutive(cls, false, true));
  const at::Tensor starts = at::cat({at::zeros({1}, sizes.options()), sizes.cumsum(0)});
  auto [pos, s, counts] =
      run(boxes, scores, &order, starts, iou_threshold, sigma, score_threshold, method, kClassThreads);
  // Slot j of class c holds its (j - starts[c])-th selection when that is < counts[c].
  const at::Tensor slot = at::arange(n, starts.options());
  const at::Tensor c = at::searchsorted(starts, slot, false, /*right=*/true).sub_(1);
  const at::Tensor rank_all = slot.sub(starts.index_select(0, c));
  const at::Tensor sel = rank_all.lt(counts.index_select(0, c)).nonzero().flatten();  // class-major
  const at::Tensor rank = rank_all.index_select(0, sel), kept = s.index_select(0, sel);
  // (score desc, rank, class): a stable sort by rank of the class-major list, then a stable sort by score
  const at::Tensor by_rank = std::get<1>(rank.sort(true, 0, false));
  const at::Tensor final_order =
      by_rank.index_select(0, std::get<1>(kept.index_select(0, by_rank).sort(true, 0, true)));
  const at::Tensor keep = order.index_select(0, pos.index_select(0, sel.index_select(0, final_order)));
  return {keep, kept.index_select(0, final_order).to(scores.scalar_type())};
}

}  // namespace
}  // namespace visionops

TORCH_LIBRARY_IMPL(visionops, CUDA, m) {
  m.impl("soft_nms", TORCH_FN(visionops::soft_nms_kernel_entry));
  m.impl("batched_soft_nms", TORCH_FN(visionops::batched_soft_nms_kernel_entry));
}
