// The CPU forward by Winograd's minimal filtering F(2, 3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural
// Networks", 2016), for wide 3x3x3 convolutions: stride 1, one group, at least kWinogradMinChannels input and output
// channels, any dilation and padding (ops/cpu/conv_cpu.h). The code handles 1 or 3 taps per axis; 3x3 layers stay on
// the direct kernels, which measured faster on them.
//
// Along an axis with 3 taps at dilation d, a tile's 2 outputs (s and s + d) are
//   y = A^T [(G g) * (B^T x)]      x: the 4 inputs s, s + d, s + 2d, s + 3d (padded coordinates)
// with B^T (4 x 4), G (4 x 3) and A^T (2 x 4) written out in InputTransform, WeightTransform and OutputTransform;
// along the three axes the transforms apply along each in turn, so a tile is 4x4x4 = 64 products per (input, output
// channel) pair for 8 outputs, where the direct sum takes 8 x 27 = 216 (3.4x fewer). The products of every tile and
// channel pair at one of the 64 transformed points are one GEMM, M[a] = V[a] @ U[a]: V [tiles x Cin] the transformed
// input, U [Cin x Cout] the transformed weight. Per chunk of tiles (bounded memory): the input transform in parallel
// over tiles; then per block of output channels the weight transform, the GEMMs in parallel over the points (each
// single-threaded, so the bits do not depend on the thread count), and the output transform, bias and write in
// parallel over tiles. The coefficients are 0, +-1 and 1/2, so results differ from the direct sum's by rounding only
// (a few ulps more in float32).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include <ATen/Parallel.h>

#include "ops/cpu/conv_cpu.h"

namespace visionops {
namespace {

// The most bytes of transformed input held at once, and the output channels transformed and multiplied at once (so
// that their transformed weight, products and output stay in cache between the steps).
constexpr int64_t kChunkBytes = int64_t{16} << 20;
constexpr int64_t kOutBlock = 256;
// The weight transform's tiles: input x output channels.
constexpr int64_t kTileC = 2, kTileO = 16;

struct Axis {
  int64_t k, d, out, in;  // taps (1 or 3), dilation, output size, padded input size
  int64_t alpha() const { return k == 3 ? 4 : 1; }
  int64_t m() const { return k == 3 ? 2 : 1; }  // outputs per tile
  // Tiles: with 3 taps, blocks of 2d outputs, each d tiles of outputs (s, s + d).
  int64_t tiles() const { return k == 3 ? (out + 2 * d - 1) / (2 * d) * d : out; }
  int64_t start(int64_t t) const { return k == 3 ? (t / d) * 2 * d + t % d : t; }
};

// The three transforms along one axis of a block x [outer][K][inner] -> y [outer][R][inner], written out (each
// output once). Each runs on GCC vectors of 16 bytes (SSE2, every x86-64 CPU; other targets split them), then on T
// for the tail, so that the loop over inner is vectorised whatever the compiler's cost model says.
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(16)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(16)));
};

template <typename V, typename T>
V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename V, typename T>
void store(T* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

// Runs f(x_k, y_r) over [0, n): in vectors, then the tail in scalars.
template <int K, int R, typename T, typename F>
void each(const T* const* x, T* const* y, int64_t n, F f) {
  using V = typename VecOf<T>::type;
  constexpr int64_t L = sizeof(V) / sizeof(T);
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    V a[K], b[R];
    for (int k = 0; k < K; ++k) a[k] = load<V>(x[k] + i);
    f(a, b, V{} + T(0.5));
    for (int r = 0; r < R; ++r) store(y[r] + i, b[r]);
  }
  for (; i < n; ++i) {
    T a[K], b[R];
    for (int k = 0; k < K; ++k) a[k] = x[k][i];
    f(a, b, T(0.5));
    for (int r = 0; r < R; ++r) y[r][i] = b[r];
  }
}

struct InputTransform {  // B^T: 4 -> 4
  static constexpr int K = 4, R = 4;
  template <typename T>
  static void apply(const T* const* x, T* const* y, int64_t n) {
    each<K, R>(x, y, n, [](const auto* a, auto* b, auto) {
      b[0] = a[0] - a[2], b[1] = a[1] + a[2], b[2] = a[2] - a[1], b[3] = a[1] - a[3];
    });
  }
};
struct WeightTransform {  // G: 3 -> 4
  static constexpr int K = 3, R = 4;
  template <typename T>
  static void apply(const T* const* x, T* const* y, int64_t n) {
    each<K, R>(x, y, n, [](const auto* a, auto* b, auto half) {
      const auto t = (a[0] + a[2]) * half, h = a[1] * half;
      b[0] = a[0], b[1] = t + h, b[2] = t - h, b[3] = a[2];
    });
  }
};
struct OutputTransform {  // A^T: 4 -> 2
  static constexpr int K = 4, R = 2;
  template <typename T>
  static void apply(const T* const* x, T* const* y, int64_t n) {
    each<K, R>(x, y, n, [](const auto* a, auto* b, auto) { b[0] = a[0] + a[1] + a[2], b[1] = a[1] - a[2] - a[3]; });
  }
};

