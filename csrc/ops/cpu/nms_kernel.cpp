// CPU kernels of the NMS family: nms, batched_nms, box_iou (+ backward).
//
// Greedy NMS is sequential in score order, but a box can only be suppressed by a kept box that intersects it
// (for iou_threshold >= 0). We keep the kept boxes in a uniform grid and test each candidate only against kept boxes
// sharing a cell, which makes the loop ~O(N * local density) instead of torchvision's O(N * kept). The decision for
// each pair uses the same IoU formula (ops/common/box_iou.h), so the result is identical to the quadratic loop.
#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/common/box_iou.h"
#include "ops/cpu/alloc.h"

namespace visionops {
namespace {

constexpr int64_t kBruteForceBelow = 64;  // grid set-up costs more than it saves on tiny inputs
constexpr int64_t kMaxCellsPerBox = 64;   // larger boxes live in a list every candidate checks

// Reference loop (torchvision's): used for tiny inputs and for thresholds < 0 or NaN, where non-intersecting
// boxes can suppress each other.
template <typename T>
void nms_quadratic(const T* b, const T* area, int64_t n, double thr, uint8_t* keep) {
  if (n <= 0) return;
  std::fill(keep, keep + n, uint8_t(1));
  for (int64_t i = 0; i < n; ++i) {
    if (!keep[i]) continue;
    for (int64_t j = i + 1; j < n; ++j) {
      if (keep[j] && static_cast<double>(box_iou_pair(b + 4 * i, area[i], b + 4 * j, area[j])) > thr) keep[j] = 0;
    }
  }
}

// Greedy NMS of n boxes b[n][4] already sorted by decreasing score; keep[i] = 1 for kept boxes.
template <typename T>
void nms_sorted(const T* b, int64_t n, double thr, uint8_t* keep) {
  std::vector<T> area(n);
  for (int64_t i = 0; i < n; ++i) area[i] = box_area(b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]);
  if (n < kBruteForceBelow || !(thr >= 0.0)) {
    nms_quadratic(b, area.data(), n, thr, keep);
    return;
  }
  // Only boxes with positive, finite extent can have a positive intersection; the others give IoU 0 or NaN with
  // everything, so they are never suppressed and never suppress.
  std::vector<uint8_t> active(n);
  double minx = INFINITY, miny = INFINITY, maxx = -INFINITY, maxy = -INFINITY, sum_side = 0;
  int64_t n_active = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T* p = b + 4 * i;
    active[i] = p[2] > p[0] && p[3] > p[1] && std::isfinite(static_cast<double>(area[i]));
    if (!active[i]) continue;
    minx = std::min(minx, double(p[0])), miny = std::min(miny, double(p[1]));
    maxx = std::max(maxx, double(p[2])), maxy = std::max(maxy, double(p[3]));
    sum_side += 0.5 * (double(p[2]) - double(p[0]) + double(p[3]) - double(p[1]));
    ++n_active;
  }
  if (n_active == 0) {
    std::fill(keep, keep + n, uint8_t(1));
    return;
  }
  // Cells about one mean box side wide, at most ~4 cells per active box. (Sizes are clamped in double before any
  // integer conversion: coordinates may span any finite range.)
  const double rx = maxx - minx, ry = maxy - miny;
  const double s = std::max(sum_side / n_active, std::sqrt(rx * ry / (4.0 * n_active)));
  if (!std::isfinite(rx) || !std::isfinite(ry) || !std::isfinite(s) || !(s > 0)) {
    nms_quadratic(b, area.data(), n, thr, keep);
    return;
  }
  const double max_cells = 4.0 * double(n_active);
  const int64_t nx = int64_t(std::min(rx / s, max_cells)) + 1;
  const int64_t ny = int64_t(std::min(ry / s, max_cells / double(nx))) + 1;
  auto cell = [&](double v, double lo, int64_t count) {
    const double c = std::floor((v - lo) / s);  // monotone in v, so overlapping boxes share a cell
    return c <= 0 ? int64_t(0) : (c >= double(count - 1) ? count - 1 : int64_t(c));
  };
  // Each cell holds the kept boxes touching it, packed contiguously so a query scans memory linearly.
  struct Kept {
    T box[4];
    T area;
    int64_t cx0, cy0;  // first cell of the kept box, to test a pair once when they share several cells
  };
  std::vector<std::vector<Kept>> cells(nx * ny);
  std::vector<Kept> big, kept;  // boxes spanning too many cells; all kept boxes
  for (int64_t i = 0; i < n; ++i) {
    keep[i] = 1;
    if (!active[i]) continue;
    const T* p = b + 4 * i;
    const int64_t cx0 = cell(p[0], minx, nx), cx1 = cell(p[2], minx, nx);
    const int64_t cy0 = cell(p[1], miny, ny), cy1 = cell(p[3], miny, ny);
    const bool is_big = (cx1 - cx0 + 1) * (cy1 - cy0 + 1) > kMaxCellsPerBox;
    auto suppresses = [&](const Kept& k) { return static_cast<double>(box_iou_pair(k.box, k.area, p, area[i])) > thr; };
    bool suppressed = false;
    for (const Kept& k : is_big ? kept : big)
      if ((suppressed = suppresses(k))) break;
    for (int64_t y = cy0; y <= cy1 && !suppressed && !is_big; ++y) {
      for (int64_t x = cx0; x <= cx1 && !suppressed; ++x) {
        for (const Kept& k : cells[y * nx + x]) {
          // Cheap rejection first: no intersection, no suppression (thr >= 0).
          if (!(k.box[0] < p[2] && p[0] < k.box[2] && k.box[1] < p[3] && p[1] < k.box[3])) continue;
          if (x != std::max(k.cx0, cx0) || y != std::max(k.cy0, cy0)) continue;
          if ((suppressed = suppresses(k))) break;
        }
      }
    }
    if (suppressed) {
      keep[i] = 0;
      continue;
    }
    const Kept rec{{p[0], p[1], p[2], p[3]}, area[i], cx0, cy0};
    kept.push_back(rec);
    if (is_big) {
      big.push_back(rec);
      continue;
    }
    for (int64_t y = cy0; y <= cy1; ++y)
      for (int64_t x = cx0; x <= cx1; ++x) cells[y * nx + x].push_back(rec);
  }
}

