// CPU kernels of box coding: decode_boxes (+ backward), encode_boxes, filter_boxes (math: ops/common/box_coder.h).
//
// torchvision's decode_single makes ~20 passes over [N, K] temporaries; here each box is read once and written once.
// The chunked decode loop below vectorises only if GCC may evaluate both arms of the selects in exp_poly and the
// clamps (its default -ftrapping-math keeps floating-point exception flags exact, which forces branches). Nothing
// here reads those flags. Clang already defaults to this. Set before the includes so that every inlined
// helper is compiled the same way (GCC does not inline across differing options).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <algorithm>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/common/box_coder.h"

namespace visionops {
namespace {

constexpr int64_t kGrain = 2048;  // boxes per task: enough work to amortise the thread hand-off

constexpr int64_t kChunk = 64;  // boxes decoded together in structure-of-arrays form, so the math vectorises

template <typename scalar_t, bool kClip>
void decode_boxes_forward_kernel_impl(const scalar_t* deltas, const scalar_t* anchors, int64_t n, int64_t k,
                                      const BoxCoderParams<at::opmath_type<scalar_t>>& p, scalar_t* out) {
  using T = at::opmath_type<scalar_t>;
  const int64_t total = n * k;
  at::parallel_for(
      0, (total + kChunk - 1) / kChunk, std::max<int64_t>(1, kGrain / kChunk), [&](int64_t c0, int64_t c1) {
        T a[4][kChunk], d[4][kChunk], o[4][kChunk];
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t first = c * kChunk, m = std::min(kChunk, total - first);
          const scalar_t* dsrc = deltas + 4 * first;
          for (int64_t t = 0; t < m; ++t)
            for (int q = 0; q < 4; ++q) d[q][t] = T(dsrc[4 * t + q]);
          if (k == 1) {  // one delta per anchor (RPN): a plain strided copy, which the compiler vectorises
            const scalar_t* asrc = anchors + 4 * first;
            for (int64_t t = 0; t < m; ++t)
              for (int q = 0; q < 4; ++q) a[q][t] = T(asrc[4 * t + q]);
          } else {
            int64_t anchor = first / k, j = first - anchor * k;  // walked, not divided: a 64-bit division per box
            for (int64_t t = 0; t < m; ++t) {                    // costs as much as the whole decode
              for (int q = 0; q < 4; ++q) a[q][t] = T(anchors[4 * anchor + q]);
              if (++j == k) j = 0, ++anchor;
            }
          }
          for (int64_t t = 0; t < m; ++t) {
            const T av[4] = {a[0][t], a[1][t], a[2][t], a[3][t]}, dv[4] = {d[0][t], d[1][t], d[2][t], d[3][t]};
            T ov[4];
            decode_box_impl<T, kClip>(av, dv, p, ov);
            o[0][t] = ov[0], o[1][t] = ov[1], o[2][t] = ov[2], o[3][t] = ov[3];
          }
          scalar_t* dst = out + 4 * first;
          for (int64_t t = 0; t < m; ++t)
            for (int q = 0; q < 4; ++q) dst[4 * t + q] = static_cast<scalar_t>(o[q][t]);
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
    auto* impl = p.clip_to_image ? &decode_boxes_forward_kernel_impl<scalar_t, true>
                                 : &decode_boxes_forward_kernel_impl<scalar_t, false>;
    impl(d.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), n, k, p, out.data_ptr<scalar_t>());
  });
  return out;
}

// Each task owns whole anchor rows, so the sum over the K deltas of an anchor needs no atomics.
std::tuple<at::Tensor, at::Tensor> decode_boxes_backward_kernel(const at::Tensor& grad, const at::Tensor& deltas,
                                                                const at::Tensor& anchors, at::ArrayRef<double> weights,
                                                                double clip, at::ArrayRef<double> image_size) {
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
      for (int64_t i = begin; i < end; ++i) decode_anchor_backward(i, k, ap, dp, gp, p, gdp, gap);
    });
  });
  return {gd, ga};
}

