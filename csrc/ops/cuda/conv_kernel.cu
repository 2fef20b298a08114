// CUDA kernels of the convolution family, conv2d and conv3d (math: ops/common/conv.h, visionops/reference/conv.py,
// whose unfold + matmul these kernels follow).
//
// The number of spatial axes is the entries' compile-time parameter (ops/common/conv_entries.h); the two kernels
// here see every call as 3-D, a 2-D one having depth 1 (ConvGeometry), so one instantiation per dtype serves both.
// Per chunk of m images (the column buffer stays under kColumnBytes; an image too large for it alone is split into
// runs of output positions, or of channels for grad_input), with L output positions per image, Kvol kernel taps and
// the columns of a group g the rows [g * Cin/G * Kvol, (g + 1) * Cin/G * Kvol):
//   forward:     col = im2col(x) [Cin * Kvol, m * L]; y[g] = w[g] @ col[g] + bias[g] in float32 for half types
//                (at::bmm's out_dtype), rounded once by the copy into the output in its memory format;
//   grad_input:  col = w[g]^T @ grad[g] in float32 for half types (at::bmm's out_dtype), then col2im in gather form:
//                each input element sums the column entries that read it, taps in a fixed order (no atomics);
//   grad_weight: sum over the chunks, in order, of grad[g] @ col[g]^T, accumulated in float32 for half types and
//                rounded once;
//   grad_bias:   at::sum of grad over batch and space (a fixed-order reduction).
// Deterministic: no atomics, and every sum runs in an order fixed by the shapes (cuBLAS GEMMs are reproducible for a
// fixed problem and device once CUBLAS_WORKSPACE_CONFIG is set, which torch.use_deterministic_algorithms(True)
// requires of any cuBLAS call), so all three gradients are bit-identical run to run and this one path also serves
// deterministic mode.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>

#include "ops/common/conv.h"
#include "ops/common/conv_entries.h"
#include "ops/cuda/launch.cuh"

