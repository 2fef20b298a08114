// The CPU forward as a register-blocked direct convolution, for x86 CPUs with AVX2 and FMA (ops/cpu/conv_cpu.h).
//
// One micro-kernel call computes a tile of up to kTile output positions of one row by 2 vectors of output channels
// (16 floats or 8 doubles): 12 accumulators that stay in registers over every tap and input channel of the group,
// K = taps * Cg multiply-adds deep. Per input channel it loads the two weight vectors and broadcasts the tile's
// input values (the padded channels-last input: position i at x + i * sw * Cin), so no im2col is built and the sum
// never leaves the registers until the end. The weight is packed once per call as [group, block of 2 vectors, tap,
// Cg, 2 vectors] (zero-filled past Og) so that the kernel reads it in order.
//
// A task is one output row (b, od, oh); it runs each block of output channels over all the row's tiles, so that the
// block's weight (taps * Cg * 2 vectors) stays in the core's L2 between tiles. Taps whose input lies wholly in the
// zero padding for a tile (ASPP's large rates near the borders) are left out of its sum. Each output is summed by
// one task in a fixed order (bias, then taps in order, channels in order): the bits do not depend on the threads.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>

#include "ops/cpu/conv_cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VISIONOPS_DIRECT_CONV 1
#include <immintrin.h>
#define VISIONOPS_AVX2 __attribute__((target("avx2,fma")))
#else
#define VISIONOPS_DIRECT_CONV 0
#endif

namespace visionops {

bool direct_conv_available() {
#if VISIONOPS_DIRECT_CONV
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

namespace {
// VISIONOPS_CONV_CPU: "direct" or "blas" (only those kernels), or unset / anything else (the default choice).
const char* conv_cpu_env() {
  const char* env = std::getenv("VISIONOPS_CONV_CPU");
  return env != nullptr && (std::strcmp(env, "direct") == 0 || std::strcmp(env, "blas") == 0) ? env : nullptr;
}
}  // namespace

bool winograd_preferred() { return conv_cpu_env() == nullptr; }

bool direct_conv_preferred() {
  if (!direct_conv_available()) return false;
  if (const char* env = conv_cpu_env()) return std::strcmp(env, "direct") == 0;
#if VISIONOPS_DIRECT_CONV
  static const bool wide = __builtin_cpu_supports("avx512f");
  return !wide;
#else
  return false;
#endif
}

#if VISIONOPS_DIRECT_CONV
namespace {

// Output positions per micro-kernel call: 6 x 2 accumulators, 2 weight vectors and a broadcast fill 15 of the 16
// vector registers.
constexpr int64_t kTile = 6;
constexpr int kVecs = 2;  // vectors of output channels per tile (4 x 3 ran slower on Zen 1)
// The most bytes of packed weight one pass over a row's tiles reads: the rest of the core's L2 holds the input rows.
constexpr int64_t kChunkBytes = 160 << 10;
// Positions (whole output rows) per block of grad_w's sum: their grad rows stay in L1 across a task's row tiles.
constexpr int64_t kBlockPositions = 256;

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using V = __m256;
  static constexpr int kLanes = 8;
  VISIONOPS_AVX2 static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  VISIONOPS_AVX2 static inline V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  VISIONOPS_AVX2 static inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  VISIONOPS_AVX2 static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
};
template <>
struct Vec<double> {
  using V = __m256d;
  static constexpr int kLanes = 4;
  VISIONOPS_AVX2 static inline V load(const double* p) { return _mm256_loadu_pd(p); }
  VISIONOPS_AVX2 static inline V bcast(const double* p) { return _mm256_broadcast_sd(p); }
  VISIONOPS_AVX2 static inline V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  VISIONOPS_AVX2 static inline void store(double* p, V v) { _mm256_storeu_pd(p, v); }
};

// One micro-kernel call: an M x 2L block of out,
//   out[i, j] = init[j] + sum over segments s < n, k < K of x[xoff[s] + roff[i] + k * xk] * w[woff[s] + k * wk + j]
// (starting from what out holds when init is null), of which the first ncols columns are stored (row i at
// out + i * ldo). The forward's rows are output positions, its segments taps and k the input channels; grad_w's rows
// are (tap, input channel) pairs, its segments output rows and k the positions along them.
template <typename T>
struct TileArgs {
  const T* x;
  const int64_t* roff;
  int64_t xk;
  const T* w;
  int64_t wk;
  const int64_t* xoff;
  const int64_t* woff;
  int64_t n, K;
  const int64_t* klen;  // per segment K instead, when not null
  const T* init;
  T* out;
  int64_t ldo, ncols;
  int64_t cs;  // out's column stride: 1, or a channels-first output's plane size (columns scattered from a buffer)
};

template <typename T, int M>
VISIONOPS_AVX2 void tile(const TileArgs<T>& a) {
  using W = Vec<T>;
  constexpr int L = W::kLanes, NV = kVecs;
  typename W::V acc[M][NV];
  alignas(32) T buf[M][NV * L];
  // (every loop over i and v unrolled, so that acc lives in registers)
  if (a.init != nullptr) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const typename W::V b = W::load(a.init + v * L);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) acc[i][v] = b;
    }
  } else {
    const bool whole = a.ncols == NV * L && a.cs == 1;
    if (!whole)
      for (int i = 0; i < M; ++i) {
        for (int64_t j = 0; j < a.ncols; ++j) buf[i][j] = a.out[i * a.ldo + j * a.cs];
        std::fill(buf[i] + a.ncols, buf[i] + NV * L, T(0));
      }
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] = W::load((whole ? a.out + i * a.ldo : buf[i]) + v * L);
  }
  int64_t roff[M];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) roff[i] = a.roff[i];
  for (int64_t s = 0; s < a.n; ++s) {
    const T* xs = a.x + a.xoff[s];
    const T* ws = a.w + a.woff[s];
    const int64_t K = a.klen != nullptr ? a.klen[s] : a.K;
    for (int64_t k = 0; k < K; ++k, xs += a.xk, ws += a.wk) {
      typename W::V w[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) w[v] = W::load(ws + v * L);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
        const typename W::V xb = W::bcast(xs + roff[i]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[i][v] = W::fma(xb, w[v], acc[i][v]);
      }
    }
  }
  const bool whole = a.ncols == NV * L && a.cs == 1;
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) W::store((whole ? a.out + i * a.ldo : buf[i]) + v * L, acc[i][v]);
  if (!whole)
    for (int64_t j = 0; j < a.ncols; ++j)
      for (int i = 0; i < M; ++i) a.out[i * a.ldo + j * a.cs] = buf[i][j];
}

