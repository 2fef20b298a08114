#pragma once
// What the CPU convolution kernels share (conv_kernel.cpp: the BLAS and direct-loop paths; conv_direct.cpp: the
// AVX2 forward): the shapes of one call on the channels-last, zero-padded buffers, and the direct forward's entry.
#include <cstdint>

#include "ops/common/conv.h"

namespace visionops {

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
// input xp, the weight w as [taps * Cg, Cout] and bias [Cout] (or null). Only for T = float or double, and only where
// direct_conv_available().
bool direct_conv_available();
// Whether the forward takes the direct kernel by default on this machine: AVX2 and FMA but no AVX-512 (where BLAS's
// wider GEMM kernels win). VISIONOPS_CONV_CPU=direct or =blas overrides it (direct only where available).
bool direct_conv_preferred();
// With channels_first, out is [B, Cout, Do, Ho, Wo] instead (written in place: no channels-last buffer to copy).
template <typename T>
void direct_conv_forward(const ConvDims& d, const ConvGeometry& g, const T* xp, const T* w, const T* bias, T* o,
                         bool channels_first = false);
// The weight gradient the same way: dw [taps * Cg, Cout] from the padded input xp and grad gp [B, Do, Ho, Wo, Cout],
// which must be readable 2 vectors (kDirectTail elements) past its end.
constexpr int64_t kDirectTail = 16;
template <typename T>
void direct_conv_grad_weight(const ConvDims& d, const ConvGeometry& g, const T* xp, const T* gp, T* dw);

}  // namespace visionops
