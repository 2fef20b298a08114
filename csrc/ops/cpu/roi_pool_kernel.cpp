// CPU kernels of RoIPool (math: ops/common/roi_pool.h, visionops/reference/roi.py).
//
// Unlike torchvision, the forward keeps no argmax tensor: it would be an int64 tensor twice the size of the
// output (100 MB for 1024 RoIs x 256 channels x 7 x 7), and writing it costs more than the pooling. The backward
// takes the input instead and finds each bin's maximum again with the same rule (first strict maximum; NaN never
// wins), which is cheap next to the scatter it saves a gather for.
//
// Both directions run in parallel over (image, block of channels) tasks and work on a channels-last view of the
// block (the input read in place when it is channels_last, else one block transposed at a time, kept in L2), so a
// bin's max/argmax is a contiguous compare-select over channels. In the backward each task owns a slice of
// grad_input and adds its RoIs' gradients in index order, torchvision's serial order, so there is no race and the
// bits do not depend on the thread count.
#include <algorithm>
#include <cfloat>
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

#include "ops/common/roi_checks.h"
#include "ops/common/roi_pool.h"
#include "ops/cpu/alloc.h"

namespace visionops {
namespace {

// Channels per task. A backward task keeps its block of features and its accumulators, H * W * kChannelBlock each,
// in L2.
constexpr int64_t kChannelBlock = 32;
constexpr int64_t kForwardBlock = 128;

template <typename T>
void check_batch_index(const T* r, int64_t K, int64_t B, const char* op) {
  for (int64_t k = 0; k < K; ++k) {
    const int64_t b = roi_pool_geom<T>(r + 5 * k, T(1), 1, 1).batch;
    TORCH_CHECK_INDEX(b >= 0 && b < B, op, ": rois[", k, ", 0] (batch index) must be in [0, ", B, "), got ", b);
  }
}

// Max and argmax (cell index h * W + w, -1 when no cell beats the initial value) of one bin over channels
// [0, n) of a channels-last image `xb` whose pixel stride is C. An empty bin gives (0, -1).
template <typename scalar_t, typename T>
void bin_max(const scalar_t* xb, int64_t C, int64_t W, int64_t h0, int64_t h1, int64_t w0, int64_t w1, int64_t n,
             T* __restrict__ m, int32_t* __restrict__ a) {
  const bool empty = h1 <= h0 || w1 <= w0;
  const T init = empty ? T(0) : T(-FLT_MAX);
  int64_t c0 = 0;
#if defined(__GNUC__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    // 8 channels' running max and argmax stay in vector registers across the bin's cells.
    typedef float vf4 __attribute__((vector_size(16)));
    typedef int32_t vi4 __attribute__((vector_size(16)));
    auto load = [](const float* p) {
      vf4 v;
      std::memcpy(&v, p, sizeof v);
      return v;
    };
    auto pick = [](vi4 mask, vi4 x, vi4 y) { return (x & mask) | (y & ~mask); };
    for (; c0 + 8 <= n; c0 += 8) {
      vf4 m0 = {init, init, init, init}, m1 = m0;
      vi4 a0 = {-1, -1, -1, -1}, a1 = a0;
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t w = w0; w < w1; ++w) {
          const int32_t idx = static_cast<int32_t>(h * W + w);
          const vi4 vidx = {idx, idx, idx, idx};
          const float* xp = xb + static_cast<int64_t>(idx) * C + c0;
          const vf4 v0 = load(xp), v1 = load(xp + 4);
          const vi4 g0 = v0 > m0, g1 = v1 > m1;  // strict: the first maximum wins; NaN never does
          m0 = (vf4)pick(g0, (vi4)v0, (vi4)m0), m1 = (vf4)pick(g1, (vi4)v1, (vi4)m1);
          a0 = pick(g0, vidx, a0), a1 = pick(g1, vidx, a1);
        }
      }
      std::memcpy(m + c0, &m0, 16), std::memcpy(m + c0 + 4, &m1, 16);
      std::memcpy(a + c0, &a0, 16), std::memcpy(a + c0 + 4, &a1, 16);
    }
  }
#endif
  std::fill(m + c0, m + n, init);
  std::fill(a + c0, a + n, int32_t(-1));
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = w0; w < w1; ++w) {
      const int32_t idx = static_cast<int32_t>(h * W + w);
      const scalar_t* __restrict__ xp = xb + static_cast<int64_t>(idx) * C;
      // Bit-mask select: gcc does not if-convert `gt ? idx : a[c]`, and the loop would stay scalar and branchy.
      for (int64_t c = c0; c < n; ++c) {
        const T v = static_cast<T>(xp[c]);
        const T mc = m[c];
        const int32_t gt = -static_cast<int32_t>(v > mc);  // strict: the first maximum wins; NaN never does
        m[c] = gt ? v : mc;
        a[c] = (a[c] & ~gt) | (idx & gt);
      }
    }
  }
}

template <typename scalar_t>
inline void prefetch(const scalar_t* p, int64_t n) {
#if defined(__GNUC__)
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < n * static_cast<int64_t>(sizeof(scalar_t)); i += 64) __builtin_prefetch(c + i);
#endif
}

