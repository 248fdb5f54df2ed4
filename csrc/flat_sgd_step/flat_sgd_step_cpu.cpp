// flat_sgd_step, CPU kernels: one pass over the flat buffer, split across
// threads with at::parallel_for. fp32 loops auto-vectorise at -O3; fp16/bf16
// convert per element to fp32. 12 B/param forward (read p, g; write p'), 12
// B/param backward (read d; write d_p, d_g) at fp32 against 20 B/param for the
// eager per-tensor `p - lr * g` (mul writes a temporary).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "flat_sgd_step.h"

namespace sophon_fast {
namespace {

// 64 K elements per task: large enough that the OpenMP hand-off (~µs) is noise,
// small enough that a 0.1 M-param small CNN still uses both cores.
constexpr int64_t kGrain = 1 << 16;

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

}  // namespace

void flat_sgd_step_forward_cpu(const at::Tensor& params, const at::Tensor& grad, at::Tensor& out,
                               double lr_d, double weight_decay_d) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params.scalar_type(), "flat_sgd_step_forward_cpu", [&] {
        using C = compute_t<scalar_t>;
        const C lr = static_cast<C>(lr_d);
        const C weight_decay = static_cast<C>(weight_decay_d);
        // No __restrict__: out may be params itself (an in-place step) or
        // grad. GCC versions the loop on a run-time overlap check; out ==
        // params passes it (distance 0) and still runs the vector loop.
        const scalar_t* p = params.const_data_ptr<scalar_t>();
        const scalar_t* g = grad.const_data_ptr<scalar_t>();
        scalar_t* o = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, params.numel(), kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const C pi = static_cast<C>(p[i]);
            const C gi = static_cast<C>(g[i]);
            o[i] = static_cast<scalar_t>(pi - lr * (gi + weight_decay * pi));
          }
        });
      });
}

void flat_sgd_step_backward_cpu(const at::Tensor& grad_out, at::Tensor& grad_params,
                                at::Tensor& grad_grad, double lr_d, double weight_decay_d) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_out.scalar_type(), "flat_sgd_step_backward_cpu", [&] {
        using C = compute_t<scalar_t>;
        const C lr = static_cast<C>(lr_d);
        const C params_scale = C(1) - lr * static_cast<C>(weight_decay_d);
        const scalar_t* __restrict__ d = grad_out.const_data_ptr<scalar_t>();
        scalar_t* __restrict__ dg = grad_grad.mutable_data_ptr<scalar_t>();
        if (!grad_params.defined()) {
          at::parallel_for(0, grad_out.numel(), kGrain, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i)
              dg[i] = static_cast<scalar_t>(-lr * static_cast<C>(d[i]));
          });
          return;
        }
        scalar_t* __restrict__ dp = grad_params.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, grad_out.numel(), kGrain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const C di = static_cast<C>(d[i]);
            dp[i] = static_cast<scalar_t>(params_scale * di);
            dg[i] = static_cast<scalar_t>(-lr * di);
          }
        });
      });
}

}  // namespace sophon_fast
