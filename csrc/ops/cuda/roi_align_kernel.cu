// CUDA kernels of RoIAlign (math: ops/common/roi_align.h, visionops/reference/roi.py).
//
// Forward: one thread per output element; features are read through their strides, so channels_last input is read
// in place. Backward: one thread per grad element scattering its samples' bilinear weights, either with float
// atomics (fast, order-dependent bits) or, when torch.are_deterministic_algorithms_enabled(), with 64-bit
// fixed-point integer atomics (roi_fixed_point.cuh): bit-identical run to run for a few percent more time and
// 12 bytes per input element, where torchvision falls back to a pure-PyTorch path that materialises every sample.
// A RoI whose batch index is out of range gives zeros and no gradient: checking it would cost a device sync.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/common/roi_align.h"
#include "ops/cuda/roi_fixed_point.cuh"

namespace visionops {
namespace {

constexpr int kThreads = 256;

struct Strides4 {
  int64_t n, c, h, w;
};

inline Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

template <typename scalar_t, typename T>
__global__ void roi_align_forward_kernel_impl(const scalar_t* __restrict__ x, Strides4 sx, const T* __restrict__ rois,
                                              int64_t n, int64_t B, int64_t C, int64_t H, int64_t W, T scale,
                                              int64_t PH, int64_t PW, int sampling_ratio, bool aligned,
                                              scalar_t* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n) return;
  const int64_t pw = idx % PW, ph = (idx / PW) % PH, c = (idx / (PW * PH)) % C, k = idx / (PW * PH * C);
  const RoIAlignGeom<T> g = roi_align_geom<T>(rois + 5 * k, scale, PH, PW, sampling_ratio, aligned);
  T acc = 0;
  if (g.batch >= 0 && g.batch < B) {
    const scalar_t* xp = x + g.batch * sx.n + c * sx.c;
    for (int64_t iy = 0; iy < g.grid_h; ++iy) {
      int64_t ylo, yhi;
      T hy, ly;
      if (!bilinear_axis(roi_align_sample(g.start_h, g.bin_h, ph, iy, g.grid_h), H, ylo, yhi, hy, ly)) continue;
      for (int64_t ix = 0; ix < g.grid_w; ++ix) {
        int64_t xlo, xhi;
        T hx, lx;
        if (!bilinear_axis(roi_align_sample(g.start_w, g.bin_w, pw, ix, g.grid_w), W, xlo, xhi, hx, lx)) continue;
        acc += hy * hx * static_cast<T>(xp[ylo * sx.h + xlo * sx.w]) + hy * lx * static_cast<T>(xp[ylo * sx.h + xhi * sx.w]) +
               ly * hx * static_cast<T>(xp[yhi * sx.h + xlo * sx.w]) + ly * lx * static_cast<T>(xp[yhi * sx.h + xhi * sx.w]);
      }
    }
  }
  out[idx] = static_cast<scalar_t>(acc / g.count);
}

// Scatter of one grad element. `Sink` is either float atomics into an opmath buffer or a FixedPointSum.
template <typename scalar_t, typename T, bool kDeterministic>
__global__ void roi_align_backward_kernel_impl(const scalar_t* __restrict__ grad, Strides4 sg,
                                               const T* __restrict__ rois, int64_t n, int64_t B, int64_t C, int64_t H,
                                               int64_t W, T scale, int64_t PH, int64_t PW, int sampling_ratio,
                                               bool aligned, T* __restrict__ gin, FixedPointSum fp) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n) return;
  const int64_t pw = idx % PW, ph = (idx / PW) % PH, c = (idx / (PW * PH)) % C, k = idx / (PW * PH * C);
  const RoIAlignGeom<T> g = roi_align_geom<T>(rois + 5 * k, scale, PH, PW, sampling_ratio, aligned);
  if (g.batch < 0 || g.batch >= B) return;
  const T go = static_cast<T>(grad[k * sg.n + c * sg.c + ph * sg.h + pw * sg.w]);
  const int64_t base = (g.batch * C + c) * H * W;
  const T count = static_cast<T>(g.grid_h * g.grid_w);
  double fp_scale = 0;
  if constexpr (kDeterministic) fp_scale = fp.scale();
  for (int64_t iy = 0; iy < g.grid_h; ++iy) {
    const T y = roi_align_sample(g.start_h, g.bin_h, ph, iy, g.grid_h);
    for (int64_t ix = 0; ix < g.grid_w; ++ix) {
      const T x = roi_align_sample(g.start_w, g.bin_w, pw, ix, g.grid_w);
      int64_t pos[4];
      T w[4];
      if (!bilinear_taps(y, x, H, W, pos, w)) continue;
      for (int j = 0; j < 4; ++j) {
        const T v = go * w[j] / count;
        if constexpr (kDeterministic) fp.add(base + pos[j], static_cast<double>(v), fp_scale);
        else atomicAdd(gin + base + pos[j], v);
      }
    }
  }
}

