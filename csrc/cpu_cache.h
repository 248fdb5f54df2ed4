// A cache of large CPU output buffers, as CUDA's caching allocator keeps
// freed device memory: the fresh outputs of the flat updates are freed and
// asked for again at the same size every inner step.
//
// Why: glibc serves every allocation above 32 MiB with its own mmap and
// unmaps it on free, so each fresh 45 MB buffer (ResNet-18 size, fp32) comes
// back from the kernel as new pages that it zeroes on first touch: ~2.4 ms
// per buffer on the 2-core reference machine, half of a whole Adam forward.
// Smaller tensors (the eager per-tensor updates) are reused from glibc's heap
// and never pay it.
//
// Rule: cached + live bytes never exceed the most bytes ever live at once (a
// miss that reaches a new high first unmaps the cache), so the cache keeps at
// most that peak mapped. Other allocations made while it holds freed buffers
// come on top: measured, a ResNet-18 second-order protect() step peaked 11 MiB
// higher (of 1.86 GiB); first-order steps update in place and allocate no such
// buffers. Buffers from 4 MiB; linux only (elsewhere fresh outputs come from
// torch's allocator). SOPHON_FAST_CPU_CACHE_MB caps the cached bytes (0 turns
// the cache off); sophon_fast.cpu_cache has the controls.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace sophon_fast {

constexpr int64_t kCpuCacheMinBytes = int64_t(4) << 20;

struct CpuCacheStats {
  int64_t live_bytes;    // handed out, not yet freed
  int64_t cached_bytes;  // freed, kept mapped for reuse
  int64_t peak_bytes;    // most live bytes at once (since the last empty)
  int64_t hits;
  int64_t misses;
  int64_t limit_bytes;  // -1: no cap
};

// An uninitialised contiguous CPU tensor like `like`, from the cache, where
// `like` is a contiguous CPU tensor of at least kCpuCacheMinBytes and the
// cache is on; an undefined tensor otherwise.
at::Tensor cpu_cache_empty_like(const at::Tensor& like);

// Whether t's storage is a reused cache buffer: its pages are mapped and were
// written before, so streamed (non-temporal) stores pay off there, while on a
// freshly mapped buffer the kernel's zeroing has just put the lines in cache.
bool cpu_cache_warm(const at::Tensor& t);

CpuCacheStats cpu_cache_stats();
// Unmaps every cached buffer and restarts the peak from the live bytes.
void cpu_cache_release();
// Caps the cached bytes (0: cache nothing; -1: no cap) and trims to the cap.
void cpu_cache_set_limit(int64_t bytes);

}  // namespace sophon_fast
