// flat_adam, CPU: the Adam / AdamW forward (also the clip + Adam meta step's,
// on a pre-scaled gradient) and its fused backward as one pass of packed
// vectors over float or double buffers. Included once per ISA by
// flat_adam_cpu.cpp, right after flat_optim_cpu_packed.h (whose loads, roots,
// stores and loop it uses), inside that ISA's namespace and target pragma. No
// include guard: it is meant to be included twice.

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

template <typename C>
void adam_forward(const AdamArgs<C, C>& args, int64_t begin, int64_t end) {
  const AdamForward<C> body{args};
  packed_run<C>(body, begin, end, args.stream,
                {args.out_p + begin, args.out_m + begin, args.out_v + begin});
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
