#pragma once
// Shared by the CPU (.cpp) and CUDA (.cu) kernels: per-element math is written once in ops/common/*.h.

#if defined(__CUDACC__) || defined(__HIPCC__)
#define VISIONOPS_HOST_DEVICE __host__ __device__
#else
#define VISIONOPS_HOST_DEVICE
#endif

namespace visionops {

// Round-to-nearest arithmetic that the compiler may not contract into a fused multiply-add, so that CPU, CUDA and
// torchvision's CPU kernel decide borderline IoUs identically. (nvcc contracts a*b+c by default.)
template <typename T>
VISIONOPS_HOST_DEVICE inline T mul_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) return __fmul_rn(a, b);
  else return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

template <typename T>
VISIONOPS_HOST_DEVICE inline T add_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) return __fadd_rn(a, b);
  else return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

template <typename T>
VISIONOPS_HOST_DEVICE inline T sub_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) return __fsub_rn(a, b);
  else return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

// std::max/std::min argument order matters for NaN: (a < b) ? b : a keeps `a` when either is NaN.
template <typename T>
VISIONOPS_HOST_DEVICE inline T max_first(T a, T b) {
  return (a < b) ? b : a;
}
template <typename T>
VISIONOPS_HOST_DEVICE inline T min_first(T a, T b) {
  return (b < a) ? b : a;
}

}  // namespace visionops
