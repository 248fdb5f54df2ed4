// flat_adagrad, CPU: the Adagrad forward and its fused backward as one pass of
// packed vectors over float or double buffers. Included once per ISA by
// flat_adagrad_cpu.cpp, right after flat_optim_cpu_packed.h (whose loads,
// roots, stores and loop it uses), inside that ISA's namespace and target
// pragma. No include guard: it is meant to be included twice.

template <typename C>
struct AdagradForward {
  AdagradArgs<C, C> k;
  template <typename V, bool Stream>
  SF_ALWAYS_INLINE void run(int64_t i) const {
    const V p = load<V>(k.p + i);
    V g = load<V>(k.g + i);
    V new_s;
    optim::adagrad_moments<V>(p, g, load<V>(k.s + i), k.hp, new_s);
    put<V, Stream>(k.out_p + i, optim::adagrad_finish<V>(p, g, root(new_s), V(k.clr), k.hp));
    put<V, Stream>(k.out_s + i, new_s);
  }
};

// Backwards: recompute the sum from the saved inputs, then the VJP. HasP:
// params were saved (L2 weight decay); otherwise they read as 0, which the VJP
// never uses.
template <typename C, bool HasP>
struct AdagradBackward {
  AdagradArgs<C, C> k;
  template <typename V, bool Stream>
  SF_ALWAYS_INLINE void run(int64_t i) const {
    const V p = HasP ? load<V>(k.p + i) : V(0);
    V g = load<V>(k.g + i);
    V new_s, gp, gg, gs;
    optim::adagrad_moments<V>(p, g, load<V>(k.s + i), k.hp, new_s);
    optim::adagrad_vjp<V>(load<V>(k.a + i), load<V>(k.c_s + i), g, new_s, root(new_s), V(k.clr),
                          k.hp, gp, gg, gs);
    put<V, Stream>(k.out_p + i, gp);
    put<V, Stream>(k.out_g + i, gg);
    put<V, Stream>(k.out_s + i, gs);
  }
};

template <typename C>
void adagrad_forward(const AdagradArgs<C, C>& args, int64_t begin, int64_t end) {
  const AdagradForward<C> body{args};
  packed_run<C>(body, begin, end, args.stream, {args.out_p + begin, args.out_s + begin});
}

template <typename C>
void adagrad_backward(const AdagradArgs<C, C>& args, int64_t begin, int64_t end) {
  const std::initializer_list<const C*> outs{args.out_p + begin, args.out_g + begin,
                                             args.out_s + begin};
  if (args.p != nullptr) {
    const AdagradBackward<C, true> body{args};
    packed_run<C>(body, begin, end, args.stream, outs);
  } else {
    const AdagradBackward<C, false> body{args};
    packed_run<C>(body, begin, end, args.stream, outs);
  }
}
