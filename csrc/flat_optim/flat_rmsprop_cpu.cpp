// flat_rmsprop, CPU kernels: the RMSprop update (plain and centered) and its
// fused backward in one pass over the flat buffers, split across threads with
// at::parallel_for. The element maths is flat_rmsprop_math.h (shared with
// CUDA). Per parameter at fp32: 20 B forward (plain), against 32-84 B for the
// 3-8 eager ops of the same update. float/double buffers run packed vectors
// (flat_rmsprop_cpu_packed.h), fp16/bf16 staged chunks (flat_optim_cpu.h says
// why).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "flat_optim_cpu.h"
#include "flat_rmsprop.h"
#include "flat_rmsprop_math.h"
#if defined(__GNUC__) && defined(__x86_64__)
#include "flat_optim_simd.h"
#endif

namespace sophon_fast {
using namespace optim_cpu;  // NOLINT(build/namespaces): the shared CPU helpers
namespace {

template <typename T, typename C>
struct RmspropArgs {
  const T* a;  // backward: d params'
  const C* c_v;
  const C* c_ga;  // null unless centered (backward)
  const T* p;     // may be null in the backward (not needed)
  const T* g;
  const C* v;
  const C* ga;  // null unless centered
  T* out_p;     // forward: params'; backward: d params
  T* out_g;     // backward: d grad
  C* out_v;
  C* out_ga;
  SfRmspropHp hp;
  bool stream;
};

template <typename T, typename C>
SF_INLINE void rmsprop_forward_range(const RmspropArgs<T, C>& args, int64_t begin, int64_t end) {
  const RmspropArgs<T, C> k = args;
  const bool centered = k.ga != nullptr;
  C xp[kChunk], xg[kChunk], xv[kChunk], xga[kChunk], xq[kChunk];
  for (int64_t i0 = begin; i0 < end; i0 += kChunk) {
    const int64_t len = std::min(kChunk, end - i0);
    for (int64_t j = 0; j < len; ++j) {
      xp[j] = static_cast<C>(k.p[i0 + j]);
      xg[j] = static_cast<C>(k.g[i0 + j]);
      xv[j] = k.v[i0 + j];
    }
    if (centered) {
      for (int64_t j = 0; j < len; ++j) xga[j] = k.ga[i0 + j];
    } else {
      for (int64_t j = 0; j < len; ++j) xga[j] = C(0);
    }
    for (int64_t j = 0; j < len; ++j) {
      C new_v, new_ga, q;
      optim::rmsprop_moments<C>(xp[j], xg[j], xv[j], xga[j], centered, k.hp, new_v, new_ga, q);
      xv[j] = new_v;
      xga[j] = new_ga;
      xq[j] = q;
    }
    sqrt_nonneg(xq, xq, len);
    for (int64_t j = 0; j < len; ++j) xp[j] = optim::rmsprop_finish<C>(xp[j], xg[j], xq[j], k.hp);
    put(k.out_p + i0, xp, len);
    put(k.out_v + i0, xv, len);
    if (centered) put(k.out_ga + i0, xga, len);
  }
}

template <typename T, typename C>
SF_INLINE void rmsprop_backward_range(const RmspropArgs<T, C>& args, int64_t begin, int64_t end) {
  const RmspropArgs<T, C> k = args;
  const bool centered = k.ga != nullptr;
  C xa[kChunk], xcv[kChunk], xcga[kChunk], xp[kChunk], xg[kChunk], xv[kChunk], xga[kChunk],
      xq[kChunk];
  for (int64_t i0 = begin; i0 < end; i0 += kChunk) {
    const int64_t len = std::min(kChunk, end - i0);
    for (int64_t j = 0; j < len; ++j) {
      xa[j] = static_cast<C>(k.a[i0 + j]);
      xcv[j] = k.c_v[i0 + j];
      xg[j] = static_cast<C>(k.g[i0 + j]);
      xv[j] = k.v[i0 + j];
    }
    if (k.p != nullptr) {
      for (int64_t j = 0; j < len; ++j) xp[j] = static_cast<C>(k.p[i0 + j]);
    } else {
      for (int64_t j = 0; j < len; ++j) xp[j] = C(0);
    }
    if (centered) {
      for (int64_t j = 0; j < len; ++j) {
        xcga[j] = k.c_ga[i0 + j];
        xga[j] = k.ga[i0 + j];
      }
    } else {
      for (int64_t j = 0; j < len; ++j) xcga[j] = xga[j] = C(0);
    }
    for (int64_t j = 0; j < len; ++j) {
      C new_v, new_ga, q;
      optim::rmsprop_moments<C>(xp[j], xg[j], xv[j], xga[j], centered, k.hp, new_v, new_ga, q);
      xga[j] = new_ga;
      xq[j] = q;
    }
    sqrt_nonneg(xq, xp, len);  // params are no longer needed: their slot takes the roots
    for (int64_t j = 0; j < len; ++j) {
      C gp, gg, gv, gga;
      optim::rmsprop_vjp<C>(xa[j], xcv[j], xcga[j], xg[j], xga[j], xq[j], xp[j], centered, k.hp, gp,
                            gg, gv, gga);
      xa[j] = gp;
      xg[j] = gg;
      xv[j] = gv;
      xga[j] = gga;
    }
    put(k.out_p + i0, xa, len);
    put(k.out_g + i0, xg, len);
    put(k.out_v + i0, xv, len);
    if (centered) put(k.out_ga + i0, xga, len);
  }
}

#if SF_X86
namespace portable {
constexpr int kVectorBytes = 16;
#include "flat_optim_cpu_packed.h"  // NOLINT(build/include)
// The optimizer's loop bodies, over the loop above.
#include "flat_rmsprop_cpu_packed.h"  // NOLINT(build/include)
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
#include "flat_rmsprop_cpu_packed.h"  // NOLINT(build/include)
}  // namespace avx2
#pragma GCC pop_options
#endif
#endif

SF_RANGE_DISPATCH(rmsprop_forward_range, RmspropArgs)
SF_RANGE_DISPATCH(rmsprop_backward_range, RmspropArgs)

// Packed where the buffers are float or double (T == C), staged chunks for
// fp16/bf16 and off x86.
template <typename T, typename C>
void rmsprop_forward_run(const RmspropArgs<T, C>& args, int64_t numel) {
#if SF_X86
  if constexpr (std::is_same_v<T, C>) {
    SF_PACKED_RUN(rmsprop_forward, args, numel);
  } else {
    rmsprop_forward_range_run<T, C>(args, numel);
  }
#else
  rmsprop_forward_range_run<T, C>(args, numel);
#endif
}

template <typename T, typename C>
void rmsprop_backward_run(const RmspropArgs<T, C>& args, int64_t numel) {
#if SF_X86
  if constexpr (std::is_same_v<T, C>) {
    SF_PACKED_RUN(rmsprop_backward, args, numel);
  } else {
    rmsprop_backward_range_run<T, C>(args, numel);
  }
#else
  rmsprop_backward_range_run<T, C>(args, numel);
#endif
}

}  // namespace

void flat_rmsprop_forward_cpu(const at::Tensor& params, const at::Tensor& grad,
                              const at::Tensor& square_avg, const at::Tensor& grad_avg,
                              at::Tensor& out_params, at::Tensor& out_square_avg,
                              at::Tensor& out_grad_avg, const SfRmspropHp& hp,
                              bool outputs_resident) {
  SF_DISPATCH(params.scalar_type(), "flat_rmsprop_forward_cpu", [&] {
    using C = compute_t<scalar_t>;
    const RmspropArgs<scalar_t, C> args{
        nullptr,
        nullptr,
        nullptr,
        in<scalar_t>(params),
        in<scalar_t>(grad),
        in<C>(square_avg),
        in<C>(grad_avg),
        outp<scalar_t>(out_params),
        nullptr,
        outp<C>(out_square_avg),
        outp<C>(out_grad_avg),
        hp,
        outputs_resident &&
            fresh_outputs(params.numel(),
                          {out_params.data_ptr() != params.data_ptr(),
                           out_square_avg.data_ptr() != square_avg.data_ptr(),
                           !grad_avg.defined() || out_grad_avg.data_ptr() != grad_avg.data_ptr()})};
    rmsprop_forward_run<scalar_t, C>(args, params.numel());
  });
}

void flat_rmsprop_backward_cpu(const at::Tensor& grad_new_params,
                               const at::Tensor& grad_new_square_avg,
                               const at::Tensor& grad_new_grad_avg, const at::Tensor& params,
                               const at::Tensor& grad, const at::Tensor& square_avg,
                               const at::Tensor& grad_avg, at::Tensor& grad_params,
                               at::Tensor& grad_grad, at::Tensor& grad_square_avg,
                               at::Tensor& grad_grad_avg, const SfRmspropHp& hp) {
  SF_DISPATCH(grad.scalar_type(), "flat_rmsprop_backward_cpu", [&] {
    using C = compute_t<scalar_t>;
    const RmspropArgs<scalar_t, C> args{in<scalar_t>(grad_new_params),
                                        in<C>(grad_new_square_avg),
                                        in<C>(grad_new_grad_avg),
                                        in<scalar_t>(params),
                                        in<scalar_t>(grad),
                                        in<C>(square_avg),
                                        in<C>(grad_avg),
                                        outp<scalar_t>(grad_params),
                                        outp<scalar_t>(grad_grad),
                                        outp<C>(grad_square_avg),
                                        outp<C>(grad_grad_avg),
                                        hp,
                                        fresh_outputs(grad.numel(), {true})};
    rmsprop_backward_run<scalar_t, C>(args, grad.numel());
  });
}

}  // namespace sophon_fast
