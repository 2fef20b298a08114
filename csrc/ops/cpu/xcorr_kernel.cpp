// CPU kernels of the SiamFC cross-correlation family (math: ops/common/xcorr.h, visionops/reference/xcorr.py).
//
// One kernel per direction serves xcorr and depthwise_xcorr, the channel sum a compile-time parameter
// (kSumChannels). Both run in parallel over (image, block of kChannelBlock channels) tasks on channels-last views of
// the block: a channels_last float input is read in place, any other layout or dtype is gathered one block at a time
// into a small buffer (in the op-math type, channels padded with zeros to whole vectors) that stays in L2. The inner
// loops are vectors over channels, kPos output positions at a time sharing each tap's load:
//
//   forward  out[u, v, c] = sum_{i, j} z[i, j, c] * x[u + i, v + j, c]           (xcorr: then summed over c)
//   grad_z   gz[i, j, c]  = sum_{u, v} g[u, v, (c)] * x[u + i, v + j, c]
//   grad_x   gx[y, w, c]  = sum_{i, j} g[y - i, w - j, (c)] * z[i, j, c]          (gather form: z read flipped,
//                                                                                  g zero-padded in w)
//
// xcorr's g is one value per position: its block is that value repeated over one vector's lanes, so it is read
// with the same vector loads as depthwise's per-channel g. Each task owns its outputs and the sums run in a fixed
// order; the partial sums that cross tasks (xcorr's forward over channel blocks, grad_z over images when z has batch
// size 1) go to small buffers reduced afterwards in index order: the bits do not depend on the thread count (they do
// on the vector width, which vec_bytes picks per machine).
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/common/xcorr.h"
#include "ops/common/xcorr_entries.h"

