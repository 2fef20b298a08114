#pragma once
// Launch helpers shared by the one-thread-per-element CUDA kernels (RoIAlign, RoIPool).
#include <cstdint>
#include <limits>

#include <ATen/core/Tensor.h>

namespace visionops {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

struct Strides4 {
  int64_t n, c, h, w;
};

inline Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Runs body(index_t{}) with index_t = int32_t when every thread index of blocks_for(n) blocks fits (the last
// block runs past n), int64_t otherwise.
template <typename F>
void with_index_type(int64_t n, F&& body) {
  if (n <= std::numeric_limits<int32_t>::max() - kThreads) body(int32_t{});
  else body(int64_t{});
}

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
