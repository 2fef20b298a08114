// CPU kernels of the convolution family (math: ops/common/conv.h, visionops/reference/conv.py).
//
// One kernel per direction serves conv2d and conv3d: a 2-D call is a 3-D one of depth 1 (ConvGeometry). Everything
// runs on channels-last copies in the op-math type (float for half and bfloat16, so those round once, at the end):
// the input zero-padded once, [B, Dp, Hp, Wp, Cin], grad [B, Do, Ho, Wo, Cout], the weight permuted so each
// direction's GEMM operand is a plain matrix. The copies cost a pass over each tensor, small against the GEMMs.
//
//   forward  out[P x Og]   += x[P x Cg] @ W_t[Cg x Og]              wide groups (kShiftMinChannels): no im2col; per
//                                                                   output row (shift_forward) or block of rows
//                                                                   (block_forward) and tap, x the padded input's
//                                                                   strided rows that tap reads; taps and row ends
//                                                                   that read only padding are skipped
//            out[P x Og]    = col[P x taps*Cg] @ W[taps*Cg x Og]    otherwise, per tile of P output positions and
//                                                                   group, col the tile's im2col (at most kColBytes:
//                                                                   BLAS packs all of W once per call)
//   grad_x   rows[n x kW*Cg] = g[n x Og] @ W[Og x kW*Cg]            per block of input rows of one residue mod the
//                                                                   stride, (kd, kh) tap and group: the output rows
//                                                                   they read are consecutive (n positions); then
//                                                                   added into the input rows they reach
//   grad_w   dW_t[Cg x Ob]  += col_t[P x Cg]^T @ g[P x Ob]          per (tap, group, block of output channels), over
//                                                                   all positions in tiles of kWeightTile, in order
//
// Wide 3x3x3 layers at stride 1 take a Winograd F(2, 3) forward instead (conv_winograd.cpp), on any CPU, and so does
// their grad_x where the direct kernels run. On x86 CPUs with AVX2 but no AVX-512 (direct_conv_preferred) the forward
// and grad_w of the other layers run as register-blocked direct convolutions (conv_direct.cpp), and so does grad_x
// where the stride is 1: it is then the forward of the padded grad with the flipped weight (transposed_geometry). The
// GEMMs below remain the path elsewhere, where BLAS's AVX-512 kernels are the faster, and for strided input gradients.
//
// Each task owns its outputs (grad_x whole input rows, grad_w a block of one tap) and sums in a fixed order, and
// the partition of grad_w does not depend on the thread count, so neither do its bits. The GEMMs go through
// at::mm_out / addmm_ on views of the buffers, that is torch's own BLAS, single-threaded inside each task
// (SerialBlas). Thin channel groups (depthwise: Cin / groups and Cout / groups both < kMinGemmChannels) make poor
// GEMMs: those run as
// direct loops over channels instead (direct_*), with the same partition.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
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
#include "ops/cpu/conv_cpu.h"

namespace visionops {
namespace {

// The largest im2col tile of the forward, in bytes: BLAS packs the whole weight once per GEMM, so the tiles are as
// large as this allows (and no more than one per thread's share of the positions).
constexpr int64_t kColBytes = int64_t{4} << 20;
// Positions per grad_x GEMM (a block of input rows).
constexpr int64_t kRowPositions = 512;
// Positions per grad_w GEMM: short enough that BLAS sums them in one block, whose order does not depend on the
// threads (MKL sizes its blocks of longer sums by the threads sharing a cache); the tiles are then added in order.
constexpr int64_t kWeightTile = 128;
// Output channels per grad_w task.
constexpr int64_t kWeightOutBlock = 128;
// Taps whose input offsets im2col tables (7x7x7); larger kernels compute them per row.
constexpr int64_t kMaxTaps = 343;
// The forward skips im2col (shift_forward) when each GEMM has at least this many input and output channels per group
// and this many output columns per row: below, BLAS's per-call packing of the tap's weight outweighs the copy saved.
constexpr int64_t kShiftMinChannels = 32;
constexpr int64_t kShiftMinWidth = 32;

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

// A task's scratch matrix, 64-byte aligned: BLAS may pick its kernel by the operands' alignment, and the bits of
// grad_w must not depend on where a thread's buffer happens to land.
template <typename T>
class Scratch {
 public:
  T* get(int64_t n) {
    v_.resize(n + kAlign);
    const auto p = reinterpret_cast<uintptr_t>(v_.data());
    return v_.data() + ((kAlign * sizeof(T) - p % (kAlign * sizeof(T))) % (kAlign * sizeof(T))) / sizeof(T);
  }

