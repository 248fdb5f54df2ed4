// The large-buffer CPU cache (cpu_cache.h: why, and the size rule).
#include "cpu_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#define SF_CPU_CACHE 1
#else
#define SF_CPU_CACHE 0
#endif

namespace sophon_fast {
namespace {

#if SF_CPU_CACHE

constexpr size_t kHuge = size_t(2) << 20;  // transparent huge page

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

struct Block {
  void* ptr;
  size_t bytes;
  bool warm;  // reused: its pages are mapped and were written before
};

// 2 MiB-aligned anonymous memory with the huge-page hint, so first touch
// faults 512x less often; nullptr when the kernel refuses.
void* map_aligned(size_t bytes) {
  void* raw =
      mmap(nullptr, bytes + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const auto begin = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t start = round_up(begin, kHuge);
  const size_t head = start - begin, tail = kHuge - head;
  if (head != 0) munmap(raw, head);
  if (tail != 0) munmap(reinterpret_cast<void*>(start + bytes), tail);
#ifdef MADV_HUGEPAGE
  madvise(reinterpret_cast<void*>(start), bytes, MADV_HUGEPAGE);
#endif
  return reinterpret_cast<void*>(start);
}

int64_t limit_from_env() {
  const char* text = std::getenv("SOPHON_FAST_CPU_CACHE_MB");
  if (text == nullptr || text[0] == '\0') return -1;
  char* end = nullptr;
  const long long mb = std::strtoll(text, &end, 10);
  if (*end != '\0' || mb < 0) {
    TORCH_WARN_ONCE("SOPHON_FAST_CPU_CACHE_MB=", text,
                    " is not a whole number of MiB >= 0; the CPU buffer cache stays uncapped");
    return -1;
  }
  return static_cast<int64_t>(mb) << 20;
}

class BufferCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    // A storage resized to nothing maps nothing (as torch's CPU allocator).
    if (nbytes == 0) return {nullptr, c10::Device(c10::DeviceType::CPU)};
    const size_t bytes = round_up(nbytes, kHuge);
    bool warm = false;
    void* ptr = take(bytes, warm);
    return {ptr, new Block{ptr, bytes, warm}, &BufferCache::release_block,
            c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  bool enabled() {
    std::lock_guard<std::mutex> lock(mutex_);
    return limit_ != 0;
  }

  CpuCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(live_),
            static_cast<int64_t>(cached_),
            static_cast<int64_t>(peak_),
            hits_,
            misses_,
            limit_};
  }

  void release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    trim(0);
    peak_ = live_;
  }

  void set_limit(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes < 0 ? -1 : bytes;
    if (limit_ >= 0) trim(static_cast<size_t>(limit_));
  }

  static bool is_warm(const c10::DataPtr& data) {
    return data.get_deleter() == &BufferCache::release_block &&
           static_cast<const Block*>(data.get_context())->warm;
  }

  static BufferCache& get() {
    static BufferCache* cache = new BufferCache();  // never destroyed: tensors may outlive statics
    return *cache;
  }

 private:
  BufferCache() : limit_(limit_from_env()) {
    // A fork (DataLoader workers) while another thread holds the lock would
    // leave the child's copy locked forever: hold it across fork instead.
    pthread_atfork([] { get().mutex_.lock(); }, [] { get().mutex_.unlock(); },
                   [] { get().mutex_.unlock(); });
  }

  void* take(size_t bytes, bool& warm) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto hit = free_.find(bytes);
      if (hit != free_.end()) {
        void* ptr = hit->second;
        free_.erase(hit);
        cached_ -= bytes;
        live_ += bytes;
        ++hits_;
        warm = true;
        return ptr;
      }
      ++misses_;
      live_ += bytes;
      peak_ = std::max(peak_, live_);
      // Never more resident than the peak of live bytes.
      trim(peak_ - live_);
    }
    void* ptr = map_aligned(bytes);
    if (ptr == nullptr) {  // the cache may hold what the kernel cannot give
      {
        std::lock_guard<std::mutex> lock(mutex_);
        trim(0);
      }
      ptr = map_aligned(bytes);
    }
    if (ptr == nullptr) {
      std::lock_guard<std::mutex> lock(mutex_);
      live_ -= bytes;
      TORCH_CHECK_WITH(OutOfMemoryError, false, "sophon_fast: could not map ", bytes,
                       " bytes for a CPU output buffer");
    }
    return ptr;
  }

  // Unmaps cached blocks, largest first, until at most `keep` bytes stay.
  void trim(size_t keep) {
    while (cached_ > keep && !free_.empty()) {
      auto last = std::prev(free_.end());
      munmap(last->second, last->first);
      cached_ -= last->first;
      free_.erase(last);
    }
  }

  void give_back(const Block& block) {
    std::lock_guard<std::mutex> lock(mutex_);
    live_ -= block.bytes;
    if (limit_ < 0 || cached_ + block.bytes <= static_cast<size_t>(limit_)) {
      free_.emplace(block.bytes, block.ptr);
      cached_ += block.bytes;
    } else {
      munmap(block.ptr, block.bytes);
    }
  }

  static void release_block(void* ctx) {
    const Block* block = static_cast<const Block*>(ctx);
    get().give_back(*block);
    delete block;
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // by size: a hit needs the exact size
  size_t live_ = 0, cached_ = 0, peak_ = 0;
  int64_t hits_ = 0, misses_ = 0;
  int64_t limit_;
};

#endif  // SF_CPU_CACHE

}  // namespace

at::Tensor cpu_cache_empty_like(const at::Tensor& like) {
#if SF_CPU_CACHE
  if (like.is_cpu() && like.is_contiguous() &&
      static_cast<int64_t>(like.nbytes()) >= kCpuCacheMinBytes && BufferCache::get().enabled()) {
    return at::detail::empty_generic(like.sizes(), &BufferCache::get(),
                                     c10::DispatchKeySet(c10::DispatchKey::CPU), like.scalar_type(),
                                     c10::nullopt);
  }
#else
  (void)like;
#endif
  return at::Tensor();
}

bool cpu_cache_warm(const at::Tensor& t) {
#if SF_CPU_CACHE
  return t.defined() && t.has_storage() && BufferCache::is_warm(t.storage().data_ptr());
#else
  (void)t;
  return false;
#endif
}

CpuCacheStats cpu_cache_stats() {
#if SF_CPU_CACHE
  return BufferCache::get().stats();
#else
  return {0, 0, 0, 0, 0, 0};
#endif
}

void cpu_cache_release() {
#if SF_CPU_CACHE
  BufferCache::get().release_all();
#endif
}

void cpu_cache_set_limit(int64_t bytes) {
#if SF_CPU_CACHE
  BufferCache::get().set_limit(bytes);
#else
  (void)bytes;
#endif
}

}  // namespace sophon_fast
