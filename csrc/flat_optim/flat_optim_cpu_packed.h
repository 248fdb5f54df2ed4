// flat optimizer family, CPU: the packed-loop scaffolding every optimizer's
// forward updates and fused backwards share for float and double buffers, as
// one pass of packed vectors (no staging through chunks): loads, square roots,
// (streamed) stores and the head / packs / tail loop. Included once per ISA by
// each optimizer's CPU file (flat_momentum_cpu.cpp, flat_adam_cpu.cpp,
// flat_rmsprop_cpu.cpp, flat_adagrad_cpu.cpp, flat_adadelta_cpu.cpp), inside a namespace that
// defines kVectorBytes (16: SSE2, 32: AVX2) and compiled under that ISA's target pragma, followed
// there by the optimizer's own loop bodies (flat_momentum_cpu_packed.h, flat_adam_cpu_packed.h,
// flat_rmsprop_cpu_packed.h, flat_adagrad_cpu_packed.h, flat_adadelta_cpu_packed.h), so everything
// here, square roots and streamed stores included, runs at that width. No include guard: it is
// meant to be included twice.
//
// Each element runs optim::*_forward's maths with the compute type set to a
// vector (simd::Pack) or, for the unaligned head and the tail, to the scalar:
// every lane rounds as the scalar loop does, so both ISAs give identical bits.
// Measured at 11.2 M params, one core, out= buffers: RMSprop 12.4 -> ~5 ms.

template <typename C>
using Wide = simd::Pack<C, kVectorBytes / static_cast<int>(sizeof(C))>;

template <typename V>
SF_ALWAYS_INLINE V load(const typename simd::lane<V>::type* src) {
  if constexpr (std::is_arithmetic_v<V>)
    return *src;
  else
    return V::load(src);
}

// sqrt(max(x, 0)), NaN -> 0, as optim::sqrt_pos: maxps/maxpd return their
// second operand (0) when the first is NaN, and sqrt is correctly rounded.
template <typename V>
SF_ALWAYS_INLINE V root(V x) {
  if constexpr (std::is_arithmetic_v<V>) {
    return optim::sqrt_pos(x);
  } else if constexpr (sizeof(V) == 32 && std::is_same_v<typename V::scalar, float>) {
    return V::raw(_mm256_sqrt_ps(_mm256_max_ps(__m256(x.v), _mm256_setzero_ps())));
  } else if constexpr (sizeof(V) == 32) {
    return V::raw(_mm256_sqrt_pd(_mm256_max_pd(__m256d(x.v), _mm256_setzero_pd())));
  } else if constexpr (std::is_same_v<typename V::scalar, float>) {
    return V::raw(_mm_sqrt_ps(_mm_max_ps(__m128(x.v), _mm_setzero_ps())));
  } else {
    return V::raw(_mm_sqrt_pd(_mm_max_pd(__m128d(x.v), _mm_setzero_pd())));
  }
}

// Stream: non-temporal store (dst vector-aligned), else a plain one.
template <typename V, bool Stream>
SF_ALWAYS_INLINE void put(typename simd::lane<V>::type* dst, V x) {
  if constexpr (std::is_arithmetic_v<V>) {
    *dst = x;
  } else if constexpr (!Stream) {
    x.store(dst);
  } else if constexpr (sizeof(V) == 32 && std::is_same_v<typename V::scalar, float>) {
    _mm256_stream_ps(dst, __m256(x.v));
  } else if constexpr (sizeof(V) == 32) {
    _mm256_stream_pd(dst, __m256d(x.v));
  } else if constexpr (std::is_same_v<typename V::scalar, float>) {
    _mm_stream_ps(dst, __m128(x.v));
  } else {
    _mm_stream_pd(dst, __m128d(x.v));
  }
}

// [begin, end): head scalars (until the streamed outputs are aligned), packs,
// then the scalar tail. Body::run<V, Stream>(i) updates elements i..i+lanes.
template <typename C, bool Stream, typename Body>
SF_ALWAYS_INLINE void packed_loop(const Body& body, int64_t begin, int64_t end, int64_t head) {
  constexpr int64_t lanes = Wide<C>::width;
  int64_t i = begin;
  for (const int64_t stop = begin + head; i < stop; ++i) body.template run<C, false>(i);
  for (; i + lanes <= end; i += lanes) body.template run<Wide<C>, Stream>(i);
  for (; i < end; ++i) body.template run<C, false>(i);
}

// Streams when asked and every output can be aligned at once (separate
// allocations always can; odd views of one storage may not).
template <typename C, typename Body>
SF_ALWAYS_INLINE void packed_run(const Body& body, int64_t begin, int64_t end, bool stream,
                                 std::initializer_list<const C*> outs) {
  const int64_t head = stream ? simd::align_prefix<C, Wide<C>::width>(outs, end - begin) : -1;
  if (head >= 0) {
    packed_loop<C, true>(body, begin, end, head);
    _mm_sfence();  // streamed stores visible before the join
  } else {
    packed_loop<C, false>(body, begin, end, 0);
  }
}