 private:
  static constexpr int64_t kAlign = 64 / sizeof(T);
  std::vector<T> v_;
};

// Copies the Cg channels of group gr at each tap in [t0, t1) for output positions [q0, q1) into col (row q - q0,
// ld (t1 - t0) * Cg): the im2col of one tile.
template <typename T>
void im2col(const ConvDims& d, const T* xp, int64_t gr, int64_t q0, int64_t q1, int64_t t0, int64_t t1, T* col) {
  const int64_t ld = (t1 - t0) * d.Cg;
  // Offsets of the taps from a position's first tap, computed once: the per-row work is then one add and a copy of
  // Cg channels per tap (with an RGB first layer that copy is 3 values: divisions per tap would dominate).
  int64_t tap_offset[kMaxTaps];
  const bool tabled = t1 - t0 <= kMaxTaps;
  if (tabled)
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t kw = t % d.kW, kh = (t / d.kW) % d.kH, kd = t / (d.kW * d.kH);
      tap_offset[t - t0] = d.x_offset(0, 0, 0, 0, kd, kh, kw);
    }
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t ow = q % d.Wo, r = q / d.Wo, oh = r % d.Ho, od = (r / d.Ho) % d.Do, b = r / (d.Ho * d.Do);
    T* dst = col + (q - q0) * ld;
    const T* base = xp + d.x_offset(b, od, oh, ow, 0, 0, 0) + gr * d.Cg;
    for (int64_t t = t0; t < t1; ++t, dst += d.Cg) {
      int64_t off;
      if (tabled) {
        off = tap_offset[t - t0];
      } else {
        const int64_t kw = t % d.kW, kh = (t / d.kW) % d.kH, kd = t / (d.kW * d.kH);
        off = d.x_offset(0, 0, 0, 0, kd, kh, kw);
      }
      const T* src = base + off;
      if (d.Cg <= 8) {
        for (int64_t c = 0; c < d.Cg; ++c) dst[c] = src[c];
      } else {
        std::memcpy(dst, src, d.Cg * sizeof(T));
      }
    }
  }
}

// Each of n rows of width c set to bias[0, c) (zeros without a bias): the start of a forward's sum over taps.
template <typename T>
void init_rows(T* dst, int64_t n, int64_t c, const T* bias) {
  for (int64_t q = 0; q < n; ++q)
    if (bias != nullptr) {
      std::copy_n(bias, c, dst + q * c);
    } else {
      std::fill_n(dst + q * c, c, T(0));
    }
}

