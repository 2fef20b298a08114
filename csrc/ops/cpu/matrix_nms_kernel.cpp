// CPU kernel of Matrix NMS (math and host steps: ops/common/matrix_nms.h).
//
// Work items are blocks of kBlock positions j inside one label's run; an item visits every higher-scored i of its
// label row by row (i outer, j inner: the box planes, or the intersection row of i, are read contiguously, and the
// IoU loop vectorises). The comp pass finishes for every item before the decay pass reads f(comp_i). Items are
// split over threads with at::parallel_for.
#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/common/matrix_nms.h"

namespace visionops {
namespace {

constexpr int64_t kBlock = 128;
// Below this many pairs one thread does a pass: waking the pool costs more than the pass (and far more on a busy
// machine, where each parallel region waits for every thread to be scheduled).
constexpr int64_t kParallelPairs = 1 << 18;

struct Item {
  int64_t start, lo, hi;  // the label's first position; the block [lo, hi) of positions j
};

std::vector<Item> make_items(const int64_t* start, int64_t n) {
  std::vector<Item> items;
  for (int64_t g = 0; g < n;) {
    int64_t end = g + 1;
    while (end < n && start[end] == g) ++end;
    for (int64_t lo = g; lo < end; lo += kBlock) items.push_back({g, lo, std::min(end, lo + kBlock)});
    g = end;
  }
  return items;
}

// IoUs of row i with the positions [lo, hi) of an item into out[0, hi - lo).
template <typename T, typename Src>
inline void iou_row(const Src& src, int64_t i, int64_t lo, int64_t hi, T* out) {
  for (int64_t j = lo; j < hi; ++j) out[j - lo] = src.iou(i, j);
}

template <typename T, bool kGaussian, typename Src>
void matrix_nms_decay_impl(const Src& src, const std::vector<Item>& items, double sigma, double* fcomp, double* decay) {
  int64_t pairs = 0;
  for (const Item& it : items) pairs += (it.hi - it.start) * (it.hi - it.lo);
  const int64_t grain = pairs < kParallelPairs ? static_cast<int64_t>(items.size()) : 1;
  // comp: column maxima over the higher-scored rows of the label
  at::parallel_for(0, static_cast<int64_t>(items.size()), grain, [&](int64_t b, int64_t e) {
    T iou[kBlock], comp[kBlock];
    for (int64_t t = b; t < e; ++t) {
      const Item it = items[t];
      std::fill(comp, comp + (it.hi - it.lo), T(0));
      for (int64_t i = it.start; i + 1 < it.hi; ++i) {
        const int64_t lo = std::max(it.lo, i + 1);
        iou_row(src, i, lo, it.hi, iou);
        T* c = comp + (lo - it.lo);
        for (int64_t k = 0; k < it.hi - lo; ++k) c[k] = c[k] < iou[k] ? iou[k] : c[k];
      }
      for (int64_t j = it.lo; j < it.hi; ++j) fcomp[j] = matrix_nms_f<kGaussian>(comp[j - it.lo], sigma);
    }
  });
  // decay: a zero IoU gives a ratio 1 / f(comp_i) >= 1, which never lowers the minimum (it starts at 1)
  at::parallel_for(0, static_cast<int64_t>(items.size()), grain, [&](int64_t b, int64_t e) {
    T iou[kBlock];
    double d[kBlock];
    for (int64_t t = b; t < e; ++t) {
      const Item it = items[t];
      std::fill(d, d + (it.hi - it.lo), 1.0);
      for (int64_t i = it.start; i + 1 < it.hi; ++i) {
        const int64_t lo = std::max(it.lo, i + 1);
        iou_row(src, i, lo, it.hi, iou);
        const double fi = fcomp[i];
        double* dj = d + (lo - it.lo);
        for (int64_t k = 0; k < it.hi - lo; ++k) {
          if (!(iou[k] > T(0))) continue;
          const double r = matrix_nms_f<kGaussian>(static_cast<double>(iou[k]), sigma) / fi;
          if (r < dj[k]) dj[k] = r;  // NaN (0 / 0) never lowers it
        }
      }
      std::copy(d, d + (it.hi - it.lo), decay + it.lo);
    }
  });
}

struct CpuKernels {
  template <typename T, bool kMasks, bool kGaussian>
  static void decay(const at::Tensor& src, const at::Tensor& area, const at::Tensor& start, double sigma,
                    at::Tensor& fcomp, at::Tensor& decay) {
    const int64_t n = start.size(0);
    const std::vector<Item> items = make_items(start.data_ptr<int64_t>(), n);
    if constexpr (kMasks) {
      const MatrixNmsMasks s{src.data_ptr<float>(), area.data_ptr<float>(), n};
      matrix_nms_decay_impl<float, kGaussian>(s, items, sigma, fcomp.data_ptr<double>(), decay.data_ptr<double>());
    } else {
      const MatrixNmsBoxes<T> s{src.data_ptr<T>(), n};
      matrix_nms_decay_impl<T, kGaussian>(s, items, sigma, fcomp.data_ptr<double>(), decay.data_ptr<double>());
    }
  }
};

std::tuple<at::Tensor, at::Tensor> matrix_nms_forward_kernel(const at::Tensor& boxes_or_masks, const at::Tensor& scores,
                                                             const at::Tensor& labels, c10::string_view kernel,
                                                             double sigma, double score_threshold, int64_t max_num) {
  return matrix_nms_entry<CpuKernels>(boxes_or_masks, scores, labels, std::string(kernel), sigma, score_threshold,
                                      max_num);
}

}  // namespace

TORCH_LIBRARY_IMPL(visionops, CPU, m) {
  m.impl("matrix_nms", TORCH_FN(matrix_nms_forward_kernel));
}

}  // namespace visionops
