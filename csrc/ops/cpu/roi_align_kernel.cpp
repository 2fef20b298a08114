// CPU kernels of RoIAlign (math: ops/common/roi_align.h, visionops/reference/roi.py).
//
// torchvision's CPU kernels are serial, walk NCHW one channel at a time and scatter the backward one output
// element at a time. Here:
// * each RoI's bilinear taps are computed once and merged per bin (neighbouring samples often share taps), then
//   applied to all channels at once on a channels-last view of the features, so the inner loop is a contiguous
//   multiply-add over C (a channels_last input is read in place; an NCHW one is transposed once);
// * the forward runs in parallel over RoIs; the backward over (image, block of channels): every task owns a slice
//   of grad_input and visits that image's RoIs in index order, so there is no race and the summation order of each
//   element is fixed: the gradient is bit-identical at any thread count.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "ops/common/roi_align.h"

namespace visionops {
namespace {

constexpr int64_t kChannelBlock = 32;  // channels per backward task: its accumulator row stays in a cache line pair

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
      for (int64_t iy = 0; iy < g.grid_h; ++iy) {
        const T y = roi_align_sample(g.start_h, g.bin_h, ph, iy, g.grid_h);
        for (int64_t ix = 0; ix < g.grid_w; ++ix) {
          const T x = roi_align_sample(g.start_w, g.bin_w, pw, ix, g.grid_w);
          int64_t pos[4];
          T w[4];
          if (!bilinear_taps(y, x, H, W, pos, w)) continue;
          for (int j = 0; j < 4; ++j) {
            if (w[j] == T(0)) continue;  // clamped axis: half the taps carry no weight
            const T wj = w[j] * inv_count;
            // Merge with an earlier tap of this bin: samples a fraction of a cell apart share taps. The scan is
            // bounded so huge adaptive grids stay linear.
            size_t e = t.pos.size();
            const size_t scan_from = t.pos.size() - first > 64 ? t.pos.size() - 64 : first;
            for (size_t q = scan_from; q < t.pos.size(); ++q) {
              if (t.pos[q] == pos[j]) {
                e = q;
                break;
              }
            }
            if (e == t.pos.size()) {
              t.pos.push_back(pos[j]);
              t.w.push_back(wj);
            } else {
              t.w[e] += wj;
            }
          }
        }
      }
      t.off[ph * PW + pw + 1] = static_cast<int64_t>(t.pos.size());
    }
  }
}

template <typename T>
void check_batch_index(int64_t batch, int64_t B, int64_t k) {
  TORCH_CHECK_INDEX(batch >= 0 && batch < B, "roi_align: rois[", k, ", 0] (batch index) must be in [0, ", B,
                    "), got ", batch);
}

