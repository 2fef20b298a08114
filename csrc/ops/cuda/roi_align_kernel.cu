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
#include "ops/common/roi_align_entries.h"
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
      const RoIAlignGeom<T> g =
          roi_align_geom<T>(rois + 5 * static_cast<int64_t>(k), L.scale[l], PH, PW, sampling_ratio, aligned);
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
    const RoIAlignGeom<T> g =
        roi_align_geom<T>(rois + 5 * static_cast<int64_t>(k), L.scale[l], PH, PW, sampling_ratio, aligned);
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

// The multi-level kernels behind the four entries of ops/common/roi_align_entries.h, which check the arguments.
struct CudaRoIAlign {
  static constexpr size_t kMaxLevels = kMaxRoIAlignLevels;  // the Levels table is a fixed-size kernel argument

  static at::Tensor forward(const char* /*op*/, at::TensorList features, const at::Tensor& rois_in,
                            const at::Tensor* levels_in, at::ArrayRef<double> scales, int64_t PH, int64_t PW,
                            int64_t sampling_ratio, bool aligned) {
    const at::Tensor& f0 = features[0];
    const c10::cuda::CUDAGuard guard(f0.device());
    const int64_t K = rois_in.size(0), C = f0.size(1);
    at::Tensor out = at::empty({K, C, PH, PW}, f0.options());
    const int64_t n = out.numel();
    if (n == 0) return out;
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

  static std::vector<at::Tensor> backward(const char* /*op*/, const at::Tensor& grad, const at::Tensor& rois_in,
                                          const at::Tensor* levels_in, at::ArrayRef<double> scales, int64_t PH,
                                          int64_t PW, at::IntArrayRef shapes, int64_t sampling_ratio, bool aligned) {
    const int64_t K = rois_in.size(0), C = shapes[1], nl = static_cast<int64_t>(shapes.size() / 4);
    const c10::cuda::CUDAGuard guard(grad.device());
    const auto stream = c10::cuda::getCurrentCUDAStream();
    int64_t total = 0;
    std::vector<int64_t> offs;
    for (int64_t l = 0; l < nl; ++l) {
      offs.push_back(total);
      total += shapes[4 * l] * shapes[4 * l + 1] * shapes[4 * l + 2] * shapes[4 * l + 3];
    }
    // One flat gradient for all levels, split into per-level views at the end.
    at::Tensor flat = at::zeros({total}, grad.options());
    auto split = [&] {
      std::vector<at::Tensor> out;
      for (int64_t l = 0; l < nl; ++l)
        out.push_back(
            flat.narrow(0, offs[l], l + 1 < nl ? offs[l + 1] - offs[l] : total - offs[l]).view(shapes.slice(4 * l, 4)));
      return out;
    };
    const int64_t n = grad.numel();
    if (n == 0 || total == 0) return split();
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
      // Per RoI, one cell receives at most weight 1 from each bin.
      const double terms = static_cast<double>(K) * PH * PW;
      scatter_roi_grad<scalar_t, T>(grad, flat, terms, stream, [&](auto deterministic, T* gin, FixedPointSum fp) {
        with_index_type(n, [&](auto index) {
          using index_t = decltype(index);
          roi_align_backward_kernel_impl<scalar_t, T, index_t, decltype(deterministic)::value>
              <<<blocks_for(n), kThreads, 0, stream>>>(grad.data_ptr<scalar_t>(), sg, L, rois.data_ptr<T>(), lvl,
                                                       static_cast<index_t>(n), static_cast<index_t>(C),
                                                       static_cast<index_t>(PH), static_cast<index_t>(PW),
                                                       static_cast<int>(sampling_ratio), aligned, gin, fp);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
    return split();
  }
};

using Entries = RoIAlignEntries<CudaRoIAlign>;

}  // namespace

TORCH_LIBRARY_IMPL(visionops, CUDA, m) {
  m.impl("roi_align", TORCH_FN(Entries::roi_align));
  m.impl("_roi_align_backward", TORCH_FN(Entries::roi_align_backward));
  m.impl("multi_scale_roi_align", TORCH_FN(Entries::multi_scale_roi_align));
  m.impl("_multi_scale_roi_align_backward", TORCH_FN(Entries::multi_scale_roi_align_backward));
}

}  // namespace visionops
