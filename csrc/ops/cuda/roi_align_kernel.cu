// CUDA kernels of RoIAlign (math: ops/common/roi_align.h, visionops/reference/roi.py).
//
// Forward: one thread per output element; features are read through their strides, so channels_last input is read
// in place. A bin spanning at most kRoIAlignBinSpan cells per axis (nearly all of them) is read, or scattered, once
// per cell with its separable summed weights (roi_align_bin_axis); wider bins go sample by sample.
// Backward: one thread per grad element scattering its bins' bilinear weights, either with float
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

#include <vector>

#include "ops/common/roi_align.h"
#include "ops/cuda/launch.cuh"
#include "ops/cuda/roi_fixed_point.cuh"

namespace visionops {
namespace {

// The feature levels of one call (a single one for roi_align), passed by value to the kernels. RoI k uses level
// levels[k] (0 without a levels tensor); a level index or batch index out of range gives zeros and no gradient.
template <typename scalar_t, typename T>
struct Levels {
  const scalar_t* x[kMaxRoIAlignLevels];
  Strides4 s[kMaxRoIAlignLevels];
  int64_t B[kMaxRoIAlignLevels], H[kMaxRoIAlignLevels], W[kMaxRoIAlignLevels];
  int64_t off[kMaxRoIAlignLevels];  // start of the level in the flat gradient buffer
  T scale[kMaxRoIAlignLevels];
  int n;
};

template <typename scalar_t, typename T, typename index_t>
__global__ void roi_align_forward_kernel_impl(Levels<scalar_t, T> L, const T* __restrict__ rois,
                                              const int64_t* __restrict__ lvl, index_t n, index_t C, index_t PH,
                                              index_t PW, int sampling_ratio, bool aligned,
                                              scalar_t* __restrict__ out) {
  VISIONOPS_KERNEL_LOOP(index_t, idx, n) {
    const Unravel<index_t> u(idx, C, PH, PW);
    const index_t pw = u.pw, ph = u.ph, c = u.c, k = u.k;
    const int64_t l = lvl ? lvl[k] : 0;
    T acc = 0, count = 1;
    if (l >= 0 && l < L.n) {
      const int64_t H = L.H[l], W = L.W[l];
      const Strides4 sx = L.s[l];
      const RoIAlignGeom<T> g = roi_align_geom<T>(rois + 5 * static_cast<int64_t>(k), L.scale[l], PH, PW,
                                                  sampling_ratio, aligned);
      count = g.count;
      if (g.batch >= 0 && g.batch < L.B[l]) {
        const scalar_t* xp = L.x[l] + g.batch * sx.n + c * sx.c;
        roi_align_bin_taps(g, ph, pw, H, W,
                           [&](int64_t y, int64_t x, T w) { acc += w * static_cast<T>(xp[y * sx.h + x * sx.w]); });
      }
    }
    out[idx] = static_cast<scalar_t>(acc / count);
  }
}

// Scatter of one grad element into the flat (all levels, NCHW each) gradient: float atomics into an op-math
// buffer, or fixed-point integer atomics when deterministic. A small bin adds one atomic per cell it touches
// (typically 4 to 9) with the separable weights, instead of 4 per sample (16 with a 2x2 sampling grid).
template <typename scalar_t, typename T, typename index_t, bool kDeterministic>
__global__ void roi_align_backward_kernel_impl(const scalar_t* __restrict__ grad, Strides4 sg, Levels<scalar_t, T> L,
                                               const T* __restrict__ rois, const int64_t* __restrict__ lvl, index_t n,
                                               index_t C, index_t PH, index_t PW, int sampling_ratio, bool aligned,
                                               T* __restrict__ gin, FixedPointSum fp) {
  VISIONOPS_KERNEL_LOOP(index_t, idx, n) {
    const Unravel<index_t> u(idx, C, PH, PW);
    const index_t pw = u.pw, ph = u.ph, c = u.c, k = u.k;
    const int64_t l = lvl ? lvl[k] : 0;
    if (l < 0 || l >= L.n) continue;
    const int64_t H = L.H[l], W = L.W[l];
    const RoIAlignGeom<T> g = roi_align_geom<T>(rois + 5 * static_cast<int64_t>(k), L.scale[l], PH, PW,
                                                sampling_ratio, aligned);
    if (g.batch < 0 || g.batch >= L.B[l]) continue;
    const T go = static_cast<T>(grad[k * sg.n + c * sg.c + ph * sg.h + pw * sg.w]);
    const int64_t base = L.off[l] + (g.batch * C + c) * H * W;
    double fp_scale = 0;
    if constexpr (kDeterministic) fp_scale = fp.scale();
    roi_align_bin_taps(g, ph, pw, H, W, [&](int64_t y, int64_t x, T w) {
      const T v = go * w / g.count;
      if constexpr (kDeterministic) fp.add(base + y * W + x, static_cast<double>(v), fp_scale);
      else atomicAdd(gin + base + y * W + x, v);
    });
  }
}

void check_common(const at::Tensor& rois, const at::Tensor* levels, int64_t PH, int64_t PW, size_t n_levels,
                  size_t n_scales, const char* op) {
  TORCH_CHECK_VALUE(rois.dim() == 2 && rois.size(1) == 5, op, ": rois must have shape [K, 5], got ", rois.sizes());
  TORCH_CHECK_VALUE(rois.is_floating_point(), op, ": rois must be a floating-point tensor");
  TORCH_CHECK_VALUE(PH > 0 && PW > 0, op, ": output_size must be positive");
  TORCH_CHECK_VALUE(n_levels >= 1 && n_levels <= kMaxRoIAlignLevels && n_scales == n_levels, op,
                    ": need 1 to ", kMaxRoIAlignLevels, " feature levels and one spatial scale per level");
  if (levels)
    TORCH_CHECK_VALUE(levels->dim() == 1 && levels->size(0) == rois.size(0) && levels->scalar_type() == at::kLong &&
                          levels->device() == rois.device(),
                      op, ": levels must be an int64 tensor of shape [K] on the rois' device");
}

at::Tensor forward(at::TensorList features, const at::Tensor& rois_in, const at::Tensor* levels_in,
                   at::ArrayRef<double> scales, int64_t PH, int64_t PW, int64_t sampling_ratio, bool aligned,
                   const char* op) {
  check_common(rois_in, levels_in, PH, PW, features.size(), scales.size(), op);
  const at::Tensor& f0 = features[0];
  for (const at::Tensor& f : features) {
    TORCH_CHECK_VALUE(f.dim() == 4, op, ": input must have shape [N, C, H, W], got ", f.sizes());
    TORCH_CHECK_VALUE(f.size(1) == f0.size(1) && f.scalar_type() == f0.scalar_type() && f.device() == rois_in.device(),
                      op, ": all feature levels must have the same channels, dtype and device as rois");
  }
  const c10::cuda::CUDAGuard guard(f0.device());
  const int64_t K = rois_in.size(0), C = f0.size(1);
  at::Tensor out = at::empty({K, C, PH, PW}, f0.options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  for (const at::Tensor& f : features)
    TORCH_CHECK_VALUE(f.size(2) > 0 && f.size(3) > 0, op, ": input must have a non-empty feature map, got ", f.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "roi_align_forward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor rois = rois_in.to(c10::CppTypeToScalarType<T>::value).contiguous();
    const at::Tensor levels = levels_in ? levels_in->contiguous() : at::Tensor();
    Levels<scalar_t, T> L{};
    L.n = static_cast<int>(features.size());
    for (int l = 0; l < L.n; ++l) {
      const at::Tensor& f = features[l];
      L.x[l] = f.data_ptr<scalar_t>();
      L.s[l] = strides_of(f);
      L.B[l] = f.size(0), L.H[l] = f.size(2), L.W[l] = f.size(3);
      L.scale[l] = static_cast<T>(scales[l]);
    }
    with_index_type(n, [&](auto index) {
      using index_t = decltype(index);
      roi_align_forward_kernel_impl<scalar_t, T, index_t>
          <<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              L, rois.data_ptr<T>(), levels_in ? levels.data_ptr<int64_t>() : nullptr, static_cast<index_t>(n),
              static_cast<index_t>(C), static_cast<index_t>(PH), static_cast<index_t>(PW),
              static_cast<int>(sampling_ratio), aligned, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& rois_in, const at::Tensor* levels_in,
                                 at::ArrayRef<double> scales, int64_t PH, int64_t PW, at::IntArrayRef shapes,
                                 int64_t sampling_ratio, bool aligned, const char* op) {
  check_common(rois_in, levels_in, PH, PW, shapes.size() / 4, scales.size(), op);
  TORCH_CHECK_VALUE(shapes.size() % 4 == 0, op, ": need 4 sizes per feature level");
  const int64_t K = rois_in.size(0), C = shapes[1], nl = static_cast<int64_t>(shapes.size() / 4);
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == K && grad.size(1) == C && grad.size(2) == PH &&
                        grad.size(3) == PW,
                    op, ": grad must have shape [K, C, PH, PW], got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  int64_t total = 0;
  std::vector<int64_t> offs;
  for (int64_t l = 0; l < nl; ++l) {
    TORCH_CHECK_VALUE(shapes[4 * l + 1] == C, op, ": all feature levels must have the same channels");
    offs.push_back(total);
    total += shapes[4 * l] * shapes[4 * l + 1] * shapes[4 * l + 2] * shapes[4 * l + 3];
  }
  // One flat gradient for all levels, split into per-level views at the end.
  at::Tensor flat = at::zeros({total}, grad.options());
  auto split = [&] {
    std::vector<at::Tensor> out;
    for (int64_t l = 0; l < nl; ++l)
      out.push_back(flat.narrow(0, offs[l], l + 1 < nl ? offs[l + 1] - offs[l] : total - offs[l])
                        .view(shapes.slice(4 * l, 4)));
    return out;
  };
  const int64_t n = grad.numel();
  if (n == 0 || total == 0) return split();
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_align_backward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor rois = rois_in.to(c10::CppTypeToScalarType<T>::value).contiguous();
    const at::Tensor levels = levels_in ? levels_in->contiguous() : at::Tensor();
    const int64_t* lvl = levels_in ? levels.data_ptr<int64_t>() : nullptr;
    Levels<scalar_t, T> L{};
    L.n = static_cast<int>(nl);
    for (int64_t l = 0; l < nl; ++l) {
      L.B[l] = shapes[4 * l], L.H[l] = shapes[4 * l + 2], L.W[l] = shapes[4 * l + 3];
      L.off[l] = offs[l];
      L.scale[l] = static_cast<T>(scales[l]);
    }
    const Strides4 sg = strides_of(grad);
    if (deterministic) {
      FixedPointBuffers buf(grad, {total});
      // Per RoI, one cell receives at most weight 1 from each bin.
      const FixedPointSum s = buf.sum(static_cast<double>(K) * PH * PW);
      with_index_type(n, [&](auto index) {
        using index_t = decltype(index);
        roi_align_backward_kernel_impl<scalar_t, T, index_t, true><<<blocks_for(n), kThreads, 0, stream>>>(
            grad.data_ptr<scalar_t>(), sg, L, rois.data_ptr<T>(), lvl, static_cast<index_t>(n),
            static_cast<index_t>(C), static_cast<index_t>(PH), static_cast<index_t>(PW),
            static_cast<int>(sampling_ratio), aligned, nullptr, s);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      buf.finish<scalar_t>(s, flat, stream);
      return;
    }
    // Half gradients are accumulated in float (no half atomics, and no rounding per addition).
    at::Tensor acc = std::is_same_v<T, scalar_t> ? flat : at::zeros({total}, grad.options().dtype(c10::CppTypeToScalarType<T>::value));
    with_index_type(n, [&](auto index) {
      using index_t = decltype(index);
      roi_align_backward_kernel_impl<scalar_t, T, index_t, false><<<blocks_for(n), kThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), sg, L, rois.data_ptr<T>(), lvl, static_cast<index_t>(n),
          static_cast<index_t>(C), static_cast<index_t>(PH), static_cast<index_t>(PW),
          static_cast<int>(sampling_ratio), aligned, acc.data_ptr<T>(), FixedPointSum{});
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (!std::is_same_v<T, scalar_t>) flat.copy_(acc);
  });
  return split();
}

at::Tensor roi_align_forward_kernel(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                   int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                                   bool aligned) {
  return forward({input}, rois, nullptr, {spatial_scale}, pooled_height, pooled_width, sampling_ratio, aligned,
                 "roi_align");
}

at::Tensor roi_align_backward_kernel(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                    int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
                                    int64_t channels, int64_t height, int64_t width, int64_t sampling_ratio,
                                    bool aligned) {
  const std::vector<int64_t> shape{batch_size, channels, height, width};
  return backward(grad, rois, nullptr, {spatial_scale}, pooled_height, pooled_width, shape, sampling_ratio, aligned,
                  "_roi_align_backward")[0];
}

at::Tensor multi_scale_roi_align_forward_kernel(at::TensorList features, const at::Tensor& rois,
                                               const at::Tensor& levels, at::ArrayRef<double> scales,
                                               int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                                               bool aligned) {
  return forward(features, rois, &levels, scales, pooled_height, pooled_width, sampling_ratio, aligned,
                 "multi_scale_roi_align");
}

std::vector<at::Tensor> multi_scale_roi_align_backward_kernel(const at::Tensor& grad, const at::Tensor& rois,
                                                              const at::Tensor& levels, at::ArrayRef<double> scales,
                                                              int64_t pooled_height, int64_t pooled_width,
                                                              at::IntArrayRef shapes, int64_t sampling_ratio,
                                                              bool aligned) {
  return backward(grad, rois, &levels, scales, pooled_height, pooled_width, shapes, sampling_ratio, aligned,
                  "_multi_scale_roi_align_backward");
}

}  // namespace

TORCH_LIBRARY_IMPL(visionops, CUDA, m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward_kernel));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_kernel));
  m.impl("multi_scale_roi_align", TORCH_FN(multi_scale_roi_align_forward_kernel));
  m.impl("_multi_scale_roi_align_backward", TORCH_FN(multi_scale_roi_align_backward_kernel));
}

}  // namespace visionops