// The forward without im2col, for wide groups and rows (kShiftMinChannels, kShiftMinWidth): each output row (b, od,
// oh) is the bias plus, per tap and group, the GEMM of the padded input's row segment that tap reads (a strided
// matrix: row stride sw * Cin) with the tap's [Cg x Og] weight. Taps that read only zero padding are skipped, and at
// the row's ends only the columns whose input lies inside the image are multiplied, so dilated kernels near the
// borders (ASPP's rate 18 on a 64x64 map: a third of all products) cost nothing. One task owns a row and sums its
// taps in a fixed order.
template <typename T>
void shift_forward(const ConvDims& d, const ConvGeometry& g, const T* xp, const T* w, const T* bias, T* o) {
  const int64_t D = g.in[0], H = g.in[1], W = g.in[2], pd = g.padding[0], ph = g.padding[1], pw = g.padding[2];
  at::parallel_for(0, d.B * d.Do * d.Ho, 1, [&](int64_t r0, int64_t r1) {
    const SerialBlas serial;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t oh = r % d.Ho, od = (r / d.Ho) % d.Do, b = r / (d.Ho * d.Do);
      T* out = o + r * d.Wo * d.Cout;
      init_rows(out, d.Wo, d.Cout, bias);
      for (int64_t kd = 0; kd < d.kD; ++kd) {
        const int64_t zd = od * d.sd + kd * d.dd;  // padded depth
        if (zd < pd || zd >= pd + D) continue;
        for (int64_t kh = 0; kh < d.kH; ++kh) {
          const int64_t zh = oh * d.sh + kh * d.dh;
          if (zh < ph || zh >= ph + H) continue;
          for (int64_t kw = 0; kw < d.kW; ++kw) {
            // output columns ow with pw <= ow * sw + kw * dw < pw + W
            const int64_t first = pw - kw * d.dw, last = pw + W - 1 - kw * d.dw;
            if (last < 0) continue;
            const int64_t lo = first <= 0 ? 0 : (first + d.sw - 1) / d.sw, hi = std::min(d.Wo, last / d.sw + 1);
            if (lo >= hi) continue;
            const T* a = xp + d.x_offset(b, od, oh, lo, kd, kh, kw);
            const T* wt = w + ((kd * d.kH + kh) * d.kW + kw) * d.Cg * d.Cout;
            for (int64_t gr = 0; gr < d.G; ++gr)
              gemm_acc(hi - lo, d.Og, d.Cg, a + gr * d.Cg, d.sw * d.Cin, wt + gr * d.Og, d.Cout,
                       out + lo * d.Cout + gr * d.Og, d.Cout);
          }
        }
      }
    }
  });
}

// shift_forward for narrow rows (C3D's 28 and 14 columns), unit strides in H and W: R output rows of one (b, od)
// at once. With the padded row pitch Wp, a tap reads the rows' input segments as ONE strided matrix (row q of the
// block's extended grid is input (zh + q / Wp, q % Wp + kw * dw)), so each GEMM covers R rows (M ~ kBlockPositions)
// and the tap's weight is packed once per block instead of per row. The grid's Wp - Wo extra columns per row are
// computed and dropped: a [R * Wp, Og] scratch per group, copied into the output rows at the end. Taps are skipped
// when their depth is padding; rows whose input row is padding are cut off the ends of the GEMM.
constexpr int64_t kBlockPositions = 256;

template <typename T>
void block_forward(const ConvDims& d, const ConvGeometry& g, const T* xp, const T* w, const T* bias, T* o) {
  const int64_t D = g.in[0], H = g.in[1], pd = g.padding[0], ph = g.padding[1];
  const int64_t R = std::max<int64_t>(1, std::min(d.Ho, kBlockPositions / d.Wp));
  const int64_t nblk = (d.Ho + R - 1) / R;
  at::parallel_for(0, d.B * d.Do * nblk * d.G, 1, [&](int64_t t0, int64_t t1) {
    const SerialBlas serial;
    Scratch<T> scratch;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t gr = task % d.G, blk = (task / d.G) % nblk, od = (task / (d.G * nblk)) % d.Do;
      const int64_t b = task / (d.G * nblk * d.Do);
      const int64_t h0 = blk * R, rows = std::min(R, d.Ho - h0);
      T* acc = scratch.get(rows * d.Wp * d.Og);
      init_rows(acc, rows * d.Wp, d.Og, bias != nullptr ? bias + gr * d.Og : nullptr);
      for (int64_t kd = 0; kd < d.kD; ++kd) {
        const int64_t zd = od * d.sd + kd * d.dd;
        if (zd < pd || zd >= pd + D) continue;
        for (int64_t kh = 0; kh < d.kH; ++kh) {
          // block rows j with ph <= h0 + j + kh * dh < ph + H
          const int64_t jlo = std::max<int64_t>(0, ph - h0 - kh * d.dh);
          const int64_t jhi = std::min(rows, ph + H - h0 - kh * d.dh);
          if (jlo >= jhi) continue;
          const int64_t M = (jhi - jlo - 1) * d.Wp + d.Wo;
          for (int64_t kw = 0; kw < d.kW; ++kw) {
            const T* a = xp + d.x_offset(b, od, h0 + jlo, 0, kd, kh, kw) + gr * d.Cg;
            const T* wt = w + ((kd * d.kH + kh) * d.kW + kw) * d.Cg * d.Cout + gr * d.Og;
            gemm_acc(M, d.Og, d.Cg, a, d.Cin, wt, d.Cout, acc + jlo * d.Wp * d.Og, d.Og);
          }
        }
      }
      for (int64_t j = 0; j < rows; ++j)
        for (int64_t ow = 0; ow < d.Wo; ++ow)
          std::copy_n(acc + (j * d.Wp + ow) * d.Og, d.Og,
                      o + (((b * d.Do + od) * d.Ho + h0 + j) * d.Wo + ow) * d.Cout + gr * d.Og);
    }
  });
}