// Applies F along every 3-tap axis of the block in a ([n0][n1][n2][C], sizes n updated), ping-ponging with b;
// returns the buffer holding the result.
template <typename F, typename T>
T* transform(T* a, T* b, const Axis (&ax)[3], int64_t (&n)[3], int64_t C) {
  for (int i = 0; i < 3; ++i) {
    if (ax[i].k != 3) continue;
    int64_t outer = 1, inner = C;
    for (int j = 0; j < i; ++j) outer *= n[j];
    for (int j = i + 1; j < 3; ++j) inner *= n[j];
    for (int64_t o = 0; o < outer; ++o) {
      const T* x[F::K];
      T* y[F::R];
      for (int k = 0; k < F::K; ++k) x[k] = a + (o * F::K + k) * inner;
      for (int r = 0; r < F::R; ++r) y[r] = b + (o * F::R + r) * inner;
      F::apply(x, y, inner);
    }
    n[i] = F::R;
    std::swap(a, b);
  }
  return a;
}

}  // namespace

bool winograd_eligible(const ConvDims& d) {
  const int64_t k[3] = {d.kD, d.kH, d.kW}, s[3] = {d.sd, d.sh, d.sw};
  int threes = 0;
  for (int i = 0; i < 3; ++i) {
    if (s[i] != 1 || (k[i] != 1 && k[i] != 3)) return false;
    threes += k[i] == 3;
  }
  return threes == 3 && d.G == 1 && d.Cin >= kWinogradMinChannels && d.Cout >= kWinogradMinChannels;
}

