// flat_optim, CPU: the forward updates and their fused backwards for float and
// double buffers as one pass of packed vectors (no staging through chunks). Included once per ISA
// by flat_optim_cpu.cpp, inside a namespace that defines kVectorBytes (16: SSE2, 32: AVX2) and
// compiled under that ISA's target pragma, so everything here, square roots and streamed stores
// included, runs at that width. No include guard: it is meant to be included twice.
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

template <typename C>
struct MomentumForward {
  MomentumArgs<C, C> k;
  template <typename V, bool Stream>
  SF_ALWAYS_INLINE void run(int64_t i) const {
    V new_p, new_b;
    optim::momentum_forward<V>(load<V>(k.p + i), load<V>(k.g + i), load<V>(k.b + i), k.first, k.hp,
                               new_p, new_b);
    put<V, Stream>(k.out_p + i, new_p);
    put<V, Stream>(k.out_b + i, new_b);
  }
};

template <typename C>
struct AdamForward {
  AdamArgs<C, C> k;
  template <typename V, bool Stream>
  SF_ALWAYS_INLINE void run(int64_t i) const {
    V p = load<V>(k.p + i);
    V g = load<V>(k.g + i) * V(k.clip);  // x * 1 == x exactly: no clip, no change
    V new_m, new_v;
    optim::adam_moments<V>(p, g, load<V>(k.m + i), load<V>(k.v + i), k.hp, new_m, new_v);
    const V new_p =
        optim::adam_finish<V>(p, new_m, root(new_v), V(k.step_size), V(k.sqrt_bc2), k.hp);
    put<V, Stream>(k.out_p + i, new_p);
    put<V, Stream>(k.out_m + i, new_m);
    put<V, Stream>(k.out_v + i, new_v);
  }
};

template <typename C, bool Centered>
struct RmspropForward {
  RmspropArgs<C, C> k;
  template <typename V, bool Stream>
  SF_ALWAYS_INLINE void run(int64_t i) const {
    const V p = load<V>(k.p + i);
    V g = load<V>(k.g + i);
    const V ga = Centered ? load<V>(k.ga + i) : V(0);
    V new_v, new_ga, q;
    optim::rmsprop_moments<V>(p, g, load<V>(k.v + i), ga, Centered, k.hp, new_v, new_ga, q);
    put<V, Stream>(k.out_p + i, optim::rmsprop_finish<V>(p, g, root(q), k.hp));
    put<V, Stream>(k.out_v + i, new_v);
    if constexpr (Centered) put<V, Stream>(k.out_ga + i, new_ga);
  }
};

// Backwards: recompute the moments from the saved inputs, then the VJP.
// HasP: params were saved (L2 weight decay); otherwise they read as 0, which
// the VJP never uses.
template <typename C, bool HasP>
struct AdamBackward {
  AdamArgs<C, C> k;
  template <typename V, bool Stream>
  SF_ALWAYS_INLINE void run(int64_t i) const {
    V p = HasP ? load<V>(k.p + i) : V(0);
    V g = load<V>(k.g + i);
    V new_m, new_v, gp, gg, gm, gv;
    optim::adam_moments<V>(p, g, load<V>(k.m + i), load<V>(k.v + i), k.hp, new_m, new_v);
    optim::adam_vjp<V>(load<V>(k.a + i), load<V>(k.c_m + i), load<V>(k.c_v + i), g, new_m, new_v,
                       root(new_v), V(k.step_size), V(k.sqrt_bc2), k.hp, gp, gg, gm, gv);
    put<V, Stream>(k.out_p + i, gp);
    put<V, Stream>(k.out_g + i, gg);
    put<V, Stream>(k.out_m + i, gm);
    put<V, Stream>(k.out_v + i, gv);
  }
};

template <typename C, bool HasP, bool Centered>
struct RmspropBackward {
  RmspropArgs<C, C> k;
  template <typename V, bool Stream>
  SF_ALWAYS_INLINE void run(int64_t i) const {
    const V p = HasP ? load<V>(k.p + i) : V(0);
    V g = load<V>(k.g + i);
    const V ga = Centered ? load<V>(k.ga + i) : V(0);
    const V c_ga = Centered ? load<V>(k.c_ga + i) : V(0);
    V new_v, new_ga, q, gp, gg, gv, gga;
    optim::rmsprop_moments<V>(p, g, load<V>(k.v + i), ga, Centered, k.hp, new_v, new_ga, q);
    optim::rmsprop_vjp<V>(load<V>(k.a + i), load<V>(k.c_v + i), c_ga, g, new_ga, q, root(q),
                          Centered, k.hp, gp, gg, gv, gga);
    put<V, Stream>(k.out_p + i, gp);
    put<V, Stream>(k.out_g + i, gg);
    put<V, Stream>(k.out_v + i, gv);
    if constexpr (Centered) put<V, Stream>(k.out_ga + i, gga);
  }
};

template <typename C>
void momentum_forward(const MomentumArgs<C, C>& args, int64_t begin, int64_t end) {
  const MomentumForward<C> body{args};  // a local copy: the outputs cannot alias it
  packed_run<C>(body, begin, end, args.stream, {args.out_p + begin, args.out_b + begin});
}

template <typename C>
void adam_forward(const AdamArgs<C, C>& args, int64_t begin, int64_t end) {
  const AdamForward<C> body{args};
  packed_run<C>(body, begin, end, args.stream,
                {args.out_p + begin, args.out_m + begin, args.out_v + begin});
}

template <typename C>
void rmsprop_forward(const RmspropArgs<C, C>& args, int64_t begin, int64_t end) {
  if (args.ga != nullptr) {
    const RmspropForward<C, true> body{args};
    packed_run<C>(body, begin, end, args.stream,
                  {args.out_p + begin, args.out_v + begin, args.out_ga + begin});
  } else {
    const RmspropForward<C, false> body{args};
    packed_run<C>(body, begin, end, args.stream, {args.out_p + begin, args.out_v + begin});
  }
}

template <typename C>
void adam_backward(const AdamArgs<C, C>& args, int64_t begin, int64_t end) {
  const std::initializer_list<const C*> outs{args.out_p + begin, args.out_g + begin,
                                             args.out_m + begin, args.out_v + begin};
  if (args.p != nullptr) {
    const AdamBackward<C, true> body{args};
    packed_run<C>(body, begin, end, args.stream, outs);
  } else {
    const AdamBackward<C, false> body{args};
    packed_run<C>(body, begin, end, args.stream, outs);
  }
}

template <typename C, bool HasP>
void rmsprop_backward_with(const RmspropArgs<C, C>& args, int64_t begin, int64_t end) {
  if (args.ga != nullptr) {
    const RmspropBackward<C, HasP, true> body{args};
    packed_run<C>(
        body, begin, end, args.stream,
        {args.out_p + begin, args.out_g + begin, args.out_v + begin, args.out_ga + begin});
  } else {
    const RmspropBackward<C, HasP, false> body{args};
    packed_run<C>(body, begin, end, args.stream,
                  {args.out_p + begin, args.out_g + begin, args.out_v + begin});
  }
}

template <typename C>
void rmsprop_backward(const RmspropArgs<C, C>& args, int64_t begin, int64_t end) {
  if (args.p != nullptr)
    rmsprop_backward_with<C, true>(args, begin, end);
  else
    rmsprop_backward_with<C, false>(args, begin, end);
}
