// flat_optim, CPU: a packed vector type that the per-element maths of
// flat_optim_math.h accepts as its compute type C, so the forward updates run
// in one pass of SSE or AVX2 vectors from the very code the scalar loops and
// the CUDA kernels use. Torch-free; x86-64 with GCC or Clang only.
//
// Pack<S, W> holds W lanes of S in a GCC vector-extension value: + - * / are
// the compiler's own packed IEEE operations (no intrinsic, so the maths
// templates need no target attribute and inline into an AVX2 caller), and
// each lane rounds exactly as the scalar expression would. The square root
// and the non-temporal store are the only per-ISA pieces
// (flat_optim_cpu_packed.h). No FMA anywhere: a contracted multiply-add would round differently
// from the scalar tail and the portable build.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#define SF_ALWAYS_INLINE __attribute__((always_inline)) inline

// Packs are only ever passed between always-inlined functions: GCC's note that
// 32-byte vector arguments changed ABI in 4.6 concerns calls that never happen.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace sophon_fast {
namespace simd {

template <typename S, int W>
struct Pack {
  typedef S vec __attribute__((vector_size(sizeof(S) * W)));
  static constexpr int width = W;
  using scalar = S;
  vec v;

  Pack() = default;
  // Broadcast: static_cast<C>(hp.lr), C(1) and the like in the maths.
  template <typename A, std::enable_if_t<std::is_arithmetic_v<A>, int> = 0>
  SF_ALWAYS_INLINE explicit Pack(A x) : v(vec{} + static_cast<S>(x)) {}

  SF_ALWAYS_INLINE static Pack raw(vec x) {
    Pack p;
    p.v = x;
    return p;
  }
  SF_ALWAYS_INLINE static Pack load(const S* src) {
    Pack p;
    std::memcpy(&p.v, src, sizeof(vec));
    return p;
  }
  SF_ALWAYS_INLINE void store(S* dst) const { std::memcpy(dst, &v, sizeof(vec)); }

  SF_ALWAYS_INLINE friend Pack operator+(Pack a, Pack b) { return raw(a.v + b.v); }
  SF_ALWAYS_INLINE friend Pack operator-(Pack a, Pack b) { return raw(a.v - b.v); }
  SF_ALWAYS_INLINE friend Pack operator*(Pack a, Pack b) { return raw(a.v * b.v); }
  SF_ALWAYS_INLINE friend Pack operator/(Pack a, Pack b) { return raw(a.v / b.v); }
  SF_ALWAYS_INLINE Pack& operator+=(Pack b) { return *this = *this + b; }
  SF_ALWAYS_INLINE Pack& operator-=(Pack b) { return *this = *this - b; }
  SF_ALWAYS_INLINE friend Pack operator-(Pack a) { return raw(-a.v); }

  // Comparison: a lane mask; static_cast<C>(a > b) gives 1 or 0 per lane, as
  // the scalar bool-to-float conversion does.
  typedef decltype(vec{} > vec{}) mask_vec;
  struct Mask {
    mask_vec m;
  };
  SF_ALWAYS_INLINE friend Mask operator>(Pack a, Pack b) { return {a.v > b.v}; }
  SF_ALWAYS_INLINE explicit Pack(Mask mask) : v(__builtin_convertvector(-mask.m, vec)) {}
};

template <typename V>
struct lane {
  using type = V;
};
template <typename S, int W>
struct lane<Pack<S, W>> {
  using type = S;
};

// Elements to run as scalars before every pointer in ptrs is vector-aligned,
// or -1 when they cannot all be aligned together (then nothing streams).
template <typename S, int W>
inline int64_t align_prefix(std::initializer_list<const S*> ptrs, int64_t len) {
  constexpr uintptr_t bytes = sizeof(S) * W;
  int64_t head = -1;
  for (const S* ptr : ptrs) {
    if (ptr == nullptr) continue;
    const auto addr = reinterpret_cast<uintptr_t>(ptr);
    if (addr % sizeof(S) != 0) return -1;
    const auto h = static_cast<int64_t>(((bytes - addr % bytes) % bytes) / sizeof(S));
    if (head >= 0 && h != head) return -1;
    head = h;
  }
  return head < 0 ? 0 : (head < len ? head : len);
}

}  // namespace simd
}  // namespace sophon_fast
