// flat_momentum, CPU kernels: the momentum SGD update (plain and Nesterov) and
// its fused backward in one pass over the flat buffers, split across threads
// with at::parallel_for. The element maths is flat_momentum_math.h (shared
// with CUDA). Per parameter at fp32: 20 B forward, against 32-84 B for the 3-8
// eager ops of the same update. float/double forwards run packed vectors
// (flat_momentum_cpu_packed.h, flat_optim_cpu.h says why).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "flat_momentum.h"
#include "flat_momentum_math.h"
#include "flat_optim_cpu.h"
#if defined(__GNUC__) && defined(__x86_64__)
#include "flat_optim_simd.h"
#endif

namespace sophon_fast {
using namespace optim_cpu;  // NOLINT(build/namespaces): the shared CPU helpers
namespace {

template <typename T, typename C>
struct MomentumArgs {
  const T* p;
  const T* g;
  const C* b;
  T* out_p;
  C* out_b;
  SfMomentumHp hp;
  bool first;
  bool stream;
};

#if SF_X86
namespace portable {
constexpr int kVectorBytes = 16;
#include "flat_optim_cpu_packed.h"  // NOLINT(build/include)
// The optimizer's loop bodies, over the loop above.
#include "flat_momentum_cpu_packed.h"  // NOLINT(build/include)
}  // namespace portable

// GCC builds the same headers for AVX2 under a target pragma (Clang ignores
// that pragma: its builds run the SSE2 packs).
#if !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
constexpr int kVectorBytes = 32;
#include "flat_optim_cpu_packed.h"  // NOLINT(build/include)
// The optimizer's loop bodies, over the loop above.
#include "flat_momentum_cpu_packed.h"  // NOLINT(build/include)
}  // namespace avx2
#pragma GCC pop_options
#endif
#endif

// Packed where the buffers are float or double (T == C), a plain loop for
// fp16/bf16 and off x86.
template <typename T, typename C>
void momentum_forward_run(const MomentumArgs<T, C>& args, int64_t numel) {
#if SF_X86
  if constexpr (std::is_same_v<T, C>) {
    SF_PACKED_RUN(momentum_forward, args, numel);
    return;
  }
#endif
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    const auto k = args;  // a local copy: outputs cannot alias it, so it stays in registers
    for (int64_t i = begin; i < end; ++i) {
      C np, nb;
      optim::momentum_forward<C>(static_cast<C>(k.p[i]), static_cast<C>(k.g[i]), k.b[i], k.first,
                                 k.hp, np, nb);
      k.out_p[i] = static_cast<T>(np);
      k.out_b[i] = nb;
    }
  });
}

}  // namespace

void flat_momentum_forward_cpu(const at::Tensor& params, const at::Tensor& grad,
                               const at::Tensor& buf, bool first, at::Tensor& out_params,
                               at::Tensor& out_buf, const SfMomentumHp& hp, bool outputs_resident) {
  SF_DISPATCH(params.scalar_type(), "flat_momentum_forward_cpu", [&] {
    using C = compute_t<scalar_t>;
    const MomentumArgs<scalar_t, C> args{
        in<scalar_t>(params),
        in<scalar_t>(grad),
        in<C>(buf),
        outp<scalar_t>(out_params),
        outp<C>(out_buf),
        hp,
        first,
        outputs_resident &&
            fresh_outputs(params.numel(), {out_params.data_ptr() != params.data_ptr(),
                                           out_buf.data_ptr() != buf.data_ptr()})};
    momentum_forward_run<scalar_t, C>(args, params.numel());
  });
}

void flat_momentum_backward_cpu(const at::Tensor& grad_new_params, const at::Tensor& grad_new_buf,
                                bool first, at::Tensor& grad_params, at::Tensor& grad_grad,
                                at::Tensor& grad_buf, const SfMomentumHp& hp) {
  SF_DISPATCH(grad_new_params.scalar_type(), "flat_momentum_backward_cpu", [&] {
    using C = compute_t<scalar_t>;
    const scalar_t* a = in<scalar_t>(grad_new_params);
    const C* c = in<C>(grad_new_buf);
    scalar_t* gp_out = outp<scalar_t>(grad_params);
    scalar_t* gg_out = outp<scalar_t>(grad_grad);
    C* gb_out = outp<C>(grad_buf);
    at::parallel_for(0, grad_new_params.numel(), kGrain, [&](int64_t begin, int64_t end) {
      const auto h = hp;  // a local copy: outputs cannot alias it, so it stays in registers
      for (int64_t i = begin; i < end; ++i) {
        C gp, gg, gb;
        optim::momentum_backward<C>(static_cast<C>(a[i]), c[i], first, h, gp, gg, gb);
        if (gp_out != nullptr) gp_out[i] = static_cast<scalar_t>(gp);
        gg_out[i] = static_cast<scalar_t>(gg);
        gb_out[i] = gb;
      }
    });
  });
}

}  // namespace sophon_fast
