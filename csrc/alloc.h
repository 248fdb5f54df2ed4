// Output allocation shared by every op's dispatch .cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <cstdint>

#include "cpu_cache.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sophon_fast {

// A fresh output like t. Large contiguous CPU buffers come from the buffer
// cache (cpu_cache.h: a freed 45 MB output is reused instead of being mapped
// and zeroed again). Otherwise, on the CPU a new 45 MB buffer (ResNet-18
// size) costs 11 k page faults on first touch, 4x the update itself (47 vs
// 11 ms for a fresh momentum step here); asking for transparent huge pages
// before the first touch cuts them 512-fold. A no-op where THP is off or
// unsupported.
inline at::Tensor fresh_like(const at::Tensor& t) {
  if (t.is_cpu()) {
    at::Tensor cached = cpu_cache_empty_like(t);
    if (cached.defined()) return cached;
  }
  at::Tensor out = at::empty_like(t);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (out.is_cpu() && out.nbytes() >= 2 * kHuge) {
    const auto begin = reinterpret_cast<uintptr_t>(out.mutable_data_ptr());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t last = (begin + out.nbytes()) & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace sophon_fast
