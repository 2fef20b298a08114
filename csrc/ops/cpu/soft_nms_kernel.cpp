// CPU kernels of soft-NMS: soft_nms and batched_soft_nms (math: ops/common/soft_nms.h).
//
// Soft-NMS is sequential in its selections, but each step's decay over the alive boxes is data-parallel: the alive
// boxes are tiles of a spatially sorted structure of arrays (see Boxes), a step decays the tiles near the kept box
// (IoU and gaussian weights in vectorised loops) and re-summarises the changed ones, and the next box comes from the
// tile maxima. Large alive sets split the tiles over threads (at::parallel_for). batched_soft_nms runs the classes in
// parallel, one serial soft-NMS each.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/common/soft_nms.h"

namespace visionops {
namespace {

constexpr int64_t kTile = 128;             // boxes per tile: the unit of vectorised work, of maxima and of culling
constexpr int64_t kParallelAlive = 32768;  // below this many alive boxes one thread does a step (a fork per step)

// Morton code of a point quantised to 16 bits per axis.
inline uint32_t spread_bits(uint32_t v) {
  v &= 0xffff;
  v = (v | (v << 8)) & 0x00ff00ff;
  v = (v | (v << 4)) & 0x0f0f0f0f;
  v = (v | (v << 2)) & 0x33333333;
  return (v | (v << 1)) & 0x55555555;
}

// Stable least-significant-digit radix sort of `values` by `keys` (4 passes of 8 bits; a pass whose digit is the
// same for every key is skipped).
void radix_sort(std::vector<uint32_t>& keys, std::vector<int64_t>& values) {
  const size_t n = keys.size();
  std::vector<uint32_t> k2(n);
  std::vector<int64_t> v2(n);
  for (int shift = 0; shift < 32; shift += 8) {
    size_t count[257] = {};
    for (uint32_t k : keys) ++count[((k >> shift) & 0xff) + 1];
    if (n == 0 || count[((keys[0] >> shift) & 0xff) + 1] == n) continue;
    for (int b = 0; b < 256; ++b) count[b + 1] += count[b];
    for (size_t j = 0; j < n; ++j) {
      const size_t dst = count[(keys[j] >> shift) & 0xff]++;
      k2[dst] = keys[j], v2[dst] = values[j];
    }
    keys.swap(k2), values.swap(v2);
  }
}

// The alive boxes of one soft-NMS problem as a structure of arrays in Morton order of their centres, so that a tile
// of kTile boxes covers a small region: a step decays only the tiles whose bounding box meets the kept box (for
// the others every IoU is exactly 0 and every weight 1). A dead box has score NaN (alive scores are >=
// score_threshold, never NaN). Each tile keeps its best alive box (highest score, then lowest input index) and its
// alive count, so a step finds the next box by scanning the tiles. Dead boxes are squeezed out (order kept) once
// they are half of the arrays.
template <typename T>
struct Boxes {
  std::vector<T> x1, y1, x2, y2, area;
  std::vector<double> s;
  std::vector<int64_t> id;
  struct Tile {
    double s;
    int64_t id, pos, alive;
    T x1, y1, x2, y2;  // bounding box of the tile's boxes (dead ones too)
    bool regular;      // every box finite with area >= 0: a disjoint kept box of positive area has IoU 0 with all
  };
  std::vector<Tile> tiles;
  int64_t m = 0, alive = 0;