namespace visionops {
namespace {

// Channels per task: a task's x block (Hx * Wx * kChannelBlock values) stays in L2, its z block in L1.
constexpr int64_t kChannelBlock = 32;

#if defined(__GNUC__)
#define VISIONOPS_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define VISIONOPS_ALWAYS_INLINE inline
#endif

// The vectors are kBytes wide: 64 (AVX-512), 32 (AVX2 + FMA) or 16 (the baseline SSE2 / NEON), chosen at run time
// (vec_bytes): the build targets the baseline ISA, and each hot loop is compiled once per width under a target
// attribute (XCORR_ISA below), where the compiler also contracts a * b + c into a fused multiply-add.
// The vector helpers are always inlined into the target-attributed functions below, so the ABI note gcc gives for
// returning a wider vector than the baseline ISA has does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
template <int kBytes, typename T>
struct Simd {
  static constexpr int64_t kLanes = kBytes / sizeof(T);
#if defined(__GNUC__)
  typedef T V __attribute__((vector_size(kBytes)));
  static VISIONOPS_ALWAYS_INLINE V splat(T s) { return V{} + s; }
  static VISIONOPS_ALWAYS_INLINE T sum(const V& v) {
    T s = 0;
    for (int64_t l = 0; l < kLanes; ++l) s += v[l];
    return s;
  }
#else
  struct V {
    T l[kLanes];
    V& operator+=(const V& o) {
      for (int64_t i = 0; i < kLanes; ++i) l[i] += o.l[i];
      return *this;
    }
    V operator*(const V& o) const {
      V r;
      for (int64_t i = 0; i < kLanes; ++i) r.l[i] = l[i] * o.l[i];
      return r;
    }
  };
  static V splat(T s) {
    V v;
    std::fill(v.l, v.l + kLanes, s);
    return v;
  }
  static T sum(V v) {
    T s = 0;
    for (int64_t l = 0; l < kLanes; ++l) s += v.l[l];
    return s;
  }
#endif
  static VISIONOPS_ALWAYS_INLINE V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static VISIONOPS_ALWAYS_INLINE void store(T* p, const V& v) { std::memcpy(p, &v, sizeof v); }
};

// Output positions (or grad_z taps) per register block: kPos accumulators, a tap and an input vector fit the
// registers (32 with AVX-512, 16 otherwise).
template <int kBytes>
constexpr int kPos = kBytes == 64 ? 12 : 8;

int vec_bytes() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const int bytes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                                   __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")
                               ? 64
                           : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 32
                                                                                             : 16;
  return bytes;
#else
  return 16;
#endif
}

// A channels-last view: cell (h, w), channel c at p[h * sh + w * sw + c]. Strides may be negative (flipped z).
template <typename T>
struct Block {
  const T* p;
  int64_t sh, sw;
};

struct Strides4 {
  int64_t n, c, h, w;
};
Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Channels [c0, c0 + cw) of image b of a tensor with any strides into `dst` (cell (h, w) at dst[h * dsh + w * dsw]),
// converted to the op-math type; cw <= kChannelBlock. Channels cw..P of dst are left as they are (zeroed by the
// caller).
template <typename scalar_t, typename T>
void gather(const scalar_t* src, Strides4 s, int64_t b, int64_t c0, int64_t cw, int64_t H, int64_t W, T* dst,
            int64_t dsh, int64_t dsw) {
  const scalar_t* sb = src + b * s.n + c0 * s.c;
  if (s.c == 1) {  // channels-last rows: copy them
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const scalar_t* sp = sb + h * s.h + w * s.w;
        T* dp = dst + h * dsh + w * dsw;
        for (int64_t c = 0; c < cw; ++c) dp[c] = static_cast<T>(sp[c]);
      }
    return;
  }
  // NCHW-like: kCells cells at a time, each channel's run of them read in order into a tile that stays in L1, then
  // the cells' channel rows copied out whole (writing the block cell by cell with its stride was 3x slower).
  constexpr int64_t kCells = 16;
  T tile[kCells * kChannelBlock];
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w0 = 0; w0 < W; w0 += kCells) {
      const int64_t n = std::min(kCells, W - w0);
      for (int64_t c = 0; c < cw; ++c) {
        const scalar_t* sp = sb + c * s.c + h * s.h + w0 * s.w;
        for (int64_t k = 0; k < n; ++k) tile[k * cw + c] = static_cast<T>(sp[k * s.w]);
      }
      for (int64_t k = 0; k < n; ++k) std::copy_n(tile + k * cw, cw, dst + h * dsh + (w0 + k) * dsw);
    }
}

// The inverse: a block (cell (h, w) at src[h * ssh + w * ssw]) into channels [c0, c0 + cw) of image b of `dst`.
template <typename scalar_t, typename T>
void scatter(const T* src, int64_t ssh, int64_t ssw, int64_t H, int64_t W, scalar_t* dst, Strides4 s, int64_t b,
             int64_t c0, int64_t cw) {
  scalar_t* db = dst + b * s.n + c0 * s.c;
  if (s.c == 1) {
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const T* sp = src + h * ssh + w * ssw;
        scalar_t* dp = db + h * s.h + w * s.w;
        for (int64_t c = 0; c < cw; ++c) dp[c] = static_cast<scalar_t>(sp[c]);
      }
    return;
  }
  for (int64_t c = 0; c < cw; ++c)
    for (int64_t h = 0; h < H; ++h) {
      const T* sp = src + h * ssh + c;
      scalar_t* dp = db + c * s.c + h * s.h;
      for (int64_t w = 0; w < W; ++w) dp[w * s.w] = static_cast<scalar_t>(sp[w * ssw]);
    }
}

