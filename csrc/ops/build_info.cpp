// What this library was built against; read by visionops.build_info() to explain load failures and mismatches.
#include <string>

#include <torch/library.h>

#include "ops/common/roi_align.h"
#include "ops/cpu/conv_cpu.h"

#ifndef VISIONOPS_TORCH_VERSION
#define VISIONOPS_TORCH_VERSION "unknown"
#endif
#ifndef VISIONOPS_CUDA_ARCHES
#define VISIONOPS_CUDA_ARCHES ""
#endif
#ifndef VISIONOPS_VERSION
#define VISIONOPS_VERSION "unknown"
#endif

namespace {
std::string build_info() {
  std::string info = "version=" VISIONOPS_VERSION ";torch=" VISIONOPS_TORCH_VERSION;
#ifdef VISIONOPS_WITH_CUDA
  info += ";cuda=1;cuda_arches=" VISIONOPS_CUDA_ARCHES;
#else
  info += ";cuda=0;cuda_arches=";
#endif
  // Kernel limits the Python side needs, from the constants themselves (common/roi_align.h).
  info += ";roi_align_max_levels=" + std::to_string(visionops::kMaxRoIAlignLevels);
  info += ";roi_align_max_grid=" + std::to_string(visionops::kMaxRoIAlignGrid);
  // The CPU convolution's kernels on this machine (ops/cpu/conv_cpu.h): whether it has the direct AVX2 one, and
  // which the convolutions take now.
  info += std::string(";cpu_conv_direct=") + (visionops::direct_conv_available() ? "1" : "0");
  info += std::string(";cpu_conv=") + (visionops::direct_conv_preferred() ? "direct" : "blas");
  info += std::string(";cpu_conv_winograd=") + (visionops::winograd_preferred() ? "1" : "0");
  return info;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(visionops, m) {
  m.def("_build_info() -> str", TORCH_FN(build_info));
}
