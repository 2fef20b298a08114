// CUDA kernel of Matrix NMS (math and host steps: ops/common/matrix_nms.h).
//
// One thread per position j, a block per kThreads consecutive positions, two launches: comp, then decay (the second
// reads f(comp_i) of every higher-scored i of the label, so it waits for the first). A block walks the rows i from
// the label start of its first position (starts never decrease with j) in tiles of kThreads staged in shared memory:
// the boxes of the tile (or, for masks, the areas; the intersection row of i is read coalesced across j) and
// f(comp_i). Pass and source are template parameters of one kernel.
#include <cstdint>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops/common/matrix_nms.h"
#include "ops/cuda/launch.cuh"

namespace visionops {
namespace {

template <typename T, bool kMasks, bool kGaussian, bool kDecayPass>
__global__ void matrix_nms_kernel(const T* __restrict__ src, const float* __restrict__ area,
                                  const int64_t* __restrict__ start, int64_t n, double sigma,
                                  double* __restrict__ fcomp, double* __restrict__ decay) {
  __shared__ T sh_box[kMasks ? 1 : 4][kThreads];
  __shared__ double sh_f[kThreads];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads;
  const int64_t j = first + threadIdx.x;
  const bool active = j < n;
  const int64_t last = (first + kThreads < n ? first + kThreads : n) - 1;
  const int64_t sj = active ? start[j] : n;
  T bj[4] = {T(0), T(0), T(0), T(0)};
  T area_j = T(0);
  if (active) {
    if constexpr (kMasks) {
      area_j = area[j];
    } else {
      for (int c = 0; c < 4; ++c) bj[c] = src[c * n + j];
      area_j = box_area(bj[0], bj[1], bj[2], bj[3]);
    }
  }
  T comp = T(0);
  double d = 1.0;
  for (int64_t tile = start[first]; tile < last; tile += kThreads) {
    __syncthreads();  // the previous tile is consumed
    const int64_t i_load = tile + threadIdx.x;
    if (i_load < last) {
      if constexpr (kMasks) {
        sh_box[0][threadIdx.x] = area[i_load];
      } else {
        for (int c = 0; c < 4; ++c) sh_box[c][threadIdx.x] = src[c * n + i_load];
      }
      if constexpr (kDecayPass) sh_f[threadIdx.x] = fcomp[i_load];
    }
    __syncthreads();
    const int64_t count = last - tile < kThreads ? last - tile : kThreads;
    for (int64_t t = 0; t < count; ++t) {
      const int64_t i = tile + t;
      if (i < sj || i >= j) continue;
      T iou;
      if constexpr (kMasks) {
        const float in = reinterpret_cast<const float*>(src)[i * n + j];
        iou = matrix_nms_clean_iou(in / sub_rn(add_rn(sh_box[0][t], area_j), in));
      } else {
        const T a[4] = {sh_box[0][t], sh_box[1][t], sh_box[2][t], sh_box[3][t]};
        iou = matrix_nms_clean_iou(box_iou_pair(a, box_area(a[0], a[1], a[2], a[3]), bj, area_j));
      }
      if constexpr (kDecayPass) {
        if (iou > T(0)) {
          const double r = matrix_nms_f<kGaussian>(static_cast<double>(iou), sigma) / sh_f[t];
          if (r < d) d = r;  // NaN (0 / 0) never lowers it; zero IoUs give ratios >= 1
        }
      } else {
        comp = comp < iou ? iou : comp;
      }
    }
  }
  if (active) {
    if constexpr (kDecayPass) decay[j] = d;
    else fcomp[j] = matrix_nms_f<kGaussian>(static_cast<double>(comp), sigma);
  }
}

struct CudaKernels {
  template <typename T, bool kMasks, bool kGaussian>
  static void decay(const at::Tensor& src, const at::Tensor& area, const at::Tensor& start, double sigma,
                    at::Tensor& fcomp, at::Tensor& decay) {
    const int64_t n = start.size(0);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
    const T* s = reinterpret_cast<const T*>(src.data_ptr());
    const float* a = kMasks ? area.data_ptr<float>() : nullptr;
    matrix_nms_kernel<T, kMasks, kGaussian, false><<<blocks, kThreads, 0, stream>>>(
        s, a, start.data_ptr<int64_t>(), n, sigma, fcomp.data_ptr<double>(), decay.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    matrix_nms_kernel<T, kMasks, kGaussian, true><<<blocks, kThreads, 0, stream>>>(
        s, a, start.data_ptr<int64_t>(), n, sigma, fcomp.data_ptr<double>(), decay.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor> matrix_nms_forward_kernel(const at::Tensor& boxes_or_masks, const at::Tensor& scores,
                                                             const at::Tensor& labels, c10::string_view kernel,
                                                             double sigma, double score_threshold, int64_t max_num) {
  c10::cuda::CUDAGuard guard(boxes_or_masks.device());
  return matrix_nms_entry<CudaKernels>(boxes_or_masks, scores, labels, std::string(kernel), sigma, score_threshold,
                                       max_num);
}

}  // namespace

TORCH_LIBRARY_IMPL(visionops, CUDA, m) {
  m.impl("matrix_nms", TORCH_FN(matrix_nms_forward_kernel));
}

}  // namespace visionops