// A block of channels [c0, c0 + cw) of image b as a channels-last view of P channels: in place when the tensor is
// channels-last in the op-math type and cw is whole vectors, else gathered into buf (P = cw rounded up to whole
// vectors, the padding zero).
template <typename scalar_t, typename T>
Block<T> block_of(const scalar_t* src, Strides4 s, int64_t b, int64_t c0, int64_t cw, int64_t P, int64_t H, int64_t W,
                  std::vector<T>& buf) {
  if (std::is_same_v<scalar_t, T> && s.c == 1 && cw == P)
    return {reinterpret_cast<const T*>(src) + b * s.n + c0, s.h, s.w};
  buf.resize(H * W * P);
  if (cw < P) std::fill(buf.begin(), buf.end(), T(0));
  gather(src, s, b, c0, cw, H, W, buf.data(), W * P, P);
  return {buf.data(), W * P, P};
}

// Output positions [v0, v0 + R) of one row: out[v, c] = sum_{i in [i0, i1), j < Kw} a(i, j, c) * b(r0 + i, v + j, c)
// over the P channels (kSumOut: out[v] = the sum over c as well). kScalarB: b is one value per cell, repeated over
// a vector's lanes (xcorr's g), so its reads do not advance with c.
template <int kBytes, bool kSumOut, bool kScalarB, int R, typename T>
VISIONOPS_ALWAYS_INLINE void correlate_cols(Block<T> a, Block<T> b, int64_t r0, int64_t i0, int64_t i1, int64_t Kw,
                                            int64_t P, int64_t v0, T* out) {
  using S = Simd<kBytes, T>;
  using V = typename S::V;
  V acc[R];
  if constexpr (kSumOut)
    for (int r = 0; r < R; ++r) acc[r] = S::splat(T(0));
  for (int64_t c = 0; c < P; c += S::kLanes) {
    if constexpr (!kSumOut)
      for (int r = 0; r < R; ++r) acc[r] = S::splat(T(0));
    for (int64_t i = i0; i < i1; ++i) {
      const T* ar = a.p + i * a.sh + c;
      const T* br = b.p + (r0 + i) * b.sh + v0 * b.sw + (kScalarB ? 0 : c);
      for (int64_t j = 0; j < Kw; ++j) {
        const V av = S::load(ar + j * a.sw);
        for (int r = 0; r < R; ++r) acc[r] += av * S::load(br + (r + j) * b.sw);
      }
    }
    if constexpr (!kSumOut)
      for (int r = 0; r < R; ++r) S::store(out + (v0 + r) * P + c, acc[r]);
  }
  if constexpr (kSumOut)
    for (int r = 0; r < R; ++r) out[v0 + r] = S::sum(acc[r]);
}

// The last n < kPos positions of a row, as one block of n.
template <int kBytes, bool kSumOut, bool kScalarB, int R, typename T>
VISIONOPS_ALWAYS_INLINE void correlate_tail(int64_t n, Block<T> a, Block<T> b, int64_t r0, int64_t i0, int64_t i1,
                                            int64_t Kw, int64_t P, int64_t v0, T* out) {
  if constexpr (R > 1)
    if (n < R) return correlate_tail<kBytes, kSumOut, kScalarB, R - 1>(n, a, b, r0, i0, i1, Kw, P, v0, out);
  correlate_cols<kBytes, kSumOut, kScalarB, R>(a, b, r0, i0, i1, Kw, P, v0, out);
}

// out rows y < Hout of Wout positions (P channels each, or one value with kSumOut): row y sums a's rows i against
// b's rows y + i (forward: every i < Kh) or, for a gather gradient (Og > 0: the gradient's height), a flipped
// z against g: a's rows i in Kh - xcorr_taps(y) against b's rows y - (Kh - 1) + i.
template <int kBytes, bool kSumOut, bool kScalarB, typename T>
VISIONOPS_ALWAYS_INLINE void correlate_block(Block<T> a, Block<T> b, int64_t Kh, int64_t Kw, int64_t Og, int64_t Hout,
                                             int64_t Wout, int64_t P, T* out) {
  constexpr int R = kPos<kBytes>;
  for (int64_t y = 0; y < Hout; ++y) {
    int64_t i0 = 0, i1 = Kh, r0 = y;
    if (Og > 0) {
      int64_t lo, hi;
      xcorr_taps(y, Kh, Og, lo, hi);
      i0 = Kh - hi, i1 = Kh - lo, r0 = y - (Kh - 1);
    }
    T* o = out + y * Wout * (kSumOut ? 1 : P);
    int64_t v = 0;
    for (; v + R <= Wout; v += R) correlate_cols<kBytes, kSumOut, kScalarB, R>(a, b, r0, i0, i1, Kw, P, v, o);
    if (v < Wout) correlate_tail<kBytes, kSumOut, kScalarB, R - 1>(Wout - v, a, b, r0, i0, i1, Kw, P, v, o);
  }
}

