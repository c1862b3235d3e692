// Aligned fp32 scratch buffers for the CPU kernels: 64-byte aligned, large ones on transparent huge
// pages (2 MiB alignment + madvise) to spare the TLB.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace maca {

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using FloatBuffer = std::unique_ptr<float[], FreeDeleter>;

inline FloatBuffer alloc_floats(int64_t n) {
  constexpr size_t kHuge = size_t(2) << 20;
  size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float);
  const size_t align = bytes >= 2 * kHuge ? kHuge : 64;
  bytes = (bytes + align - 1) / align * align;
  void* p = std::aligned_alloc(align, bytes);
  if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (align == kHuge) madvise(p, bytes, MADV_HUGEPAGE);  // a hint; failure is harmless
#endif
  return FloatBuffer(static_cast<float*>(p));
}

}  // namespace maca