template <typename T, size_t... I>
void run_tile_(int64_t m, const TileArgs<T>& a, std::index_sequence<I...>) {
  static constexpr void (*fns[])(const TileArgs<T>&) = {tile<T, static_cast<int>(I) + 1>...};
  fns[m - 1](a);
}

template <typename T>
void run_tile(int64_t m, const TileArgs<T>& a) {
  run_tile_(m, a, std::make_index_sequence<kTile>());
}

}  // namespace

template <typename T>
void direct_conv_forward(const ConvDims& d, const ConvGeometry& g, const T* xp, const WeightView<T>& w, const T* bias,
                         T* o, bool channels_first) {
  const int64_t rows = d.Do * d.Ho, plane = rows * d.Wo;  // one image's output rows and positions
  constexpr int64_t N = kVecs * Vec<T>::kLanes;           // output channels per block
  const int64_t D = g.in[0], H = g.in[1], W = g.in[2], pd = g.padding[0], ph = g.padding[1], pw = g.padding[2];
  const int64_t nob = (d.Og + N - 1) / N, block = d.taps * d.Cg * N;
  // The packed weight [G, nob, taps, Cg, N] and bias [G, nob, N], zero past Og.
  std::vector<T> wpk(d.G * nob * block), bpk(d.G * nob * N, T(0));
  at::parallel_for(0, d.G * nob, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t o0 = (k / nob) * d.Og + (k % nob) * N, n = std::min(N, (k / nob + 1) * d.Og - o0);
      T* dst = wpk.data() + k * block;
      for (int64_t r = 0; r < d.taps * d.Cg; ++r, dst += N) {
        for (int64_t j = 0; j < n; ++j) dst[j] = w(r / d.Cg, r % d.Cg, o0 + j);
        std::fill(dst + n, dst + N, T(0));
      }
      if (bias != nullptr) std::copy_n(bias + o0, n, bpk.data() + k * N);
    }
  });
  // Tiles of a row: as even as kTile allows (a 14-wide row is 5 + 5 + 4, not 6 + 6 + 2). Taps in chunks whose
  // weight block fits in L2 beside the input rows (C3D's conv4a: 27 taps x 256 channels x 16 floats is 442 KiB):
  // the first chunk starts from the bias, the others add to the output.
  const int64_t ntiles = (d.Wo + kTile - 1) / kTile, width = (d.Wo + ntiles - 1) / ntiles;
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / static_cast<int64_t>(d.Cg * N * sizeof(T)));
  const int64_t nchunks = (d.taps + chunk - 1) / chunk;
  int64_t roff[kTile];  // a tile's positions along the row
  for (int i = 0; i < kTile; ++i) roff[i] = i * d.sw * d.Cin;
  at::parallel_for(0, d.B * d.Do * d.Ho, 1, [&](int64_t r0, int64_t r1) {
    // per tile: its taps that read some of the image (input and weight offsets), and where each chunk's begin
    std::vector<int64_t> xoff(ntiles * d.taps), woff(ntiles * d.taps), klen(ntiles * d.taps);
    std::vector<int64_t> begin(ntiles * (nchunks + 1));
    // The lists depend on the row only through which (kd, kh) read inside the image: rebuilt when that changes
    std::array<int64_t, 4> listed{-1, -1, -1, -1};
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t oh = r % d.Ho, od = (r / d.Ho) % d.Do, b = r / (d.Ho * d.Do);
      std::array<int64_t, 4> inside{d.kD, 0, d.kH, 0};  // [kd_lo, kd_hi), [kh_lo, kh_hi)
      for (int64_t kd = 0; kd < d.kD; ++kd)
        if (od * d.sd + kd * d.dd >= pd && od * d.sd + kd * d.dd < pd + D)
          inside[0] = std::min(inside[0], kd), inside[1] = kd + 1;
      for (int64_t kh = 0; kh < d.kH; ++kh)
        if (oh * d.sh + kh * d.dh >= ph && oh * d.sh + kh * d.dh < ph + H)
          inside[2] = std::min(inside[2], kh), inside[3] = kh + 1;
      for (int64_t tl = 0; tl < ntiles && inside != listed; ++tl) {
        const int64_t ow0 = tl * width, m = std::min(width, d.Wo - ow0);
        int64_t n = 0;
        for (int64_t t = 0; t < d.taps; ++t) {
          if (t % chunk == 0) begin[tl * (nchunks + 1) + t / chunk] = n;
          const int64_t kw = t % d.kW, kh = (t / d.kW) % d.kH, kd = t / (d.kW * d.kH);
          const int64_t first = ow0 * d.sw + kw * d.dw, last = (ow0 + m - 1) * d.sw + kw * d.dw;
          if (kd < inside[0] || kd >= inside[1] || kh < inside[2] || kh >= inside[3] || last < pw || first >= pw + W)
            continue;
          const int64_t xo = d.x_offset(0, 0, 0, 0, kd, kh, kw), wo = t * d.Cg * N, prev = tl * d.taps + n - 1;
          // a tap whose input channels follow the previous tap's in memory, as its weight rows do (unit dilation
          // along W and one group: an RGB first layer's 3 kW taps are 9 values in a row), extends its segment
          if (n > begin[tl * (nchunks + 1) + t / chunk] && xoff[prev] + klen[prev] == xo &&
              woff[prev] + klen[prev] * N == wo) {
            klen[prev] += d.Cg;
            continue;
          }
          xoff[prev + 1] = xo, woff[prev + 1] = wo, klen[prev + 1] = d.Cg;
          ++n;
        }
        begin[tl * (nchunks + 1) + nchunks] = n;
      }
      listed = inside;
      for (int64_t k = 0; k < d.G * nob; ++k) {
        const int64_t gr = k / nob, o0 = gr * d.Og + (k % nob) * N, ncols = std::min(N, (gr + 1) * d.Og - o0);
        for (int64_t ch = 0; ch < nchunks; ++ch)
          for (int64_t tl = 0; tl < ntiles; ++tl) {
            const int64_t ow0 = tl * width, m = std::min(width, d.Wo - ow0);
            const int64_t i0 = begin[tl * (nchunks + 1) + ch], i1 = begin[tl * (nchunks + 1) + ch + 1];
            if (ch > 0 && i0 == i1) continue;
            run_tile(
                m, TileArgs<T>{xp + d.x_offset(b, od, oh, ow0, 0, 0, 0) + gr * d.Cg, roff, 1, wpk.data() + k * block, N,
                               xoff.data() + tl * d.taps + i0, woff.data() + tl * d.taps + i0, i1 - i0, d.Cg,
                               klen.data() + tl * d.taps + i0, ch == 0 ? bpk.data() + k * N : nullptr,
                               channels_first ? o + (b * d.Cout + o0) * plane + (r % rows) * d.Wo + ow0
                                              : o + (r * d.Wo + ow0) * d.Cout + o0,
                               channels_first ? 1 : d.Cout, ncols, channels_first ? plane : 1});
          }
      }
    }
  });
}