// Taps [j0, j0 + R) of z row i: gz[i, j, c] = sum_{u < Ho, v < Wo} g(u, v, c) * x(u + i, v + j, c).
template <int kBytes, bool kScalarG, int R, typename T>
VISIONOPS_ALWAYS_INLINE void grad_z_cols(Block<T> g, Block<T> x, int64_t Ho, int64_t Wo, int64_t P, int64_t i,
                                         int64_t j0, T* out) {
  using S = Simd<kBytes, T>;
  using V = typename S::V;
  for (int64_t c = 0; c < P; c += S::kLanes) {
    V acc[R];
    for (int r = 0; r < R; ++r) acc[r] = S::splat(T(0));
    for (int64_t u = 0; u < Ho; ++u) {
      const T* gr = g.p + u * g.sh + (kScalarG ? 0 : c);
      const T* xr = x.p + (u + i) * x.sh + j0 * x.sw + c;
      for (int64_t v = 0; v < Wo; ++v) {
        const V gv = S::load(gr + v * g.sw);
        for (int r = 0; r < R; ++r) acc[r] += gv * S::load(xr + (v + r) * x.sw);
      }
    }
    for (int r = 0; r < R; ++r) S::store(out + (j0 + r) * P + c, acc[r]);
  }
}

template <int kBytes, bool kScalarG, int R, typename T>
VISIONOPS_ALWAYS_INLINE void grad_z_tail(int64_t n, Block<T> g, Block<T> x, int64_t Ho, int64_t Wo, int64_t P,
                                         int64_t i, int64_t j0, T* out) {
  if constexpr (R > 1)
    if (n < R) return grad_z_tail<kBytes, kScalarG, R - 1>(n, g, x, Ho, Wo, P, i, j0, out);
  grad_z_cols<kBytes, kScalarG, R>(g, x, Ho, Wo, P, i, j0, out);
}

// gz[i, j, c] for the Hz x Wz taps (P channels each).
template <int kBytes, bool kScalarG, typename T>
VISIONOPS_ALWAYS_INLINE void grad_z_block(Block<T> g, Block<T> x, int64_t Ho, int64_t Wo, int64_t Hz, int64_t Wz,
                                          int64_t P, T* out) {
  constexpr int R = kPos<kBytes>;
  for (int64_t i = 0; i < Hz; ++i) {
    T* o = out + i * Wz * P;
    int64_t j = 0;
    for (; j + R <= Wz; j += R) grad_z_cols<kBytes, kScalarG, R>(g, x, Ho, Wo, P, i, j, o);
    if (j < Wz) grad_z_tail<kBytes, kScalarG, R - 1>(Wz - j, g, x, Ho, Wo, P, i, j, o);
  }
}

