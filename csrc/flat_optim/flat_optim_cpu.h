// flat optimizer family, CPU: what the optimizers' CPU loops share
// (flat_momentum_cpu.cpp, flat_adam_cpu.cpp, flat_rmsprop_cpu.cpp,
// flat_adagrad_cpu.cpp, flat_adadelta_cpu.cpp, flat_optim_cpu.cpp): the task grain, the chunk size
// of the staged loops, pointer access, the AVX2 switch, the packed square roots, and the macros
// that run a packed or staged loop across threads.
//
// On float/double buffers the forwards and the Adam/RMSprop backwards run
// their maths on packed vectors in one pass (flat_optim_cpu_packed.h and each
// optimizer's *_cpu_packed.h), built for SSE2 and, under GCC, for AVX2,
// picked at run time where the CPU has it (the extension itself is compiled
// for baseline x86-64); SOPHON_FAST_NO_AVX2=1 (read at each call) runs the
// SSE2 build, so tests compare the two. No FMA: both builds round alike. The
// fp16/bf16 Adam/RMSprop loops (and every float/double loop off x86) stage
// each 256-element chunk through local arrays instead (outputs may alias
// inputs in the in-place steps; with locals the compiler can prove they do
// not and vectorise the maths; 1 KiB per array stays in L1) and take the
// chunk's roots with SSE2 instructions on x86.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <type_traits>

#include "flat_optim_math.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define SF_X86 1
#define SF_INLINE __attribute__((always_inline)) inline
#else
#define SF_X86 0
#define SF_INLINE inline
#endif

namespace sophon_fast {
namespace optim_cpu {

// 64 K elements per task: the OpenMP hand-off (~µs) is noise, and a 0.1 M-param
// small CNN still uses both cores.
constexpr int64_t kGrain = 1 << 16;
constexpr int64_t kChunk = 256;

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
const T* in(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
T* outp(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.mutable_data_ptr()) : nullptr;
}

// AVX2 where the CPU has it, unless SOPHON_FAST_NO_AVX2=1 (read at each call).
inline bool has_avx2() {
#if SF_X86
  static const bool yes = __builtin_cpu_supports("avx2");
  const char* off = std::getenv("SOPHON_FAST_NO_AVX2");
  return yes && !(off != nullptr && off[0] == '1');
#else
  return false;
#endif
}

// root[j] = sqrt(max(x[j], 0)) (NaN -> 0, as optim::sqrt_pos) with packed
// instructions: a scalar sqrt call sets errno and keeps the loops scalar.
template <typename C>
void sqrt_nonneg(const C* x, C* root, int64_t len) {
  int64_t j = 0;
#if SF_X86
  if constexpr (std::is_same_v<C, float>) {
    for (; j + 4 <= len; j += 4)
      _mm_storeu_ps(root + j, _mm_sqrt_ps(_mm_max_ps(_mm_loadu_ps(x + j), _mm_setzero_ps())));
  } else {
    for (; j + 2 <= len; j += 2)
      _mm_storeu_pd(root + j, _mm_sqrt_pd(_mm_max_pd(_mm_loadu_pd(x + j), _mm_setzero_pd())));
  }
#endif
  for (; j < len; ++j) root[j] = optim::sqrt_pos(x[j]);
}

// Writes a chunk of one output, converting to the storage type.
template <typename T, typename C>
SF_INLINE void put(T* dst, const C* src, int64_t len) {
  for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<T>(src[j]);
}

// Non-temporal stores pay off for outputs that are not the inputs (in place,
// the lines are already cached) and too big to be read back from cache: from
// 1 M elements (4 MiB per buffer at fp32).
inline bool fresh_outputs(int64_t numel, std::initializer_list<bool> distinct) {
  if (numel < (int64_t(1) << 20)) return false;
  for (const bool d : distinct)
    if (!d) return false;
  return true;
}

}  // namespace optim_cpu
}  // namespace sophon_fast

#if SF_X86
// Each optimizer's .cpp includes flat_optim_cpu_packed.h and its own
// *_cpu_packed.h twice, in namespaces portable (kVectorBytes 16, SSE2) and,
// under GCC, avx2 (kVectorBytes 32, inside a target("avx2") pragma; Clang
// ignores that pragma: its builds run the SSE2 packs). These macros pick one.
#if !defined(__clang__)
#define SF_PACKED_WIDE(NAME, args, begin, end) avx2::NAME<C>(args, begin, end)
#else
#define SF_PACKED_WIDE(NAME, args, begin, end) portable::NAME<C>(args, begin, end)
#endif

// The packed loops, AVX2 or baseline, across threads.
#define SF_PACKED_RUN(NAME, args, numel)                                 \
  do {                                                                   \
    const bool wide = has_avx2();                                        \
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) { \
      if (wide)                                                          \
        SF_PACKED_WIDE(NAME, args, begin, end);                          \
      else                                                               \
        portable::NAME<C>(args, begin, end);                             \
    });                                                                  \
  } while (0)
#endif

// The staged loops (fp16/bf16 buffers, and float/double off x86), across
// threads.
#define SF_RANGE_DISPATCH(NAME, ARGS_T)                                                  \
  template <typename T, typename C>                                                      \
  void NAME##_run(const ARGS_T<T, C>& args, int64_t numel) {                             \
    at::parallel_for(0, numel, kGrain,                                                   \
                     [&](int64_t begin, int64_t end) { NAME<T, C>(args, begin, end); }); \
  }

#define SF_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)