// Boxes gathered in `order` as contiguous opmath rows, so half inputs are compared in float (torchvision upcasts).
template <typename T, typename scalar_t>
std::vector<T> gather_rows(const at::Tensor& boxes, const int64_t* order, int64_t n) {
  std::vector<T> out(4 * n);
  const scalar_t* src = boxes.data_ptr<scalar_t>();
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int d = 0; d < 4; ++d) out[4 * i + d] = static_cast<T>(src[4 * order[i] + d]);
  });
  return out;
}

at::Tensor nms_kernel(const at::Tensor& boxes_in, const at::Tensor& scores, double iou_threshold) {
  TORCH_CHECK(boxes_in.dim() == 2 && boxes_in.size(1) == 4, "nms: boxes must have shape [N, 4], got ",
              boxes_in.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes_in.size(0),
              "nms: scores must have shape [N] matching boxes, got ", scores.sizes());
  const int64_t n = boxes_in.size(0);
  if (n == 0) return at::empty({0}, boxes_in.options().dtype(at::kLong));
  const at::Tensor boxes = boxes_in.contiguous();
  const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true)).contiguous();
  at::Tensor keep = at::empty({n}, boxes.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "nms_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const std::vector<T> sorted = gather_rows<T, scalar_t>(boxes, order.data_ptr<int64_t>(), n);
    nms_sorted(sorted.data(), n, iou_threshold, keep.data_ptr<uint8_t>());
  });
  return order.masked_select(keep.to(at::kBool));
}

at::Tensor batched_nms_kernel(const at::Tensor& boxes_in, const at::Tensor& scores, const at::Tensor& idxs,
                              double iou_threshold) {
  TORCH_CHECK(boxes_in.dim() == 2 && boxes_in.size(1) == 4, "batched_nms: boxes must have shape [N, 4], got ",
              boxes_in.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes_in.size(0) && idxs.sizes() == scores.sizes(),
              "batched_nms: scores and idxs must have shape [N] matching boxes");
  const int64_t n = boxes_in.size(0);
  if (n == 0) return at::empty({0}, boxes_in.options().dtype(at::kLong));
  const at::Tensor boxes = boxes_in.contiguous();
  // Score order, then (class, score rank) pairs sorted: each class becomes a contiguous run in decreasing score.
  // (One std::sort of pairs is several times faster here than ATen's stable sort of int64 keys.)
  const at::Tensor order = std::get<1>(scores.sort(true, 0, true)).contiguous();
  const at::Tensor idxs_by_rank = idxs.to(at::kLong).index_select(0, order).contiguous();
  std::vector<std::pair<int64_t, int64_t>> cls_rank(n);
  const int64_t* ir = idxs_by_rank.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) cls_rank[r] = {ir[r], r};
  std::sort(cls_rank.begin(), cls_rank.end());
  std::vector<int64_t> class_order(n), rank(n), starts{0};
  const int64_t* order_p = order.data_ptr<int64_t>();
  for (int64_t p = 0; p < n; ++p) {
    rank[p] = cls_rank[p].second;
    class_order[p] = order_p[rank[p]];
    if (p > 0 && cls_rank[p].first != cls_rank[p - 1].first) starts.push_back(p);
  }
  starts.push_back(n);
  const int64_t n_classes = int64_t(starts.size()) - 1;

  // keep_by_rank[r] marks the box with the r-th highest score, so the result comes out in decreasing score order.
  at::Tensor keep_by_rank = at::zeros({n}, boxes.options().dtype(at::kBool));
  bool* keep_p = keep_by_rank.data_ptr<bool>();
  const int64_t* rank_p = rank.data();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "batched_nms_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const std::vector<T> sorted = gather_rows<T, scalar_t>(boxes, class_order.data(), n);
    at::parallel_for(0, n_classes, 1, [&](int64_t c0, int64_t c1) {
      std::vector<uint8_t> keep;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t s = starts[c], len = starts[c + 1] - s;
        keep.resize(len);
        nms_sorted(sorted.data() + 4 * s, len, iou_threshold, keep.data());
        for (int64_t i = 0; i < len; ++i) keep_p[rank_p[s + i]] = keep[i];
      }
    });
  });
  return order.masked_select(keep_by_rank);
}

