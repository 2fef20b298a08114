// CPU kernels of the convolution family (math: ops/common/conv.h, visionops/reference/conv.py).
//
// One kernel per direction serves conv2d and conv3d: a 2-D call is a 3-D one of depth 1 (ConvGeometry). Everything
// runs on channels-last copies in the op-math type (float for half and bfloat16, so those round once, at the end):
// the input zero-padded once, [B, Dp, Hp, Wp, Cin], grad [B, Do, Ho, Wo, Cout], the weight permuted so each
// direction's GEMM operand is a plain matrix. The copies cost a pass over each tensor, small against the GEMMs.
//
//   forward  out[P x Og]      = col[P x taps*Cg] @ W[taps*Cg x Og]       per tile of P output positions and group,
//                                                                       col that tile's im2col (it stays in L2)
//   grad_x   row[Wo x kW*Cg]  = g[Wo x Og] @ W[Og x kW*Cg]                per input row, (kd, kh) tap and group,
//                                                                       then added into the input row it reaches
//   grad_w   dW_t[Cg x Og]   += col_t[P x Cg]^T @ g[P x Og]              per (tap, group), over all positions in
//                                                                       tiles of P, in order
//
// Each task owns its outputs (grad_x a whole input row, grad_w a tap and group) and sums in a fixed order, so the
// bits do not depend on the thread count. The GEMMs go through at::mm_out on views of the buffers, that is torch's
// own BLAS (MKL, OpenBLAS, ...), called from inside at::parallel_for so that each runs single-threaded.
// Small channel groups (depthwise, Cin / groups < kMinGemmChannels) make poor GEMMs: those run as direct loops over
// channels instead (conv_direct_*), with the same partition.
#include <algorithm>
#include <cstring>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/common/conv.h"
#include "ops/common/conv_entries.h"