// depthwise forward of one NCHW plane whose rows are contiguous, vectors over output columns (no conversion to
// channels-last): out[u, v] = sum_{i < Hz, j < Wz} z[i, j] * x[u + i, v + j]. A row's last partial vector is
// computed as the full vector ending at Wo - 1 (overlapping the one before, same values), or in scalars when the row
// is narrower than a vector.
template <int kBytes, typename T>
VISIONOPS_ALWAYS_INLINE void plane_row_block(const T* z, int64_t szh, int64_t szw, const T* xr, int64_t sxh, int64_t Hz,
                                             int64_t Wz, int64_t v, T* o) {
  using S = Simd<kBytes, T>;
  constexpr int64_t L = S::kLanes;
  typename S::V a0 = S::splat(0), a1 = S::splat(0);
  for (int64_t i = 0; i < Hz; ++i) {
    const T* x = xr + i * sxh + v;
    for (int64_t j = 0; j < Wz; ++j) {
      const typename S::V w = S::splat(z[i * szh + j * szw]);
      a0 += w * S::load(x + j);
      a1 += w * S::load(x + j + L);
    }
  }
  S::store(o + v, a0);
  S::store(o + v + L, a1);
}

template <int kBytes, typename T>
VISIONOPS_ALWAYS_INLINE void plane_vector(const T* z, int64_t szh, int64_t szw, const T* xr, int64_t sxh, int64_t Hz,
                                          int64_t Wz, int64_t v, T* o) {
  using S = Simd<kBytes, T>;
  typename S::V a = S::splat(0);
  for (int64_t i = 0; i < Hz; ++i)
    for (int64_t j = 0; j < Wz; ++j) a += S::splat(z[i * szh + j * szw]) * S::load(xr + i * sxh + v + j);
  S::store(o + v, a);
}

template <int kBytes, typename T>
VISIONOPS_ALWAYS_INLINE void plane_block(const T* z, int64_t szh, int64_t szw, const T* x, int64_t sxh, int64_t Hz,
                                         int64_t Wz, int64_t Ho, int64_t Wo, T* out, int64_t soh) {
  constexpr int64_t L = Simd<kBytes, T>::kLanes;
  for (int64_t u = 0; u < Ho; ++u) {
    const T* xr = x + u * sxh;
    T* o = out + u * soh;
    int64_t v = 0;
    for (; v + 2 * L <= Wo; v += 2 * L) plane_row_block<kBytes>(z, szh, szw, xr, sxh, Hz, Wz, v, o);
    for (; v + L <= Wo; v += L) plane_vector<kBytes>(z, szh, szw, xr, sxh, Hz, Wz, v, o);
    if (v < Wo && Wo >= L) {
      plane_vector<kBytes>(z, szh, szw, xr, sxh, Hz, Wz, Wo - L, o);
    } else {
      for (; v < Wo; ++v) {
        T a = 0;
        for (int64_t i = 0; i < Hz; ++i)
          for (int64_t j = 0; j < Wz; ++j) a += z[i * szh + j * szw] * xr[i * sxh + v + j];
        o[v] = a;
      }
    }
  }
}

// correlate_block and grad_z_block compiled for each vector width: XCORR_ISA(suffix, bytes, target) defines
// correlate_<suffix> and grad_z_<suffix>; correlate() and grad_z() pick one by vec_bytes().
#define XCORR_ISA(suffix, bytes, target)                                                                            \
  template <bool kSumOut, bool kScalarB, typename T>                                                                \
  target void correlate_##suffix(Block<T> a, Block<T> b, int64_t Kh, int64_t Kw, int64_t Og, int64_t Hout,          \
                                 int64_t Wout, int64_t P, T* out) {                                                 \
    correlate_block<bytes, kSumOut, kScalarB>(a, b, Kh, Kw, Og, Hout, Wout, P, out);                                \
  }                                                                                                                 \
  template <bool kScalarG, typename T>                                                                              \
  target void grad_z_##suffix(Block<T> g, Block<T> x, int64_t Ho, int64_t Wo, int64_t Hz, int64_t Wz, int64_t P,    \
                              T* out) {                                                                             \
    grad_z_block<bytes, kScalarG>(g, x, Ho, Wo, Hz, Wz, P, out);                                                    \
  }                                                                                                                 \
  template <typename T>                                                                                             \
  target void plane_##suffix(const T* z, int64_t szh, int64_t szw, const T* x, int64_t sxh, int64_t Hz, int64_t Wz, \
                             int64_t Ho, int64_t Wo, T* out, int64_t soh) {                                         \
    plane_block<bytes>(z, szh, szw, x, sxh, Hz, Wz, Ho, Wo, out, soh);                                              \
  }

