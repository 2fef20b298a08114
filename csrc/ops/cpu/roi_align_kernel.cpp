// CPU kernels of RoIAlign (math: ops/common/roi_align.h, visionops/reference/roi.py).
//
// torchvision's CPU kernels are serial, walk NCHW one channel at a time and scatter the backward one output
// element at a time. Here:
// * each RoI's bilinear taps are computed once and merged per bin (roi_align_bin_taps, shared with the CUDA
//   kernels), then applied to all channels at once on a channels-last view of the features, so the inner loop is a
//   contiguous multiply-add over C (a channels_last input is read in place; an NCHW one is transposed once);
// * the forward runs in parallel over RoIs; the backward over (level, image, block of channels): every task owns a
//   slice of grad_input and visits that image's RoIs in index order, so there is no race and the summation order of
//   each element is fixed: the gradient is bit-identical at any thread count;
// * MultiScaleRoIAlign is the same kernel over several levels, each RoI reading the level it was assigned; the
//   single- and multi-level entries, with their argument checks, come from ops/common/roi_align_entries.h.
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

#include "ops/common/roi_align.h"
#include "ops/common/roi_align_entries.h"
#include "ops/cpu/alloc.h"

namespace visionops {
namespace {

constexpr int64_t kChannelBlock = 32;  // channels per backward task: a cell's accumulators fill two cache lines

// Merged bilinear taps of one RoI: bin b uses entries [off[b], off[b + 1]) of (pos, w); w already holds 1/count.
template <typename T>
struct RoITaps {
  int64_t batch = 0;
  std::vector<int64_t> off, pos;
  std::vector<T> w;
};

template <typename T>
void roi_align_taps(const T* roi, T scale, int64_t H, int64_t W, int64_t PH, int64_t PW, int sampling_ratio,
                    bool aligned, RoITaps<T>& t) {
  const RoIAlignGeom<T> g = roi_align_geom<T>(roi, scale, PH, PW, sampling_ratio, aligned);
  t.batch = g.batch;
  t.off.assign(PH * PW + 1, 0);
  t.pos.clear();
  t.w.clear();
  const T inv_count = T(1) / g.count;
  for (int64_t ph = 0; ph < PH; ++ph) {
    for (int64_t pw = 0; pw < PW; ++pw) {
      const size_t first = t.pos.size();
      roi_align_bin_taps(g, ph, pw, H, W, [&](int64_t y, int64_t x, T w) {
        const int64_t pos = y * W + x;
        // A wide bin passes a cell once per sample touching it: merge with an earlier tap of this bin. The scan is
        // bounded so huge adaptive grids stay linear.
        const size_t scan_from = t.pos.size() - first > 64 ? t.pos.size() - 64 : first;
        for (size_t q = scan_from; q < t.pos.size(); ++q) {
          if (t.pos[q] == pos) {
            t.w[q] += w * inv_count;
            return;
          }
        }
        t.pos.push_back(pos);
        t.w.push_back(w * inv_count);
      });
      t.off[ph * PW + pw + 1] = static_cast<int64_t>(t.pos.size());
    }
  }
}

// One feature level: channels-last data (forward) or NCHW gradient (backward), its size and its spatial scale.
// The single-level op is the one-level case of the multi-level op (MultiScaleRoIAlign), whose RoIs each name a level.
template <typename scalar_t>
struct Level {
  scalar_t* data;
  int64_t B, H, W;
  double scale;
};

template <typename scalar_t>
void roi_align_forward_kernel_impl(const std::vector<Level<scalar_t>>& levels, const int64_t* lvl,
                                   const at::opmath_type<scalar_t>* r, int64_t K, int64_t C, int64_t PH, int64_t PW,
                                   int64_t sampling_ratio, bool aligned, scalar_t* o) {
  using T = at::opmath_type<scalar_t>;
  const int64_t bins = PH * PW;
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    RoITaps<T> t;
    for (int64_t k = k0; k < k1; ++k) {
      const Level<scalar_t>& L = levels[lvl ? lvl[k] : 0];
      roi_align_taps<T>(r + 5 * k, T(L.scale), L.H, L.W, PH, PW, int(sampling_ratio), aligned, t);
      const scalar_t* xb = L.data + t.batch * L.H * L.W * C;
      scalar_t* ok = o + k * C * bins;
      for (int64_t bin = 0; bin < bins; ++bin) {
        const int64_t e0 = t.off[bin], e1 = t.off[bin + 1];
        int64_t c0 = 0;
#if defined(__GNUC__)
        if constexpr (std::is_same_v<scalar_t, float>) {
          // 16 channels live in four vector registers across the bin's taps (gcc does not find this by itself:
          // it keeps a fixed-size accumulator array in scalar registers).
          typedef float vf4 __attribute__((vector_size(16)));
          auto load = [](const float* p) {
            vf4 v;
            std::memcpy(&v, p, sizeof v);
            return v;
          };
          for (; c0 + 16 <= C; c0 += 16) {
            vf4 a0 = {}, a1 = {}, a2 = {}, a3 = {};
            for (int64_t e = e0; e < e1; ++e) {
              const float* xp = xb + t.pos[e] * C + c0;
              const float w = t.w[e];
              a0 += w * load(xp), a1 += w * load(xp + 4), a2 += w * load(xp + 8), a3 += w * load(xp + 12);
            }
            float acc[16];
            std::memcpy(acc, &a0, 16), std::memcpy(acc + 4, &a1, 16), std::memcpy(acc + 8, &a2, 16);
            std::memcpy(acc + 12, &a3, 16);
            for (int j = 0; j < 16; ++j) ok[(c0 + j) * bins + bin] = acc[j];
          }
        }
#endif
        for (; c0 < C; ++c0) {
          T acc = 0;
          for (int64_t e = e0; e < e1; ++e) acc += t.w[e] * static_cast<T>(xb[t.pos[e] * C + c0]);
          ok[c0 * bins + bin] = static_cast<scalar_t>(acc);
        }
      }
    }
  });
}