namespace visionops {
namespace {

// Output positions per forward tile: its im2col (kTile x taps * Cg values) stays in L2 for common layers.
constexpr int64_t kForwardTile = 64;
// Positions per grad_w tile: its column (kTile x Cg) and grad (kTile x Og) blocks stay in L2.
constexpr int64_t kWeightTile = 256;
// Below this many input channels per group the GEMMs are too thin to pay: direct loops instead.
constexpr int64_t kMinGemmChannels = 8;

// t's [B, D, H, W, C] channels-last view (2-D: D = 1).
at::Tensor cl5(const at::Tensor& t, int ndim) {
  const at::Tensor t5 = ndim == 2 ? t.unsqueeze(2) : t;
  return t5.permute({0, 2, 3, 4, 1});
}

// view as a contiguous tensor of dtype: itself when it already is, else a copy.
at::Tensor dense(const at::Tensor& view, at::ScalarType dtype) {
  if (view.scalar_type() == dtype && view.is_contiguous()) return view;
  return at::empty(view.sizes(), view.options().dtype(dtype)).copy_(view);
}

// The input as [B, Dp, Hp, Wp, Cin], zero-padded, so no kernel checks bounds.
at::Tensor padded_input(const at::Tensor& input, const ConvGeometry& g, at::ScalarType dtype) {
  const at::Tensor x = cl5(input, g.ndim);
  if (g.padding[0] == 0 && g.padding[1] == 0 && g.padding[2] == 0) return dense(x, dtype);
  at::Tensor xp = at::zeros(
      {g.batch, g.in[0] + 2 * g.padding[0], g.in[1] + 2 * g.padding[1], g.in[2] + 2 * g.padding[2], g.in_channels},
      input.options().dtype(dtype));
  xp.narrow(1, g.padding[0], g.in[0]).narrow(2, g.padding[1], g.in[1]).narrow(3, g.padding[2], g.in[2]).copy_(x);
  return xp;
}

// A [rows, cols] matrix view of p with row stride ld (no copy; the buffer outlives it).
template <typename T>
at::Tensor mat(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Where a [B, D, H, W, C] result goes: out's own memory when its channels-last view is dense in T, else a buffer
// copied into out by finish().
template <typename T>
struct Result {
  at::Tensor view, buf;
  Result(const at::Tensor& out, int ndim) : view(cl5(out, ndim)) {
    constexpr auto dtype = c10::CppTypeToScalarType<T>::value;
    buf = view.scalar_type() == dtype && view.is_contiguous() ? view
                                                              : at::empty(view.sizes(), view.options().dtype(dtype));
  }
  T* data() { return buf.template mutable_data_ptr<T>(); }
  void finish() {
    if (!buf.is_same(view)) view.copy_(buf);
  }
};

struct Dims {
  int64_t B, Cin, Cout, G, Cg, Og, taps;
  int64_t Dp, Hp, Wp, Do, Ho, Wo, kD, kH, kW, sd, sh, sw, dd, dh, dw;
  explicit Dims(const ConvGeometry& g)
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

// Copies the Cg channels of group gr at each tap in [t0, t1) for output positions [q0, q1) into col (row q - q0,
// ld (t1 - t0) * Cg): the im2col of one tile.
template <typename T>
void im2col(const Dims& d, const T* xp, int64_t gr, int64_t q0, int64_t q1, int64_t t0, int64_t t1, T* col) {
  const int64_t ld = (t1 - t0) * d.Cg;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t ow = q % d.Wo, r = q / d.Wo, oh = r % d.Ho, od = (r / d.Ho) % d.Do, b = r / (d.Ho * d.Do);
    T* dst = col + (q - q0) * ld;
    for (int64_t t = t0; t < t1; ++t, dst += d.Cg) {
      const int64_t kw = t % d.kW, kh = (t / d.kW) % d.kH, kd = t / (d.kW * d.kH);
      std::memcpy(dst, xp + d.x_offset(b, od, oh, ow, kd, kh, kw) + gr * d.Cg, d.Cg * sizeof(T));
    }
  }
}

template <typename T>
void forward_impl(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& weight, const at::Tensor* bias,
                  at::Tensor& out) {
  constexpr auto dtype = c10::CppTypeToScalarType<T>::value;
  const Dims d(g);
  const at::Tensor xp_t = padded_input(input, g, dtype);
  // weight as [taps * Cg, Cout]: group gr's GEMM operand is columns [gr * Og, (gr + 1) * Og).
  const at::Tensor w_t = dense(cl5(weight, g.ndim).permute({1, 2, 3, 4, 0}), dtype);
  const at::Tensor b_t = bias != nullptr ? dense(*bias, dtype) : at::Tensor();
  Result<T> res(out, g.ndim);
  const T* xp = xp_t.const_data_ptr<T>();
  const T* w = w_t.const_data_ptr<T>();
  T* o = res.data();
  const int64_t positions = d.B * d.Do * d.Ho * d.Wo, K = d.taps * d.Cg;
  const int64_t ntiles = (positions + kForwardTile - 1) / kForwardTile;
  at::parallel_for(0, ntiles * d.G, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> col;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t gr = task % d.G, q0 = (task / d.G) * kForwardTile, q1 = std::min(positions, q0 + kForwardTile);
      col.resize((q1 - q0) * K);
      im2col(d, xp, gr, q0, q1, 0, d.taps, col.data());
      at::Tensor dst = mat(o + q0 * d.Cout + gr * d.Og, q1 - q0, d.Og, d.Cout);
      const at::Tensor a = mat(col.data(), q1 - q0, K, K), b = mat(w + gr * d.Og, K, d.Og, d.Cout);
      if (b_t.defined()) {
        at::addmm_out(dst, b_t.narrow(0, gr * d.Og, d.Og).expand({q1 - q0, d.Og}), a, b);
      } else {
        at::mm_out(dst, a, b);
      }
    }
  });
  res.finish();
}

template <typename T>
void grad_input_impl(const ConvGeometry& g, const T* gp, const at::Tensor& weight, at::Tensor& grad_input) {
  constexpr auto dtype = c10::CppTypeToScalarType<T>::value;
  const Dims d(g);
  const bool direct = d.Cg < kMinGemmChannels;
  // weight as [kD, kH, Cout, kW, Cg]: for one (kd, kh) and group, rows o, columns (kw, c); the direct loops take
  // the forward's [taps * Cg, Cout].
  const at::Tensor w_t = dense(
      cl5(weight, g.ndim).permute(direct ? at::IntArrayRef{1, 2, 3, 4, 0} : at::IntArrayRef{1, 2, 0, 3, 4}), dtype);
  const T* w = w_t.const_data_ptr<T>();
  Result<T> res(grad_input, g.ndim);
  T* gx = res.data();
  const int64_t D = g.in[0], H = g.in[1], W = g.in[2], pd = g.padding[0], ph = g.padding[1], pw = g.padding[2];
  const int64_t ncol = d.kW * d.Cg;
  at::parallel_for(0, d.B * D * H, 1, [&](int64_t r0, int64_t r1) {
    std::vector<T> rowbuf(d.Wo * ncol);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t ih = r % H, id = (r / H) % D, b = r / (H * D);
      T* dst = gx + r * W * d.Cin;
      std::fill_n(dst, W * d.Cin, T(0));
      for (int64_t kd = 0; kd < d.kD; ++kd) {
        const int64_t zd = id + pd - kd * d.dd;
        if (zd < 0 || zd % d.sd != 0 || zd / d.sd >= d.Do) continue;
        for (int64_t kh = 0; kh < d.kH; ++kh) {
          const int64_t zh = ih + ph - kh * d.dh;
          if (zh < 0 || zh % d.sh != 0 || zh / d.sh >= d.Ho) continue;
          const int64_t orow = (b * d.Do + zd / d.sd) * d.Ho + zh / d.sh;
          if (direct) {
            direct_grad_input_row(d, gp + orow * d.Wo * d.Cout, w, kd, kh, W, pw, dst);
            continue;
          }
          for (int64_t gr = 0; gr < d.G; ++gr) {
            at::Tensor row = mat(rowbuf.data(), d.Wo, ncol, ncol);
            at::mm_out(row, mat(gp + orow * d.Wo * d.Cout + gr * d.Og, d.Wo, d.Og, d.Cout),
                       mat(w + ((kd * d.kH + kh) * d.Cout + gr * d.Og) * ncol, d.Og, ncol, ncol));
            for (int64_t ow = 0; ow < d.Wo; ++ow)
              for (int64_t kw = 0; kw < d.kW; ++kw) {
                const int64_t iw = ow * d.sw + kw * d.dw - pw;
                if (iw < 0 || iw >= W) continue;
                const T* s = rowbuf.data() + ow * ncol + kw * d.Cg;
                T* t = dst + iw * d.Cin + gr * d.Cg;
                for (int64_t c = 0; c < d.Cg; ++c) t[c] += s[c];
              }
          }
        }
      }
    }
  });
  res.finish();
}

