// flat_adadelta, CPU kernels: the Adadelta update and its fused backward in
// one pass over the flat buffers, split across threads with at::parallel_for.
// The element maths is flat_adadelta_math.h (shared with CUDA). Per parameter
// at fp32: 28 B forward, against 116 B for the 11 eager ops of the same
// update. float/double buffers run packed vectors (flat_adadelta_cpu_packed.h),
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

#include "flat_adadelta.h"
#include "flat_adadelta_math.h"
#include "flat_optim_cpu.h"
#if defined(__GNUC__) && defined(__x86_64__)
#include "flat_optim_simd.h"
#endif

namespace sophon_fast {
using namespace optim_cpu;  // NOLINT(build/namespaces): the shared CPU helpers
namespace {

template <typename T, typename C>
struct AdadeltaArgs {
  const T* a;  // backward: d params'
  const C* c_v;
  const C* c_u;
  const T* p;  // may be null in the backward (not needed)
  const T* g;
  const C* v;
  const C* u;
  T* out_p;  // forward: params'; backward: d params
  T* out_g;  // backward: d grad
  C* out_v;
  C* out_u;
  SfAdadeltaHp hp;
  bool stream;
};

template <typename T, typename C>
SF_INLINE void adadelta_forward_range(const AdadeltaArgs<T, C>& args, int64_t begin, int64_t end) {
  const AdadeltaArgs<T, C> k = args;  // a local copy: the outputs cannot alias it
  C xp[kChunk], xg[kChunk], xv[kChunk], xu[kChunk], xqv[kChunk], xqu[kChunk];
  for (int64_t i0 = begin; i0 < end; i0 += kChunk) {
    const int64_t len = std::min(kChunk, end - i0);
    for (int64_t j = 0; j < len; ++j) {
      xp[j] = static_cast<C>(k.p[i0 + j]);
      xg[j] = static_cast<C>(k.g[i0 + j]);
      xv[j] = k.v[i0 + j];
      xu[j] = k.u[i0 + j];
    }
    for (int64_t j = 0; j < len; ++j) {
      C new_v, q_v, q_u;
      optim::adadelta_moments<C>(xp[j], xg[j], xv[j], xu[j], k.hp, new_v, q_v, q_u);
      xv[j] = new_v;
      xqv[j] = q_v;
      xqu[j] = q_u;
    }
    sqrt_nonneg(xqv, xqv, len);
    sqrt_nonneg(xqu, xqu, len);
    for (int64_t j = 0; j < len; ++j) {
      C new_p, new_u;
      optim::adadelta_finish<C>(xp[j], xg[j], xu[j], xqv[j], xqu[j], k.hp, new_p, new_u);
      xp[j] = new_p;
      xu[j] = new_u;
    }
    put(k.out_p + i0, xp, len);
    put(k.out_v + i0, xv, len);
    put(k.out_u + i0, xu, len);
  }
}

template <typename T, typename C>
SF_INLINE void adadelta_backward_range(const AdadeltaArgs<T, C>& args, int64_t begin, int64_t end) {
  const AdadeltaArgs<T, C> k = args;
  C xa[kChunk], xcv[kChunk], xcu[kChunk], xp[kChunk], xg[kChunk], xv[kChunk], xu[kChunk],
      xqv[kChunk], xqu[kChunk];
  for (int64_t i0 = begin; i0 < end; i0 += kChunk) {
    const int64_t len = std::min(kChunk, end - i0);
    for (int64_t j = 0; j < len; ++j) {
      xa[j] = static_cast<C>(k.a[i0 + j]);
      xcv[j] = k.c_v[i0 + j];
      xcu[j] = k.c_u[i0 + j];
      xg[j] = static_cast<C>(k.g[i0 + j]);
      xv[j] = k.v[i0 + j];
      xu[j] = k.u[i0 + j];
    }
    if (k.p != nullptr) {
      for (int64_t j = 0; j < len; ++j) xp[j] = static_cast<C>(k.p[i0 + j]);
    } else {
      for (int64_t j = 0; j < len; ++j) xp[j] = C(0);
    }
    for (int64_t j = 0; j < len; ++j) {
      C new_v, q_v, q_u;
      optim::adadelta_moments<C>(xp[j], xg[j], xv[j], xu[j], k.hp, new_v, q_v, q_u);
      xqv[j] = q_v;
      xqu[j] = q_u;
    }
    // params and the states are no longer needed: their slots take the roots.
    sqrt_nonneg(xqv, xv, len);
    sqrt_nonneg(xqu, xu, len);
    for (int64_t j = 0; j < len; ++j) {
      C gp, gg, gv, gu;
      optim::adadelta_vjp<C>(xa[j], xcv[j], xcu[j], xg[j], xqv[j], xqu[j], xv[j], xu[j], k.hp, gp,
                             gg, gv, gu);
      xa[j] = gp;
      xg[j] = gg;
      xv[j] = gv;
      xu[j] = gu;
    }
    put(k.out_p + i0, xa, len);
    put(k.out_g + i0, xg, len);
    put(k.out_v + i0, xv, len);
    put(k.out_u + i0, xu, len);
  }
}

#if SF_X86
namespace portable {
constexpr int kVectorBytes = 16;
#include "flat_optim_cpu_packed.h"  // NOLINT(build/include)
// The optimizer's loop bodies, over the loop above.
#include "flat_adadelta_cpu_packed.h"  // NOLINT(build/include)
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
#include "flat_adadelta_cpu_packed.h"  // NOLINT(build/include)
}  // namespace avx2
#pragma GCC pop_options
#endif
#endif

SF_RANGE_DISPATCH(adadelta_forward_range, AdadeltaArgs)
SF_RANGE_DISPATCH(adadelta_backward_range, AdadeltaArgs)

// Packed where the buffers are float or double (T == C), staged chunks for
// fp16/bf16 and off x86.
template <typename T, typename C>
void adadelta_forward_run(const AdadeltaArgs<T, C>& args, int64_t numel) {
#if SF_X86
  if constexpr (std::is_same_v<T, C>) {
    SF_PACKED_RUN(adadelta_forward, args, numel);
  } else {
    adadelta_forward_range_run<T, C>(args, numel);
  }
#else
  adadelta_forward_range_run<T, C>(args, numel);
#endif
}

template <typename T, typename C>
void adadelta_backward_run(const AdadeltaArgs<T, C>& args, int64_t numel) {
#if SF_X86
  if constexpr (std::is_same_v<T, C>) {
    SF_PACKED_RUN(adadelta_backward, args, numel);
  } else {
    adadelta_backward_range_run<T, C>(args, numel);
  }
#else
  adadelta_backward_range_run<T, C>(args, numel);
#endif
}

}  // namespace

void flat_adadelta_forward_cpu(const at::Tensor& params, const at::Tensor& grad,
                               const at::Tensor& square_avg, const at::Tensor& acc_delta,
                               at::Tensor& out_params, at::Tensor& out_square_avg,
                               at::Tensor& out_acc_delta, const SfAdadeltaHp& hp,
                               bool outputs_resident) {
  SF_DISPATCH(params.scalar_type(), "flat_adadelta_forward_cpu", [&] {
    using C = compute_t<scalar_t>;
    const AdadeltaArgs<scalar_t, C> args{
        nullptr,
        nullptr,
        nullptr,
        in<scalar_t>(params),
        in<scalar_t>(grad),
        in<C>(square_avg),
        in<C>(acc_delta),
        outp<scalar_t>(out_params),
        nullptr,
        outp<C>(out_square_avg),
        outp<C>(out_acc_delta),
        hp,
        outputs_resident &&
            fresh_outputs(params.numel(), {out_params.data_ptr() != params.data_ptr(),
                                           out_square_avg.data_ptr() != square_avg.data_ptr(),
                                           out_acc_delta.data_ptr() != acc_delta.data_ptr()})};
    adadelta_forward_run<scalar_t, C>(args, params.numel());
  });
}

void flat_adadelta_backward_cpu(const at::Tensor& grad_new_params,
                                const at::Tensor& grad_new_square_avg,
                                const at::Tensor& grad_new_acc_delta, const at::Tensor& params,
                                const at::Tensor& grad, const at::Tensor& square_avg,
                                const at::Tensor& acc_delta, at::Tensor& grad_params,
                                at::Tensor& grad_grad, at::Tensor& grad_square_avg,
                                at::Tensor& grad_acc_delta, const SfAdadeltaHp& hp) {
  SF_DISPATCH(grad.scalar_type(), "flat_adadelta_backward_cpu", [&] {
    using C = compute_t<scalar_t>;
    const AdadeltaArgs<scalar_t, C> args{in<scalar_t>(grad_new_params),
                                         in<C>(grad_new_square_avg),
                                         in<C>(grad_new_acc_delta),
                                         in<scalar_t>(params),
                                         in<scalar_t>(grad),
                                         in<C>(square_avg),
                                         in<C>(acc_delta),
                                         outp<scalar_t>(grad_params),
                                         outp<scalar_t>(grad_grad),
                                         outp<C>(grad_square_avg),
                                         outp<C>(grad_acc_delta),
                                         hp,
                                         fresh_outputs(grad.numel(), {true})};
    adadelta_backward_run<scalar_t, C>(args, grad.numel());
  });
}

}  // namespace sophon_fast