template <typename scalar_t>
void roi_align_backward_kernel_impl(const scalar_t* g, const std::vector<Level<scalar_t>>& levels, const int64_t* lvl,
                                    const at::opmath_type<scalar_t>* r, int64_t K, int64_t C, int64_t PH, int64_t PW,
                                    int64_t sampling_ratio, bool aligned) {
  using T = at::opmath_type<scalar_t>;
  const int64_t bins = PH * PW;
  std::vector<RoITaps<T>> taps(K);
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const Level<scalar_t>& L = levels[lvl ? lvl[k] : 0];
      roi_align_taps<T>(r + 5 * k, T(L.scale), L.H, L.W, PH, PW, int(sampling_ratio), aligned, taps[k]);
    }
  });
  // RoIs of each (level, image), in index order; one task per (level, image, block of channels).
  std::vector<std::pair<int64_t, int64_t>> images;
  std::vector<std::vector<int64_t>> members;
  std::vector<int64_t> first(levels.size() + 1, 0);
  for (size_t l = 0; l < levels.size(); ++l) {
    first[l + 1] = first[l] + levels[l].B;
    for (int64_t b = 0; b < levels[l].B; ++b) images.emplace_back(l, b);
  }
  members.resize(images.size());
  for (int64_t k = 0; k < K; ++k) members[first[lvl ? lvl[k] : 0] + taps[k].batch].push_back(k);
  const int64_t nblk = (C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, static_cast<int64_t>(images.size()) * nblk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> acc, gt(bins * kChannelBlock);
    for (int64_t task = t0; task < t1; ++task) {
      const auto [l, b] = images[task / nblk];
      const Level<scalar_t>& L = levels[l];
      const int64_t HW = L.H * L.W, c0 = (task % nblk) * kChannelBlock;
      const int64_t cw = std::min(kChannelBlock, C - c0);
      acc.assign(HW * cw, T(0));
      for (const int64_t k : members[task / nblk]) {
        const RoITaps<T>& t = taps[k];
        const scalar_t* gk = g + (k * C + c0) * bins;
        for (int64_t c = 0; c < cw; ++c)  // this block's grad, bins-major, so the update below is contiguous
          for (int64_t bin = 0; bin < bins; ++bin) gt[bin * cw + c] = static_cast<T>(gk[c * bins + bin]);
        for (int64_t bin = 0; bin < bins; ++bin) {
          const T* gb = gt.data() + bin * cw;
          for (int64_t e = t.off[bin]; e < t.off[bin + 1]; ++e) {
            T* a = acc.data() + t.pos[e] * cw;
            const T w = t.w[e];
            for (int64_t c = 0; c < cw; ++c) a[c] += gb[c] * w;
          }
        }
      }
      scalar_t* out = L.data + (b * C + c0) * HW;
      for (int64_t c = 0; c < cw; ++c)
        for (int64_t p = 0; p < HW; ++p) out[c * HW + p] = static_cast<scalar_t>(acc[p * cw + c]);
    }
  });
}

template <typename T>
void check_indices(const T* r, const int64_t* lvl, int64_t K, const std::vector<int64_t>& batch_sizes, const char* op) {
  const int64_t L = static_cast<int64_t>(batch_sizes.size());
  for (int64_t k = 0; k < K; ++k) {
    const int64_t l = lvl ? lvl[k] : 0;
    TORCH_CHECK_INDEX(l >= 0 && l < L, op, ": levels[", k, "] must be in [0, ", L, "), got ", l);
    const int64_t b = roi_align_geom<T>(r + 5 * k, T(1), 1, 1, 1, false).batch;
    TORCH_CHECK_INDEX(b >= 0 && b < batch_sizes[l], op, ": rois[", k, ", 0] (batch index) must be in [0, ",
                      batch_sizes[l], "), got ", b);
  }
}