template <typename T>
void winograd_forward(const ConvDims& d, const ConvGeometry& g, const T* xp, const WeightView<T>& w, const T* bias,
                      T* o, bool channels_first) {
  const Axis ax[3] = {{d.kD, d.dd, d.Do, d.Dp}, {d.kH, d.dh, d.Ho, d.Hp}, {d.kW, d.dw, d.Wo, d.Wp}};
  const int64_t A = ax[0].alpha() * ax[1].alpha() * ax[2].alpha(), C = d.Cin, O = d.Cout;
  const int64_t T1 = ax[1].tiles(), T2 = ax[2].tiles(), per_image = ax[0].tiles() * T1 * T2;
  const int64_t tiles = d.B * per_image, plane = d.Do * d.Ho * d.Wo;
  const int64_t ob = std::min(O, kOutBlock), big = std::max(C, ob) * A;  // a tile's largest block
  const int64_t chunk = std::min(tiles, std::max<int64_t>(1, kChunkBytes / static_cast<int64_t>(A * C * sizeof(T))));
  // V [A][chunk][C] the transformed inputs, U [A][C][ob] one block of transformed weights, M [A][chunk][ob] the
  // products (uninitialised: every element is written before it is read)
  std::unique_ptr<T[]> v(new T[A * chunk * C]), u(new T[A * C * ob]), m(new T[A * chunk * ob]);
  // tile p: image, and its first output along each axis
  auto locate = [&](int64_t p, int64_t (&s)[3]) {
    s[2] = ax[2].start(p % T2), s[1] = ax[1].start((p / T2) % T1), s[0] = ax[0].start((p / (T2 * T1)) % ax[0].tiles());
    return p / per_image;
  };
  for (int64_t p0 = 0; p0 < tiles; p0 += chunk) {
    const int64_t np = std::min(chunk, tiles - p0);
    at::parallel_for(0, np, 1, [&](int64_t i0, int64_t i1) {
      std::vector<T> p(big), q(big);
      for (int64_t i = i0; i < i1; ++i) {
        int64_t s[3];
        const int64_t b = locate(p0 + i, s);
        // the tile's inputs [alpha0][alpha1][alpha2][C], zero past the padded input
        T* dst = p.data();
        for (int64_t j0 = 0; j0 < ax[0].alpha(); ++j0)
          for (int64_t j1 = 0; j1 < ax[1].alpha(); ++j1)
            for (int64_t j2 = 0; j2 < ax[2].alpha(); ++j2, dst += C) {
              const int64_t z0 = s[0] + j0 * ax[0].d, z1 = s[1] + j1 * ax[1].d, z2 = s[2] + j2 * ax[2].d;
              if (z0 >= d.Dp || z1 >= d.Hp || z2 >= d.Wp) {
                std::fill_n(dst, C, T(0));
              } else {
                std::copy_n(xp + (((b * d.Dp + z0) * d.Hp + z1) * d.Wp + z2) * C, C, dst);
              }
            }
        int64_t n[3] = {ax[0].alpha(), ax[1].alpha(), ax[2].alpha()};
        const T* r = transform<InputTransform>(p.data(), q.data(), ax, n, C);
        for (int64_t a = 0; a < A; ++a) std::copy_n(r + a * C, C, v.get() + (a * np + i) * C);
      }
    });
    for (int64_t o0 = 0; o0 < O; o0 += ob) {
      const int64_t no = std::min(ob, O - o0);
      // U for output channels [o0, o0 + no), in tasks of kTileC input x kTileO output channels: their taps gathered
      // as [taps][kTileC x kTileO] and transformed together (vectorised over the tile), each point's rows written
      const int64_t nct = (C + kTileC - 1) / kTileC, nott = (no + kTileO - 1) / kTileO;
      at::parallel_for(0, nct * nott, 1, [&](int64_t k0, int64_t k1) {
        constexpr int64_t width = kTileC * kTileO;
        std::vector<T> p(A * width), q(A * width);
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t c0 = (k / nott) * kTileC, nc = std::min(kTileC, C - c0);
          const int64_t j0 = (k % nott) * kTileO, nj = std::min(kTileO, no - j0);
          if (nc < kTileC || nj < kTileO) std::fill(p.begin(), p.end(), T(0));
          for (int64_t ci = 0; ci < nc; ++ci)
            for (int64_t j = 0; j < nj; ++j) {
              const int64_t base = (c0 + ci) * w.sc + (o0 + j0 + j) * w.so;
              for (int64_t t = 0; t < d.taps; ++t) p[(t * kTileC + ci) * kTileO + j] = w.p[base + t * w.st];
            }
          int64_t n[3] = {d.kD, d.kH, d.kW};
          const T* r = transform<WeightTransform>(p.data(), q.data(), ax, n, width);
          for (int64_t a = 0; a < A; ++a)
            for (int64_t ci = 0; ci < nc; ++ci)
              std::copy_n(r + (a * kTileC + ci) * kTileO, nj, u.get() + (a * C + c0 + ci) * no + j0);
        }
      });
      at::parallel_for(0, A, 1, [&](int64_t a0, int64_t a1) {
        const SerialBlas serial;
        for (int64_t a = a0; a < a1; ++a)
          gemm_acc(np, no, C, v.get() + a * np * C, C, u.get() + a * C * no, no, m.get() + a * np * no, no, T(0));
      });
      at::parallel_for(0, np, 1, [&](int64_t i0, int64_t i1) {
        std::vector<T> p(big), q(big);
        for (int64_t i = i0; i < i1; ++i) {
          int64_t s[3];
          const int64_t b = locate(p0 + i, s);
          for (int64_t a = 0; a < A; ++a) std::copy_n(m.get() + (a * np + i) * no, no, p.data() + a * no);
          int64_t n[3] = {ax[0].alpha(), ax[1].alpha(), ax[2].alpha()};
          const T* r = transform<OutputTransform>(p.data(), q.data(), ax, n, no);
          for (int64_t j0 = 0; j0 < ax[0].m(); ++j0)
            for (int64_t j1 = 0; j1 < ax[1].m(); ++j1)
              for (int64_t j2 = 0; j2 < ax[2].m(); ++j2) {
                const T* y = r + ((j0 * n[1] + j1) * n[2] + j2) * no;
                const int64_t z0 = s[0] + j0 * ax[0].d, z1 = s[1] + j1 * ax[1].d, z2 = s[2] + j2 * ax[2].d;
                if (z0 >= d.Do || z1 >= d.Ho || z2 >= d.Wo) continue;
                const int64_t sp = (z0 * d.Ho + z1) * d.Wo + z2;
                const T* bs = bias != nullptr ? bias + o0 : nullptr;
                if (channels_first) {
                  T* out = o + (b * O + o0) * plane + sp;
                  for (int64_t c = 0; c < no; ++c) out[c * plane] = y[c] + (bs != nullptr ? bs[c] : T(0));
                } else {
                  T* out = o + (b * plane + sp) * O + o0;
                  for (int64_t c = 0; c < no; ++c) out[c] = y[c] + (bs != nullptr ? bs[c] : T(0));
                }
              }
        }
      });
    }
  }
}

template void winograd_forward<float>(const ConvDims&, const ConvGeometry&, const float*, const WeightView<float>&,
                                      const float*, float*, bool);
template void winograd_forward<double>(const ConvDims&, const ConvGeometry&, const double*, const WeightView<double>&,
                                       const double*, double*, bool);

}  // namespace visionops