// The direct loops for thin groups (ConvDims::thin), on the same buffers and with the same partition as the
// GEMM paths. w is the forward's [taps * Cg, Cout] weight; the innermost loops run over contiguous output channels
// (or, depthwise, over all channels at once) so that they vectorise.
template <typename T>
void direct_forward(const ConvDims& d, const T* xp, const T* w, const T* bias, T* o, int64_t q0, int64_t q1) {
  const bool depthwise = d.Cg == 1 && d.Og == 1;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t ow = q % d.Wo, r = q / d.Wo, oh = r % d.Ho, od = (r / d.Ho) % d.Do, b = r / (d.Ho * d.Do);
    T* out = o + q * d.Cout;
    for (int64_t c = 0; c < d.Cout; ++c) out[c] = bias != nullptr ? bias[c] : T(0);
    for (int64_t t = 0; t < d.taps; ++t) {
      const int64_t kw = t % d.kW, kh = (t / d.kW) % d.kH, kd = t / (d.kW * d.kH);
      const T* xs = xp + d.x_offset(b, od, oh, ow, kd, kh, kw);
      const T* wt = w + t * d.Cg * d.Cout;
      if (depthwise) {
        for (int64_t c = 0; c < d.Cout; ++c) out[c] += wt[c] * xs[c];
        continue;
      }
      for (int64_t gr = 0; gr < d.G; ++gr)
        for (int64_t c = 0; c < d.Cg; ++c) {
          const T xv = xs[gr * d.Cg + c];
          const T* wr = wt + c * d.Cout + gr * d.Og;
          T* og = out + gr * d.Og;
          for (int64_t m = 0; m < d.Og; ++m) og[m] += wr[m] * xv;
        }
    }
  }
}

// Adds the gradient reaching input row dst (width W, columns shifted by the padding pw) from output row g through
// taps (kd, kh, all kw).
template <typename T>
void direct_grad_input_row(const ConvDims& d, const T* g, const T* w, int64_t kd, int64_t kh, int64_t W, int64_t pw,
                           T* dst) {
  const bool depthwise = d.Cg == 1 && d.Og == 1;
  for (int64_t ow = 0; ow < d.Wo; ++ow) {
    const T* gs = g + ow * d.Cout;
    for (int64_t kw = 0; kw < d.kW; ++kw) {
      const int64_t iw = ow * d.sw + kw * d.dw - pw;
      if (iw < 0 || iw >= W) continue;
      const T* wt = w + ((kd * d.kH + kh) * d.kW + kw) * d.Cg * d.Cout;
      T* t = dst + iw * d.Cin;
      if (depthwise) {
        for (int64_t c = 0; c < d.Cin; ++c) t[c] += wt[c] * gs[c];
        continue;
      }
      for (int64_t gr = 0; gr < d.G; ++gr)
        for (int64_t c = 0; c < d.Cg; ++c) {
          const T* wr = wt + c * d.Cout + gr * d.Og;
          const T* gg = gs + gr * d.Og;
          T acc = 0;
          for (int64_t m = 0; m < d.Og; ++m) acc += wr[m] * gg[m];
          t[gr * d.Cg + c] += acc;
        }
    }
  }
}