// Same chunked structure-of-arrays layout as decode, so that the math (log included) vectorises.
template <typename scalar_t>
void encode_boxes_forward_kernel_impl(const scalar_t* ref, const scalar_t* prop, int64_t n,
                                      const BoxCoderParams<at::opmath_type<scalar_t>>& p, scalar_t* out) {
  using T = at::opmath_type<scalar_t>;
  at::parallel_for(0, (n + kChunk - 1) / kChunk, std::max<int64_t>(1, kGrain / kChunk), [&](int64_t c0, int64_t c1) {
    T r[4][kChunk], q[4][kChunk], o[4][kChunk];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t first = c * kChunk, m = std::min(kChunk, n - first);
      const scalar_t *rs = ref + 4 * first, *qs = prop + 4 * first;
      for (int64_t t = 0; t < m; ++t)
        for (int k = 0; k < 4; ++k) r[k][t] = T(rs[4 * t + k]), q[k][t] = T(qs[4 * t + k]);
      for (int64_t t = 0; t < m; ++t) {
        const T rv[4] = {r[0][t], r[1][t], r[2][t], r[3][t]}, qv[4] = {q[0][t], q[1][t], q[2][t], q[3][t]};
        T ov[4];
        encode_box(rv, qv, p, ov);
        o[0][t] = ov[0], o[1][t] = ov[1], o[2][t] = ov[2], o[3][t] = ov[3];
      }
      scalar_t* dst = out + 4 * first;
      for (int64_t t = 0; t < m; ++t)
        for (int k = 0; k < 4; ++k) dst[4 * t + k] = static_cast<scalar_t>(o[k][t]);
    }
  });
}

at::Tensor encode_boxes_forward_kernel(const at::Tensor& reference_boxes, const at::Tensor& proposals,
                                       at::ArrayRef<double> weights) {
  check_encode_args(reference_boxes, proposals, weights);
  const at::Tensor r = reference_boxes.contiguous(), q = proposals.contiguous();
  at::Tensor out = at::empty(r.sizes(), r.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "encode_boxes_cpu", [&] {
    const auto p = make_coder_params<at::opmath_type<scalar_t>>(weights, 0.0, {});
    encode_boxes_forward_kernel_impl<scalar_t>(r.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), r.size(0), p,
                                               out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor filter_boxes_kernel(const at::Tensor& boxes, const at::Tensor& scores, double score_threshold,
                               double min_size) {
  check_filter_args(boxes, scores);
  const at::Tensor b = boxes.contiguous(), s = scores.contiguous().to(boxes.scalar_type());
  const int64_t n = b.size(0);
  std::vector<uint8_t> keep(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "filter_boxes_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t *bp = b.data_ptr<scalar_t>(), *sp = s.data_ptr<scalar_t>();
    const T thr = T(static_cast<scalar_t>(score_threshold)), lo = T(static_cast<scalar_t>(min_size));
    for (int64_t i = 0; i < n; ++i) {
      const T w = T(static_cast<scalar_t>(bp[4 * i + 2] - bp[4 * i]));
      const T h = T(static_cast<scalar_t>(bp[4 * i + 3] - bp[4 * i + 1]));
      keep[i] = (T(sp[i]) >= thr) & (w >= lo) & (h >= lo);
    }
  });
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += keep[i];
  at::Tensor out = at::empty({count}, b.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t i = 0, j = 0; j < count; ++i) {
    op[j] = i;  // written unconditionally, advanced only when kept: no branch to mispredict
    j += keep[i];
  }
  return out;
}

}  // namespace
}  // namespace visionops

TORCH_LIBRARY_IMPL(visionops, CPU, m) {
  m.impl("decode_boxes", TORCH_FN(visionops::decode_boxes_forward_kernel));
  m.impl("_decode_boxes_backward", TORCH_FN(visionops::decode_boxes_backward_kernel));
  m.impl("encode_boxes", TORCH_FN(visionops::encode_boxes_forward_kernel));
  m.impl("filter_boxes", TORCH_FN(visionops::filter_boxes_kernel));
}
