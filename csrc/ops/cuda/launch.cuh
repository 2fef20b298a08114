#pragma once
// The one way to launch a 1-D elementwise CUDA kernel here (torchvision's cuda_helpers.h idiom):
//
//   template <typename index_t> __global__ void k(index_t n, ...) { VISIONOPS_KERNEL_LOOP(index_t, i, n) {...} }
//   with_index_type(n, [&](auto index) {
//     using index_t = decltype(index);
//     k<index_t><<<blocks_for(n), kThreads, 0, stream>>>(static_cast<index_t>(n), ...);
//     C10_CUDA_KERNEL_LAUNCH_CHECK();
//   });
//
// Kernels that index with int64_t throughout call VISIONOPS_KERNEL_LOOP(int64_t, ...) and skip with_index_type.
// Below the cap, blocks_for(n) covers n exactly, so each thread runs the loop body once. Only the NMS mask and
// gather kernels size their grids otherwise: their geometry is the 64-box tile of the bitmask.
#include <cstdint>
#include <limits>

#include <ATen/core/Tensor.h>

namespace visionops {

constexpr int kThreads = 256;
// Past kMaxBlocks * threads elements a thread takes several (grid-stride loop): the grid stays launchable.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

inline unsigned blocks_for(int64_t n, int threads = kThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// Grid-stride loop over [0, n). The stride is computed in index_t: with_index_type leaves room for it.
#define VISIONOPS_KERNEL_LOOP(index_t, i, n)                                                                   \
  for (index_t i = static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<index_t>(gridDim.x) * static_cast<index_t>(blockDim.x))

// Runs body(index_t{}) with index_t = int32_t when every index a VISIONOPS_KERNEL_LOOP over n can form (up to n - 1
// plus one grid stride of blocks_for(n) blocks of at most kThreads) fits, int64_t otherwise.
template <typename F>
void with_index_type(int64_t n, F&& body) {
  if (n <= std::numeric_limits<int32_t>::max() - kMaxBlocks * kThreads) body(int32_t{});
  else body(int64_t{});
}

struct Strides4 {
  int64_t n, c, h, w;
};

inline Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// (pw, ph, c, k) of element idx of a [K, C, PH, PW] tensor. With index_t = int32_t this is 32-bit arithmetic:
// 64-bit division is emulated on the GPU and was a large share of the RoI gather kernels' instructions.
template <typename index_t>
struct Unravel {
  index_t pw, ph, c, k;
  __device__ Unravel(index_t idx, index_t C, index_t PH, index_t PW) {
    pw = idx % PW;
    idx /= PW;
    ph = idx % PH;
    idx /= PH;
    c = idx % C;
    k = idx / C;
  }
};

}  // namespace visionops