// dw[tap, c, o] for o in [o0, o1), summed over all positions in order.
template <typename T>
void direct_grad_weight(const ConvDims& d, const T* xp, const T* g, int64_t tap, int64_t o0, int64_t o1, T* dw) {
  const int64_t kw = tap % d.kW, kh = (tap / d.kW) % d.kH, kd = tap / (d.kW * d.kH);
  T* dst = dw + tap * d.Cg * d.Cout;
  for (int64_t c = 0; c < d.Cg; ++c) std::fill(dst + c * d.Cout + o0, dst + c * d.Cout + o1, T(0));
  const bool depthwise = d.Cg == 1 && d.Og == 1;
  const int64_t positions = d.B * d.Do * d.Ho * d.Wo;
  for (int64_t q = 0; q < positions; ++q) {
    const int64_t ow = q % d.Wo, r = q / d.Wo, oh = r % d.Ho, od = (r / d.Ho) % d.Do, b = r / (d.Ho * d.Do);
    const T* xs = xp + d.x_offset(b, od, oh, ow, kd, kh, kw);
    const T* gs = g + q * d.Cout;
    if (depthwise) {
      for (int64_t o = o0; o < o1; ++o) dst[o] += xs[o] * gs[o];
      continue;
    }
    for (int64_t c = 0; c < d.Cg; ++c)
      for (int64_t o = o0; o < o1; ++o) dst[c * d.Cout + o] += xs[(o / d.Og) * d.Cg + c] * gs[o];
  }
}

// The forward kernel of the direct family for d: Winograd where eligible and preferred, else the AVX2 direct one.
template <typename T>
auto direct_family_kernel(const ConvDims& d) {
  return winograd_eligible(d) && winograd_preferred() ? winograd_forward<T> : direct_conv_forward<T>;
}

// The direct forward into out: in place when out is contiguous in T (channels-first: the kernel scatters each tile's
// channels) or channels-last and dense in T, else through a channels-last buffer copied into it.
template <typename T, typename Kernel>
void direct_into(const ConvDims& d, const ConvGeometry& g, const T* xp, const WeightView<T>& w, const T* bias,
                 at::Tensor& out, Kernel kernel) {
  if (out.scalar_type() == c10::CppTypeToScalarType<T>::value && out.is_contiguous()) {
    kernel(d, g, xp, w, bias, out.mutable_data_ptr<T>(), true);
    return;
  }
  Result<T> res(out, g.ndim);
  kernel(d, g, xp, w, bias, res.data(), false);
  res.finish();
}

