// CUDA kernels of RoIPool (math: ops/common/roi_pool.h, visionops/reference/roi.py).
//
// One thread per output (forward) or grad (backward) element. As on the CPU, no argmax tensor is kept: the backward
// finds each bin's maximum again with the forward's rule, then adds its gradient with a float atomic, or, when
// torch.are_deterministic_algorithms_enabled(), with fixed-point integer atomics (roi_fixed_point.cuh). Features
// are read through their strides (channels_last in place). An out-of-range batch index gives zeros, no gradient.
#include <cfloat>

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/common/roi_checks.h"
#include "ops/common/roi_pool.h"
#include "ops/cuda/launch.cuh"
#include "ops/cuda/roi_fixed_point.cuh"

namespace visionops {
namespace {

// Max and argmax (h * W + w; -1 when nothing beats the initial value or the bin is empty) of element idx's bin.
template <typename scalar_t, typename T, typename index_t>
__device__ inline T bin_max(const scalar_t* __restrict__ x, Strides4 sx, const T* __restrict__ rois,
                            const Unravel<index_t>& u, int64_t B, int64_t H, int64_t W, T scale, int64_t PH, int64_t PW,
                            int64_t& batch, int64_t& arg) {
  const int64_t pw = u.pw, ph = u.ph, c = u.c, k = u.k;
  const RoIPoolGeom<T> g = roi_pool_geom<T>(rois + 5 * k, scale, PH, PW);
  batch = g.batch;
  arg = -1;
  int64_t h0, h1, w0, w1;
  roi_pool_bin(g.start_h, g.bin_h, ph, H, h0, h1);
  roi_pool_bin(g.start_w, g.bin_w, pw, W, w0, w1);
  if (!g.valid || g.batch < 0 || g.batch >= B || h1 <= h0 || w1 <= w0) return T(0);
  const scalar_t* xp = x + g.batch * sx.n + c * sx.c;
  T best = -FLT_MAX;
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = w0; w < w1; ++w) {
      const T v = static_cast<T>(xp[h * sx.h + w * sx.w]);
      if (v > best) {  // strict: the first maximum wins; NaN never does
        best = v;
        arg = h * W + w;
      }
    }
  }
  return best;
}

template <typename scalar_t, typename T, typename index_t>
__global__ void roi_pool_forward_kernel_impl(const scalar_t* __restrict__ x, Strides4 sx, const T* __restrict__ rois,
                                             index_t n, int64_t B, index_t C, int64_t H, int64_t W, T scale, index_t PH,
                                             index_t PW, scalar_t* __restrict__ out) {
  VISIONOPS_KERNEL_LOOP(index_t, idx, n) {
    int64_t batch, arg;
    const Unravel<index_t> u(idx, C, PH, PW);
    out[idx] = static_cast<scalar_t>(bin_max(x, sx, rois, u, B, H, W, scale, PH, PW, batch, arg));
  }
}

template <typename scalar_t, typename T, typename index_t, bool kDeterministic>
__global__ void roi_pool_backward_kernel_impl(const scalar_t* __restrict__ grad, Strides4 sg,
                                              const scalar_t* __restrict__ x, Strides4 sx, const T* __restrict__ rois,
                                              index_t n, int64_t B, index_t C, int64_t H, int64_t W, T scale,
                                              index_t PH, index_t PW, T* __restrict__ gin, FixedPointSum fp) {
  VISIONOPS_KERNEL_LOOP(index_t, idx, n) {
    int64_t batch, arg;
    const Unravel<index_t> u(idx, C, PH, PW);
    bin_max(x, sx, rois, u, B, H, W, scale, PH, PW, batch, arg);
    if (arg < 0) continue;
    const T go = static_cast<T>(grad[u.k * sg.n + u.c * sg.c + u.ph * sg.h + u.pw * sg.w]);
    const int64_t dst = (batch * C + u.c) * H * W + arg;
    if constexpr (kDeterministic) fp.add(dst, static_cast<double>(go), fp.scale());
    else atomicAdd(gin + dst, go);
  }
}

at::Tensor roi_pool_forward_kernel(const at::Tensor& input, const at::Tensor& rois_in, double spatial_scale,
                                   int64_t pooled_height, int64_t pooled_width) {
  check_roi_pool_args("roi_pool", input, rois_in, spatial_scale, pooled_height, pooled_width);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t K = rois_in.size(0), B = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  at::Tensor out = at::empty({K, C, pooled_height, pooled_width}, input.options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_pool_forward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor rois = rois_in.to(c10::CppTypeToScalarType<T>::value).contiguous();
    with_index_type(n, [&](auto index) {
      using index_t = decltype(index);
      roi_pool_forward_kernel_impl<scalar_t, T, index_t>
          <<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              input.data_ptr<scalar_t>(), strides_of(input), rois.data_ptr<T>(), static_cast<index_t>(n), B,
              static_cast<index_t>(C), H, W, static_cast<T>(spatial_scale), static_cast<index_t>(pooled_height),
              static_cast<index_t>(pooled_width), out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor roi_pool_backward_kernel(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& rois_in,
                                    double spatial_scale, int64_t pooled_height, int64_t pooled_width) {
  check_roi_pool_args("_roi_pool_backward", input, rois_in, spatial_scale, pooled_height, pooled_width, &grad);
  const int64_t K = rois_in.size(0), B = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor gin = at::zeros(input.sizes(), grad.options());
  const int64_t n = grad.numel();
  if (n == 0 || gin.numel() == 0) return gin;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_pool_backward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor rois = rois_in.to(c10::CppTypeToScalarType<T>::value).contiguous();
    const T scale = static_cast<T>(spatial_scale);
    // Per RoI, one cell is the maximum of each bin at most once.
    const double terms = static_cast<double>(K) * pooled_height * pooled_width;
    scatter_roi_grad<scalar_t, T>(grad, gin, terms, stream, [&](auto deterministic, T* acc, FixedPointSum fp) {
      with_index_type(n, [&](auto index) {
        using index_t = decltype(index);
        roi_pool_backward_kernel_impl<scalar_t, T, index_t, decltype(deterministic)::value>
            <<<blocks_for(n), kThreads, 0, stream>>>(
                grad.data_ptr<scalar_t>(), strides_of(grad), input.data_ptr<scalar_t>(), strides_of(input),
                rois.data_ptr<T>(), static_cast<index_t>(n), B, static_cast<index_t>(C), H, W, scale,
                static_cast<index_t>(pooled_height), static_cast<index_t>(pooled_width), acc, fp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return gin;
}

}  // namespace

TORCH_LIBRARY_IMPL(visionops, CUDA, m) {
  m.impl("roi_pool", TORCH_FN(roi_pool_forward_kernel));
  m.impl("_roi_pool_backward", TORCH_FN(roi_pool_backward_kernel));
}

}  // namespace visionops
