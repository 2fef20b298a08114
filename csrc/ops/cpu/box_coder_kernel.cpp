// CPU kernels of box coding: decode_boxes (+ backward), encode_boxes, filter_boxes (math: ops/common/box_coder.h).
//
// torchvision's decode_single makes ~20 passes over [N, K] temporaries; here each box is read once and written once.
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include "ops/common/box_coder.h"

namespace visionops {
namespace {

constexpr int64_t kGrain = 2048;  // boxes per task: enough work to amortise the thread hand-off

template <typename scalar_t>
void decode_boxes_forward_kernel_impl(const scalar_t* deltas, const scalar_t* anchors, int64_t n, int64_t k,
                                      const BoxCoderParams<at::opmath_type<scalar_t>>& p, scalar_t* out) {
  using T = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, std::max<int64_t>(1, kGrain / k), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T a[4] = {T(anchors[4 * i]), T(anchors[4 * i + 1]), T(anchors[4 * i + 2]), T(anchors[4 * i + 3])};
      for (int64_t j = 0; j < k; ++j) {
        const scalar_t* dp = deltas + 4 * (i * k + j);
        const T d[4] = {T(dp[0]), T(dp[1]), T(dp[2]), T(dp[3])};
        T o[4];
        decode_box(a, d, p, o);
        scalar_t* op = out + 4 * (i * k + j);
        for (int c = 0; c < 4; ++c) op[c] = static_cast<scalar_t>(o[c]);
      }
    }
  });
}

at::Tensor decode_boxes_forward_kernel(const at::Tensor& deltas, const at::Tensor& anchors,
                                       at::ArrayRef<double> weights, double clip, at::ArrayRef<double> image_size) {
  check_decode_args(deltas, anchors, weights, image_size);
  const at::Tensor d = deltas.contiguous(), a = anchors.contiguous();
  at::Tensor out = at::empty(d.sizes(), d.options());
  if (out.numel() == 0) return out;
  const int64_t n = d.size(0), k = d.size(1) / 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "decode_boxes_cpu", [&] {
    const auto p = make_coder_params<at::opmath_type<scalar_t>>(weights, clip, image_size);
    decode_boxes_forward_kernel_impl<scalar_t>(d.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), n, k, p,
                                               out.data_ptr<scalar_t>());
  });
  return out;
}

// Each task owns whole anchor rows, so the sum over the K deltas of an anchor needs no atomics.
std::tuple<at::Tensor, at::Tensor> decode_boxes_backward_kernel(const at::Tensor& grad, const at::Tensor& deltas,
                                                                const at::Tensor& anchors,
                                                                at::ArrayRef<double> weights, double clip,
                                                                at::ArrayRef<double> image_size) {
  check_decode_args(deltas, anchors, weights, image_size);
  TORCH_CHECK(grad.sizes() == deltas.sizes(), "decode_boxes backward: grad must have the shape of deltas");
  const at::Tensor g = grad.contiguous().to(deltas.scalar_type()), d = deltas.contiguous(), a = anchors.contiguous();
  at::Tensor gd = at::empty(d.sizes(), d.options()), ga = at::zeros_like(a);
  if (d.numel() == 0) return {gd, ga};
  const int64_t n = d.size(0), k = d.size(1) / 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "decode_boxes_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto p = make_coder_params<T>(weights, clip, image_size);
    const scalar_t *gp = g.data_ptr<scalar_t>(), *dp = d.data_ptr<scalar_t>(), *ap = a.data_ptr<scalar_t>();
    scalar_t *gdp = gd.data_ptr<scalar_t>(), *gap = ga.data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, kGrain / k), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const T av[4] = {T(ap[4 * i]), T(ap[4 * i + 1]), T(ap[4 * i + 2]), T(ap[4 * i + 3])};
        T acc[4] = {0, 0, 0, 0};
        for (int64_t j = 0; j < k; ++j) {
          const int64_t o = 4 * (i * k + j);
          const T dv[4] = {T(dp[o]), T(dp[o + 1]), T(dp[o + 2]), T(dp[o + 3])};
          const T gv[4] = {T(gp[o]), T(gp[o + 1]), T(gp[o + 2]), T(gp[o + 3])};
          T gdv[4];
          decode_box_backward(av, dv, p, gv, gdv, acc);
          for (int c = 0; c < 4; ++c) gdp[o + c] = static_cast<scalar_t>(gdv[c]);
        }
        for (int c = 0; c < 4; ++c) gap[4 * i + c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
  return {gd, ga};
}

at::Tensor encode_boxes_forward_kernel(const at::Tensor& reference_boxes, const at::Tensor& proposals,
                                       at::ArrayRef<double> weights) {
  check_encode_args(reference_boxes, proposals, weights);
  const at::Tensor r = reference_boxes.contiguous(), q = proposals.contiguous();
  at::Tensor out = at::empty(r.sizes(), r.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "encode_boxes_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto p = make_coder_params<T>(weights, 0.0, {});
    const scalar_t *rp = r.data_ptr<scalar_t>(), *qp = q.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, r.size(0), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const T rv[4] = {T(rp[4 * i]), T(rp[4 * i + 1]), T(rp[4 * i + 2]), T(rp[4 * i + 3])};
        const T qv[4] = {T(qp[4 * i]), T(qp[4 * i + 1]), T(qp[4 * i + 2]), T(qp[4 * i + 3])};
        T o[4];
        encode_box(rv, qv, p, o);
        for (int c = 0; c < 4; ++c) op[4 * i + c] = static_cast<scalar_t>(o[c]);
      }
    });
  });
  return out;
}

at::Tensor filter_boxes_kernel(const at::Tensor& boxes, const at::Tensor& scores, double score_threshold,
                               double min_size) {
  check_filter_args(boxes, scores);
  const at::Tensor b = boxes.contiguous(), s = scores.contiguous().to(boxes.scalar_type());
  std::vector<int64_t> keep;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "filter_boxes_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t *bp = b.data_ptr<scalar_t>(), *sp = s.data_ptr<scalar_t>();
    // As torchvision: sides are rounded to the box dtype, and the thresholds are compared in that dtype.
    const T thr = T(static_cast<scalar_t>(score_threshold)), lo = T(static_cast<scalar_t>(min_size));
    for (int64_t i = 0; i < b.size(0); ++i) {
      const T w = T(static_cast<scalar_t>(bp[4 * i + 2] - bp[4 * i]));
      const T h = T(static_cast<scalar_t>(bp[4 * i + 3] - bp[4 * i + 1]));
      if (T(sp[i]) >= thr && w >= lo && h >= lo) keep.push_back(i);
    }
  });
  at::Tensor out = at::empty({static_cast<int64_t>(keep.size())}, b.options().dtype(at::kLong));
  std::copy(keep.begin(), keep.end(), out.data_ptr<int64_t>());
  return out;
}

}  // namespace
}  // namespace visionops

TORCH_LIBRARY_IMPL(visionops, CPU, m) {
  m.impl("decode_boxes", &visionops::decode_boxes_forward_kernel);
  m.impl("_decode_boxes_backward", &visionops::decode_boxes_backward_kernel);
  m.impl("encode_boxes", &visionops::encode_boxes_forward_kernel);
  m.impl("filter_boxes", &visionops::filter_boxes_kernel);
}