namespace visionops {
namespace {

// Bytes of one column buffer (unless one output position's column, or one channel's rows for grad_input, is larger
// alone): bounds the memory a call takes besides its inputs and outputs, while chunks of several small images keep
// the GEMMs large.
constexpr int64_t kColumnBytes = int64_t(256) << 20;

// ConvGeometry's spatial sizes as a plain struct the kernels take by value ([depth, height, width]).
struct Geom {
  int64_t in[3], out[3], k[3], stride[3], pad[3], dil[3];
};

Geom geom_of(const ConvGeometry& g) {
  Geom r;
  for (int i = 0; i < 3; ++i) {
    r.in[i] = g.in[i];
    r.out[i] = g.out[i];
    r.k[i] = g.kernel[i];
    r.stride[i] = g.stride[i];
    r.pad[i] = g.padding[i];
    r.dil[i] = g.dilation[i];
  }
  return r;
}

struct Strides5 {
  int64_t n, c, d, h, w;
};

// A 2-D tensor's depth stride is 0: its one depth index is always 0.
Strides5 strides5(const at::Tensor& t) {
  if (t.dim() == 4) return {t.stride(0), t.stride(1), 0, t.stride(2), t.stride(3)};
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

// col[c * Kvol + t][b * P + p - p0] = x[b, c, p * stride - pad + t * dil] for the output positions p in [p0, p0 + P),
// zero outside x (the reference's unfold), one thread per column entry, consecutive threads on consecutive output
// positions. x points at the chunk's first image and is read through its strides, so channels-last and strided
// inputs need no copy.
template <typename scalar_t, typename index_t>
__global__ void im2col_kernel(index_t n, const scalar_t* __restrict__ x, Strides5 sx, Geom g, index_t cols, index_t P,
                              index_t p0, scalar_t* __restrict__ col) {
  const index_t Kvol = static_cast<index_t>(g.k[0] * g.k[1] * g.k[2]);
  VISIONOPS_KERNEL_LOOP(index_t, idx, n) {
    const index_t j = idx % cols, row = idx / cols;
    const index_t b = j / P;
    index_t p = p0 + j % P;
    const index_t ow = p % static_cast<index_t>(g.out[2]);
    p /= static_cast<index_t>(g.out[2]);
    const index_t oh = p % static_cast<index_t>(g.out[1]), od = p / static_cast<index_t>(g.out[1]);
    index_t t = row % Kvol;
    const index_t c = row / Kvol;
    const index_t kw = t % static_cast<index_t>(g.k[2]);
    t /= static_cast<index_t>(g.k[2]);
    const index_t kh = t % static_cast<index_t>(g.k[1]), kd = t / static_cast<index_t>(g.k[1]);
    const int64_t id = od * g.stride[0] - g.pad[0] + kd * g.dil[0];
    const int64_t ih = oh * g.stride[1] - g.pad[1] + kh * g.dil[1];
    const int64_t iw = ow * g.stride[2] - g.pad[2] + kw * g.dil[2];
    const bool inside = id >= 0 && id < g.in[0] && ih >= 0 && ih < g.in[1] && iw >= 0 && iw < g.in[2];
    col[idx] = inside ? x[b * sx.n + c * sx.c + id * sx.d + ih * sx.h + iw * sx.w] : static_cast<scalar_t>(0);
  }
}

// One axis of the gather: the output position o with o * stride - pad + t * dil = i for tap t, or -1 when there is
// none inside the output (the inverse of im2col's index formula).
__device__ __forceinline__ int64_t source_of(int64_t i, int64_t t, int64_t stride, int64_t pad, int64_t dil,
                                             int64_t out) {
  const int64_t q = i + pad - t * dil;
  if (q < 0 || q % stride != 0) return -1;
  const int64_t o = q / stride;
  return o < out ? o : -1;
}

// grad_x[b, c, i] = sum over taps t (in order) of col[c * Kvol + t][b * L + o(t)], o(t) the output position that
// read x[b, c, i] through tap t (the reference's fold, gathered). One thread per element of the chunk's grad_x, in
// NC(D)HW order so consecutive threads read consecutive columns; writes go through gx's strides.
template <typename scalar_t, typename index_t>
__global__ void col2im_kernel(index_t n, const at::opmath_type<scalar_t>* __restrict__ col, Geom g, index_t C,
                              int64_t cols, scalar_t* __restrict__ gx, Strides5 sgx) {
  using T = at::opmath_type<scalar_t>;
  const int64_t L = g.out[0] * g.out[1] * g.out[2], Kvol = g.k[0] * g.k[1] * g.k[2];
  VISIONOPS_KERNEL_LOOP(index_t, idx, n) {
    index_t r = idx;
    const index_t iw = r % static_cast<index_t>(g.in[2]);
    r /= static_cast<index_t>(g.in[2]);
    const index_t ih = r % static_cast<index_t>(g.in[1]);
    r /= static_cast<index_t>(g.in[1]);
    const index_t id = r % static_cast<index_t>(g.in[0]);
    r /= static_cast<index_t>(g.in[0]);
    const index_t c = r % C, b = r / C;
    const T* colc = col + static_cast<int64_t>(c) * Kvol * cols + static_cast<int64_t>(b) * L;
    T acc = 0;
    for (int64_t kd = 0; kd < g.k[0]; ++kd) {
      const int64_t od = source_of(id, kd, g.stride[0], g.pad[0], g.dil[0], g.out[0]);
      if (od < 0) continue;
      for (int64_t kh = 0; kh < g.k[1]; ++kh) {
        const int64_t oh = source_of(ih, kh, g.stride[1], g.pad[1], g.dil[1], g.out[1]);
        if (oh < 0) continue;
        for (int64_t kw = 0; kw < g.k[2]; ++kw) {
          const int64_t ow = source_of(iw, kw, g.stride[2], g.pad[2], g.dil[2], g.out[2]);
          if (ow < 0) continue;
          acc += colc[((kd * g.k[1] + kh) * g.k[2] + kw) * cols + (od * g.out[1] + oh) * g.out[2] + ow];
        }
      }
    }
    gx[b * sgx.n + c * sgx.c + id * sgx.d + ih * sgx.h + iw * sgx.w] = static_cast<scalar_t>(acc);
  }
}

// Calls f(b0, m, p0, P) for the column chunks of a call, in order: images [b0, b0 + m), output positions
// [p0, p0 + P) of each. Whole images (p0 = 0, P = L), as many per chunk as fit kColumnBytes at col_bytes per output
// position; an image that does not fit alone is taken one run of positions at a time.
template <typename F>
void for_each_chunk(const ConvGeometry& g, int64_t col_bytes, F&& f) {
  const int64_t L = g.out_spatial(), run = std::max<int64_t>(kColumnBytes / std::max<int64_t>(col_bytes, 1), 1);
  if (run >= L) {
    const int64_t images = std::min(run / L, g.batch);
    for (int64_t b0 = 0; b0 < g.batch; b0 += images) f(b0, std::min(images, g.batch - b0), int64_t(0), L);
    return;
  }
  for (int64_t b = 0; b < g.batch; ++b)
    for (int64_t p0 = 0; p0 < L; p0 += run) f(b, int64_t(1), p0, std::min(run, L - p0));
}

bool is_reduced(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// Batched a @ b over the groups with the result in opmath precision: float32 for half types (cuBLAS accumulates in
// float32 either way; this keeps the sums unrounded until the kernels' single final rounding).
at::Tensor gemm_opmath(const at::Tensor& a, const at::Tensor& b) {
  return is_reduced(a.scalar_type()) ? at::bmm(a, b, at::kFloat) : at::bmm(a, b);
}

at::Tensor mm_opmath(const at::Tensor& a, const at::Tensor& b) {
  return is_reduced(a.scalar_type()) ? at::mm(a, b, at::kFloat) : at::mm(a, b);
}

// im2col of output positions [p0, p0 + P) of images [b0, b0 + m) of x into col ([Cin * Kvol, m * P], x's dtype).
void im2col(const at::Tensor& x, const ConvGeometry& g, int64_t b0, int64_t m, int64_t p0, int64_t P, at::Tensor& col,
            cudaStream_t stream) {
  const Strides5 sx = strides5(x);
  const Geom geom = geom_of(g);
  const int64_t n = col.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_im2col_cuda", [&] {
    with_index_type(std::max(n, g.out_spatial()), [&](auto index) {
      using index_t = decltype(index);
      im2col_kernel<scalar_t, index_t><<<blocks_for(n), kThreads, 0, stream>>>(
          static_cast<index_t>(n), x.const_data_ptr<scalar_t>() + b0 * sx.n, sx, geom, static_cast<index_t>(m * P),
          static_cast<index_t>(P), static_cast<index_t>(p0), col.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// col2im of col ([cn * Kvol, m * L], opmath dtype) into channels [c0, c0 + cn) of images [b0, b0 + m) of gx, every
// element written.
void col2im(const at::Tensor& col, const ConvGeometry& g, int64_t b0, int64_t m, int64_t c0, int64_t cn, at::Tensor& gx,
            cudaStream_t stream) {
  const Strides5 sgx = strides5(gx);
  const Geom geom = geom_of(g);
  const int64_t n = m * cn * g.in_spatial(), cols = m * g.out_spatial();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gx.scalar_type(), "conv_col2im_cuda", [&] {
    with_index_type(n, [&](auto index) {
      using index_t = decltype(index);
      col2im_kernel<scalar_t, index_t><<<blocks_for(n), kThreads, 0, stream>>>(
          static_cast<index_t>(n), col.const_data_ptr<at::opmath_type<scalar_t>>(), geom, static_cast<index_t>(cn),
          cols, gx.mutable_data_ptr<scalar_t>() + b0 * sgx.n + c0 * sgx.c, sgx);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// The kernels behind ops/common/conv_entries.h, which checks the arguments, allocates the outputs and answers the
// empty cases: here B, Cin, Cout >= 1 and every output size >= 1.
struct CudaConv {
  static void forward(const char* /*op*/, const ConvGeometry& g, const at::Tensor& input, const at::Tensor& weight,
                      const at::Tensor* bias, at::Tensor& out) {
    c10::cuda::CUDAGuard guard(input.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    // The GEMMs below stay in the call's dtype inside a torch.autocast region too (the backward op can be called
    // there), where autocast would otherwise recast at::bmm's operands.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const int64_t G = g.groups, Og = g.out_per_group, R = g.in_per_group * g.taps(), L = g.out_spatial();
    const at::Tensor w = weight.contiguous().view({G, Og, R});
    const at::ScalarType opmath = is_reduced(input.scalar_type()) ? at::kFloat : input.scalar_type();
    const at::Tensor b = bias != nullptr ? bias->to(opmath).view({G, Og, 1}) : at::Tensor();
    // [B, Cout, L]: a view in either memory format, since the spatial axes stay adjacent in both.
    at::Tensor out3 = out.view({g.batch, g.out_channels, L});
    for_each_chunk(g, G * R * input.element_size(), [&](int64_t b0, int64_t m, int64_t p0, int64_t P) {
      at::Tensor col = at::empty({G, R, m * P}, input.options());
      im2col(input, g, b0, m, p0, P, col, stream);
      at::Tensor y = gemm_opmath(w, col);
      if (b.defined()) y.add_(b);
      out3.narrow(0, b0, m).narrow(2, p0, P).copy_(y.view({g.out_channels, m, P}).permute({1, 0, 2}));
    });
  }

  static void backward(const char* /*op*/, const ConvGeometry& g, const at::Tensor& grad, const at::Tensor& input,
                       const at::Tensor& weight, at::Tensor* grad_input, at::Tensor* grad_weight,
                       at::Tensor* grad_bias) {
    c10::cuda::CUDAGuard guard(input.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    if (grad_bias != nullptr) {
      std::array<int64_t, 4> dims{0, 2, 3, 4};
      grad_bias->copy_(at::sum(grad, at::IntArrayRef(dims.data(), g.ndim + 1)));
    }
    if (grad_input == nullptr && grad_weight == nullptr) return;
    const int64_t G = g.groups, Og = g.out_per_group, R = g.in_per_group * g.taps(), L = g.out_spatial();
    const at::Tensor w = weight.contiguous().view({G, Og, R});
    const at::Tensor grad4 = grad.reshape({g.batch, G, Og, L});
    const int64_t opmath_bytes = is_reduced(input.scalar_type()) ? 4 : input.element_size();
    if (grad_input != nullptr) {
      const int64_t per_image = G * R * L * opmath_bytes;
      if (per_image <= kColumnBytes) {
        const int64_t images = std::min(kColumnBytes / per_image, g.batch);
        for (int64_t b0 = 0; b0 < g.batch; b0 += images) {
          const int64_t m = std::min(images, g.batch - b0);
          // grad of the chunk as [G, Og, m * L], columns in the order im2col writes them.
          const at::Tensor gmat = grad4.narrow(0, b0, m).permute({1, 2, 0, 3}).contiguous().view({G, Og, m * L});
          col2im(gemm_opmath(w.transpose(1, 2), gmat), g, b0, m, 0, g.in_channels, *grad_input, stream);
        }
      } else {
        // One image's columns do not fit: runs of cn channels of a group, whose rows of w^T @ grad are all the
        // gather of those channels needs.
        const int64_t Cg = g.in_per_group, Kvol = g.taps();
        const int64_t cn = std::clamp<int64_t>(kColumnBytes / (Kvol * L * opmath_bytes), 1, Cg);
        for (int64_t b = 0; b < g.batch; ++b)
          for (int64_t gi = 0; gi < G; ++gi)
            for (int64_t c0 = 0; c0 < Cg; c0 += cn) {
              const int64_t n = std::min(cn, Cg - c0);
              const at::Tensor wt = w.select(0, gi).narrow(1, c0 * Kvol, n * Kvol).t();
              col2im(mm_opmath(wt, grad4.select(0, b).select(0, gi)), g, b, 1, gi * Cg + c0, n, *grad_input, stream);
            }
      }
    }
    if (grad_weight == nullptr) return;
    at::Tensor gw_acc;  // [G, Og, R] in opmath precision, summed over the chunks in order
    for_each_chunk(g, G * R * input.element_size(), [&](int64_t b0, int64_t m, int64_t p0, int64_t P) {
      const at::Tensor gmat =
          grad4.narrow(0, b0, m).narrow(3, p0, P).permute({1, 2, 0, 3}).contiguous().view({G, Og, m * P});
      at::Tensor col = at::empty({G, R, m * P}, input.options());
      im2col(input, g, b0, m, p0, P, col, stream);
      at::Tensor part = gemm_opmath(gmat, col.transpose(1, 2));
      gw_acc = gw_acc.defined() ? gw_acc.add_(part) : part;
    });
    grad_weight->copy_(gw_acc.view(weight.sizes()));
  }
};

using Entries = ConvEntries<CudaConv>;

}  // namespace

TORCH_LIBRARY_IMPL(visionops, CUDA, m) {
  m.impl("conv2d", TORCH_FN(Entries::conv2d));
  m.impl("_conv2d_backward", TORCH_FN(Entries::conv2d_backward));
  m.impl("conv3d", TORCH_FN(Entries::conv3d));
  m.impl("_conv3d_backward", TORCH_FN(Entries::conv3d_backward));
}

}  // namespace visionops
