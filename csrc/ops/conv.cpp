// Schemas of the convolution family: conv2d and conv3d, one kernel family with the number of spatial dimensions a
// compile-time parameter. Kernels: ops/cpu/conv_kernel.cpp, ops/cuda/conv_kernel.cu; fake kernels, autograd and
// autocast: visionops/ops/conv.py. Padding is symmetric here; the Python layer turns padding="same" with an even
// kernel into an explicit pad first, as F.conv2d does. The backward's output_mask says which of (grad_input,
// grad_weight, grad_bias) to compute; the others come back as empty tensors (shape [0]).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(visionops, m) {
  m.def(
      "conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, int groups) "
      "-> Tensor");
  m.def(
      "_conv2d_backward(Tensor grad, Tensor input, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "conv3d(Tensor input, Tensor weight, Tensor? bias, int[3] stride, int[3] padding, int[3] dilation, int groups) "
      "-> Tensor");
  m.def(
      "_conv3d_backward(Tensor grad, Tensor input, Tensor weight, int[3] stride, int[3] padding, int[3] dilation, "
      "int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}
