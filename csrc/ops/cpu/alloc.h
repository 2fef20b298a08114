// Large CPU outputs. A fresh multi-megabyte allocation is mmap'ed by malloc and first touched by the kernel writing
// it: one page fault per 4 KiB, about 12 ms for the 51 MB output of RoIAlign over 1024 RoIs x 256 channels x 7 x 7
// on a Xeon, as long as the pooling itself. Asking for transparent huge pages on the allocation's 2 MiB-aligned
// interior before it is touched makes that one fault per 2 MiB (about 3 ms). Memory malloc reuses (already touched)
// is unaffected, and so is a system where THP is disabled; elsewhere than Linux it is a plain at::empty.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace visionops {

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t bytes = t.nbytes();
  if (bytes < 2 * kHuge || !t.is_contiguous(t.suggest_memory_format())) return;
  const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1), end = (p + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice: may fail freely
#endif
}

// at::empty for an output the kernel writes in full (huge pages advised when it is large).
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                               at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  at::Tensor out = at::empty(sizes, options, format);
  advise_huge_pages(out);
  return out;
}

// at::zeros likewise, for outputs a kernel accumulates into.
inline at::Tensor zeros_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return empty_output(sizes, options).zero_();
}

}  // namespace visionops
