// CUDA kernels of the SiamFC cross-correlation family (math: ops/common/xcorr.h, visionops/reference/xcorr.py).
//
// One kernel per direction serves xcorr and depthwise_xcorr, the channel sum a compile-time parameter
// (kSumChannels). Inputs are read through their strides (channels_last in place, expanded z as is), and every
// output element is written by one thread after a sum in a fixed order, so results are bit-identical run to run:
//   forward: a block is 32 output positions x 8 channel lanes; xcorr's lanes each sum a strided share of the
//     channels and are added in lane order through shared memory, depthwise's are 8 channels of the output;
//   grad_z:  a block is 32 taps of one (z image, channel) x 8 shares of the output rows, added in share order; with
//     one z for the batch (Bz == 1) each thread also runs over the images in order;
//   grad_x:  one thread per element of x gathers the taps that reach it (ops/common/xcorr.h's xcorr_taps): no
//     atomics, and no zero fill.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "ops/common/xcorr.h"
#include "ops/common/xcorr_entries.h"
#include "ops/cuda/launch.cuh"

namespace visionops {
namespace {

constexpr int kTile = 32;   // output positions (forward) or taps (grad_z) per block: one warp's lanes
constexpr int kShares = 8;  // channel lanes (forward) or row shares (grad_z) per block

// The tap sum of one output position: sum_{i, j} z(i, j) * x(u + i, v + j), both read through their strides.
template <typename T, typename scalar_t>
__device__ __forceinline__ T tap_sum(const scalar_t* __restrict__ z, Strides4 sz, const scalar_t* __restrict__ x,
                                     Strides4 sx, int64_t Hz, int64_t Wz) {
  T acc = 0;
  for (int64_t i = 0; i < Hz; ++i) {
    const scalar_t* zr = z + i * sz.h;
    const scalar_t* xr = x + i * sx.h;
    for (int64_t j = 0; j < Wz; ++j) acc += static_cast<T>(zr[j * sz.w]) * static_cast<T>(xr[j * sx.w]);
  }
  return acc;
}

// grid: (B * position tiles, kSumChannels ? 1 : channel groups of kShares); block: (kTile, kShares).
template <bool kSumChannels, typename scalar_t>
__global__ void __launch_bounds__(kTile* kShares)
    xcorr_forward_kernel_impl(const scalar_t* __restrict__ z, Strides4 sz, bool one_z, const scalar_t* __restrict__ x,
                              Strides4 sx, int64_t C, int64_t Hz, int64_t Wz, int64_t Ho, int64_t Wo, int64_t tiles,
                              at::opmath_type<scalar_t> scale, scalar_t* __restrict__ out, Strides4 so) {
  using T = at::opmath_type<scalar_t>;
  const int64_t b = blockIdx.x / tiles, p = (blockIdx.x % tiles) * kTile + threadIdx.x;
  const bool valid = p < Ho * Wo;
  const int64_t u = valid ? p / Wo : 0, v = valid ? p % Wo : 0;
  const scalar_t* zb = z + (one_z ? 0 : b * sz.n);
  const scalar_t* xb = x + b * sx.n + u * sx.h + v * sx.w;
  if constexpr (kSumChannels) {
    __shared__ T part[kShares][kTile];
    T acc = 0;
    if (valid)
      for (int64_t c = threadIdx.y; c < C; c += kShares)
        acc += tap_sum<T>(zb + c * sz.c, sz, xb + c * sx.c, sx, Hz, Wz);
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && valid) {
      T sum = 0;
      for (int s = 0; s < kShares; ++s) sum += part[s][threadIdx.x];
      out[b * so.n + u * so.h + v * so.w] = static_cast<scalar_t>(sum * scale);
    }
  } else {
    const int64_t c = static_cast<int64_t>(blockIdx.y) * kShares + threadIdx.y;
    if (valid && c < C)
      out[b * so.n + c * so.c + u * so.h + v * so.w] =
          static_cast<scalar_t>(tap_sum<T>(zb + c * sz.c, sz, xb + c * sx.c, sx, Hz, Wz));
  }
}

// grid: (Bz * C, tap tiles); block: (kTile, kShares). Image b of z's group sum_{u, v} g(u, v) x(u + i, v + j), the
// rows u shared out over threadIdx.y.
template <bool kSumChannels, typename scalar_t>
__global__ void __launch_bounds__(kTile* kShares)
    xcorr_grad_z_kernel(const scalar_t* __restrict__ g, Strides4 sg, const scalar_t* __restrict__ x, Strides4 sx,
                        int64_t C, int64_t Hz, int64_t Wz, int64_t Ho, int64_t Wo, int64_t per,
                        at::opmath_type<scalar_t> scale, scalar_t* __restrict__ gz, Strides4 sgz) {
  using T = at::opmath_type<scalar_t>;
  __shared__ T part[kShares][kTile];
  const int64_t bz = blockIdx.x / C, c = blockIdx.x % C;
  const int64_t tap = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.x;
  const bool valid = tap < Hz * Wz;
  const int64_t i = valid ? tap / Wz : 0, j = valid ? tap % Wz : 0;
  T acc = 0;
  if (valid)
    for (int64_t b = bz * per; b < (bz + 1) * per; ++b) {
      const scalar_t* gb = g + b * sg.n + (kSumChannels ? 0 : c * sg.c);
      const scalar_t* xb = x + b * sx.n + c * sx.c + i * sx.h + j * sx.w;
      for (int64_t u = threadIdx.y; u < Ho; u += kShares)
        for (int64_t v = 0; v < Wo; ++v)
          acc += static_cast<T>(gb[u * sg.h + v * sg.w]) * static_cast<T>(xb[u * sx.h + v * sx.w]);
    }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && valid) {
    T sum = 0;
    for (int s = 0; s < kShares; ++s) sum += part[s][threadIdx.x];
    gz[bz * sgz.n + c * sgz.c + i * sgz.h + j * sgz.w] = static_cast<scalar_t>(sum * scale);
  }
}