template <typename T>
void forward_impl(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& weight, const at::Tensor* bias,
                  at::Tensor& out) {
  constexpr auto dtype = c10::CppTypeToScalarType<T>::value;
  const ConvDims d(g);
  const at::Tensor xp_t = padded_input(input, g, dtype);
  // detached: the GEMMs below run on worker threads, which do not inherit the caller's below-autograd dispatch state
  const at::Tensor b_t = bias != nullptr ? dense(*bias, dtype).detach() : at::Tensor();
  const T* xp = xp_t.const_data_ptr<T>();
  if ((winograd_eligible(d) && winograd_preferred()) || (!d.thin() && direct_conv_preferred())) {
    // these read the weight in its own layout [Cout, Cg, taps]
    const at::Tensor w_c = dense(weight, dtype);
    const WeightView<T> wv{w_c.const_data_ptr<T>(), 1, d.taps, d.Cg * d.taps};
    return direct_into(d, g, xp, wv, b_t.defined() ? b_t.const_data_ptr<T>() : nullptr, out,
                       direct_family_kernel<T>(d));
  }
  // weight as [taps * Cg, Cout]: group gr's GEMM operand is columns [gr * Og, (gr + 1) * Og).
  const at::Tensor w_t = dense(cl5(weight, g.ndim).permute({1, 2, 3, 4, 0}), dtype);
  const T* w = w_t.const_data_ptr<T>();
  Result<T> res(out, g.ndim);
  T* o = res.data();
  const int64_t positions = d.B * d.Do * d.Ho * d.Wo, K = d.taps * d.Cg;
  const int64_t threads = at::get_num_threads();
  const int64_t cap = std::max<int64_t>(64, kColBytes / static_cast<int64_t>(K * sizeof(T)));
  int64_t ntiles = std::max((positions + cap - 1) / cap, std::min<int64_t>(threads, positions));
  ntiles = (ntiles + threads - 1) / threads * threads;  // a whole number of rounds of the threads
  const int64_t tile = (positions + ntiles - 1) / ntiles;
  ntiles = (positions + tile - 1) / tile;
  if (d.Cg >= kShiftMinChannels && d.Og >= kShiftMinChannels && d.Wo >= kShiftMinWidth) {
    shift_forward(d, g, xp, w, b_t.defined() ? b_t.const_data_ptr<T>() : nullptr, o);
    res.finish();
    return;
  }
  if (d.Cg >= kShiftMinChannels && d.Og >= kShiftMinChannels && d.sh == 1 && d.sw == 1) {
    block_forward(d, g, xp, w, b_t.defined() ? b_t.const_data_ptr<T>() : nullptr, o);
    res.finish();
    return;
  }
  if (d.thin()) {
    const T* bp = b_t.defined() ? b_t.const_data_ptr<T>() : nullptr;
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      direct_forward(d, xp, w, bp, o, t0 * tile, std::min(positions, t1 * tile));
    });
    res.finish();
    return;
  }
  at::parallel_for(0, ntiles * d.G, 1, [&](int64_t t0, int64_t t1) {
    Scratch<T> scratch;
    const SerialBlas serial;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t gr = task % d.G, q0 = (task / d.G) * tile, q1 = std::min(positions, q0 + tile);
      T* col = scratch.get((q1 - q0) * K);
      im2col(d, xp, gr, q0, q1, 0, d.taps, col);
      at::Tensor dst = mat(o + q0 * d.Cout + gr * d.Og, q1 - q0, d.Og, d.Cout);
      const at::Tensor a = mat(col, q1 - q0, K, K), b = mat(w + gr * d.Og, K, d.Og, d.Cout);
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
  const ConvDims d(g);
  const bool direct = d.thin();
  // weight as [kD, kH, Cout, kW, Cg]: for one (kd, kh) and group, rows o, columns (kw, c); the direct loops take
  // the forward's [taps * Cg, Cout].
  const at::Tensor w_t = dense(
      cl5(weight, g.ndim).permute(direct ? at::IntArrayRef{1, 2, 3, 4, 0} : at::IntArrayRef{1, 2, 0, 3, 4}), dtype);
  const T* w = w_t.const_data_ptr<T>();
  Result<T> res(grad_input, g.ndim);
  T* gx = res.data();
  const int64_t D = g.in[0], H = g.in[1], W = g.in[2], pd = g.padding[0], ph = g.padding[1], pw = g.padding[2];
  const int64_t ncol = d.kW * d.Cg;
  // A task takes rows ih = rho + j * sh, j in [j0, j1), of one (b, id): for one kh they read consecutive output
  // rows, so one GEMM covers them all.
  const int64_t nj = (H + d.sh - 1) / d.sh;
  const int64_t planes = d.B * D * d.sh;
  const int64_t want = (4 * at::get_num_threads() + planes - 1) / planes;  // blocks per plane for balance
  const int64_t R = std::max<int64_t>(1, std::min((kRowPositions + d.Wo - 1) / d.Wo, (nj + want - 1) / want));
  const int64_t nblk = (nj + R - 1) / R;
  at::parallel_for(0, planes * nblk, 1, [&](int64_t t0, int64_t t1) {
    Scratch<T> scratch;
    const SerialBlas serial;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t rho = (task / nblk) % d.sh, id = (task / (nblk * d.sh)) % D, b = task / (nblk * d.sh * D);
      const int64_t j0 = (task % nblk) * R, j1 = std::min(j0 + R, (H - rho + d.sh - 1) / d.sh);
      if (j0 >= j1) continue;
      T* plane = gx + (b * D + id) * H * W * d.Cin;
      for (int64_t j = j0; j < j1; ++j) std::fill_n(plane + (rho + j * d.sh) * W * d.Cin, W * d.Cin, T(0));
      for (int64_t kd = 0; kd < d.kD; ++kd) {
        const int64_t zd = id + pd - kd * d.dd;
        if (zd < 0 || zd % d.sd != 0 || zd / d.sd >= d.Do) continue;
        for (int64_t kh = 0; kh < d.kH; ++kh) {
          const int64_t num = rho + ph - kh * d.dh;
          if (((num % d.sh) + d.sh) % d.sh != 0) continue;
          const int64_t base = num / d.sh;  // exact: output row of j = 0
          const int64_t jlo = std::max(j0, -base), jhi = std::min(j1, d.Ho - base);
          if (jlo >= jhi) continue;
          const T* grow = gp + ((b * d.Do + zd / d.sd) * d.Ho + base + jlo) * d.Wo * d.Cout;
          if (direct) {
            for (int64_t j = jlo; j < jhi; ++j)
              direct_grad_input_row(d, grow + (j - jlo) * d.Wo * d.Cout, w, kd, kh, W, pw,
                                    plane + (rho + j * d.sh) * W * d.Cin);
            continue;
          }
          const int64_t n = (jhi - jlo) * d.Wo;
          T* buf = scratch.get(n * ncol);
          for (int64_t gr = 0; gr < d.G; ++gr) {
            at::Tensor rows = mat(buf, n, ncol, ncol);
            at::mm_out(rows, mat(grow + gr * d.Og, n, d.Og, d.Cout),
                       mat(w + ((kd * d.kH + kh) * d.Cout + gr * d.Og) * ncol, d.Og, ncol, ncol));
            for (int64_t j = jlo; j < jhi; ++j) {
              T* dst = plane + (rho + j * d.sh) * W * d.Cin + gr * d.Cg;
              for (int64_t ow = 0; ow < d.Wo; ++ow)
                for (int64_t kw = 0; kw < d.kW; ++kw) {
                  const int64_t iw = ow * d.sw + kw * d.dw - pw;
                  if (iw < 0 || iw >= W) continue;
                  const T* src = buf + ((j - jlo) * d.Wo + ow) * ncol + kw * d.Cg;
                  T* t = dst + iw * d.Cin;
                  for (int64_t c = 0; c < d.Cg; ++c) t[c] += src[c];
                }
            }
          }
        }
      }
    }
  });
  res.finish();
}

