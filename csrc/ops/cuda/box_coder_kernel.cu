// CUDA kernels of box coding: decode_boxes (+ backward), encode_boxes, filter_boxes (math: ops/common/box_coder.h).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/common/box_coder.h"
#include "ops/cuda/launch.cuh"

namespace visionops {
namespace {

// One thread per decoded box (anchor i, class j).
template <typename scalar_t>
__global__ void decode_boxes_forward_kernel_impl(const scalar_t* __restrict__ deltas,
                                                 const scalar_t* __restrict__ anchors, int64_t n, int64_t k,
                                                 const BoxCoderParams<at::opmath_type<scalar_t>> p,
                                                 scalar_t* __restrict__ out) {
  using T = at::opmath_type<scalar_t>;
  VISIONOPS_KERNEL_LOOP(int64_t, idx, n * k) {
    const int64_t i = idx / k;
    const T a[4] = {T(anchors[4 * i]), T(anchors[4 * i + 1]), T(anchors[4 * i + 2]), T(anchors[4 * i + 3])};
    const T d[4] = {T(deltas[4 * idx]), T(deltas[4 * idx + 1]), T(deltas[4 * idx + 2]), T(deltas[4 * idx + 3])};
    T o[4];
    decode_box(a, d, p, o);
    for (int c = 0; c < 4; ++c) out[4 * idx + c] = static_cast<scalar_t>(o[c]);
  }
}

// One thread per anchor: it sums its K deltas' contributions, so there are no atomics and the result is
// deterministic.
template <typename scalar_t>
__global__ void decode_boxes_backward_kernel_impl(const scalar_t* __restrict__ grad,
                                                  const scalar_t* __restrict__ deltas,
                                                  const scalar_t* __restrict__ anchors, int64_t n, int64_t k,
                                                  const BoxCoderParams<at::opmath_type<scalar_t>> p,
                                                  scalar_t* __restrict__ grad_deltas,
                                                  scalar_t* __restrict__ grad_anchors) {
  VISIONOPS_KERNEL_LOOP(int64_t, i, n) decode_anchor_backward(i, k, anchors, deltas, grad, p, grad_deltas, grad_anchors);
}

template <typename scalar_t>
__global__ void encode_boxes_forward_kernel_impl(const scalar_t* __restrict__ ref, const scalar_t* __restrict__ prop,
                                                 int64_t n, const BoxCoderParams<at::opmath_type<scalar_t>> p,
                                                 scalar_t* __restrict__ out) {
  using T = at::opmath_type<scalar_t>;
  VISIONOPS_KERNEL_LOOP(int64_t, i, n) {
    const T r[4] = {T(ref[4 * i]), T(ref[4 * i + 1]), T(ref[4 * i + 2]), T(ref[4 * i + 3])};
    const T q[4] = {T(prop[4 * i]), T(prop[4 * i + 1]), T(prop[4 * i + 2]), T(prop[4 * i + 3])};
    T o[4];
    encode_box(r, q, p, o);
    for (int c = 0; c < 4; ++c) out[4 * i + c] = static_cast<scalar_t>(o[c]);
  }
}

template <typename scalar_t>
__global__ void filter_boxes_mask_kernel(const scalar_t* __restrict__ boxes, const scalar_t* __restrict__ scores,
                                         int64_t n, scalar_t thr, scalar_t min_size, bool* __restrict__ keep) {
  VISIONOPS_KERNEL_LOOP(int64_t, i, n) {
    // Sides rounded to the box dtype and thresholds compared in it, as torchvision's tensor comparisons.
    const scalar_t w = static_cast<scalar_t>(boxes[4 * i + 2] - boxes[4 * i]);
    const scalar_t h = static_cast<scalar_t>(boxes[4 * i + 3] - boxes[4 * i + 1]);
    keep[i] = scores[i] >= thr && w >= min_size && h >= min_size;
  }
}

at::Tensor decode_boxes_forward_kernel(const at::Tensor& deltas, const at::Tensor& anchors,
                                       at::ArrayRef<double> weights, double clip, at::ArrayRef<double> image_size) {
  check_decode_args(deltas, anchors, weights, image_size);
  const c10::cuda::CUDAGuard guard(deltas.device());
  const at::Tensor d = deltas.contiguous(), a = anchors.contiguous();
  at::Tensor out = at::empty(d.sizes(), d.options());
  if (out.numel() == 0) return out;
  const int64_t n = d.size(0), k = d.size(1) / 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "decode_boxes_cuda", [&] {
    const auto p = make_coder_params<at::opmath_type<scalar_t>>(weights, clip, image_size);
    decode_boxes_forward_kernel_impl<scalar_t><<<blocks_for(n * k), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        d.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), n, k, p, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> decode_boxes_backward_kernel(const at::Tensor& grad, const at::Tensor& deltas,
                                                                const at::Tensor& anchors, at::ArrayRef<double> weights,
                                                                double clip, at::ArrayRef<double> image_size) {
  check_decode_args(deltas, anchors, weights, image_size);
  TORCH_CHECK(grad.sizes() == deltas.sizes(), "decode_boxes backward: grad must have the shape of deltas");
  const c10::cuda::CUDAGuard guard(deltas.device());
  const at::Tensor g = grad.contiguous().to(deltas.scalar_type()), d = deltas.contiguous(), a = anchors.contiguous();
  at::Tensor gd = at::empty(d.sizes(), d.options()), ga = at::zeros_like(a);
  if (d.numel() == 0) return {gd, ga};
  const int64_t n = d.size(0), k = d.size(1) / 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), "decode_boxes_backward_cuda", [&] {
    const auto p = make_coder_params<at::opmath_type<scalar_t>>(weights, clip, image_size);
    decode_boxes_backward_kernel_impl<scalar_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), n, k, p, gd.data_ptr<scalar_t>(),
        ga.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gd, ga};
}

at::Tensor encode_boxes_forward_kernel(const at::Tensor& reference_boxes, const at::Tensor& proposals,
                                       at::ArrayRef<double> weights) {
  check_encode_args(reference_boxes, proposals, weights);
  const c10::cuda::CUDAGuard guard(reference_boxes.device());
  const at::Tensor r = reference_boxes.contiguous(), q = proposals.contiguous();
  at::Tensor out = at::empty(r.sizes(), r.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "encode_boxes_cuda", [&] {
    const auto p = make_coder_params<at::opmath_type<scalar_t>>(weights, 0.0, {});
    encode_boxes_forward_kernel_impl<scalar_t>
        <<<blocks_for(r.size(0)), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            r.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), r.size(0), p, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor filter_boxes_kernel(const at::Tensor& boxes, const at::Tensor& scores, double score_threshold,
                               double min_size) {
  check_filter_args(boxes, scores);
  const c10::cuda::CUDAGuard guard(boxes.device());
  const at::Tensor b = boxes.contiguous(), s = scores.contiguous().to(boxes.scalar_type());
  const int64_t n = b.size(0);
  if (n == 0) return at::empty({0}, b.options().dtype(at::kLong));
  at::Tensor keep = at::empty({n}, b.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "filter_boxes_cuda", [&] {
    filter_boxes_mask_kernel<scalar_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        b.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), n, static_cast<scalar_t>(score_threshold),
        static_cast<scalar_t>(min_size), keep.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return at::nonzero(keep).view({-1});
}

}  // namespace
}  // namespace visionops

TORCH_LIBRARY_IMPL(visionops, CUDA, m) {
  m.impl("decode_boxes", TORCH_FN(visionops::decode_boxes_forward_kernel));
  m.impl("_decode_boxes_backward", TORCH_FN(visionops::decode_boxes_backward_kernel));
  m.impl("encode_boxes", TORCH_FN(visionops::encode_boxes_forward_kernel));
  m.impl("filter_boxes", TORCH_FN(visionops::filter_boxes_kernel));
}