template <typename T>
void grad_weight_impl(const ConvGeometry& g, const T* gp, const at::Tensor& input, at::Tensor& grad_weight) {
  constexpr auto dtype = c10::CppTypeToScalarType<T>::value;
  const Dims d(g);
  const at::Tensor xp_t = padded_input(input, g, dtype);
  const T* xp = xp_t.const_data_ptr<T>();
  // dW as [taps * Cg, Cout] (the forward's weight operand), permuted into grad_weight at the end.
  at::Tensor dw_t = at::empty({d.taps * d.Cg, d.Cout}, input.options().dtype(dtype));
  T* dw = dw_t.mutable_data_ptr<T>();
  const int64_t positions = d.B * d.Do * d.Ho * d.Wo;
  if (d.Cg < kMinGemmChannels) {
    constexpr int64_t kBlock = 64;  // output channels per task
    const int64_t nblk = (d.Cout + kBlock - 1) / kBlock;
    at::parallel_for(0, d.taps * nblk, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t o0 = (task % nblk) * kBlock;
        direct_grad_weight(d, xp, gp, task / nblk, o0, std::min(d.Cout, o0 + kBlock), dw);
      }
    });
  } else {
    at::parallel_for(0, d.taps * d.G, 1, [&](int64_t t0, int64_t t1) {
      std::vector<T> col;
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t gr = task % d.G, tap = task / d.G;
        at::Tensor dst = mat(dw + tap * d.Cg * d.Cout + gr * d.Og, d.Cg, d.Og, d.Cout);
        dst.zero_();
        for (int64_t q0 = 0; q0 < positions; q0 += kWeightTile) {
          const int64_t q1 = std::min(positions, q0 + kWeightTile);
          col.resize((q1 - q0) * d.Cg);
          im2col(d, xp, gr, q0, q1, tap, tap + 1, col.data());
          dst.addmm_(mat(col.data(), q1 - q0, d.Cg, d.Cg).t(),
                     mat(gp + q0 * d.Cout + gr * d.Og, q1 - q0, d.Og, d.Cout));
        }
      }
    });
  }
  // [kD, kH, kW, Cg, Cout] -> grad_weight [Cout, Cg, kD, kH, kW] in its own layout.
  at::Tensor gw5 = g.ndim == 2 ? grad_weight.unsqueeze(2) : grad_weight;
  gw5.permute({2, 3, 4, 1, 0}).copy_(dw_t.view({d.kD, d.kH, d.kW, d.Cg, d.Cout}));
}

