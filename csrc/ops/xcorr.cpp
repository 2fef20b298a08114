// Schemas of the SiamFC cross-correlation family. Kernels: ops/cpu/xcorr_kernel.cpp, ops/cuda/xcorr_kernel.cu (one
// kernel each, the depthwise variant a compile-time parameter); fake kernels, autograd and autocast:
// visionops/ops/xcorr.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(visionops, m) {
  m.def("xcorr(Tensor z, Tensor x, float out_scale=1.0) -> Tensor");
  m.def("_xcorr_backward(Tensor grad, Tensor z, Tensor x, float out_scale) -> (Tensor, Tensor)");
  m.def("depthwise_xcorr(Tensor z, Tensor x) -> Tensor");
  m.def("_depthwise_xcorr_backward(Tensor grad, Tensor z, Tensor x) -> (Tensor, Tensor)");
}