#define XCORR_NO_TARGET
XCORR_ISA(base, 16, XCORR_NO_TARGET)
#if defined(__GNUC__) && defined(__x86_64__)
#define XCORR_ISAS 1
XCORR_ISA(avx2, 32, __attribute__((target("avx2,fma"))))
XCORR_ISA(avx512, 64, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))))
#endif

template <bool kSumOut, bool kScalarB, typename T>
void correlate(int bytes, Block<T> a, Block<T> b, int64_t Kh, int64_t Kw, int64_t Og, int64_t Hout, int64_t Wout,
               int64_t P, T* out) {
#if defined(XCORR_ISAS)
  if (bytes == 64) return correlate_avx512<kSumOut, kScalarB>(a, b, Kh, Kw, Og, Hout, Wout, P, out);
  if (bytes == 32) return correlate_avx2<kSumOut, kScalarB>(a, b, Kh, Kw, Og, Hout, Wout, P, out);
#endif
  correlate_base<kSumOut, kScalarB>(a, b, Kh, Kw, Og, Hout, Wout, P, out);
}

template <bool kScalarG, typename T>
void grad_z(int bytes, Block<T> g, Block<T> x, int64_t Ho, int64_t Wo, int64_t Hz, int64_t Wz, int64_t P, T* out) {
#if defined(XCORR_ISAS)
  if (bytes == 64) return grad_z_avx512<kScalarG>(g, x, Ho, Wo, Hz, Wz, P, out);
  if (bytes == 32) return grad_z_avx2<kScalarG>(g, x, Ho, Wo, Hz, Wz, P, out);
#endif
  grad_z_base<kScalarG>(g, x, Ho, Wo, Hz, Wz, P, out);
}

template <typename T>
void plane(int bytes, const T* z, int64_t szh, int64_t szw, const T* x, int64_t sxh, int64_t Hz, int64_t Wz, int64_t Ho,
           int64_t Wo, T* out, int64_t soh) {
#if defined(XCORR_ISAS)
  if (bytes == 64) return plane_avx512(z, szh, szw, x, sxh, Hz, Wz, Ho, Wo, out, soh);
  if (bytes == 32) return plane_avx2(z, szh, szw, x, sxh, Hz, Wz, Ho, Wo, out, soh);
#endif
  plane_base(z, szh, szw, x, sxh, Hz, Wz, Ho, Wo, out, soh);
}

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// out: xcorr's [B, 1, Ho, Wo] (contiguous; times out_scale) or depthwise's [B, C, Ho, Wo].
template <bool kSumChannels, typename scalar_t>
void xcorr_forward_kernel_impl(const at::Tensor& z, const at::Tensor& x, double out_scale, at::Tensor& out) {
  using T = at::opmath_type<scalar_t>;
  const int bytes = vec_bytes();
  const int64_t L = bytes / sizeof(T);
  const int64_t Bz = z.size(0), B = x.size(0), C = x.size(1), Hz = z.size(2), Wz = z.size(3);
  const int64_t Hx = x.size(2), Wx = x.size(3), Ho = out.size(2), Wo = out.size(3);
  const int64_t nblk = (C + kChannelBlock - 1) / kChannelBlock;
  const Strides4 sz = strides_of(z), sx = strides_of(x), so = strides_of(out);
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  if constexpr (!kSumChannels && std::is_same_v<T, scalar_t>) {
    // NCHW-like x and output (rows contiguous, channels not innermost): one plane per task, vectors over columns.
    if (sx.w == 1 && so.w == 1 && sx.c != 1 && so.c != 1) {
      at::parallel_for(0, B * C, 16, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = t / C, c = t % C;
          plane(bytes, zp + (Bz == 1 ? 0 : b) * sz.n + c * sz.c, sz.h, sz.w, xp + b * sx.n + c * sx.c, sx.h, Hz, Wz, Ho,
                Wo, op + b * so.n + c * so.c, so.h);
        }
      });
      return;
    }
  }
  // xcorr: each task's sum over its channels, [B, nblk, Ho, Wo], summed over blocks in order below.
  std::vector<T> partial(kSumChannels ? B * nblk * Ho * Wo : 0);
  at::parallel_for(0, B * nblk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> zbuf, xbuf, obuf;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / nblk, blk = task % nblk, c0 = blk * kChannelBlock;
      const int64_t cw = std::min(kChannelBlock, C - c0), P = round_up(cw, L);
      const Block<T> zb = block_of(zp, sz, Bz == 1 ? 0 : b, c0, cw, P, Hz, Wz, zbuf);
      const Block<T> xb = block_of(xp, sx, b, c0, cw, P, Hx, Wx, xbuf);
      if constexpr (kSumChannels) {
        correlate<true, false>(bytes, zb, xb, Hz, Wz, 0, Ho, Wo, P, partial.data() + task * Ho * Wo);
      } else {
        obuf.resize(Ho * Wo * P);
        correlate<false, false>(bytes, zb, xb, Hz, Wz, 0, Ho, Wo, P, obuf.data());
        scatter(obuf.data(), Wo * P, P, Ho, Wo, op, so, b, c0, cw);
      }
    }
  });
  if constexpr (kSumChannels) {
    const T s = static_cast<T>(out_scale);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t p = 0; p < Ho * Wo; ++p) {
          T acc = 0;
          for (int64_t blk = 0; blk < nblk; ++blk) acc += partial[(b * nblk + blk) * Ho * Wo + p];
          op[b * Ho * Wo + p] = static_cast<scalar_t>(s * acc);
        }
    });
  }
}