// grad_bias[o] = sum over positions of g[q, o], each block of channels summed by one task in position order.
template <typename T>
void grad_bias_impl(const ConvGeometry& g, const T* gp, at::Tensor& grad_bias) {
  constexpr int64_t kBlock = 64;
  const int64_t Cout = g.out_channels, positions = g.batch * g.out_spatial();
  std::vector<T> sums(Cout);
  at::parallel_for(0, (Cout + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t c0 = blk * kBlock, c1 = std::min(Cout, c0 + kBlock);
      T* acc = sums.data();
      std::fill(acc + c0, acc + c1, T(0));
      for (int64_t q = 0; q < positions; ++q)
        for (int64_t c = c0; c < c1; ++c) acc[c] += gp[q * Cout + c];
    }
  });
  grad_bias.copy_(at::from_blob(sums.data(), {Cout}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value)));
}

template <typename T>
void backward_impl(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                   at::Tensor* grad_input, at::Tensor* grad_weight, at::Tensor* grad_bias) {
  const at::Tensor g_t = dense(cl5(grad, g.ndim), c10::CppTypeToScalarType<T>::value);
  const T* gp = g_t.const_data_ptr<T>();
  if (grad_input != nullptr) grad_input_impl<T>(g, gp, weight, *grad_input);
  if (grad_weight != nullptr) grad_weight_impl<T>(g, gp, input, *grad_weight);
  if (grad_bias != nullptr) grad_bias_impl<T>(g, gp, *grad_bias);
}

// The kernels behind the four entries of ops/common/conv_entries.h, which check the arguments and allocate the
// outputs. double runs in double, the other dtypes in float.
struct CpuConv {
  static void forward(const char*, const ConvGeometry& g, const at::Tensor& input, const at::Tensor& weight,
                      const at::Tensor* bias, at::Tensor& out) {
    if (input.scalar_type() == at::kDouble) return forward_impl<double>(g, input, weight, bias, out);
    forward_impl<float>(g, input, weight, bias, out);
  }
  static void backward(const char*, const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& input,
                       const at::Tensor& weight, at::Tensor* grad_input, at::Tensor* grad_weight,
                       at::Tensor* grad_bias) {
    if (input.scalar_type() == at::kDouble)
      return backward_impl<double>(g, grad, input, weight, grad_input, grad_weight, grad_bias);
    backward_impl<float>(g, grad, input, weight, grad_input, grad_weight, grad_bias);
  }
};

using Entries = ConvEntries<CpuConv>;

}  // namespace

TORCH_LIBRARY_IMPL(visionops, CPU, m) {
  m.impl("conv2d", TORCH_FN(Entries::conv2d));
  m.impl("_conv2d_backward", TORCH_FN(Entries::conv2d_backward));
  m.impl("conv3d", TORCH_FN(Entries::conv3d));
  m.impl("_conv3d_backward", TORCH_FN(Entries::conv3d_backward));
}

}  // namespace visionops
