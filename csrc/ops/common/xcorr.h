#pragma once
// SiamFC cross-correlation, shared by the CPU and CUDA kernels (math: visionops/reference/xcorr.py). With
// z [Bz, C, Hz, Wz], x [B, C, Hx, Wx], Ho = Hx - Hz + 1, Wo = Wx - Wz + 1 and b' = b (or 0 when Bz == 1):
//
//   depthwise_xcorr(z, x)[b, c, u, v] = sum_{i, j} z[b', c, i, j] * x[b, c, u + i, v + j]
//   xcorr(z, x, s)[b, 0, u, v]        = s * sum_c depthwise_xcorr(z, x)[b, c, u, v]
//   grad_z[b', c, i, j] = sum_{b -> b', u, v} g[b, (c), u, v] * x[b, c, u + i, v + j]    (times s for xcorr)
//   grad_x[b, c, y, w]  = sum_{i, j} g[b, (c), y - i, w - j] * z[b', c, i, j]          (the taps xcorr_taps gives)
//
// where g[b, (c), ...] is grad[b, c, ...] for depthwise_xcorr and grad[b, 0, ...] for xcorr.
#include <cstdint>

#include <ATen/core/Tensor.h>

#include "ops/common/macros.h"

namespace visionops {

// The taps [lo, hi) of one axis that reach output position p of a gather gradient: the i < K with 0 <= p - i < O,
// where K is z's size and O the output's along that axis (grad_x's gather form: no atomics, no bounds checks inside).
VISIONOPS_HOST_DEVICE inline void xcorr_taps(int64_t p, int64_t K, int64_t O, int64_t& lo, int64_t& hi) {
  lo = p - O + 1 > 0 ? p - O + 1 : 0;
  hi = p + 1 < K ? p + 1 : K;
}

// The memory format of an output that follows t (depthwise_xcorr's output follows x; grad_z and grad_x follow z and
// x): channels_last when t is and is not also plainly contiguous. The fake kernels (visionops/ops/xcorr.py) use the
// same rule.
inline at::MemoryFormat xcorr_out_format(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

// The checks of every xcorr entry (both variants, both directions, both backends): z and x 4-D floating tensors of
// one dtype and device, same channels, z no larger than x, z's batch 1 or x's; grad (backwards) the output's shape.
inline void check_xcorr_args(const char* op, const at::Tensor& z, const at::Tensor& x, bool sum_channels,
                             const at::Tensor* grad = nullptr) {
  TORCH_CHECK_VALUE(z.dim() == 4, op, ": z must be a 4-D tensor [Bz, C, Hz, Wz], got shape ", z.sizes());
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be a 4-D tensor [B, C, Hx, Wx], got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.is_floating_point(), op, ": x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK_TYPE(z.scalar_type() == x.scalar_type(), op, ": z has dtype ", z.scalar_type(), " but x has ",
                   x.scalar_type(), "; they must have the same dtype");
  TORCH_CHECK_VALUE(z.device() == x.device(), op, ": z is on ", z.device(), " but x is on ", x.device(),
                    "; they must be on the same device");
  TORCH_CHECK_VALUE(z.size(1) == x.size(1), op, ": z has ", z.size(1), " channels but x has ", x.size(1),
                    "; they must be equal");
  TORCH_CHECK_VALUE(z.size(2) >= 1 && z.size(3) >= 1, op, ": z must have a non-empty spatial size, got shape ",
                    z.sizes());
  TORCH_CHECK_VALUE(z.size(2) <= x.size(2) && z.size(3) <= x.size(3), op, ": z (", z.size(2), "x", z.size(3),
                    ") must not be larger than x (", x.size(2), "x", x.size(3), ") in either spatial dimension");
  TORCH_CHECK_VALUE(z.size(0) == 1 || z.size(0) == x.size(0), op, ": z must have batch size 1 or x's (", x.size(0),
                    "), got ", z.size(0));
  if (grad == nullptr) return;
  const at::Tensor& g = *grad;
  const int64_t channels = sum_channels ? 1 : x.size(1);
  const int64_t Ho = x.size(2) - z.size(2) + 1, Wo = x.size(3) - z.size(3) + 1;
  TORCH_CHECK_VALUE(
      g.dim() == 4 && g.size(0) == x.size(0) && g.size(1) == channels && g.size(2) == Ho && g.size(3) == Wo, op,
      ": grad must have the output's shape [", x.size(0), ", ", channels, ", ", Ho, ", ", Wo, "], got ", g.sizes());
  TORCH_CHECK_TYPE(g.scalar_type() == x.scalar_type(), op, ": grad has dtype ", g.scalar_type(), " but x has ",
                   x.scalar_type(), "; they must have the same dtype");
  TORCH_CHECK_VALUE(g.device() == x.device(), op, ": grad is on ", g.device(), " but x is on ", x.device(),
                    "; they must be on the same device");
}

}  // namespace visionops