template <bool kSumChannels, typename scalar_t>
void xcorr_backward_kernel_impl(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& x, double out_scale,
                                at::Tensor& gz, at::Tensor& gx) {
  using T = at::opmath_type<scalar_t>;
  const int bytes = vec_bytes();
  const int64_t L = bytes / sizeof(T);
  const int64_t Bz = z.size(0), B = x.size(0), C = x.size(1), Hz = z.size(2), Wz = z.size(3);
  const int64_t Hx = x.size(2), Wx = x.size(3), Ho = grad.size(2), Wo = grad.size(3);
  const int64_t nblk = (C + kChannelBlock - 1) / kChannelBlock;
  const int64_t Wp = Wo + 2 * (Wz - 1);  // g's block is zero-padded by Wz - 1 columns on each side for grad_x
  const Strides4 sg = strides_of(grad), sz = strides_of(z), sx = strides_of(x);
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  // Each image's grad_z, [B, Hz, Wz, C]: summed over the images of each z in order below.
  std::vector<T> gz_part(B * Hz * Wz * C);
  const T s = static_cast<T>(out_scale);
  at::parallel_for(0, B * nblk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> zbuf, xbuf, gbuf, gzbuf, gxbuf;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / nblk, c0 = (task % nblk) * kChannelBlock;
      const int64_t cw = std::min(kChannelBlock, C - c0), P = round_up(cw, L);
      const Block<T> zb = block_of(zp, sz, Bz == 1 ? 0 : b, c0, cw, P, Hz, Wz, zbuf);
      const Block<T> xb = block_of(xp, sx, b, c0, cw, P, Hx, Wx, xbuf);
      // g's block, padded: xcorr's g (times out_scale) repeated over one vector's lanes, depthwise's per channel.
      const int64_t gw = kSumChannels ? L : P;
      gbuf.assign(Ho * Wp * gw, T(0));
      if constexpr (kSumChannels) {
        const scalar_t* g0 = gp + b * sg.n;
        for (int64_t u = 0; u < Ho; ++u)
          for (int64_t v = 0; v < Wo; ++v)
            std::fill_n(gbuf.data() + (u * Wp + v + Wz - 1) * L, L, s * static_cast<T>(g0[u * sg.h + v * sg.w]));
      } else {
        gather(gp, sg, b, c0, cw, Ho, Wo, gbuf.data() + (Wz - 1) * P, Wp * P, P);
      }
      const Block<T> gpad = {gbuf.data(), Wp * gw, gw};
      const Block<T> gb = {gbuf.data() + (Wz - 1) * gw, Wp * gw, gw};

      gzbuf.resize(Hz * Wz * P);
      grad_z<kSumChannels>(bytes, gb, xb, Ho, Wo, Hz, Wz, P, gzbuf.data());
      T* part = gz_part.data() + b * Hz * Wz * C + c0;
      for (int64_t k = 0; k < Hz * Wz; ++k) std::copy_n(gzbuf.data() + k * P, cw, part + k * C);

      // grad_x row y: taps i in xcorr_taps(y), i.e. z flipped (zf) rows Hz - 1 - i against g rows y - i.
      const Block<T> zf = {zb.p + (Hz - 1) * zb.sh + (Wz - 1) * zb.sw, -zb.sh, -zb.sw};
      gxbuf.resize(Hx * Wx * P);
      correlate<false, kSumChannels>(bytes, zf, gpad, Hz, Wz, Ho, Hx, Wx, P, gxbuf.data());
      scatter(gxbuf.data(), Wx * P, P, Hx, Wx, gx.mutable_data_ptr<scalar_t>(), strides_of(gx), b, c0, cw);
    }
  });
  // grad_z[b'] = the sum of its images' parts in index order (one image each when Bz == B).
  const Strides4 so = strides_of(gz);
  scalar_t* op = gz.mutable_data_ptr<scalar_t>();
  const int64_t per = Bz == 1 ? B : 1;
  at::parallel_for(0, Bz * Hz * Wz, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t bz = k / (Hz * Wz), i = (k / Wz) % Hz, j = k % Wz;
      scalar_t* dst = op + bz * so.n + i * so.h + j * so.w;
      for (int64_t c = 0; c < C; ++c) {
        T acc = 0;
        for (int64_t b = bz * per; b < (bz + 1) * per; ++b) acc += gz_part[(b * Hz * Wz + i * Wz + j) * C + c];
        dst[c * so.c] = static_cast<scalar_t>(acc);
      }
    }
  });
}