// The multi-level kernels behind the four entries of ops/common/roi_align_entries.h, which check the arguments.
struct CpuRoIAlign {
  // Levels live in a std::vector here: no cap (CUDA's is kMaxRoIAlignLevels).
  static constexpr size_t kMaxLevels = kAnyLevelCount;

  static at::Tensor forward(const char* op, at::TensorList features, const at::Tensor& rois_in,
                            const at::Tensor* levels_in, at::ArrayRef<double> scales, int64_t PH, int64_t PW,
                            int64_t sampling_ratio, bool aligned) {
    const at::Tensor& f0 = features[0];
    const int64_t K = rois_in.size(0), C = f0.size(1);
    at::Tensor out = empty_output({K, C, PH, PW}, f0.options());
    if (K == 0) return out;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "roi_align_forward_cpu", [&] {
      using T = at::opmath_type<scalar_t>;
      const at::Tensor rois = rois_in.to(c10::CppTypeToScalarType<T>::value).contiguous();
      const at::Tensor levels = levels_in ? levels_in->contiguous() : at::Tensor();
      const int64_t* lvl = levels_in ? levels.data_ptr<int64_t>() : nullptr;
      std::vector<int64_t> batch_sizes;
      for (const at::Tensor& f : features) batch_sizes.push_back(f.size(0));
      check_indices(rois.data_ptr<T>(), lvl, K, batch_sizes, op);
      if (C == 0) return;
      // Channels-last views: read in place when the input already is, transposed once otherwise.
      std::vector<at::Tensor> keep;
      std::vector<Level<scalar_t>> lv;
      for (size_t l = 0; l < features.size(); ++l) {
        keep.push_back(features[l].contiguous(at::MemoryFormat::ChannelsLast));
        lv.push_back({keep.back().data_ptr<scalar_t>(), keep.back().size(0), keep.back().size(2), keep.back().size(3),
                      scales[l]});
      }
      roi_align_forward_kernel_impl<scalar_t>(lv, lvl, rois.data_ptr<T>(), K, C, PH, PW, sampling_ratio, aligned,
                                              out.data_ptr<scalar_t>());
    });
    return out;
  }

  static std::vector<at::Tensor> backward(const char* op, const at::Tensor& grad_in, const at::Tensor& rois_in,
                                          const at::Tensor* levels_in, at::ArrayRef<double> scales, int64_t PH,
                                          int64_t PW, at::IntArrayRef shapes, int64_t sampling_ratio, bool aligned) {
    const int64_t K = rois_in.size(0), L = static_cast<int64_t>(shapes.size() / 4), C = shapes[1];
    std::vector<at::Tensor> gins;
    for (int64_t l = 0; l < L; ++l) gins.push_back(zeros_output(shapes.slice(4 * l, 4), grad_in.options()));
    if (K == 0 || C == 0) return gins;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_in.scalar_type(), "roi_align_backward_cpu", [&] {
      using T = at::opmath_type<scalar_t>;
      const at::Tensor rois = rois_in.to(c10::CppTypeToScalarType<T>::value).contiguous();
      const at::Tensor levels = levels_in ? levels_in->contiguous() : at::Tensor();
      const int64_t* lvl = levels_in ? levels.data_ptr<int64_t>() : nullptr;
      std::vector<int64_t> batch_sizes;
      std::vector<Level<scalar_t>> lv;
      for (int64_t l = 0; l < L; ++l) {
        batch_sizes.push_back(shapes[4 * l]);
        lv.push_back({gins[l].data_ptr<scalar_t>(), shapes[4 * l], shapes[4 * l + 2], shapes[4 * l + 3], scales[l]});
      }
      check_indices(rois.data_ptr<T>(), lvl, K, batch_sizes, op);
      const at::Tensor grad = grad_in.contiguous();
      roi_align_backward_kernel_impl<scalar_t>(grad.data_ptr<scalar_t>(), lv, lvl, rois.data_ptr<T>(), K, C, PH, PW,
                                               sampling_ratio, aligned);
    });
    return gins;
  }
};

using Entries = RoIAlignEntries<CpuRoIAlign>;

}  // namespace

TORCH_LIBRARY_IMPL(visionops, CPU, m) {
  m.impl("roi_align", TORCH_FN(Entries::roi_align));
  m.impl("_roi_align_backward", TORCH_FN(Entries::roi_align_backward));
  m.impl("multi_scale_roi_align", TORCH_FN(Entries::multi_scale_roi_align));
  m.impl("_multi_scale_roi_align_backward", TORCH_FN(Entries::multi_scale_roi_align_backward));
}

}  // namespace visionops