template <typename T>
void direct_conv_grad_weight(const ConvDims& d, const ConvGeometry& g, const T* xp, const T* gp, T* dw) {
  constexpr int64_t N = kVecs * Vec<T>::kLanes;
  const int64_t D = g.in[0], H = g.in[1], W = g.in[2], pd = g.padding[0], ph = g.padding[1], pw = g.padding[2];
  const int64_t rows = d.taps * d.Cg, ntiles = (rows + kTile - 1) / kTile, nob = (d.Og + N - 1) / N;
  const int64_t runs = d.B * d.Do * d.Ho, per_block = std::max<int64_t>(1, kBlockPositions / d.Wo);
  const int64_t nblocks = (runs + per_block - 1) / per_block;
  // Tasks: (group, block of output channels, chunk of row tiles), enough of them for every thread. Each dW element
  // is summed by one task over the blocks of positions in order, whatever the partition: the bits do not depend on
  // the threads.
  const int64_t want = (4 * at::get_num_threads() + d.G * nob - 1) / (d.G * nob);
  const int64_t per_chunk = (ntiles + std::min(ntiles, want) - 1) / std::min(ntiles, want);
  const int64_t nchunks = (ntiles + per_chunk - 1) / per_chunk;
  at::parallel_for(0, d.G * nob * nchunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> xoff(per_block), woff(per_block);
    const std::vector<T> zeros(N, T(0));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t ch = task % nchunks, k = task / nchunks, gr = k / nob;
      const int64_t o0 = gr * d.Og + (k % nob) * N, ncols = std::min(N, (gr + 1) * d.Og - o0);
      const int64_t tl1 = std::min(ntiles, (ch + 1) * per_chunk);
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int64_t run0 = blk * per_block, run1 = std::min(runs, run0 + per_block);
        for (int64_t tl = ch * per_chunk; tl < tl1; ++tl) {
          const int64_t r0 = tl * kTile, m = std::min(kTile, rows - r0);
          // the tile's rows (tap, c): where each reads, and their taps' depth and height offsets
          int64_t roff[kTile], zd[kTile], zh[kTile];
          int64_t kw0 = -1;
          bool one_kw = true;
          for (int64_t i = 0; i < m; ++i) {
            const int64_t t = (r0 + i) / d.Cg, c = (r0 + i) % d.Cg;
            const int64_t kw = t % d.kW, kh = (t / d.kW) % d.kH, kd = t / (d.kW * d.kH);
            roff[i] = d.x_offset(0, 0, 0, 0, kd, kh, kw) + gr * d.Cg + c;
            zd[i] = kd * d.dd, zh[i] = kh * d.dh;
            one_kw = one_kw && (kw0 < 0 || kw == kw0);
            kw0 = kw;
          }
          // with one kw, only the output columns whose input lies inside the image
          int64_t lo = 0, hi = d.Wo;
          if (one_kw) {
            const int64_t first = pw - kw0 * d.dw, last = pw + W - 1 - kw0 * d.dw;
            lo = first <= 0 ? 0 : (first + d.sw - 1) / d.sw;
            hi = last < 0 ? 0 : std::min(d.Wo, last / d.sw + 1);
            if (lo >= hi) lo = hi = 0;
          }
          int64_t n = 0;
          for (int64_t run = run0; run < run1 && hi > lo; ++run) {
            const int64_t oh = run % d.Ho, od = (run / d.Ho) % d.Do, b = run / (d.Ho * d.Do);
            bool inside = false;
            for (int64_t i = 0; i < m && !inside; ++i) {
              const int64_t z = od * d.sd + zd[i], y = oh * d.sh + zh[i];
              inside = z >= pd && z < pd + D && y >= ph && y < ph + H;
            }
            if (!inside) continue;
            xoff[n] = d.x_offset(b, od, oh, lo, 0, 0, 0);
            woff[n] = (run * d.Wo + lo) * d.Cout;
            ++n;
          }
          if (blk > 0 && n == 0) continue;
          run_tile(m, TileArgs<T>{xp, roff, d.sw * d.Cin, gp + o0, d.Cout, xoff.data(), woff.data(), n, hi - lo,
                                  nullptr, blk == 0 ? zeros.data() : nullptr, dw + r0 * d.Cout + o0, d.Cout, ncols, 1});
        }
      }
    }
  });
}

#else

template <typename T>
void direct_conv_forward(const ConvDims&, const ConvGeometry&, const T*, const WeightView<T>&, const T*, T*, bool) {
  TORCH_CHECK(false, "conv: the direct CPU kernel needs an x86 CPU with AVX2 and FMA");
}
template <typename T>
void direct_conv_grad_weight(const ConvDims&, const ConvGeometry&, const T*, const T*, T*) {
  TORCH_CHECK(false, "conv: the direct CPU kernel needs an x86 CPU with AVX2 and FMA");
}

#endif

template void direct_conv_forward<float>(const ConvDims&, const ConvGeometry&, const float*, const WeightView<float>&,
                                         const float*, float*, bool);
template void direct_conv_forward<double>(const ConvDims&, const ConvGeometry&, const double*,
                                          const WeightView<double>&, const double*, double*, bool);
template void direct_conv_grad_weight<float>(const ConvDims&, const ConvGeometry&, const float*, const float*, float*);
template void direct_conv_grad_weight<double>(const ConvDims&, const ConvGeometry&, const double*, const double*,
                                              double*);

}  // namespace visionops
