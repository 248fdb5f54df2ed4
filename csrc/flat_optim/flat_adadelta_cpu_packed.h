// flat_adadelta, CPU: the Adadelta forward and its fused backward as one pass
// of packed vectors over float or double buffers. Included once per ISA by
// flat_adadelta_cpu.cpp, right after flat_optim_cpu_packed.h (whose loads,
// roots, stores and loop it uses), inside that ISA's namespace and target
// pragma. No include guard: it is meant to be included twice.

template <typename C>
struct AdadeltaForward {
  AdadeltaArgs<C, C> k;
  template <typename V, bool Stream>
  SF_ALWAYS_INLINE void run(int64_t i) const {
    const V p = load<V>(k.p + i);
    V g = load<V>(k.g + i);
    const V u = load<V>(k.u + i);
    V new_v, q_v, q_u, new_p, new_u;
    optim::adadelta_moments<V>(p, g, load<V>(k.v + i), u, k.hp, new_v, q_v, q_u);
    optim::adadelta_finish<V>(p, g, u, root(q_v), root(q_u), k.hp, new_p, new_u);
    put<V, Stream>(k.out_p + i, new_p);
    put<V, Stream>(k.out_v + i, new_v);
    put<V, Stream>(k.out_u + i, new_u);
  }
};

// Backwards: recompute the radicands from the saved inputs, then the VJP.
// HasP: params were saved (L2 weight decay); otherwise they read as 0, which
// the VJP never uses.
template <typename C, bool HasP>
struct AdadeltaBackward {
  AdadeltaArgs<C, C> k;
  template <typename V, bool Stream>
  SF_ALWAYS_INLINE void run(int64_t i) const {
    const V p = HasP ? load<V>(k.p + i) : V(0);
    V g = load<V>(k.g + i);
    V new_v, q_v, q_u, gp, gg, gv, gu;
    optim::adadelta_moments<V>(p, g, load<V>(k.v + i), load<V>(k.u + i), k.hp, new_v, q_v, q_u);
    optim::adadelta_vjp<V>(load<V>(k.a + i), load<V>(k.c_v + i), load<V>(k.c_u + i), g, q_v, q_u,
                           root(q_v), root(q_u), k.hp, gp, gg, gv, gu);
    put<V, Stream>(k.out_p + i, gp);
    put<V, Stream>(k.out_g + i, gg);
    put<V, Stream>(k.out_v + i, gv);
    put<V, Stream>(k.out_u + i, gu);
  }
};

template <typename C>
void adadelta_forward(const AdadeltaArgs<C, C>& args, int64_t begin, int64_t end) {
  const AdadeltaForward<C> body{args};
  packed_run<C>(body, begin, end, args.stream,
                {args.out_p + begin, args.out_v + begin, args.out_u + begin});
}

template <typename C>
void adadelta_backward(const AdadeltaArgs<C, C>& args, int64_t begin, int64_t end) {
  const std::initializer_list<const C*> outs{args.out_p + begin, args.out_g + begin,
                                             args.out_v + begin, args.out_u + begin};
  if (args.p != nullptr) {
    const AdadeltaBackward<C, true> body{args};
    packed_run<C>(body, begin, end, args.stream, outs);
  } else {
    const AdadeltaBackward<C, false> body{args};
    packed_run<C>(body, begin, end, args.stream, outs);
  }
}