  void summarise(int64_t t) {
    Tile& tile = tiles[t];
    const int64_t lo = t * kTile, hi = std::min(m, lo + kTile);
    tile.pos = -1, tile.alive = 0;
    for (int64_t i = lo; i < hi; ++i) {
      if (s[i] != s[i]) continue;
      ++tile.alive;
      if (tile.pos < 0 || s[i] > tile.s || (s[i] == tile.s && id[i] < tile.id))
        tile.s = s[i], tile.id = id[i], tile.pos = i;
    }
  }
  void rebuild() {
    tiles.resize((m + kTile - 1) / kTile);
    for (int64_t t = 0; t < int64_t(tiles.size()); ++t) {
      Tile& tile = tiles[t];
      const int64_t lo = t * kTile, hi = std::min(m, lo + kTile);
      tile.x1 = tile.y1 = INFINITY, tile.x2 = tile.y2 = -INFINITY, tile.regular = true;
      for (int64_t i = lo; i < hi; ++i) {
        tile.x1 = std::min(tile.x1, x1[i]), tile.y1 = std::min(tile.y1, y1[i]);
        tile.x2 = std::max(tile.x2, x2[i]), tile.y2 = std::max(tile.y2, y2[i]);
        tile.regular &= std::isfinite(x1[i]) && std::isfinite(y1[i]) && std::isfinite(x2[i]) && std::isfinite(y2[i]) &&
                        x2[i] >= x1[i] && y2[i] >= y1[i];
      }
      summarise(t);
    }
  }
  void compact() {
    int64_t out = 0;
    for (int64_t i = 0; i < m; ++i) {
      if (s[i] != s[i]) continue;
      x1[out] = x1[i], y1[out] = y1[i], x2[out] = x2[i], y2[out] = y2[i], area[out] = area[i];
      s[out] = s[i], id[out] = id[i];
      ++out;
    }
    m = out;
    rebuild();
  }
  // Position of the alive box with the highest score, the lowest input index on ties; -1 when none.
  int64_t best() const {
    const Tile* b = nullptr;
    for (const Tile& t : tiles)
      if (t.alive > 0 && (!b || t.s > b->s || (t.s == b->s && t.id < b->id))) b = &t;
    return b ? b->pos : -1;
  }
};

// exp(x) of 8 lanes for x in [-708, 0] (the gaussian weights' range; callers redo other lanes with std::exp):
// x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to degree 13 (truncation < 1e-17), times 2^n built
// in the exponent bits. Within 1 ulp of std::exp (3.2e7 points checked), and exactly 1 at x = 0 (an IoU of 0 leaves a
// score unchanged).
typedef double vd8 __attribute__((vector_size(64)));
typedef int64_t vi8 __attribute__((vector_size(64)));

#define SOFT_NMS_NO_FMA __attribute__((optimize("fp-contract=off")))  // same bits with and without FMA units
inline __attribute__((always_inline)) SOFT_NMS_NO_FMA void exp_lanes(const double* in, double* out) {
  vd8 x;
  __builtin_memcpy(&x, in, sizeof(x));
  const double shifter = 0x1.8p52;  // adding it rounds to an integer kept in the low mantissa bits
  const vd8 t = x * 1.4426950408889634 + shifter;
  const vd8 n = t - shifter;
  const vd8 r = (x - n * 0.6931471803691238) - n * 1.9082149292705877e-10;  // ln 2 split: n * hi is exact
  vd8 p = r * (1.0 / 6227020800.0) + (1.0 / 479001600.0);
  for (double c : {1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0,
                   1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0})
    p = p * r + c;
  vi8 bits;
  __builtin_memcpy(&bits, &t, sizeof(t));
  bits = (bits << 52) + (int64_t(1023) << 52);  // (n mod 4096) << 52, biased: 2^n for n in [-1022, 1023]
  vd8 scale;
  __builtin_memcpy(&scale, &bits, sizeof(bits));
  p *= scale;
  __builtin_memcpy(out, &p, sizeof(p));
}

// exp_lanes over a tile ([len rounded up to 8] lanes), compiled for the baseline ISA, AVX2 and AVX-512, picked at
// run time; multiply-adds are not contracted into FMAs, so every ISA gives the same bits.
#if defined(__GNUC__) && defined(__x86_64__)
#define SOFT_NMS_EXP_TILE(suffix, target)                                                  \
  target SOFT_NMS_NO_FMA void exp_tile_##suffix(const double* x, int64_t len, double* w) { \
    for (int64_t j = 0; j < len; j += 8) exp_lanes(x + j, w + j);                          \
  }
SOFT_NMS_EXP_TILE(base, )
SOFT_NMS_EXP_TILE(avx2, __attribute__((target("avx2,fma"))))
SOFT_NMS_EXP_TILE(avx512, __attribute__((target("avx512f,avx512dq,avx2,fma"))))
#undef SOFT_NMS_EXP_TILE

void exp_tile(const double* x, int64_t len, double* w) {
  static const auto fn = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") ? exp_tile_avx512
                         : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")       ? exp_tile_avx2
                                                                                                 : exp_tile_base;
  fn(x, len, w);
}
#else
SOFT_NMS_NO_FMA void exp_tile(const double* x, int64_t len, double* w) {
  for (int64_t j = 0; j < len; j += 8) exp_lanes(x + j, w + j);
}
#endif

// Gaussian weights exp(-iou^2 / sigma) of a tile, 8 lanes at a time; lanes outside exp_lanes' range (tiny sigma,
// NaN IoUs of malformed boxes) go through std::exp as the scalar path would.
template <typename T>
void gaussian_weights(const T* iou, int64_t len, double sigma, double* w) {
  alignas(64) double x[kTile];
  for (int64_t j = 0; j < len; ++j) {
    const double v = static_cast<double>(iou[j]);
    x[j] = -(v * v) / sigma;
  }
  for (int64_t j = len; j < (len + 7) / 8 * 8; ++j) x[j] = 0.0;
  exp_tile(x, len, w);
  for (int64_t j = 0; j < len; ++j)
    if (!(x[j] >= -708.0)) w[j] = std::exp(x[j]);
}

// Decays the alive scores of tile t by the kept box k ([4] + area): IoU for the whole tile (a vectorised loop), then
// weights and scores only when some weight differs from 1. Returns whether the tile changed.
template <typename T, SoftNmsMethod M>
bool decay_tile(Boxes<T>& a, int64_t t, const T k[4], T k_area, const SoftNmsParams& p) {
  const int64_t lo = t * kTile, len = std::min(a.m, lo + kTile) - lo;
  const T *x1 = a.x1.data() + lo, *y1 = a.y1.data() + lo, *x2 = a.x2.data() + lo, *y2 = a.y2.data() + lo;
  const T* area = a.area.data() + lo;
  T iou[kTile];
  for (int64_t j = 0; j < len; ++j) {
    const T b[4] = {x1[j], y1[j], x2[j], y2[j]};
    iou[j] = box_iou_pair(k, k_area, b, area[j]);
  }
  // A weight is 1 exactly where iou == 0 (gaussian, linear) or !(iou > iou_threshold) (hard, linear).
  bool any = false;
  for (int64_t j = 0; j < len; ++j) {
    const double v = static_cast<double>(iou[j]);
    any |= M == SoftNmsMethod::kGaussian ? !(v == 0.0) : v > p.iou_threshold;
  }
  if (!any) return false;
  double* s = a.s.data() + lo;
  if constexpr (M == SoftNmsMethod::kGaussian) {
    // Every lane, dead ones too (NaN * w stays NaN): a branch-free loop beats skipping exp calls.
    alignas(64) double w[kTile];
    gaussian_weights(iou, len, p.sigma, w);
    for (int64_t j = 0; j < len; ++j) {
      const double v = s[j] * w[j];
      s[j] = soft_nms_alive(v, p) ? v : NAN;
    }
    return true;
  }
  for (int64_t j = 0; j < len; ++j) {
    if (s[j] != s[j]) continue;  // dead
    const double v = s[j] * soft_nms_weight<M>(static_cast<double>(iou[j]), p);
    s[j] = soft_nms_alive(v, p) ? v : NAN;  // dead stays dead: NaN * w is NaN
  }
  return true;
}

// Soft-NMS of the boxes `order[0..n)` (input indices; boxes [N, 4] of scalar_t, scores [N] in double). Writes the
// kept input indices and their scores at selection, in selection order, and returns how many.
template <typename scalar_t, SoftNmsMethod M>
int64_t soft_nms_run(const scalar_t* boxes, const double* scores, const int64_t* order, int64_t n,
                     const SoftNmsParams& p, bool may_parallelise, int64_t* keep, double* kept_scores) {
  using T = at::opmath_type<scalar_t>;
  // Alive boxes, sorted by the Morton code of their centre (non-finite centres last), then input index.
  std::vector<int64_t> ids;
  ids.reserve(n);
  double lo[2] = {INFINITY, INFINITY}, hi[2] = {-INFINITY, -INFINITY};
  auto centre = [&](int64_t i, int d) { return 0.5 * (double(boxes[4 * i + d]) + double(boxes[4 * i + d + 2])); };
  for (int64_t r = 0; r < n; ++r) {
    const int64_t i = order ? order[r] : r;
    if (!soft_nms_alive(scores[i], p)) continue;
    ids.push_back(i);
    for (int d = 0; d < 2; ++d)
      if (std::isfinite(centre(i, d))) lo[d] = std::min(lo[d], centre(i, d)), hi[d] = std::max(hi[d], centre(i, d));
  }
  std::vector<uint32_t> codes(ids.size());
  for (size_t j = 0; j < ids.size(); ++j) {
    uint32_t q[2];
    for (int d = 0; d < 2; ++d) {
      const double c = centre(ids[j], d), span = hi[d] - lo[d];
      const double u = std::isfinite(c) && span > 0 && std::isfinite(span) ? (c - lo[d]) / span * 65535.0 : 0.0;
      q[d] = std::isfinite(c) ? uint32_t(std::min(std::max(u, 0.0), 65535.0)) : 0xffff;
    }
    codes[j] = spread_bits(q[0]) | (spread_bits(q[1]) << 1);
  }
  radix_sort(codes, ids);  // stable, and ids arrive in increasing input order: ties stay by index
  Boxes<T> a;
  a.m = a.alive = int64_t(ids.size());
  for (auto* v : {&a.x1, &a.y1, &a.x2, &a.y2, &a.area}) v->resize(a.m);
  a.s.resize(a.m), a.id.resize(a.m);
  for (int64_t j = 0; j < a.m; ++j) {
    const int64_t i = ids[j];
    const T b[4] = {T(boxes[4 * i]), T(boxes[4 * i + 1]), T(boxes[4 * i + 2]), T(boxes[4 * i + 3])};
    a.x1[j] = b[0], a.y1[j] = b[1], a.x2[j] = b[2], a.y2[j] = b[3], a.area[j] = box_area(b[0], b[1], b[2], b[3]);
    a.s[j] = scores[i], a.id[j] = i;
  }
  a.rebuild();
  // Disjoint tiles are skipped only where a weight of IoU 0 is 1: always but for hard with iou_threshold < 0.
  const bool cull_hard = !(0.0 > p.iou_threshold);
  int64_t kept = 0;
  for (int64_t b = a.best(); b >= 0; b = a.best()) {
    keep[kept] = a.id[b];
    kept_scores[kept++] = a.s[b];
    a.s[b] = NAN;
    const T k[4] = {a.x1[b], a.y1[b], a.x2[b], a.y2[b]};
    const T k_area = a.area[b];
    const bool cull = (M != SoftNmsMethod::kHard || cull_hard) && std::isfinite(k[0]) && std::isfinite(k[1]) &&
                      std::isfinite(k[2]) && std::isfinite(k[3]) && k_area > T(0);
    auto run_tiles = [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const auto& tile = a.tiles[t];
        if (tile.alive == 0) continue;
        const bool disjoint = !(tile.x1 < k[2] && k[0] < tile.x2 && tile.y1 < k[3] && k[1] < tile.y2);
        const bool changed = !(cull && tile.regular && disjoint) && decay_tile<T, M>(a, t, k, k_area, p);
        if (changed || t == b / kTile) a.summarise(t);
      }
    };
    const int64_t n_tiles = int64_t(a.tiles.size());
    if (may_parallelise && a.alive >= kParallelAlive)
      at::parallel_for(0, n_tiles, kParallelAlive / kTile / 4, run_tiles);
    else run_tiles(0, n_tiles);
    a.alive = 0;
    for (const auto& tile : a.tiles) a.alive += tile.alive;
    if (2 * a.alive < a.m && a.m > kTile) a.compact();
  }
  return kept;
}

