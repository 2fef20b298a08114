#pragma once
// The four convolution entries (conv2d, _conv2d_backward, conv3d, _conv3d_backward) for any backend: they check the
// arguments (check_conv_args), allocate the outputs in the memory format the fake kernels give (conv_out_format),
// answer the empty cases (batch 0, no output or input channels) without a kernel, and hand the rest to the
// backend's kernels, which see only validated calls with B, Cin and Cout >= 1 (every output size is >= 1 then).
//
// Kernels provides (the outputs are allocated, not initialised; a null pointer is an output not asked for):
//   static void forward(const char* op, const ConvGeometry& g, const at::Tensor& input, const at::Tensor& weight,
//                       const at::Tensor* bias, at::Tensor& out);
//   static void backward(const char* op, const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& input,
//                        const at::Tensor& weight, at::Tensor* grad_input, at::Tensor* grad_weight,
//                        at::Tensor* grad_bias);
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>

#include "ops/common/conv.h"

namespace visionops {

template <typename Kernels>
struct ConvEntries {
  using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

  static at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    return forward<2>("conv2d", input, weight, bias, stride, padding, dilation, groups);
  }
  static Grads conv2d_backward(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, std::array<bool, 3> output_mask) {
    return backward<2>("_conv2d_backward", grad, input, weight, stride, padding, dilation, groups, output_mask);
  }
  static at::Tensor conv3d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    return forward<3>("conv3d", input, weight, bias, stride, padding, dilation, groups);
  }
  static Grads conv3d_backward(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, std::array<bool, 3> output_mask) {
    return backward<3>("_conv3d_backward", grad, input, weight, stride, padding, dilation, groups, output_mask);
  }

 private:
  template <int NDim>
  static at::Tensor forward(const char* op, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups) {
    const ConvGeometry g = check_conv_args<NDim>(op, input, weight, bias, stride, padding, dilation, groups);
    const auto sizes = g.out_sizes();
    const at::IntArrayRef shape = g.out_shape(sizes);
    const at::TensorOptions opts = input.options().memory_format(conv_out_format(input));
    const at::Tensor* b = bias.has_value() && bias->defined() ? &*bias : nullptr;
    if (g.batch == 0 || g.out_channels == 0) return at::empty(shape, opts);
    if (g.in_channels == 0) {  // nothing to sum: the output is the bias
      at::Tensor out = at::empty(shape, opts).zero_();
      if (b != nullptr) {
        std::array<int64_t, 5> bshape{1, g.out_channels, 1, 1, 1};
        out.add_(b->view(at::IntArrayRef(bshape.data(), NDim + 2)));
      }
      return out;
    }
    at::Tensor out = at::empty(shape, opts);
    Kernels::forward(op, g, input, weight, b, out);
    return out;
  }

  template <int NDim>
  static Grads backward(const char* op, const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        std::array<bool, 3> mask) {
    const ConvGeometry g =
        check_conv_args<NDim>(op, input, weight, std::nullopt, stride, padding, dilation, groups, &grad);
    const at::TensorOptions iopts = input.options().memory_format(conv_out_format(input));
    const at::TensorOptions wopts = weight.options().memory_format(conv_out_format(weight));
    const at::TensorOptions bopts = input.options();
    const bool empty = g.batch == 0 || g.out_channels == 0 || g.in_channels == 0;
    auto make = [&](bool wanted, at::IntArrayRef sizes, const at::TensorOptions& opts) {
      if (!wanted) return at::empty({0}, input.options());
      at::Tensor t = at::empty(sizes, opts);  // at::zeros would drop the memory format
      return empty ? t.zero_() : t;
    };
    at::Tensor gi = make(mask[0], input.sizes(), iopts);
    at::Tensor gw = make(mask[1], weight.sizes(), wopts);
    at::Tensor gb = make(mask[2], {g.out_channels}, bopts);
    if (empty) {
      // Without input channels the output was the bias alone, whose gradient still sums grad.
      if (mask[2] && g.batch > 0 && g.out_channels > 0) {
        std::array<int64_t, 4> dims{0, 2, 3, 4};
        gb.copy_(at::sum(grad, at::IntArrayRef(dims.data(), NDim + 1)));
      }
      return {gi, gw, gb};
    }
    Kernels::backward(op, g, grad, input, weight, mask[0] ? &gi : nullptr, mask[1] ? &gw : nullptr,
                      mask[2] ? &gb : nullptr);
    return {gi, gw, gb};
  }
};

}  // namespace visionops