// The kernels behind the four entries of ops/common/xcorr_entries.h, which check the arguments and allocate the
// outputs.
struct CpuXCorr {
  template <bool kSumChannels>
  static void forward(const char*, const at::Tensor& z, const at::Tensor& x, double out_scale, at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "xcorr_forward_cpu",
                                    [&] { xcorr_forward_kernel_impl<kSumChannels, scalar_t>(z, x, out_scale, out); });
  }

  template <bool kSumChannels>
  static void backward(const char*, const at::Tensor& grad, const at::Tensor& z, const at::Tensor& x, double out_scale,
                       at::Tensor& gz, at::Tensor& gx) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "xcorr_backward_cpu", [&] {
      xcorr_backward_kernel_impl<kSumChannels, scalar_t>(grad, z, x, out_scale, gz, gx);
    });
  }
};

using Entries = XCorrEntries<CpuXCorr>;

}  // namespace

TORCH_LIBRARY_IMPL(visionops, CPU, m) {
  m.impl("xcorr", TORCH_FN(Entries::xcorr));
  m.impl("_xcorr_backward", TORCH_FN(Entries::xcorr_backward));
  m.impl("depthwise_xcorr", TORCH_FN(Entries::depthwise_xcorr));
  m.impl("_depthwise_xcorr_backward", TORCH_FN(Entries::depthwise_xcorr_backward));
}

}  // namespace visionops