// One thread per element of x, in gx's memory order (channels fastest when gx is channels_last).
template <bool kSumChannels, typename scalar_t, typename index_t>
__global__ void xcorr_grad_x_kernel(index_t n, const scalar_t* __restrict__ g, Strides4 sg,
                                    const scalar_t* __restrict__ z, Strides4 sz, bool one_z, index_t C, index_t Hx,
                                    index_t Wx, int64_t Hz, int64_t Wz, int64_t Ho, int64_t Wo, bool channels_last,
                                    at::opmath_type<scalar_t> scale, scalar_t* __restrict__ gx, Strides4 sgx) {
  using T = at::opmath_type<scalar_t>;
  VISIONOPS_KERNEL_LOOP(index_t, idx, n) {
    index_t b, c, y, w, t = idx;
    if (channels_last) {
      c = t % C, t /= C, w = t % Wx, t /= Wx, y = t % Hx, b = t / Hx;
    } else {
      w = t % Wx, t /= Wx, y = t % Hx, t /= Hx, c = t % C, b = t / C;
    }
    int64_t i0, i1, j0, j1;
    xcorr_taps(y, Hz, Ho, i0, i1);
    xcorr_taps(w, Wz, Wo, j0, j1);
    const scalar_t* gb = g + b * sg.n + (kSumChannels ? 0 : c * sg.c);
    const scalar_t* zb = z + (one_z ? 0 : b * sz.n) + c * sz.c;
    T acc = 0;
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = j0; j < j1; ++j)
        acc += static_cast<T>(gb[(y - i) * sg.h + (w - j) * sg.w]) * static_cast<T>(zb[i * sz.h + j * sz.w]);
    gx[b * sgx.n + c * sgx.c + y * sgx.h + w * sgx.w] = static_cast<scalar_t>(acc * scale);
  }
}

unsigned grid_dim(int64_t n, const char* what) {
  TORCH_CHECK_VALUE(n <= 65535, "xcorr: too many ", what, " for one launch (", n, ", at most 65535)");
  return static_cast<unsigned>(n);
}