// RoIs of each image, in index order (batch indices already checked).
template <typename T>
std::vector<std::vector<int64_t>> rois_by_image(const T* r, int64_t K, int64_t B) {
  std::vector<std::vector<int64_t>> by_image(B);
  for (int64_t k = 0; k < K; ++k) by_image[roi_pool_geom<T>(r + 5 * k, T(1), 1, 1).batch].push_back(k);
  return by_image;
}

// Channels [c0, c0 + cw) of image b as channels-last rows of `stride` elements per cell: in place for a channels_last
// input (stride C); an NCHW one is transposed into `buf` (stride cw). A task's block (H * W * cw elements) stays in
// L2 while the image's RoIs are pooled, and no channels-last copy of the whole input goes through memory.
template <typename scalar_t>
const scalar_t* feature_block(const scalar_t* x, bool channels_last, int64_t b, int64_t c0, int64_t cw, int64_t C,
                              int64_t HW, std::vector<scalar_t>& buf, int64_t& stride) {
  if (channels_last) {
    stride = C;
    return x + b * HW * C + c0;
  }
  buf.resize(HW * cw);
  const scalar_t* src = x + (b * C + c0) * HW;
  // Cell-major: the cw source rows are read in step (a cache line each), every row of buf written whole.
  for (int64_t p = 0; p < HW; ++p)
    for (int64_t c = 0; c < cw; ++c) buf[p * cw + c] = src[c * HW + p];
  stride = cw;
  return buf.data();
}

// Forward tasks take wider blocks (kForwardBlock): no accumulator shares the cache, and bin_max calls are fewer.
template <typename scalar_t>
void roi_pool_forward_kernel_impl(const at::Tensor& x, bool channels_last, const at::Tensor& rois, double spatial_scale,
                                  int64_t PH, int64_t PW, at::Tensor& out) {
  using T = at::opmath_type<scalar_t>;
  const int64_t K = rois.size(0), B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t bins = PH * PW, HW = H * W;
  const T* r = rois.data_ptr<T>();
  const std::vector<std::vector<int64_t>> by_image = rois_by_image(r, K, B);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t nblk = (C + kForwardBlock - 1) / kForwardBlock;
  at::parallel_for(0, B * nblk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<scalar_t> buf;
    std::vector<T> m(bins * kForwardBlock);  // one RoI's block, bins-major, written out channel by channel
    std::vector<int32_t> a(kForwardBlock);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / nblk, c0 = (task % nblk) * kForwardBlock;
      const int64_t cw = std::min(kForwardBlock, C - c0);
      if (by_image[b].empty()) continue;
      int64_t stride;
      const scalar_t* xb = feature_block(xp, channels_last, b, c0, cw, C, HW, buf, stride);
      for (const int64_t k : by_image[b]) {
        const RoIPoolGeom<T> g = roi_pool_geom<T>(r + 5 * k, T(spatial_scale), PH, PW);
        for (int64_t ph = 0; ph < PH; ++ph) {
          int64_t h0, h1;
          roi_pool_bin(g.start_h, g.bin_h, ph, H, h0, h1);
          if (!g.valid) h1 = h0;
          for (int64_t pw = 0; pw < PW; ++pw) {
            int64_t w0, w1;
            roi_pool_bin(g.start_w, g.bin_w, pw, W, w0, w1);
            bin_max(xb, stride, W, h0, h1, w0, w1, cw, m.data() + (ph * PW + pw) * cw, a.data());
          }
        }
        scalar_t* ok = o + (k * C + c0) * bins;
        for (int64_t c = 0; c < cw; ++c)
          for (int64_t bin = 0; bin < bins; ++bin) ok[c * bins + bin] = static_cast<scalar_t>(m[bin * cw + c]);
      }
    }
  });
}