template <typename scalar_t>
void box_iou_kernel_impl(const scalar_t* b1, const scalar_t* b2, int64_t n, int64_t m, scalar_t* out) {
  using T = at::opmath_type<scalar_t>;
  // Structure-of-arrays copy of boxes2 so the inner loop vectorises.
  std::vector<T> x1(m), y1(m), x2(m), y2(m), a2(m);
  for (int64_t j = 0; j < m; ++j) {
    x1[j] = b2[4 * j], y1[j] = b2[4 * j + 1], x2[j] = b2[4 * j + 2], y2[j] = b2[4 * j + 3];
    a2[j] = (x2[j] - x1[j]) * (y2[j] - y1[j]);
  }
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(m, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T ax1 = b1[4 * i], ay1 = b1[4 * i + 1], ax2 = b1[4 * i + 2], ay2 = b1[4 * i + 3];
      const T a1 = (ax2 - ax1) * (ay2 - ay1);
      scalar_t* row = out + i * m;
      for (int64_t j = 0; j < m; ++j) {
        const T w = std::max(T(0), std::min(ax2, x2[j]) - std::max(ax1, x1[j]));
        const T h = std::max(T(0), std::min(ay2, y2[j]) - std::max(ay1, y1[j]));
        const T inter = w * h;
        row[j] = static_cast<scalar_t>(inter / (a1 + a2[j] - inter));
      }
    }
  });
}

at::Tensor box_iou_kernel(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  TORCH_CHECK(boxes1.dim() == 2 && boxes1.size(1) == 4, "box_iou: boxes1 must have shape [N, 4], got ", boxes1.sizes());
  TORCH_CHECK(boxes2.dim() == 2 && boxes2.size(1) == 4, "box_iou: boxes2 must have shape [M, 4], got ", boxes2.sizes());
  const at::Tensor a = boxes1.contiguous(), b = boxes2.contiguous();
  at::Tensor out = empty_output({a.size(0), b.size(0)}, a.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "box_iou_cpu", [&] {
    box_iou_kernel_impl(a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), a.size(0), b.size(0), out.data_ptr<scalar_t>());
  });
  return out;
}

// grad[i] of one side = sum over the other side; each output row is owned by one task (no atomics, deterministic).
template <typename scalar_t>
void box_iou_backward_side(const scalar_t* g, const scalar_t* own, const scalar_t* other, int64_t n, int64_t m,
                           bool own_is_first, scalar_t* out) {
  using T = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(m, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T acc[4] = {0, 0, 0, 0}, unused[4];
      const T a[4] = {T(own[4 * i]), T(own[4 * i + 1]), T(own[4 * i + 2]), T(own[4 * i + 3])};
      for (int64_t j = 0; j < m; ++j) {
        const T bj[4] = {T(other[4 * j]), T(other[4 * j + 1]), T(other[4 * j + 2]), T(other[4 * j + 3])};
        const T gij = own_is_first ? T(g[i * m + j]) : T(g[j * n + i]);
        if (own_is_first) box_iou_pair_backward(a, bj, gij, acc, unused);
        else box_iou_pair_backward(bj, a, gij, unused, acc);
      }
      for (int d = 0; d < 4; ++d) out[4 * i + d] = static_cast<scalar_t>(acc[d]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> box_iou_backward_kernel(const at::Tensor& grad, const at::Tensor& boxes1,
                                                           const at::Tensor& boxes2) {
  const at::Tensor g = grad.contiguous(), a = boxes1.contiguous(), b = boxes2.contiguous();
  at::Tensor ga = at::zeros_like(a), gb = at::zeros_like(b);
  if (g.numel() == 0) return {ga, gb};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "box_iou_backward_cpu", [&] {
    const scalar_t *gp = g.data_ptr<scalar_t>(), *ap = a.data_ptr<scalar_t>(), *bp = b.data_ptr<scalar_t>();
    box_iou_backward_side(gp, ap, bp, a.size(0), b.size(0), true, ga.data_ptr<scalar_t>());
    box_iou_backward_side(gp, bp, ap, b.size(0), a.size(0), false, gb.data_ptr<scalar_t>());
  });
  return {ga, gb};
}

}  // namespace
}  // namespace visionops

TORCH_LIBRARY_IMPL(visionops, CPU, m) {
  m.impl("nms", TORCH_FN(visionops::nms_kernel));
  m.impl("batched_nms", TORCH_FN(visionops::batched_nms_kernel));
  m.impl("box_iou", TORCH_FN(visionops::box_iou_kernel));
  m.impl("_box_iou_backward", TORCH_FN(visionops::box_iou_backward_kernel));
}