template <typename scalar_t>
void roi_align_forward_kernel_impl(const at::Tensor& x_cl, const at::Tensor& rois, double spatial_scale, int64_t PH,
                                   int64_t PW, int64_t sampling_ratio, bool aligned, at::Tensor& out) {
  using T = at::opmath_type<scalar_t>;
  const int64_t K = rois.size(0), C = x_cl.size(1), H = x_cl.size(2), W = x_cl.size(3);
  const scalar_t* x = x_cl.data_ptr<scalar_t>();
  const T* r = rois.data_ptr<T>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t bins = PH * PW;
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    RoITaps<T> t;
    for (int64_t k = k0; k < k1; ++k) {
      roi_align_taps<T>(r + 5 * k, T(spatial_scale), H, W, PH, PW, int(sampling_ratio), aligned, t);
      const scalar_t* xb = x + t.batch * H * W * C;
      scalar_t* ok = o + k * C * bins;
      for (int64_t bin = 0; bin < bins; ++bin) {
        const int64_t e0 = t.off[bin], e1 = t.off[bin + 1];
        int64_t c0 = 0;
#if defined(__GNUC__)
        if constexpr (std::is_same_v<scalar_t, float>) {
          // 16 channels live in four vector registers across the bin's taps (gcc does not find this by itself:
          // it keeps a fixed-size accumulator array in scalar registers).
          typedef float vf4 __attribute__((vector_size(16)));
          auto load = [](const float* p) { vf4 v; std::memcpy(&v, p, sizeof v); return v; };
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
void roi_align_backward_kernel_impl(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale, int64_t PH,
                                    int64_t PW, int64_t sampling_ratio, bool aligned, at::Tensor& gin) {
  using T = at::opmath_type<scalar_t>;
  const int64_t K = rois.size(0), B = gin.size(0), C = gin.size(1), H = gin.size(2), W = gin.size(3);
  const int64_t bins = PH * PW, HW = H * W;
  const T* r = rois.data_ptr<T>();
  std::vector<RoITaps<T>> taps(K);
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      roi_align_taps<T>(r + 5 * k, T(spatial_scale), H, W, PH, PW, int(sampling_ratio), aligned, taps[k]);
  });
  std::vector<std::vector<int64_t>> by_image(B);  // RoIs of each image, in index order
  for (int64_t k = 0; k < K; ++k) by_image[taps[k].batch].push_back(k);
  const scalar_t* g = grad.data_ptr<scalar_t>();
  scalar_t* gi = gin.data_ptr<scalar_t>();
  const int64_t nblk = (C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, B * nblk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> acc, gt(bins * kChannelBlock);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / nblk, c0 = (task % nblk) * kChannelBlock;
      const int64_t cw = std::min(kChannelBlock, C - c0);
      acc.assign(HW * cw, T(0));
      for (const int64_t k : by_image[b]) {
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
      scalar_t* out = gi + (b * C + c0) * HW;
      for (int64_t c = 0; c < cw; ++c)
        for (int64_t p = 0; p < HW; ++p) out[c * HW + p] = static_cast<scalar_t>(acc[p * cw + c]);
    }
  });
}

void check_rois(const at::Tensor& input, const at::Tensor& rois, const char* op) {
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must have shape [N, C, H, W], got ", input.sizes());
  TORCH_CHECK_VALUE(rois.dim() == 2 && rois.size(1) == 5, op, ": rois must have shape [K, 5], got ", rois.sizes());
  TORCH_CHECK_VALUE(rois.is_floating_point(), op, ": rois must be a floating-point tensor, got ", rois.scalar_type());
}

at::Tensor roi_align_forward_kernel(const at::Tensor& input, const at::Tensor& rois_in, double spatial_scale,
                                   int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                                   bool aligned) {
  check_rois(input, rois_in, "roi_align");
  TORCH_CHECK_VALUE(pooled_height > 0 && pooled_width > 0, "roi_align: output_size must be positive, got (",
                    pooled_height, ", ", pooled_width, ")");
  const int64_t K = rois_in.size(0), B = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  at::Tensor out = at::empty({K, C, pooled_height, pooled_width}, input.options());
  if (K == 0) return out;
  TORCH_CHECK_VALUE(H > 0 && W > 0, "roi_align: input must have a non-empty feature map, got ", input.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_align_forward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor rois = rois_in.to(c10::CppTypeToScalarType<T>::value).contiguous();
    const T* r = rois.data_ptr<T>();
    for (int64_t k = 0; k < K; ++k)
      check_batch_index<T>(roi_align_geom<T>(r + 5 * k, T(1), 1, 1, 1, false).batch, B, k);
    if (C == 0) return;
    // Channels-last view: read in place when the input already is, transposed once otherwise.
    const at::Tensor x_cl = input.contiguous(at::MemoryFormat::ChannelsLast);
    roi_align_forward_kernel_impl<scalar_t>(x_cl, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                                            aligned, out);
  });
  return out;
}

at::Tensor roi_align_backward_kernel(const at::Tensor& grad_in, const at::Tensor& rois_in, double spatial_scale,
                                    int64_t pooled_height, int64_t pooled_width, int64_t batch_size,
                                    int64_t channels, int64_t height, int64_t width, int64_t sampling_ratio,
                                    bool aligned) {
  TORCH_CHECK_VALUE(rois_in.dim() == 2 && rois_in.size(1) == 5, "_roi_align_backward: rois must have shape [K, 5]");
  const int64_t K = rois_in.size(0);
  TORCH_CHECK_VALUE(grad_in.dim() == 4 && grad_in.size(0) == K && grad_in.size(1) == channels &&
                        grad_in.size(2) == pooled_height && grad_in.size(3) == pooled_width,
                    "_roi_align_backward: grad must have shape [K, C, PH, PW], got ", grad_in.sizes());
  at::Tensor gin = at::zeros({batch_size, channels, height, width}, grad_in.options());
  if (K == 0 || gin.numel() == 0) return gin;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_in.scalar_type(), "roi_align_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor rois = rois_in.to(c10::CppTypeToScalarType<T>::value).contiguous();
    const T* r = rois.data_ptr<T>();
    for (int64_t k = 0; k < K; ++k)
      check_batch_index<T>(roi_align_geom<T>(r + 5 * k, T(1), 1, 1, 1, false).batch, batch_size, k);
    roi_align_backward_kernel_impl<scalar_t>(grad_in.contiguous(), rois, spatial_scale, pooled_height, pooled_width,
                                             sampling_ratio, aligned, gin);
  });
  return gin;
}

}  // namespace

TORCH_LIBRARY_IMPL(visionops, CPU, m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward_kernel));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_kernel));
}

}  // namespace visionops