std::tuple<at::Tensor, at::Tensor> outputs(const at::Tensor& scores, const std::vector<int64_t>& keep,
                                           const std::vector<double>& kept_scores, int64_t count) {
  at::Tensor k = at::empty({count}, scores.options().dtype(at::kLong));
  at::Tensor s = at::empty({count}, scores.options().dtype(at::kDouble));
  std::copy(keep.begin(), keep.begin() + count, k.data_ptr<int64_t>());
  std::copy(kept_scores.begin(), kept_scores.begin() + count, s.data_ptr<double>());
  return {k, s.to(scores.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> soft_nms_kernel(const at::Tensor& boxes_in, const at::Tensor& scores_in,
                                                   double iou_threshold, double sigma, double score_threshold,
                                                   int64_t method) {
  check_soft_nms_args("soft_nms", boxes_in, scores_in, nullptr, sigma, method);
  const int64_t n = boxes_in.size(0);
  const at::Tensor boxes = boxes_in.contiguous(), scores = scores_in.to(at::kDouble).contiguous();
  const SoftNmsParams p{iou_threshold, sigma, score_threshold};
  std::vector<int64_t> keep(n);
  std::vector<double> kept_scores(n);
  int64_t count = 0;
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "soft_nms_cpu", [&] {
      VISIONOPS_DISPATCH_SOFT_NMS_METHOD(method, [&] {
        count = soft_nms_run<scalar_t, kMethod>(boxes.data_ptr<scalar_t>(), scores.data_ptr<double>(), nullptr, n, p,
                                                true, keep.data(), kept_scores.data());
      });
    });
  }
  return outputs(scores_in, keep, kept_scores, count);
}

std::tuple<at::Tensor, at::Tensor> batched_soft_nms_kernel(const at::Tensor& boxes_in, const at::Tensor& scores_in,
                                                           const at::Tensor& idxs, double iou_threshold, double sigma,
                                                           double score_threshold, int64_t method) {
  check_soft_nms_args("batched_soft_nms", boxes_in, scores_in, &idxs, sigma, method);
  const int64_t n = boxes_in.size(0);
  const at::Tensor boxes = boxes_in.contiguous(), scores = scores_in.to(at::kDouble).contiguous();
  const at::Tensor cls = idxs.to(at::kLong).contiguous();
  const SoftNmsParams p{iou_threshold, sigma, score_threshold};
  // Boxes by (class, input index): each class a contiguous run in input order.
  std::vector<std::pair<int64_t, int64_t>> by_class(n);
  const int64_t* c = cls.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) by_class[i] = {c[i], i};
  std::sort(by_class.begin(), by_class.end());
  std::vector<int64_t> order(n), starts;
  for (int64_t r = 0; r < n; ++r) {
    order[r] = by_class[r].second;
    if (r == 0 || by_class[r].first != by_class[r - 1].first) starts.push_back(r);
  }
  starts.push_back(n);
  const int64_t n_classes = int64_t(starts.size()) - 1;
  // Class q writes its kept boxes at [starts[q], starts[q] + counts[q]).
  std::vector<int64_t> keep(n), counts(std::max<int64_t>(n_classes, 0));
  std::vector<double> kept_scores(n);
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "batched_soft_nms_cpu", [&] {
      VISIONOPS_DISPATCH_SOFT_NMS_METHOD(method, [&] {
        at::parallel_for(0, n_classes, 1, [&](int64_t q0, int64_t q1) {
          for (int64_t q = q0; q < q1; ++q) {
            const int64_t s = starts[q];
            counts[q] = soft_nms_run<scalar_t, kMethod>(boxes.data_ptr<scalar_t>(), scores.data_ptr<double>(),
                                                        order.data() + s, starts[q + 1] - s, p, n_classes == 1,
                                                        keep.data() + s, kept_scores.data() + s);
          }
        });
      });
    });
  }
  // By decreasing score; ties by selection rank within the class, then by class (ascending idxs).
  struct Entry {
    double s;
    int64_t rank, q, index;
  };
  std::vector<Entry> all;
  for (int64_t q = 0; q < n_classes; ++q)
    for (int64_t r = 0; r < counts[q]; ++r) all.push_back({kept_scores[starts[q] + r], r, q, keep[starts[q] + r]});
  std::sort(all.begin(), all.end(), [](const Entry& a, const Entry& b) {
    if (a.s != b.s) return a.s > b.s;
    return a.rank != b.rank ? a.rank < b.rank : a.q < b.q;
  });
  const int64_t count = int64_t(all.size());
  for (int64_t j = 0; j < count; ++j) keep[j] = all[j].index, kept_scores[j] = all[j].s;
  return outputs(scores_in, keep, kept_scores, count);
}

}  // namespace
}  // namespace visionops

TORCH_LIBRARY_IMPL(visionops, CPU, m) {
  m.impl("soft_nms", TORCH_FN(visionops::soft_nms_kernel));
  m.impl("batched_soft_nms", TORCH_FN(visionops::batched_soft_nms_kernel));
}
