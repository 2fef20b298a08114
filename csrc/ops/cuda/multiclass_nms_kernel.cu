// CUDA kernel of the fixed-shape multiclass NMS (definition: visionops/reference/nms.py, multiclass_nms; shared math:
// ops/common/multiclass_nms.h; the same pipeline as visionops/triton/multiclass_nms.py).
//
// A segment is an (image, class), or an image when class-agnostic. ATen sorts every segment's masked scores (scores
// at or below the threshold become -inf, so a segment's candidates are the head of its order: by decreasing score,
// ties by class-major position). One block per segment walks its candidates in order: the threads test the
// candidate against the boxes kept so far in parallel (kept slot k lives with thread k % blockDim, which alone
// writes and reads it, so one __syncthreads_or per candidate orders everything) and the walk stops once the segment
// has accepted its limit. A fixed-size stable sort then merges each image's per-class survivors, and gathers write
// the padded outputs. No host synchronisation: every shape follows from the input shapes and max_total, so the op
// runs under CUDA graph capture.
#include <limits>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/common/multiclass_nms.h"

namespace visionops {
namespace {

constexpr int kAgnosticThreads = 256;

template <typename T>
__global__ void multiclass_nms_walk_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ count,
                                           const T* __restrict__ boxes, double iou_threshold, T* kept, int64_t* sel,
                                           int64_t* sel_count, int32_t* class_count, int64_t L, int64_t N, int64_t C,
                                           int64_t kcap, int64_t out, int64_t max_per_class, bool agnostic,
                                           bool shared_boxes) {
  const int64_t s = blockIdx.x;
  const int64_t img = agnostic ? s : s / C;
  const int tid = threadIdx.x, threads = blockDim.x;
  const int64_t cnt = count[s];
  T* my_kept = kept + s * kcap * 5;  // x1, y1, x2, y2, area per kept box
  int64_t nk = 0, accepted = 0;
  for (int64_t i = 0; i < cnt && accepted < out; ++i) {
    const int64_t p = order[s * L + i];
    const int64_t c = agnostic ? p / N : s % C;
    const int64_t n = agnostic ? p % N : p;
    const T* bp = boxes + 4 * (shared_boxes ? img * N + n : (img * N + n) * C + c);
    const T box[4] = {bp[0], bp[1], bp[2], bp[3]};
    const T area = box_area(box[0], box[1], box[2], box[3]);
    int hit = 0;
    for (int64_t k = tid; k < nk && !hit; k += threads) {
      const T* kb = my_kept + 5 * k;
      hit = mcnms_suppresses(kb, kb[4], box, area, iou_threshold);
    }
    if (__syncthreads_or(hit)) continue;
    if (tid == nk % threads) {
      T* dst = my_kept + 5 * nk;
      dst[0] = box[0], dst[1] = box[1], dst[2] = box[2], dst[3] = box[3], dst[4] = area;
    }
    ++nk;
    bool take = true;
    if (agnostic) {
      // a kept box past its class's cap is not output but still suppresses later candidates
      int32_t* per_class = class_count + img * C + c;
      take = *per_class < max_per_class;
      __syncthreads();  // every thread has read the count before thread 0 bumps it
      if (take && tid == 0) ++*per_class;
    }
    if (take) {
      if (tid == 0) sel[s * out + accepted] = c * N + n;
      ++accepted;
    }
  }
  if (tid == 0) sel_count[s] = accepted;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multiclass_nms_kernel(
    const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold, double score_threshold,
    int64_t max_per_class, int64_t max_total, bool class_agnostic) {
  check_multiclass_nms_args(boxes, scores, max_per_class, max_total);
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t batch = scores.size(0), n = scores.size(1), c = scores.size(2);
  const auto long_opts = scores.options().dtype(at::kLong);
  if (scores.numel() == 0) {
    return {at::zeros({batch, max_total, 4}, boxes.options()), at::zeros({batch, max_total}, scores.options()),
            at::full({batch, max_total}, -1, long_opts), at::zeros({batch}, long_opts)};
  }
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor valid = scores.gt(score_threshold);  // [B, N, C], in the scores' dtype (as the reference)
  const at::Tensor keys = at::where(valid, scores, -inf).transpose(1, 2);  // [B, C, N]: class-major
  const int64_t segments = class_agnostic ? batch : batch * c;
  const int64_t length = class_agnostic ? c * n : n;
  const int64_t out = class_agnostic ? max_total : std::min(max_per_class, n);
  const int64_t kcap = class_agnostic ? length : out;
  TORCH_CHECK_VALUE(segments <= std::numeric_limits<int32_t>::max(), "multiclass_nms: too many (image, class) ",
                    "pairs for one launch: ", segments);
  const at::Tensor count = class_agnostic ? valid.sum({1, 2}) : valid.sum(1).reshape({-1});
  const at::Tensor order =
      std::get<1>(keys.reshape({segments, length}).sort(/*stable=*/true, 1, /*descending=*/true)).contiguous();
  at::Tensor sel = at::empty({segments, out}, long_opts);
  at::Tensor sel_count = at::empty({segments}, long_opts);
  at::Tensor class_count = at::zeros({class_agnostic ? batch * c : 0}, scores.options().dtype(at::kInt));
  int threads = kAgnosticThreads;
  if (!class_agnostic) {  // at most max_per_class kept boxes to test: one warp per 32 of them
    threads = 32;
    while (threads < kcap && threads < kAgnosticThreads) threads *= 2;
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "multiclass_nms_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor bx = boxes.to(c10::CppTypeToScalarType<T>::value).contiguous();
    at::Tensor kept = at::empty({segments, kcap, 5}, bx.options());
    multiclass_nms_walk_kernel<T><<<static_cast<unsigned>(segments), threads, 0, stream>>>(
        order.data_ptr<int64_t>(), count.data_ptr<int64_t>(), bx.data_ptr<T>(), iou_threshold, kept.data_ptr<T>(),
        sel.data_ptr<int64_t>(), sel_count.data_ptr<int64_t>(), class_count.data_ptr<int32_t>(), length, n, c, kcap,
        out, max_per_class, class_agnostic, boxes.dim() == 3);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // sel holds class-major flat indices f = class * N + box
  const at::Tensor flat_scores = scores.reshape({batch, n * c});
  at::Tensor f, num;
  if (class_agnostic) {
    f = sel, num = sel_count;
  } else {
    // an image's C x out survivors, merged by a fixed-size stable sort (ties: class, then rank)
    const at::Tensor ok = at::arange(out, long_opts).lt(sel_count.unsqueeze(1)).reshape({batch, c * out});
    f = at::where(ok, sel.reshape({batch, c * out}), 0);
    const at::Tensor at_score = flat_scores.gather(1, f.remainder(n).mul(c).add(f.div(n, "floor")));
    const at::Tensor key = at::where(ok, at_score, -inf);
    f = f.gather(1, std::get<1>(key.sort(/*stable=*/true, 1, /*descending=*/true)).slice(1, 0, max_total));
    if (f.size(1) < max_total) f = at::constant_pad_nd(f, {0, max_total - f.size(1)}, 0);
    num = sel_count.reshape({batch, c}).sum(1).clamp_max(max_total);
  }
  const at::Tensor rows_valid = at::arange(max_total, long_opts).lt(num.unsqueeze(1));  // [B, max_total]
  f = at::where(rows_valid, f, 0);
  const at::Tensor cls = f.div(n, "floor"), idx = f.remainder(n);
  const at::Tensor rows = boxes.dim() == 3 ? idx : idx.mul(c).add(cls);
  const at::Tensor out_boxes = boxes.reshape({batch, -1, 4}).gather(1, rows.unsqueeze(2).expand({batch, max_total, 4}));
  const at::Tensor out_scores = flat_scores.gather(1, idx.mul(c).add(cls));
  return {at::where(rows_valid.unsqueeze(2), out_boxes, 0), at::where(rows_valid, out_scores, 0),
          at::where(rows_valid, cls, -1), num};
}

}  // namespace
}  // namespace visionops

TORCH_LIBRARY_IMPL(visionops, CUDA, m) {
  m.impl("multiclass_nms", TORCH_FN(visionops::multiclass_nms_kernel));
}
