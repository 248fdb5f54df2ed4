// flat_adam, CPU kernels: the Adam / AdamW update and its fused backward in one
// pass over the flat buffers, split across threads with at::parallel_for, and
// the clip + Adam meta step's gradient norm. The element maths is
// flat_adam_math.h (shared with CUDA). Per parameter at fp32: 28 B forward,
// against 32-84 B for the 3-8 eager ops of the same update. float/double
// buffers run packed vectors (flat_adam_cpu_packed.h), fp16/bf16 staged chunks
// (flat_optim_cpu.h says why).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "flat_adam.h"
#include "flat_adam_math.h"
#include "flat_optim_cpu.h"
#if defined(__GNUC__) && defined(__x86_64__)
#include "flat_optim_simd.h"
#endif

namespace sophon_fast {
using namespace optim_cpu;  // NOLINT(build/namespaces): the shared CPU helpers
namespace {

template <typename T, typename C>
struct AdamArgs {
  const T* a;  // backward: d params'
  const C* c_m;
  const C* c_v;
  const T* p;  // may be null in the backward (not needed)
  const T* g;
  const C* m;
  const C* v;
  T* out_p;  // forward: params'; backward: d params
  T* out_g;  // backward: d grad
  C* out_m;
  C* out_v;
  C step_size, sqrt_bc2, clip;
  SfAdamHp hp;
  bool stream;  // non-temporal stores: outputs are fresh (not the inputs) and large
};

template <typename T, typename C>
SF_INLINE void adam_forward_range(const AdamArgs<T, C>& args, int64_t begin, int64_t end) {
  const AdamArgs<T, C> k = args;  // a local copy: the outputs cannot alias it
  C xp[kChunk], xg[kChunk], xm[kChunk], xv[kChunk];
  for (int64_t i0 = begin; i0 < end; i0 += kChunk) {
    const int64_t len = std::min(kChunk, end - i0);
    for (int64_t j = 0; j < len; ++j) {
      xp[j] = static_cast<C>(k.p[i0 + j]);
      xg[j] = static_cast<C>(k.g[i0 + j]) * k.clip;  // x * 1 == x exactly: no clip, no change
      xm[j] = k.m[i0 + j];
      xv[j] = k.v[i0 + j];
    }
    for (int64_t j = 0; j < len; ++j) {
      C new_m, new_v;
      optim::adam_moments<C>(xp[j], xg[j], xm[j], xv[j], k.hp, new_m, new_v);
      xm[j] = new_m;
      xv[j] = new_v;
    }
    sqrt_nonneg(xv, xg, len);  // d is no longer needed: its slot takes the roots
    for (int64_t j = 0; j < len; ++j)
      xp[j] = optim::adam_finish<C>(xp[j], xm[j], xg[j], k.step_size, k.sqrt_bc2, k.hp);
    put(k.out_p + i0, xp, len);
    put(k.out_m + i0, xm, len);
    put(k.out_v + i0, xv, len);
  }
}

template <typename T, typename C>
SF_INLINE void adam_backward_range(const AdamArgs<T, C>& args, int64_t begin, int64_t end) {
  const AdamArgs<T, C> k = args;
  C xa[kChunk], xcm[kChunk], xcv[kChunk], xp[kChunk], xg[kChunk], xm[kChunk], xv[kChunk];
  for (int64_t i0 = begin; i0 < end; i0 += kChunk) {
    const int64_t len = std::min(kChunk, end - i0);
    for (int64_t j = 0; j < len; ++j) {
      xa[j] = static_cast<C>(k.a[i0 + j]);
      xcm[j] = k.c_m[i0 + j];
      xcv[j] = k.c_v[i0 + j];
      xg[j] = static_cast<C>(k.g[i0 + j]);
      xm[j] = k.m[i0 + j];
      xv[j] = k.v[i0 + j];
    }
    if (k.p != nullptr) {
      for (int64_t j = 0; j < len; ++j) xp[j] = static_cast<C>(k.p[i0 + j]);
    } else {
      for (int64_t j = 0; j < len; ++j) xp[j] = C(0);
    }
    for (int64_t j = 0; j < len; ++j) {
      C new_m, new_v;
      optim::adam_moments<C>(xp[j], xg[j], xm[j], xv[j], k.hp, new_m, new_v);
      xm[j] = new_m;
      xv[j] = new_v;
    }
    sqrt_nonneg(xv, xp, len);  // params are no longer needed: their slot takes the roots
    for (int64_t j = 0; j < len; ++j) {
      C gp, gg, gm, gv;
      optim::adam_vjp<C>(xa[j], xcm[j], xcv[j], xg[j], xm[j], xv[j], xp[j], k.step_size, k.sqrt_bc2,
                         k.hp, gp, gg, gm, gv);
      xa[j] = gp;
      xg[j] = gg;
      xm[j] = gm;
      xv[j] = gv;
    }
    put(k.out_p + i0, xa, len);
    put(k.out_g + i0, xg, len);
    put(k.out_m + i0, xm, len);
    put(k.out_v + i0, xv, len);
  }
}

#if SF_X86
namespace portable {
constexpr int kVectorBytes = 16;
#include "flat_optim_cpu_packed.h"  // NOLINT(build/include)
// The optimizer's loop bodies, over the loop above.
#include "flat_adam_cpu_packed.h"  // NOLINT(build/include)
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
#include "flat_adam_cpu_packed.h"  // NOLINT(build/include)
}  // namespace avx2
#pragma GCC pop_options
#endif
#endif

SF_RANGE_DISPATCH(adam_forward_range, AdamArgs)
SF_RANGE_DISPATCH(adam_backward_range, AdamArgs)

// Packed where the buffers are float or double (T == C), staged chunks for
// fp16/bf16 and off x86.
template <typename T, typename C>
void adam_forward_run(const AdamArgs<T, C>& args, int64_t numel) {
#if SF_X86
  if constexpr (std::is_same_v<T, C>) {
    SF_PACKED_RUN(adam_forward, args, numel);
  } else {
    adam_forward_range_run<T, C>(args, numel);
  }
#else
  adam_forward_range_run<T, C>(args, numel);
#endif
}

template <typename T, typename C>
void adam_backward_run(const AdamArgs<T, C>& args, int64_t numel) {
#if SF_X86
  if constexpr (std::is_same_v<T, C>) {
    SF_PACKED_RUN(adam_backward, args, numel);
  } else {
    adam_backward_range_run<T, C>(args, numel);
  }
#else
  adam_backward_range_run<T, C>(args, numel);
#endif
}

}  // namespace

void flat_adam_forward_cpu(const at::Tensor& params, const at::Tensor& grad,
                           const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, double step,
                           double clip, at::Tensor& out_params, at::Tensor& out_exp_avg,
                           at::Tensor& out_exp_avg_sq, const SfAdamHp& hp, bool outputs_resident) {
  const double t = step + 1.0;
  const double step_size = hp.lr / (1.0 - std::pow(hp.beta1, t));
  const double sqrt_bc2 = std::sqrt(1.0 - std::pow(hp.beta2, t));
  SF_DISPATCH(params.scalar_type(), "flat_adam_forward_cpu", [&] {
    using C = compute_t<scalar_t>;
    const AdamArgs<scalar_t, C> args{
        nullptr,
        nullptr,
        nullptr,
        in<scalar_t>(params),
        in<scalar_t>(grad),
        in<C>(exp_avg),
        in<C>(exp_avg_sq),
        outp<scalar_t>(out_params),
        nullptr,
        outp<C>(out_exp_avg),
        outp<C>(out_exp_avg_sq),
        static_cast<C>(step_size),
        static_cast<C>(sqrt_bc2),
        static_cast<C>(clip),
        hp,
        outputs_resident &&
            fresh_outputs(params.numel(), {out_params.data_ptr() != params.data_ptr(),
                                           out_exp_avg.data_ptr() != exp_avg.data_ptr(),
                                           out_exp_avg_sq.data_ptr() != exp_avg_sq.data_ptr()})};
    adam_forward_run<scalar_t, C>(args, params.numel());
  });
}

void flat_adam_backward_cpu(const at::Tensor& grad_new_params, const at::Tensor& grad_new_exp_avg,
                            const at::Tensor& grad_new_exp_avg_sq, const at::Tensor& params,
                            const at::Tensor& grad, const at::Tensor& exp_avg,
                            const at::Tensor& exp_avg_sq, double step, at::Tensor& grad_params,
                            at::Tensor& grad_grad, at::Tensor& grad_exp_avg,
                            at::Tensor& grad_exp_avg_sq, const SfAdamHp& hp) {
  const double t = step + 1.0;
  const double step_size = hp.lr / (1.0 - std::pow(hp.beta1, t));
  const double sqrt_bc2 = std::sqrt(1.0 - std::pow(hp.beta2, t));
  SF_DISPATCH(grad.scalar_type(), "flat_adam_backward_cpu", [&] {
    using C = compute_t<scalar_t>;
    const AdamArgs<scalar_t, C> args{in<scalar_t>(grad_new_params),
                                     in<C>(grad_new_exp_avg),
                                     in<C>(grad_new_exp_avg_sq),
                                     in<scalar_t>(params),
                                     in<scalar_t>(grad),
                                     in<C>(exp_avg),
                                     in<C>(exp_avg_sq),
                                     outp<scalar_t>(grad_params),
                                     outp<scalar_t>(grad_grad),
                                     outp<C>(grad_exp_avg),
                                     outp<C>(grad_exp_avg_sq),
                                     static_cast<C>(step_size),
                                     static_cast<C>(sqrt_bc2),
                                     C(1),
                                     hp,
                                     fresh_outputs(grad.numel(), {true})};
    adam_backward_run<scalar_t, C>(args, grad.numel());
  });
}

// The clip + Adam meta step's norm (flat_adam.cpp takes the root).
double flat_sum_of_squares_cpu(const at::Tensor& x) {
  double total = 0.0;
  SF_DISPATCH(x.scalar_type(), "flat_sum_of_squares_cpu", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    // Sums in double: the clip coefficient of a 11 M-param buffer stays exact to
    // ~1e-16 instead of fp32's ~1e-4 sequential error. Eight independent
    // partial sums: one dependent add chain ran at 4 cycles per element (12 ms
    // for ResNet-18 size on 2 cores); eight overlap.
    total = at::parallel_reduce(
        0, x.numel(), kGrain, 0.0,
        [&](int64_t begin, int64_t end, double acc) {
          double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          int64_t i = begin;
          for (; i + 8 <= end; i += 8) {
            for (int u = 0; u < 8; ++u) {
              const double v = static_cast<double>(data[i + u]);
              part[u] += v * v;
            }
          }
          for (; i < end; ++i) {
            const double v = static_cast<double>(data[i]);
            acc += v * v;
          }
          for (int u = 0; u < 8; ++u) acc += part[u];
          return acc;
        },
        [](double a, double b) { return a + b; });
  });
  return total;
}

}  // namespace sophon_fast
