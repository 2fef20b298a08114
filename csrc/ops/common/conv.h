#pragma once
// The convolution family (conv2d, conv3d), shared by the CPU and CUDA kernels: argument checks, the output size, the
// geometry both backends loop over, and the memory-format rule of the outputs. The math is F.conv2d / F.conv3d
// (cross-correlation, symmetric zero padding; visionops/reference/conv.py):
//
//   out[b, o, p]   = bias[o] + sum_{c < Cin/G, t} w[o, c, t] * x[b, g * Cin/G + c, p * s - pad + t * d]
//   grad_x[b, ci, q] = sum_{o in ci's group, t : q = p * s - pad + t * d} g[b, o, p] * w[o, ci % (Cin/G), t]
//   grad_w[o, c, t]  = sum_{b, p} g[b, o, p] * x[b, g * Cin/G + c, p * s - pad + t * d]
//   grad_bias[o]     = sum_{b, p} g[b, o, p]
//
// with p, q, t multi-indices over the NDim spatial axes, g = o / (Cout/G) the group, and x read as zero outside it.
// 2-D is handled as 3-D with depth 1 (ConvGeometry), so a kernel written for 3-D serves both.
#include <array>
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>

#include "ops/common/macros.h"

namespace visionops {

// The output size along one axis (F.conv's formula); >= 1 whenever the dilated kernel fits the padded input.
VISIONOPS_HOST_DEVICE inline int64_t conv_out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  return (in + 2 * p - d * (k - 1) - 1) / s + 1;
}

// One call's shapes, spatial axes always 3 (depth, height, width): a 2-D call has depth 1, kernel 1, stride 1,
// padding 0 and dilation 1 along axis 0.
struct ConvGeometry {
  int ndim = 0;  // 2 or 3: the call's own number of spatial axes
  int64_t batch = 0, in_channels = 0, out_channels = 0, groups = 1;
  int64_t in_per_group = 0, out_per_group = 0;  // Cin / G, Cout / G
  std::array<int64_t, 3> in{}, out{}, kernel{}, stride{}, padding{}, dilation{};

  int64_t in_spatial() const { return in[0] * in[1] * in[2]; }
  int64_t out_spatial() const { return out[0] * out[1] * out[2]; }
  int64_t taps() const { return kernel[0] * kernel[1] * kernel[2]; }
  // The sizes of the output tensor [B, Cout, *out] (ndim + 2 of them).
  std::array<int64_t, 5> out_sizes() const {
    std::array<int64_t, 5> s{batch, out_channels, 0, 0, 0};
    for (int i = 0; i < ndim; ++i) s[2 + i] = out[3 - ndim + i];
    return s;
  }
  at::IntArrayRef out_shape(const std::array<int64_t, 5>& s) const { return at::IntArrayRef(s.data(), ndim + 2); }
};

// The memory format of an output that follows t (the output and grad_input follow the input, grad_weight the
// weight): channels-last when t is and is not also plainly contiguous. The fake kernels (visionops/ops/conv.py)
// use the same rule.
inline at::MemoryFormat conv_out_format(const at::Tensor& t) {
  const at::MemoryFormat cl = t.dim() == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
  return (t.dim() == 4 || t.dim() == 5) && t.is_contiguous(cl) && !t.is_contiguous() ? cl
                                                                                     : at::MemoryFormat::Contiguous;
}

