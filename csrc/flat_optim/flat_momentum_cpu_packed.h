// flat_momentum, CPU: the momentum SGD forward as one pass of packed vectors
// over float or double buffers. Included once per ISA by flat_momentum_cpu.cpp,
// right after flat_optim_cpu_packed.h (whose loads, stores and loop it uses),
// inside that ISA's namespace and target pragma. No include guard: it is meant
// to be included twice.

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
void momentum_forward(const MomentumArgs<C, C>& args, int64_t begin, int64_t end) {
  const MomentumForward<C> body{args};  // a local copy: the outputs cannot alias it
  packed_run<C>(body, begin, end, args.stream, {args.out_p + begin, args.out_b + begin});
}
