// CPU kernel of the fixed-shape multiclass NMS (definition: visionops/reference/nms.py, multiclass_nms; the shared
// walk and IoU test: ops/common/multiclass_nms.h). Three parallel phases: gather each image's candidates into
// per-(image, class) lists in one row-major pass over the scores (a per-class pass would stride by C), then sort and
// walk each list (a task per (image, class), or per image when class-agnostic), then merge each image's survivors.
#include <algorithm>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/common/multiclass_nms.h"

namespace visionops {
namespace {

template <typename acc_t>
struct Candidate {
  acc_t score;
  int64_t f;  // class-major flat index c * N + n: the order of equal scores
};

template <typename acc_t>
inline bool before(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  return a.score > b.score || (a.score == b.score && a.f < b.f);
}

// Greedy NMS's kept list: each new candidate is tested against every box kept before it.
template <typename acc_t>
class KeptList {
 public:
  explicit KeptList(double thr) : thr_(thr) {}

  template <typename scalar_t>
  bool try_keep(const scalar_t* p) {
    const acc_t box[4] = {acc_t(p[0]), acc_t(p[1]), acc_t(p[2]), acc_t(p[3])};
    const acc_t area = box_area(box[0], box[1], box[2], box[3]);
    for (size_t k = 0; k < kept_.size(); k += 5) {
      if (mcnms_suppresses(&kept_[k], kept_[k + 4], box, area, thr_)) return false;
    }
    kept_.insert(kept_.end(), {box[0], box[1], box[2], box[3], area});
    return true;
  }

 private:
  double thr_;
  std::vector<acc_t> kept_;  // x1, y1, x2, y2, area per kept box
};

template <typename scalar_t>
void multiclass_nms_kernel_impl(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold,
                                double score_threshold, int64_t max_per_class, int64_t max_total, bool class_agnostic,
                                at::Tensor& out_boxes, at::Tensor& out_scores, at::Tensor& out_classes,
                                at::Tensor& out_num) {
  using acc_t = at::opmath_type<scalar_t>;
  using Cand = Candidate<acc_t>;
  const int64_t batch = scores.size(0), n = scores.size(1), classes = scores.size(2);
  const bool shared_boxes = boxes.dim() == 3;
  const scalar_t* b_ptr = boxes.data_ptr<scalar_t>();
  const scalar_t* s_ptr = scores.data_ptr<scalar_t>();
  scalar_t* ob = out_boxes.data_ptr<scalar_t>();
  scalar_t* os = out_scores.data_ptr<scalar_t>();
  int64_t* oc = out_classes.data_ptr<int64_t>();
  int64_t* on = out_num.data_ptr<int64_t>();
  auto box_of = [&](int64_t img, int64_t f) {
    const int64_t c = f / n, i = f % n;
    return b_ptr + 4 * (shared_boxes ? img * n + i : (img * n + i) * classes + c);
  };
  auto write = [&](int64_t img, const std::vector<Cand>& chosen, int64_t count) {
    for (int64_t j = 0; j < count; ++j) {
      const int64_t f = chosen[j].f, c = f / n, i = f % n;
      const scalar_t* p = box_of(img, f);
      std::copy(p, p + 4, ob + 4 * (img * max_total + j));
      os[img * max_total + j] = s_ptr[(img * n + i) * classes + c];
      oc[img * max_total + j] = c;
    }
    on[img] = count;
  };

  // one list per image (class-agnostic) or per (image, class)
  const int64_t lists_per_image = class_agnostic ? 1 : classes;
  std::vector<std::vector<Cand>> lists(batch * lists_per_image);
  const acc_t thr = acc_t(scalar_t(score_threshold));  // PyTorch's rule: the threshold in the scores' dtype
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t img = begin; img < end; ++img) {
      const scalar_t* s = s_ptr + img * n * classes;
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t c = 0; c < classes; ++c) {
          const acc_t v = acc_t(s[i * classes + c]);
          if (v > thr) {
            lists[img * lists_per_image + (class_agnostic ? 0 : c)].push_back({v, c * n + i});
          }
        }
      }
    }
  });

  if (class_agnostic) {
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<Cand> chosen;
      std::vector<int64_t> per_class(classes);
      for (int64_t img = begin; img < end; ++img) {
        std::vector<Cand>& cands = lists[img];
        std::sort(cands.begin(), cands.end(), before<acc_t>);
        KeptList<acc_t> kept(iou_threshold);
        chosen.clear();
        std::fill(per_class.begin(), per_class.end(), 0);
        for (const Cand& cand : cands) {
          if (!kept.try_keep(box_of(img, cand.f))) continue;
          // kept boxes past their class's cap still suppress later candidates
          if (per_class[cand.f / n]++ < max_per_class) chosen.push_back(cand);
          if (int64_t(chosen.size()) == max_total) break;
        }
        write(img, chosen, chosen.size());
      }
    });
    return;
  }

  // per (image, class): sort, then walk until max_per_class are kept; the survivors replace the list's head
  std::vector<int64_t> kept_count(batch * classes);
  at::parallel_for(0, batch * classes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::vector<Cand>& cands = lists[t];
      std::sort(cands.begin(), cands.end(), before<acc_t>);
      KeptList<acc_t> kept(iou_threshold);
      int64_t k = 0;
      for (size_t j = 0; j < cands.size() && k < max_per_class; ++j) {
        if (kept.try_keep(box_of(t / classes, cands[j].f))) cands[k++] = cands[j];
      }
      kept_count[t] = k;
    }
  });
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<Cand> all;
    for (int64_t img = begin; img < end; ++img) {
      all.clear();
      for (int64_t c = 0; c < classes; ++c) {
        const std::vector<Cand>& l = lists[img * classes + c];
        all.insert(all.end(), l.begin(), l.begin() + kept_count[img * classes + c]);
      }
      const int64_t count = std::min<int64_t>(max_total, all.size());
      std::partial_sort(all.begin(), all.begin() + count, all.end(), before<acc_t>);
      write(img, all, count);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multiclass_nms_kernel(
    const at::Tensor& boxes_in, const at::Tensor& scores_in, double iou_threshold, double score_threshold,
    int64_t max_per_class, int64_t max_total, bool class_agnostic) {
  check_multiclass_nms_args(boxes_in, scores_in, max_per_class, max_total);
  const int64_t batch = scores_in.size(0);
  auto out_boxes = at::zeros({batch, max_total, 4}, boxes_in.options());
  auto out_scores = at::zeros({batch, max_total}, scores_in.options());
  auto out_classes = at::full({batch, max_total}, -1, scores_in.options().dtype(at::kLong));
  auto out_num = at::zeros({batch}, scores_in.options().dtype(at::kLong));
  if (scores_in.numel() == 0) return {out_boxes, out_scores, out_classes, out_num};
  const at::Tensor boxes = boxes_in.contiguous(), scores = scores_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "multiclass_nms_cpu", [&] {
    multiclass_nms_kernel_impl<scalar_t>(boxes, scores, iou_threshold, score_threshold, max_per_class, max_total,
                                         class_agnostic, out_boxes, out_scores, out_classes, out_num);
  });
  return {out_boxes, out_scores, out_classes, out_num};
}

}  // namespace
}  // namespace visionops

TORCH_LIBRARY_IMPL(visionops, CPU, m) {
  m.impl("multiclass_nms", TORCH_FN(visionops::multiclass_nms_kernel));
}