// The checks of every conv entry (both directions, both backends), naming op and argument: input [B, Cin, *spatial]
// and weight [Cout, Cin / groups, *kernel] floating tensors of NDim + 2 dimensions, bias [Cout] or none, all of one
// dtype and device; groups >= 1 dividing Cin and Cout; NDim strides and dilations >= 1, paddings >= 0; the dilated
// kernel no larger than the padded input; grad (backwards) the output's shape, dtype and device.
template <int NDim>
inline ConvGeometry check_conv_args(const char* op, const at::Tensor& input, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                    const at::Tensor* grad = nullptr) {
  static_assert(NDim == 2 || NDim == 3, "conv: NDim must be 2 or 3");
  const char* in_shape = NDim == 2 ? "[B, Cin, H, W]" : "[B, Cin, D, H, W]";
  const char* w_shape = NDim == 2 ? "[Cout, Cin / groups, kH, kW]" : "[Cout, Cin / groups, kD, kH, kW]";
  TORCH_CHECK_VALUE(input.dim() == NDim + 2, op, ": input must be a ", NDim + 2, "-D tensor ", in_shape, ", got shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(weight.dim() == NDim + 2, op, ": weight must be a ", NDim + 2, "-D tensor ", w_shape,
                    ", got shape ", weight.sizes());
  TORCH_CHECK_TYPE(input.is_floating_point(), op, ": input must be a floating-point tensor, got ", input.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == input.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
                   " but input has ", input.scalar_type(), "; they must have the same dtype");
  TORCH_CHECK_VALUE(weight.device() == input.device(), op, ": weight is on ", weight.device(), " but input is on ",
                    input.device(), "; they must be on the same device");
  TORCH_CHECK_VALUE(stride.size() == NDim, op, ": stride must have ", NDim, " values, got ", stride);
  TORCH_CHECK_VALUE(padding.size() == NDim, op, ": padding must have ", NDim, " values, got ", padding);
  TORCH_CHECK_VALUE(dilation.size() == NDim, op, ": dilation must have ", NDim, " values, got ", dilation);
  TORCH_CHECK_VALUE(groups >= 1, op, ": groups must be >= 1, got ", groups);
  const int64_t cin = input.size(1), cout = weight.size(0);
  TORCH_CHECK_VALUE(cin % groups == 0, op, ": input's channels (", cin, ") must be divisible by groups (", groups, ")");
  TORCH_CHECK_VALUE(cout % groups == 0, op, ": weight's output channels (", cout, ") must be divisible by groups (",
                    groups, ")");
  TORCH_CHECK_VALUE(weight.size(1) == cin / groups, op, ": weight must have Cin / groups = ", cin / groups,
                    " input channels per group (input has ", cin, " channels, groups = ", groups, "), got shape ",
                    weight.sizes());
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == cout, op, ": bias must be a 1-D tensor [Cout] = [", cout,
                      "], got shape ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == input.scalar_type(), op, ": bias has dtype ", b.scalar_type(),
                     " but input has ", input.scalar_type(), "; they must have the same dtype");
    TORCH_CHECK_VALUE(b.device() == input.device(), op, ": bias is on ", b.device(), " but input is on ",
                      input.device(), "; they must be on the same device");
  }
  ConvGeometry g;
  g.ndim = NDim;
  g.batch = input.size(0);
  g.in_channels = cin;
  g.out_channels = cout;
  g.groups = groups;
  g.in_per_group = cin / groups;
  g.out_per_group = cout / groups;
  const int off = 3 - NDim;  // 2-D: axis 0 is the unit depth
  for (int i = 0; i < off; ++i) {
    g.in[i] = g.out[i] = g.kernel[i] = g.stride[i] = g.dilation[i] = 1;
    g.padding[i] = 0;
  }
  for (int i = 0; i < NDim; ++i) {
    TORCH_CHECK_VALUE(stride[i] >= 1, op, ": stride must be >= 1 in every dimension, got ", stride);
    TORCH_CHECK_VALUE(dilation[i] >= 1, op, ": dilation must be >= 1 in every dimension, got ", dilation);
    TORCH_CHECK_VALUE(padding[i] >= 0, op, ": padding must be >= 0 in every dimension, got ", padding);
    const int64_t in = input.size(2 + i), k = weight.size(2 + i);
    TORCH_CHECK_VALUE(k >= 1, op, ": weight must have a non-empty kernel, got shape ", weight.sizes());
    TORCH_CHECK_VALUE(dilation[i] * (k - 1) + 1 <= in + 2 * padding[i], op, ": the dilated kernel (size ",
                      dilation[i] * (k - 1) + 1, " in spatial dimension ", i,
                      ") must not be larger than the padded input (", in + 2 * padding[i], "); input shape ",
                      input.sizes(), ", weight shape ", weight.sizes());
    g.in[off + i] = in;
    g.kernel[off + i] = k;
    g.stride[off + i] = stride[i];
    g.padding[off + i] = padding[i];
    g.dilation[off + i] = dilation[i];
    g.out[off + i] = conv_out_size(in, k, stride[i], padding[i], dilation[i]);
  }
  if (grad != nullptr) {
    const at::Tensor& gr = *grad;
    const auto sizes = g.out_sizes();
    TORCH_CHECK_VALUE(gr.sizes() == g.out_shape(sizes), op, ": grad must have the output's shape ", g.out_shape(sizes),
                      ", got ", gr.sizes());
    TORCH_CHECK_TYPE(gr.scalar_type() == input.scalar_type(), op, ": grad has dtype ", gr.scalar_type(),
                     " but input has ", input.scalar_type(), "; they must have the same dtype");
    TORCH_CHECK_VALUE(gr.device() == input.device(), op, ": grad is on ", gr.device(), " but input is on ",
                      input.device(), "; they must be on the same device");
  }
  return g;
}

}  // namespace visionops