// direct: the AVX2 kernel (conv_direct.cpp; gp then readable kDirectTail elements past its end).
template <typename T>
void grad_weight_impl(const ConvGeometry& g, const T* gp, const at::Tensor& input, at::Tensor& grad_weight,
                      bool direct) {
  constexpr auto dtype = c10::CppTypeToScalarType<T>::value;
  const ConvDims d(g);
  const at::Tensor xp_t = padded_input(input, g, dtype);
  const T* xp = xp_t.const_data_ptr<T>();
  // dW as [taps * Cg, Cout] (the forward's weight operand), permuted into grad_weight at the end.
  at::Tensor dw_t = at::empty({d.taps * d.Cg, d.Cout}, input.options().dtype(dtype));
  T* dw = dw_t.mutable_data_ptr<T>();
  const int64_t positions = d.B * d.Do * d.Ho * d.Wo;
  if (direct) {
    direct_conv_grad_weight(d, g, xp, gp, dw);
  } else if (d.thin()) {
    constexpr int64_t kBlock = 64;  // output channels per task
    const int64_t nblk = (d.Cout + kBlock - 1) / kBlock;
    at::parallel_for(0, d.taps * nblk, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t o0 = (task % nblk) * kBlock;
        direct_grad_weight(d, xp, gp, task / nblk, o0, std::min(d.Cout, o0 + kBlock), dw);
      }
    });
  } else {
    // Output channels split in fixed blocks (never by the thread count, which must not change the bits) so that
    // a layer with few taps and groups still has tasks for every thread.
    const int64_t ob = std::min(d.Og, kWeightOutBlock), nob = (d.Og + ob - 1) / ob;
    at::parallel_for(0, d.taps * d.G * nob, 1, [&](int64_t t0, int64_t t1) {
      Scratch<T> scratch;
      const SerialBlas serial;
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t o0 = (task % nob) * ob, gr = (task / nob) % d.G, tap = task / (nob * d.G);
        const int64_t on = std::min(ob, d.Og - o0);
        at::Tensor dst = mat(dw + tap * d.Cg * d.Cout + gr * d.Og + o0, d.Cg, on, d.Cout);
        dst.zero_();
        for (int64_t q0 = 0; q0 < positions; q0 += kWeightTile) {
          const int64_t q1 = std::min(positions, q0 + kWeightTile);
          T* col = scratch.get((q1 - q0) * d.Cg);
          im2col(d, xp, gr, q0, q1, tap, tap + 1, col);
          dst.addmm_(mat(col, q1 - q0, d.Cg, d.Cg).t(), mat(gp + q0 * d.Cout + gr * d.Og + o0, q1 - q0, on, d.Cout));
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

// grad_x of a stride-1 convolution is itself one: the forward of grad, zero-padded by dilation * (kernel - 1) -
// padding, with the weight flipped along every axis and its channel axes swapped (grad_x[q] = sum_t g[q + pad -
// t * dil] W[t]^T). The direct forward kernel then serves the input gradient too. Its sizes, or nothing when the
// convolution has a stride or a padding beyond the dilated kernel.
std::optional<ConvGeometry> transposed_geometry(const ConvGeometry& g) {
  ConvGeometry t = g;
  for (int i = 0; i < 3; ++i) {
    t.padding[i] = g.dilation[i] * (g.kernel[i] - 1) - g.padding[i];
    if (g.stride[i] != 1 || t.padding[i] < 0) return std::nullopt;
  }
  t.in_channels = g.out_channels, t.out_channels = g.in_channels;
  t.in_per_group = g.out_per_group, t.out_per_group = g.in_per_group;
  t.in = g.out, t.out = g.in;
  return t;
}

template <typename T>
void direct_grad_input(const ConvGeometry& t, const at::Tensor& grad, const at::Tensor& weight,
                       at::Tensor& grad_input) {
  constexpr auto dtype = c10::CppTypeToScalarType<T>::value;
  const ConvDims d(t);
  const at::Tensor gp = padded_input(grad, t, dtype);
  // weight [Cout = G * Og, Cg, kD, kH, kW] -> [kD, kH, kW, Og, G * Cg] flipped: the forward's [taps * Cg', Cout']
  const at::Tensor w5 = t.ndim == 2 ? weight.unsqueeze(2) : weight;
  const at::Tensor w_t =
      dense(w5.reshape({t.groups, t.in_per_group, t.out_per_group, t.kernel[0], t.kernel[1], t.kernel[2]})
                .flip({3, 4, 5})
                .permute({3, 4, 5, 1, 0, 2}),
            dtype);
  const WeightView<T> wv{w_t.const_data_ptr<T>(), t.in_per_group * t.out_channels, t.out_channels, 1};
  direct_into(d, t, gp.const_data_ptr<T>(), wv, static_cast<const T*>(nullptr), grad_input, direct_family_kernel<T>(d));
}

template <typename T>
void backward_impl(const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                   at::Tensor* grad_input, at::Tensor* grad_weight, at::Tensor* grad_bias) {
  const std::optional<ConvGeometry> t = transposed_geometry(g);
  if (grad_input != nullptr && t && !ConvDims(*t).thin() && direct_conv_preferred()) {
    direct_grad_input<T>(*t, grad, weight, *grad_input);
    grad_input = nullptr;
  }
  if (grad_input == nullptr && grad_weight == nullptr && grad_bias == nullptr) return;
  constexpr auto dtype = c10::CppTypeToScalarType<T>::value;
  const bool direct_w = grad_weight != nullptr && !ConvDims(g).thin() && direct_conv_preferred();
  at::Tensor g_t;
  if (direct_w) {  // a dense copy readable kDirectTail elements past its end
    const at::Tensor g5 = cl5(grad, g.ndim);
    at::Tensor buf = at::empty({g5.numel() + kDirectTail}, grad.options().dtype(dtype));
    buf.narrow(0, g5.numel(), kDirectTail).zero_();
    g_t = buf.narrow(0, 0, g5.numel()).view(g5.sizes()).copy_(g5);
  } else {
    g_t = dense(cl5(grad, g.ndim), dtype);
  }
  const T* gp = g_t.const_data_ptr<T>();
  if (grad_input != nullptr) grad_input_impl<T>(g, gp, weight, *grad_input);
  if (grad_weight != nullptr) grad_weight_impl<T>(g, gp, input, *grad_weight, direct_w);
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