at::Tensor roi_align_forward_kernel(const at::Tensor& input, const at::Tensor& rois_in, double spatial_scale,
                                   int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                                   bool aligned) {
  TORCH_CHECK_VALUE(input.dim() == 4, "roi_align: input must have shape [N, C, H, W], got ", input.sizes());
  TORCH_CHECK_VALUE(rois_in.dim() == 2 && rois_in.size(1) == 5, "roi_align: rois must have shape [K, 5], got ",
                    rois_in.sizes());
  TORCH_CHECK_VALUE(pooled_height > 0 && pooled_width > 0, "roi_align: output_size must be positive");
  TORCH_CHECK_VALUE(input.device() == rois_in.device(), "roi_align: input and rois must be on the same device");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t K = rois_in.size(0), B = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  at::Tensor out = at::empty({K, C, pooled_height, pooled_width}, input.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK_VALUE(H > 0 && W > 0, "roi_align: input must have a non-empty feature map, got ", input.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_forward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor rois = rois_in.to(c10::CppTypeToScalarType<T>::value).contiguous();
    const int64_t n = out.numel();
    roi_align_forward_kernel_impl<scalar_t, T><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        input.data_ptr<scalar_t>(), strides_of(input), rois.data_ptr<T>(), n, B, C, H, W, static_cast<T>(spatial_scale),
        pooled_height, pooled_width, static_cast<int>(sampling_ratio), aligned, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor roi_align_backward_kernel(const at::Tensor& grad, const at::Tensor& rois_in, double spatial_scale,
                                    int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
                                    int64_t channels, int64_t height, int64_t width, int64_t sampling_ratio,
                                    bool aligned) {
  TORCH_CHECK_VALUE(rois_in.dim() == 2 && rois_in.size(1) == 5, "_roi_align_backward: rois must have shape [K, 5]");
  const int64_t K = rois_in.size(0);
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == K && grad.size(1) == channels &&
                        grad.size(2) == pooled_height && grad.size(3) == pooled_width,
                    "_roi_align_backward: grad must have shape [K, C, PH, PW], got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const std::vector<int64_t> sizes{batch_size, channels, height, width};
  at::Tensor gin = at::zeros(sizes, grad.options());
  if (grad.numel() == 0 || gin.numel() == 0) return gin;
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor rois = rois_in.to(c10::CppTypeToScalarType<T>::value).contiguous();
    const int64_t n = grad.numel();
    const auto args = std::make_tuple(grad.data_ptr<scalar_t>(), strides_of(grad), rois.data_ptr<T>(), n, batch_size,
                                      channels, height, width, static_cast<T>(spatial_scale), pooled_height,
                                      pooled_width, static_cast<int>(sampling_ratio), aligned);
    if (deterministic) {
      FixedPointBuffers buf(grad, sizes);
      // Per RoI, one cell receives at most weight 1 from each bin.
      const FixedPointSum s = buf.sum(static_cast<double>(K) * pooled_height * pooled_width);
      std::apply([&](auto... a) {
        roi_align_backward_kernel_impl<scalar_t, T, true><<<blocks_for(n), kThreads, 0, stream>>>(a..., nullptr, s);
      }, args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      buf.finish<scalar_t>(s, gin, stream);
      return;
    }
    // Half gradients are accumulated in float (no half atomics, and no rounding per addition).
    at::Tensor acc = std::is_same_v<T, scalar_t> ? gin : at::zeros(sizes, grad.options().dtype(c10::CppTypeToScalarType<T>::value));
    std::apply([&](auto... a) {
      roi_align_backward_kernel_impl<scalar_t, T, false><<<blocks_for(n), kThreads, 0, stream>>>(
          a..., acc.data_ptr<T>(), FixedPointSum{});
    }, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!std::is_same_v<T, scalar_t>) gin.copy_(acc);
  });
  return gin;
}

}  // namespace

TORCH_LIBRARY_IMPL(visionops, CUDA, m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward_kernel));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_kernel));
}

}  // namespace visionops