// The kernels behind the four entries of ops/common/xcorr_entries.h, which check the arguments and allocate the
// outputs (never empty here).
struct CudaXCorr {
  template <bool kSumChannels>
  static void forward(const char* op, const at::Tensor& z, const at::Tensor& x, double out_scale, at::Tensor& out) {
    const int64_t B = x.size(0), C = x.size(1), Hz = z.size(2), Wz = z.size(3);
    const int64_t Ho = x.size(2) - Hz + 1, Wo = x.size(3) - Wz + 1;
    c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int64_t tiles = (Ho * Wo + kTile - 1) / kTile;
    // gridDim.x takes at most 2^31 - 1 blocks
    TORCH_CHECK_VALUE(B * tiles < int64_t(1) << 31, op, ": x has too many images x output positions for one launch (",
                      B, " x ", Ho * Wo, "; B * ceil(Ho * Wo / ", kTile, ") must be below 2^31)");
    const dim3 grid(static_cast<unsigned>(B * tiles),
                    kSumChannels ? 1 : grid_dim((C + kShares - 1) / kShares, "channels"));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "xcorr_forward_cuda", [&] {
      xcorr_forward_kernel_impl<kSumChannels, scalar_t><<<grid, dim3(kTile, kShares), 0, stream>>>(
          z.const_data_ptr<scalar_t>(), strides_of(z), z.size(0) == 1, x.const_data_ptr<scalar_t>(), strides_of(x), C,
          Hz, Wz, Ho, Wo, tiles, static_cast<at::opmath_type<scalar_t>>(out_scale), out.mutable_data_ptr<scalar_t>(),
          strides_of(out));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  template <bool kSumChannels>
  static void backward(const char* op, const at::Tensor& grad, const at::Tensor& z, const at::Tensor& x,
                       double out_scale, at::Tensor& gz, at::Tensor& gx) {
    const int64_t Bz = z.size(0), B = x.size(0), C = x.size(1), Hz = z.size(2), Wz = z.size(3);
    const int64_t Hx = x.size(2), Wx = x.size(3), Ho = Hx - Hz + 1, Wo = Wx - Wz + 1;
    c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int64_t n = gx.numel();
    const bool gx_cl = xcorr_out_format(x) == at::MemoryFormat::ChannelsLast;
    TORCH_CHECK_VALUE(Bz * C < int64_t(1) << 31, op, ": z has too many images x channels for one launch (", Bz, " x ",
                      C, ", below 2^31)");
    const dim3 zgrid(static_cast<unsigned>(Bz * C), grid_dim((Hz * Wz + kTile - 1) / kTile, "z taps"));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "xcorr_backward_cuda", [&] {
      using T = at::opmath_type<scalar_t>;
      const T scale = static_cast<T>(out_scale);
      xcorr_grad_z_kernel<kSumChannels, scalar_t><<<zgrid, dim3(kTile, kShares), 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), strides_of(grad), x.const_data_ptr<scalar_t>(), strides_of(x), C, Hz, Wz, Ho,
          Wo, Bz == 1 ? B : 1, scale, gz.mutable_data_ptr<scalar_t>(), strides_of(gz));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      with_index_type(n, [&](auto index) {
        using index_t = decltype(index);
        xcorr_grad_x_kernel<kSumChannels, scalar_t, index_t><<<blocks_for(n), kThreads, 0, stream>>>(
            static_cast<index_t>(n), grad.const_data_ptr<scalar_t>(), strides_of(grad), z.const_data_ptr<scalar_t>(),
            strides_of(z), Bz == 1, static_cast<index_t>(C), static_cast<index_t>(Hx), static_cast<index_t>(Wx), Hz, Wz,
            Ho, Wo, gx_cl, scale, gx.mutable_data_ptr<scalar_t>(), strides_of(gx));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
};

using Entries = XCorrEntries<CudaXCorr>;

}  // namespace

TORCH_LIBRARY_IMPL(visionops, CUDA, m) {
  m.impl("xcorr", TORCH_FN(Entries::xcorr));
  m.impl("_xcorr_backward", TORCH_FN(Entries::xcorr_backward));
  m.impl("depthwise_xcorr", TORCH_FN(Entries::depthwise_xcorr));
  m.impl("_depthwise_xcorr_backward", TORCH_FN(Entries::depthwise_xcorr_backward));
}

}  // namespace visionops
