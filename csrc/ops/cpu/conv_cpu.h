#pragma once
// What the CPU convolution kernels share (conv_kernel.cpp: the BLAS and direct-loop paths; conv_direct.cpp: the
// AVX2 forward): the shapes of one call on the channels-last, zero-padded buffers, and the direct forward's entry.
#include <cstdint>

#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <type_traits>

#include "ops/common/conv.h"

namespace visionops {

// A [rows, cols] matrix view of p with row stride ld (no copy; the buffer outlives it).
template <typename T>
at::Tensor mat(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Each task's GEMMs run single-threaded: inside at::parallel_for MKL may still split one GEMM over threads (and so
// its sums, making grad_w's bits depend on the thread count). MKL_Set_Num_Threads_Local is MKL's per-thread setting
// (the C entry mkl_service.h's mkl_set_num_threads_local names; the lower-case symbol is the Fortran one, taking a
// pointer), declared weak so that a torch built on another BLAS (single-threaded inside OpenMP regions) loads too.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

class SerialBlas {
 public:
  SerialBlas() : prev_(MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SerialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(prev_);
  }
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;

 private:
  int prev_;
};

// A weight in any layout: element (tap t, input channel c of its group, output channel o) at p[t * st + c * sc + o *
// so]. The forward's own weight [Cout, Cg, kD, kH, kW] is (1, taps, Cg * taps).
template <typename T>
struct WeightView {
  const T* p;
  int64_t st, sc, so;
  T operator()(int64_t t, int64_t c, int64_t o) const { return p[t * st + c * sc + o * so]; }
};

// BLAS's own GEMM entries (MKL's, exported by libtorch_cpu), declared weak: a torch built on another BLAS loads too
// and takes at::addmm_ instead. Fortran interface, LP64 (32-bit ints), column-major.
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
extern "C" void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
                       const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));

// Row-major C[M x N] = beta * C + A[M x K] @ B[K x N] (leading dimensions lda, ldb, ldc; beta 0 or 1): called per
// output row and tap, a few thousand times per convolution, where at::addmm_'s dispatch and tensor wrapping would
// cost a tenth of the time.
template <typename T>
void gemm_acc(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
              T beta = 1) {
  auto blas = [&](auto* fn) {
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const T one = 1;
    fn("N", "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);  // C^T = B^T A^T, column-major
  };
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) return blas(sgemm_);
  } else {
    if (dgemm_ != nullptr) return blas(dgemm_);
  }
  at::Tensor c = mat(C, M, N, ldc);
  if (beta == T(0)) {
    at::mm_out(c, mat(A, M, K, lda), mat(B, K, N, ldb));
  } else {
    c.addmm_(mat(A, M, K, lda), mat(B, K, N, ldb));
  }
}

// Below this many input and output channels per group (depthwise and its near relatives) the GEMMs are too thin to
// pay: direct loops instead. A thin input alone (an RGB first layer) still makes a fine GEMM: K is taps * Cg.
constexpr int64_t kMinGemmChannels = 8;

// One call's sizes on the buffers: input [B, Dp, Hp, Wp, Cin] (padded), output [B, Do, Ho, Wo, Cout], Cg / Og
// channels per group.
struct ConvDims {
  int64_t B, Cin, Cout, G, Cg, Og, taps;
  bool thin() const { return Cg < kMinGemmChannels && Og < kMinGemmChannels; }
  int64_t Dp, Hp, Wp, Do, Ho, Wo, kD, kH, kW, sd, sh, sw, dd, dh, dw;
  explicit ConvDims(const ConvGeometry& g)
      : B(g.batch),
        Cin(g.in_channels),
        Cout(g.out_channels),
        G(g.groups),
        Cg(g.in_per_group),
        Og(g.out_per_group),
        taps(g.taps()),
        Dp(g.in[0] + 2 * g.padding[0]),
        Hp(g.in[1] + 2 * g.padding[1]),
        Wp(g.in[2] + 2 * g.padding[2]),
        Do(g.out[0]),
        Ho(g.out[1]),
        Wo(g.out[2]),
        kD(g.kernel[0]),
        kH(g.kernel[1]),
        kW(g.kernel[2]),
        sd(g.stride[0]),
        sh(g.stride[1]),
        sw(g.stride[2]),
        dd(g.dilation[0]),
        dh(g.dilation[1]),
        dw(g.dilation[2]) {}
  // The padded input at output position (b, od, oh, ow) and tap (kd, kh, kw), channel 0.
  int64_t x_offset(int64_t b, int64_t od, int64_t oh, int64_t ow, int64_t kd, int64_t kh, int64_t kw) const {
    return (((b * Dp + od * sd + kd * dd) * Hp + oh * sh + kh * dh) * Wp + ow * sw + kw * dw) * Cin;
  }
};

// The forward as a register-blocked direct convolution (x86 AVX2 + FMA): out [B, Do, Ho, Wo, Cout] from the padded
// input xp, the weight w and bias [Cout] (or null). Only for T = float or double, and only where
// direct_conv_available().
bool direct_conv_available();
// Whether the forward takes the direct kernel by default on this machine: AVX2 and FMA but no AVX-512 (where BLAS's
// wider GEMM kernels win). VISIONOPS_CONV_CPU=direct or =blas overrides it (direct only where available; =winograd
// is the default choice).
bool direct_conv_preferred();
// Winograd F(2, 3) forward (conv_winograd.cpp), same arguments: for stride-1, one-group 3x3x3 convolutions with at
// least kWinogradMinChannels input and output channels (narrower ones ran faster on the direct kernels). Taken
// wherever eligible, on any CPU, unless VISIONOPS_CONV_CPU is direct or blas (winograd_preferred).
constexpr int64_t kWinogradMinChannels = 128;
bool winograd_eligible(const ConvDims& d);
bool winograd_preferred();
template <typename T>
void winograd_forward(const ConvDims& d, const ConvGeometry& g, const T* xp, const WeightView<T>& w, const T* bias,
                      T* o, bool channels_first);
// With channels_first, out is [B, Cout, Do, Ho, Wo] instead (written in place: no channels-last buffer to copy).
template <typename T>
void direct_conv_forward(const ConvDims& d, const ConvGeometry& g, const T* xp, const WeightView<T>& w, const T* bias,
                         T* o, bool channels_first = false);
// The weight gradient the same way: dw [taps * Cg, Cout] from the padded input xp and grad gp [B, Do, Ho, Wo, Cout],
// which must be readable 2 vectors (kDirectTail elements) past its end.
constexpr int64_t kDirectTail = 16;
template <typename T>
void direct_conv_grad_weight(const ConvDims& d, const ConvGeometry& g, const T* xp, const T* gp, T* dw);

}  // namespace visionops
