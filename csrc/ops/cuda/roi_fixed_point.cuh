#pragma once
// The RoI backward kernels' scatter-add (scatter_roi_grad, at the end): float atomics, or, when
// torch.are_deterministic_algorithms_enabled(), the deterministic fixed-point sum below.
//
// Float atomics make the summation order, and so the bits, vary run to run. Here every contribution is rounded to
// a 64-bit fixed-point integer and added with integer atomics, which are associative: the result does not depend
// on the order. The scale is a power of two chosen on the device from max|grad| so that no sum can overflow
// (|sum| <= max|grad| * terms, `terms` bounding the total interpolation weight one cell can receive), which keeps
// ~2^-40 of max|grad| as resolution. Non-finite contributions are tracked in a separate flag word (NaN, +inf,
// -inf) and restored at the end, as a float sum would. Memory: 8 + 4 bytes per gradient element, no K-fold blow-up.
#include <cstdint>
#include <type_traits>

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/nan_to_num.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "ops/cuda/launch.cuh"

namespace visionops {

struct FixedPointSum {
  unsigned long long* q;  // two's-complement 64-bit sums
  int* flags;             // 1: NaN seen, 2: +inf seen, 4: -inf seen
  const double* max_abs;  // max |finite grad|, on the device
  double terms;

  __device__ double scale() const {
    int e;
    frexp(*max_abs * terms, &e);  // max_abs * terms < 2^e
    return ldexp(1.0, 62 - e);
  }

  __device__ void add(int64_t i, double v, double scale) const {
    if (v != v) {
      atomicOr(flags + i, 1);
    } else if (v - v != 0.0) {
      atomicOr(flags + i, v > 0 ? 2 : 4);
    } else {
      atomicAdd(q + i, static_cast<unsigned long long>(__double2ll_rn(v * scale)));
    }
  }
};

template <typename scalar_t>
__global__ void fixed_point_finish_kernel(FixedPointSum s, int64_t n, scalar_t* __restrict__ out) {
  VISIONOPS_KERNEL_LOOP(int64_t, i, n) {
    const int f = s.flags[i];
    double v = static_cast<double>(static_cast<long long>(s.q[i])) / s.scale();
    if (f & 1 || (f & 6) == 6) v = __longlong_as_double(0x7ff8000000000000LL);  // NaN, or +inf + -inf
    else if (f & 2) v = __longlong_as_double(0x7ff0000000000000LL);
    else if (f & 4) v = -__longlong_as_double(0x7ff0000000000000LL);
    out[i] = static_cast<scalar_t>(v);
  }
}

// Buffers for a gradient shaped like `like_sizes`, the scale's input computed from `grad` (stream-ordered, no sync).
struct FixedPointBuffers {
  at::Tensor q, flags, max_abs;

  FixedPointBuffers(const at::Tensor& grad, at::IntArrayRef sizes) {
    q = at::zeros(sizes, grad.options().dtype(at::kLong));
    flags = at::zeros(sizes, grad.options().dtype(at::kInt));
    // In grad's dtype (a float64 copy of grad would double the peak memory), then one element to float64.
    max_abs = at::amax(at::nan_to_num(grad.abs(), 0.0, 0.0, 0.0)).to(at::kDouble).reshape({1});
  }

  FixedPointSum sum(double terms) {
    return FixedPointSum{reinterpret_cast<unsigned long long*>(q.data_ptr<int64_t>()), flags.data_ptr<int>(),
                         max_abs.data_ptr<double>(), terms};
  }

  template <typename scalar_t>
  void finish(FixedPointSum s, at::Tensor& out, cudaStream_t stream) {
    const int64_t n = out.numel();
    if (n == 0) return;
    fixed_point_finish_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(s, n, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// The scatter of a RoI backward into `out` (zero-filled, grad's dtype), the same for every RoI op: float atomics
// into an op-math (T) buffer, or fixed-point integer atomics when torch.are_deterministic_algorithms_enabled().
// launch(deterministic, gin, fp) launches the op's kernel, deterministic being std::true_type or std::false_type:
// it adds to gin (nullptr when deterministic) or to fp. `terms` bounds the total weight one element of `out` can
// receive (it sets the fixed-point scale).
template <typename scalar_t, typename T, typename Launch>
void scatter_roi_grad(const at::Tensor& grad, at::Tensor& out, double terms, cudaStream_t stream,
                      const Launch& launch) {
  if (at::globalContext().deterministicAlgorithms()) {
    FixedPointBuffers buf(grad, out.sizes());
    const FixedPointSum s = buf.sum(terms);
    launch(std::true_type{}, static_cast<T*>(nullptr), s);
    buf.finish<scalar_t>(s, out, stream);
    return;
  }
  // Half gradients are accumulated in float (no half atomics, and no rounding per addition).
  constexpr bool kSame = std::is_same_v<T, scalar_t>;
  at::Tensor acc = kSame ? out : at::zeros(out.sizes(), out.options().dtype(c10::CppTypeToScalarType<T>::value));
  launch(std::false_type{}, acc.data_ptr<T>(), FixedPointSum{});
  if (!kSame) out.copy_(acc);
}

}  // namespace visionops
