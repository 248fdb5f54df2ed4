// flat_rmsprop, CPU: the RMSprop forward (plain and centered) and its fused
// backward as one pass of packed vectors over float or double buffers.
// Included once per ISA by flat_rmsprop_cpu.cpp, right after
// flat_optim_cpu_packed.h (whose loads, roots, stores and loop it uses), inside
// that ISA's namespace and target pragma. No include guard: it is meant to be
// included twice.

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
