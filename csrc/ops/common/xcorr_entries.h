#pragma once
// The four cross-correlation entries (xcorr, _xcorr_backward, depthwise_xcorr, _depthwise_xcorr_backward) for any
// backend: they check the arguments (check_xcorr_args), allocate the outputs in the memory format the fake kernels
// give (xcorr_out_format), answer empty batches and zero channels, and hand the rest to the backend's kernels,
// which see only validated, non-empty calls. The variant is the compile-time parameter kSumChannels.
//
// Kernels provides:
//   template <bool kSumChannels> static void forward(const char* op, const at::Tensor& z, const at::Tensor& x,
//                                                    double out_scale, at::Tensor& out);
//   template <bool kSumChannels> static void backward(const char* op, const at::Tensor& grad, const at::Tensor& z,
//                                                     const at::Tensor& x, double out_scale, at::Tensor& grad_z,
//                                                     at::Tensor& grad_x);
#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "ops/common/xcorr.h"

namespace visionops {

template <typename Kernels>
struct XCorrEntries {
  static at::Tensor xcorr(const at::Tensor& z, const at::Tensor& x, double out_scale) {
    return forward<true>("xcorr", z, x, out_scale);
  }
  static std::tuple<at::Tensor, at::Tensor> xcorr_backward(const at::Tensor& grad, const at::Tensor& z,
                                                           const at::Tensor& x, double out_scale) {
    return backward<true>("_xcorr_backward", grad, z, x, out_scale);
  }
  static at::Tensor depthwise_xcorr(const at::Tensor& z, const at::Tensor& x) {
    return forward<false>("depthwise_xcorr", z, x, 1.0);
  }
  static std::tuple<at::Tensor, at::Tensor> depthwise_xcorr_backward(const at::Tensor& grad, const at::Tensor& z,
                                                                     const at::Tensor& x) {
    return backward<false>("_depthwise_xcorr_backward", grad, z, x, 1.0);
  }

 private:
  template <bool kSumChannels>
  static at::Tensor forward(const char* op, const at::Tensor& z, const at::Tensor& x, double out_scale) {
    check_xcorr_args(op, z, x, kSumChannels);
    const int64_t B = x.size(0), C = x.size(1), Ho = x.size(2) - z.size(2) + 1, Wo = x.size(3) - z.size(3) + 1;
    const at::TensorOptions opts =
        x.options().memory_format(kSumChannels ? at::MemoryFormat::Contiguous : xcorr_out_format(x));
    const int64_t shape[4] = {B, kSumChannels ? 1 : C, Ho, Wo};
    if (B == 0 || C == 0) return at::zeros(shape, opts);
    at::Tensor out = at::empty(shape, opts);
    Kernels::template forward<kSumChannels>(op, z, x, out_scale, out);
    return out;
  }

  template <bool kSumChannels>
  static std::tuple<at::Tensor, at::Tensor> backward(const char* op, const at::Tensor& grad, const at::Tensor& z,
                                                     const at::Tensor& x, double out_scale) {
    check_xcorr_args(op, z, x, kSumChannels, &grad);
    const at::TensorOptions zopts = z.options().memory_format(xcorr_out_format(z));
    const at::TensorOptions xopts = x.options().memory_format(xcorr_out_format(x));
    if (x.size(0) == 0 || x.size(1) == 0) return {at::zeros(z.sizes(), zopts), at::zeros(x.sizes(), xopts)};
    at::Tensor gz = at::empty(z.sizes(), zopts), gx = at::empty(x.sizes(), xopts);
    Kernels::template backward<kSumChannels>(op, grad, z, x, out_scale, gz, gx);
    return {gz, gx};
  }
};

}  // namespace visionops