// Each task owns a slice of grad_input and writes all of it (gin needs no zero fill); RoIs add in index order,
// torchvision's serial order, so there is no race and the bits do not depend on the thread count.
template <typename scalar_t>
void roi_pool_backward_kernel_impl(const at::Tensor& grad, const at::Tensor& x, bool channels_last,
                                   const at::Tensor& rois, double spatial_scale, int64_t PH, int64_t PW,
                                   at::Tensor& gin) {
  using T = at::opmath_type<scalar_t>;
  const int64_t K = rois.size(0), B = gin.size(0), C = gin.size(1), H = gin.size(2), W = gin.size(3);
  const int64_t bins = PH * PW, HW = H * W;
  const T* r = rois.data_ptr<T>();
  const std::vector<std::vector<int64_t>> by_image = rois_by_image(r, K, B);
  const scalar_t* g = grad.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* gi = gin.data_ptr<scalar_t>();
  const int64_t nblk = (C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, B * nblk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<scalar_t> buf;
    std::vector<T> acc, m(kChannelBlock), gt(kChannelBlock * bins);
    std::vector<int32_t> a(kChannelBlock);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / nblk, c0 = (task % nblk) * kChannelBlock;
      const int64_t cw = std::min(kChannelBlock, C - c0);
      acc.assign(HW * cw, T(0));
      int64_t stride = 0;
      const scalar_t* xb =
          by_image[b].empty() ? nullptr : feature_block(xp, channels_last, b, c0, cw, C, HW, buf, stride);
      const std::vector<int64_t>& ks = by_image[b];
      for (size_t i = 0; i < ks.size(); ++i) {
        const int64_t k = ks[i];
        // The next RoI's grad rows are a few KB far from these: fetch them while this RoI is pooled (the reads
        // below stalled on memory for a fifth of the backward's time).
        if (i + 1 < ks.size()) prefetch(g + (ks[i + 1] * C + c0) * bins, cw * bins);
        const RoIPoolGeom<T> geo = roi_pool_geom<T>(r + 5 * k, T(spatial_scale), PH, PW);
        if (!geo.valid) continue;
        // This block's grad rows are contiguous: read once, bins-major, so each bin's scatter reads a row.
        const scalar_t* gk = g + (k * C + c0) * bins;
        for (int64_t c = 0; c < cw; ++c)
          for (int64_t bin = 0; bin < bins; ++bin) gt[bin * cw + c] = static_cast<T>(gk[c * bins + bin]);
        for (int64_t ph = 0; ph < PH; ++ph) {
          int64_t h0, h1;
          roi_pool_bin(geo.start_h, geo.bin_h, ph, H, h0, h1);
          for (int64_t pw = 0; pw < PW; ++pw) {
            int64_t w0, w1;
            roi_pool_bin(geo.start_w, geo.bin_w, pw, W, w0, w1);
            if (h1 <= h0 || w1 <= w0) continue;  // empty bin: no maximum, no gradient
            bin_max(xb, stride, W, h0, h1, w0, w1, cw, m.data(), a.data());
            const T* gb = gt.data() + (ph * PW + pw) * cw;
            for (int64_t c = 0; c < cw; ++c)
              if (a[c] >= 0) acc[a[c] * cw + c] += gb[c];
          }
        }
      }
      scalar_t* out = gi + (b * C + c0) * HW;
      for (int64_t c = 0; c < cw; ++c)
        for (int64_t p = 0; p < HW; ++p) out[c * HW + p] = static_cast<scalar_t>(acc[p * cw + c]);
    }
  });
}

// The layout the kernels read the input in: channels_last in place, anything else as NCHW.
bool read_channels_last(const at::Tensor& input) {
  return input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// The shared checks (ops/common/roi_checks.h), plus this kernel's own limit: argmaxes are int32 cell indices.
void check_args(const char* op, const at::Tensor& input, const at::Tensor& rois, double spatial_scale, int64_t PH,
                int64_t PW, const at::Tensor* grad) {
  check_roi_pool_args(op, input, rois, spatial_scale, PH, PW, grad);
  TORCH_CHECK_VALUE(input.size(2) * input.size(3) < (int64_t(1) << 31), op,
                    ": input's H * W must be below 2^31 on the CPU, got ", input.sizes());
}

at::Tensor roi_pool_forward_kernel(const at::Tensor& input, const at::Tensor& rois_in, double spatial_scale,
                                   int64_t pooled_height, int64_t pooled_width) {
  check_args("roi_pool", input, rois_in, spatial_scale, pooled_height, pooled_width, nullptr);
  const int64_t K = rois_in.size(0), B = input.size(0), C = input.size(1);
  at::Tensor out = empty_output({K, C, pooled_height, pooled_width}, input.options());
  if (K == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "roi_pool_forward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor rois = rois_in.to(c10::CppTypeToScalarType<T>::value).contiguous();
    check_batch_index<T>(rois.data_ptr<T>(), K, B, "roi_pool");
    if (C == 0) return;
    const bool cl = read_channels_last(input);
    roi_pool_forward_kernel_impl<scalar_t>(
        input.contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous), cl, rois, spatial_scale,
        pooled_height, pooled_width, out);
  });
  return out;
}

at::Tensor roi_pool_backward_kernel(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& rois_in,
                                    double spatial_scale, int64_t pooled_height, int64_t pooled_width) {
  check_args("_roi_pool_backward", input, rois_in, spatial_scale, pooled_height, pooled_width, &grad);
  const int64_t K = rois_in.size(0), B = input.size(0);
  if (K == 0 || input.numel() == 0) return at::zeros(input.sizes(), grad.options());
  at::Tensor gin = empty_output(input.sizes(), grad.options());  // the kernel writes every element
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "roi_pool_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor rois = rois_in.to(c10::CppTypeToScalarType<T>::value).contiguous();
    check_batch_index<T>(rois.data_ptr<T>(), K, B, "_roi_pool_backward");
    const bool cl = read_channels_last(input);
    roi_pool_backward_kernel_impl<scalar_t>(
        grad.contiguous(), input.contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous), cl,
        rois, spatial_scale, pooled_height, pooled_width, gin);
  });
  return gin;
}

}  // namespace

TORCH_LIBRARY_IMPL(visionops, CPU, m) {
  m.impl("roi_pool", TORCH_FN(roi_pool_forward_kernel));
  m.impl("_roi_pool_backward", TORCH_FN(roi_pool_backward_kernel));
}

}  // namespace visionops
