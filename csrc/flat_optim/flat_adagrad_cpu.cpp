// flat_adagrad, CPU kernels: the Adagrad update and its fused backward in one
// pass over the flat buffers, split across threads with at::parallel_for. The
// element maths is flat_adagrad_math.h (shared with CUDA). Per parameter at
// fp32: 20 B forward, against 48 B for the 4 eager ops of the same update.
// float/double buffers run packed vectors (flat_adagrad_cpu_packed.h),
// fp16/bf16 staged chunks (flat_optim_cpu.h says why).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "flat_adagrad.h"
#include "flat_adagrad_math.h"
#include "flat_optim_cpu.h"
#if defined(__GNUC__) && defined(__x86_64__)
#include "flat_optim_simd.h"
#endif

namespace sophon_fast {
using namespace optim_cpu;  // NOLINT(build/namespaces): the shared CPU helpers
namespace {

template <typename T, typename C>
struct AdagradArgs {
  const T* a;  // backward: d params'
  const C* c_s;
  const T* p;  // may be null in the backward (not needed)
  const T* g;
  const C* s;
  T* out_p;  // forward: params'; backward: d params
  T* out_g;  // backward: d grad
  C* out_s;
  C clr;
  SfAdagradHp hp;
  bool stream;
};

template <typename T, typename C>
SF_INLINE void adagrad_forward_range(const AdagradArgs<T, C>& args, int64_t begin, int64_t end) {
  const AdagradArgs<T, C> k = args;  // a local copy: the outputs cannot alias it
  C xp[kChunk], xg[kChunk], xs[kChunk], xr[kChunk];
  for (int64_t i0 = begin; i0 < end; i0 += kChunk) {
    const int64_t len = std::min(kChunk, end - i0);
    for (int64_t j = 0; j < len; ++j) {
      xp[j] = static_cast<C>(k.p[i0 + j]);
      xg[j] = static_cast<C>(k.g[i0 + j]);
      xs[j] = k.s[i0 + j];
    }
    for (int64_t j = 0; j < len; ++j) {
      C new_s;
      optim::adagrad_moments<C>(xp[j], xg[j], xs[j], k.hp, new_s);
      xs[j] = new_s;
    }
    sqrt_nonneg(xs, xr, len);
    for (int64_t j = 0; j < len; ++j)
      xp[j] = optim::adagrad_finish<C>(xp[j], xg[j], xr[j], k.clr, k.hp);
    put(k.out_p + i0, xp, len);
    put(k.out_s + i0, xs, len);
  }
}

template <typename T, typename C>
SF_INLINE void adagrad_backward_range(const AdagradArgs<T, C>& args, int64_t begin, int64_t end) {
  const AdagradArgs<T, C> k = args;
  C xa[kChunk], xcs[kChunk], xp[kChunk], xg[kChunk], xs[kChunk];
  for (int64_t i0 = begin; i0 < end; i0 += kChunk) {
    const int64_t len = std::min(kChunk, end - i0);
    for (int64_t j = 0; j < len; ++j) {
      xa[j] = static_cast<C>(k.a[i0 + j]);
      xcs[j] = k.c_s[i0 + j];
      xg[j] = static_cast<C>(k.g[i0 + j]);
      xs[j] = k.s[i0 + j];
    }
    if (k.p != nullptr) {
      for (int64_t j = 0; j < len; ++j) xp[j] = static_cast<C>(k.p[i0 + j]);
    } else {
      for (int64_t j = 0; j < len; ++j) xp[j] = C(0);
    }
    for (int64_t j = 0; j < len; ++j) {
      C new_s;
      optim::adagrad_moments<C>(xp[j], xg[j], xs[j], k.hp, new_s);
      xs[j] = new_s;
    }
    sqrt_nonneg(xs, xp, len);  // params are no longer needed: their slot takes the roots
    for (int64_t j = 0; j < len; ++j) {
      C gp, gg, gs;
      optim::adagrad_vjp<C>(xa[j], xcs[j], xg[j], xs[j], xp[j], k.clr, k.hp, gp, gg, gs);
      xa[j] = gp;
      xg[j] = gg;
      xs[j] = gs;
    }
    put(k.out_p + i0, xa, len);
    put(k.out_g + i0, xg, len);
    put(k.out_s + i0, xs, len);
  }
}

#if SF_X86
namespace portable {
constexpr int kVectorBytes = 16;
#include "flat_optim_cpu_packed.h"  // NOLINT(build/include)
// The optimizer's loop bodies, over the loop above.
#include "flat_adagrad_cpu_packed.h"  // NOLINT(build/include)
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
#include "flat_adagrad_cpu_packed.h"  // NOLINT(build/include)
}  // namespace avx2
#pragma GCC pop_options
#endif
#endif

SF_RANGE_DISPATCH(adagrad_forward_range, AdagradArgs)
SF_RANGE_DISPATCH(adagrad_backward_range, AdagradArgs)

// Packed where the buffers are float or double (T == C), staged chunks for
// fp16/bf16 and off x86.
template <typename T, typename C>
void adagrad_forward_run(const AdagradArgs<T, C>& args, int64_t numel) {
#if SF_X86
  if constexpr (std::is_same_v<T, C>) {
    SF_PACKED_RUN(adagrad_forward, args, numel);
  } else {
    adagrad_forward_range_run<T, C>(args, numel);
  }
#else
  adagrad_forward_range_run<T, C>(args, numel);
#endif
}

template <typename T, typename C>
void adagrad_backward_run(const AdagradArgs<T, C>& args, int64_t numel) {
#if SF_X86
  if constexpr (std::is_same_v<T, C>) {
    SF_PACKED_RUN(adagrad_backward, args, numel);
  } else {
    adagrad_backward_range_run<T, C>(args, numel);
  }
#else
  adagrad_backward_range_run<T, C>(args, numel);
#endif
}

}  // namespace

void flat_adagrad_forward_cpu(const at::Tensor& params, const at::Tensor& grad,
                              const at::Tensor& state_sum, double clr, at::Tensor& out_params,
                              at::Tensor& out_sum, const SfAdagradHp& hp, bool outputs_resident) {
  SF_DISPATCH(params.scalar_type(), "flat_adagrad_forward_cpu", [&] {
    using C = compute_t<scalar_t>;
    const AdagradArgs<scalar_t, C> args{
        nullptr,
        nullptr,
        in<scalar_t>(params),
        in<scalar_t>(grad),
        in<C>(state_sum),
        outp<scalar_t>(out_params),
        nullptr,
        outp<C>(out_sum),
        static_cast<C>(clr),
        hp,
        outputs_resident &&
            fresh_outputs(params.numel(), {out_params.data_ptr() != params.data_ptr(),
                                           out_sum.data_ptr() != state_sum.data_ptr()})};
    adagrad_forward_run<scalar_t, C>(args, params.numel());
  });
}

void flat_adagrad_backward_cpu(const at::Tensor& grad_new_params, const at::Tensor& grad_new_sum,
                               const at::Tensor& params, const at::Tensor& grad,
                               const at::Tensor& state_sum, double clr, at::Tensor& grad_params,
                               at::Tensor& grad_grad, at::Tensor& grad_sum, const SfAdagradHp& hp) {
  SF_DISPATCH(grad.scalar_type(), "flat_adagrad_backward_cpu", [&] {
    using C = compute_t<scalar_t>;
    const AdagradArgs<scalar_t, C> args{in<scalar_t>(grad_new_params),
                                        in<C>(grad_new_sum),
                                        in<scalar_t>(params),
                                        in<scalar_t>(grad),
                                        in<C>(state_sum),
                                        outp<scalar_t>(grad_params),
                                        outp<scalar_t>(grad_grad),
                                        outp<C>(grad_sum),
                                        static_cast<C>(clr),
                                        hp,
                                        fresh_outputs(grad.numel(), {true})};
    adagrad_backward_run<scalar_t, C>(args, grad.numel());
  });
}

}  // namespace sophon_fast
