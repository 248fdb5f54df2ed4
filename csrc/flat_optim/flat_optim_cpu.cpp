// flat_optim, CPU kernels: one pass per update (and per fused backward) over
// the flat buffers, split across threads with at::parallel_for. The element
// maths is flat_optim_math.h (shared with CUDA); fp32 loops auto-vectorise at
// -O3, fp16/bf16 convert per element. Per parameter at fp32: momentum 20 B,
// Adam 28 B, RMSprop 20 B forward, against 7-14 eager ops of 8-12 B each.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <type_traits>

#include "flat_optim.h"
#include "flat_optim_math.h"

namespace sophon_fast {
namespace {

// 64 K elements per task: the OpenMP hand-off (~µs) is noise, and a 0.1 M-param
// small CNN still uses both cores.
constexpr int64_t kGrain = 1 << 16;

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
const T* in(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
T* outp(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.mutable_data_ptr()) : nullptr;
}

#define SF_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

}  // namespace

void flat_momentum_forward_cpu(const at::Tensor& params, const at::Tensor& grad,
                               const at::Tensor& buf, bool first, at::Tensor& out_params,
                               at::Tensor& out_buf, const SfMomentumHp& hp) {
  SF_DISPATCH(params.scalar_type(), "flat_momentum_forward_cpu", [&] {
    using C = compute_t<scalar_t>;
    const scalar_t* p = in<scalar_t>(params);
    const scalar_t* g = in<scalar_t>(grad);
    const C* b = in<C>(buf);
    scalar_t* op = outp<scalar_t>(out_params);
    C* ob = outp<C>(out_buf);
    at::parallel_for(0, params.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        C np, nb;
        optim::momentum_forward<C>(static_cast<C>(p[i]), static_cast<C>(g[i]), b[i], first, hp, np,
                                   nb);
        op[i] = static_cast<scalar_t>(np);
        ob[i] = nb;
      }
    });
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
      for (int64_t i = begin; i < end; ++i) {
        C gp, gg, gb;
        optim::momentum_backward<C>(static_cast<C>(a[i]), c[i], first, hp, gp, gg, gb);
        if (gp_out != nullptr) gp_out[i] = static_cast<scalar_t>(gp);
        gg_out[i] = static_cast<scalar_t>(gg);
        gb_out[i] = gb;
      }
    });
  });
}

void flat_adam_forward_cpu(const at::Tensor& params, const at::Tensor& grad,
                           const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, double step,
                           double clip, at::Tensor& out_params, at::Tensor& out_exp_avg,
                           at::Tensor& out_exp_avg_sq, const SfAdamHp& hp) {
  const double t = step + 1.0;
  const double step_size_d = hp.lr / (1.0 - std::pow(hp.beta1, t));
  const double sqrt_bc2_d = std::sqrt(1.0 - std::pow(hp.beta2, t));
  SF_DISPATCH(params.scalar_type(), "flat_adam_forward_cpu", [&] {
    using C = compute_t<scalar_t>;
    const C step_size = static_cast<C>(step_size_d), sqrt_bc2 = static_cast<C>(sqrt_bc2_d);
    const C clip_c = static_cast<C>(clip);
    const scalar_t* p = in<scalar_t>(params);
    const scalar_t* g = in<scalar_t>(grad);
    const C* m = in<C>(exp_avg);
    const C* v = in<C>(exp_avg_sq);
    scalar_t* op = outp<scalar_t>(out_params);
    C* om = outp<C>(out_exp_avg);
    C* ov = outp<C>(out_exp_avg_sq);
    at::parallel_for(0, params.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        C np, nm, nv;
        C gi = static_cast<C>(g[i]);
        if (clip != 1.0) gi *= clip_c;
        optim::adam_forward<C>(static_cast<C>(p[i]), gi, m[i], v[i], step_size, sqrt_bc2, hp, np,
                               nm, nv);
        op[i] = static_cast<scalar_t>(np);
        om[i] = nm;
        ov[i] = nv;
      }
    });
  });
}

void flat_adam_backward_cpu(const at::Tensor& grad_new_params, const at::Tensor& grad_new_exp_avg,
                            const at::Tensor& grad_new_exp_avg_sq, const at::Tensor& params,
                            const at::Tensor& grad, const at::Tensor& exp_avg,
                            const at::Tensor& exp_avg_sq, double step, at::Tensor& grad_params,
                            at::Tensor& grad_grad, at::Tensor& grad_exp_avg,
                            at::Tensor& grad_exp_avg_sq, const SfAdamHp& hp) {
  const double t = step + 1.0;
  const double step_size_d = hp.lr / (1.0 - std::pow(hp.beta1, t));
  const double sqrt_bc2_d = std::sqrt(1.0 - std::pow(hp.beta2, t));
  SF_DISPATCH(grad.scalar_type(), "flat_adam_backward_cpu", [&] {
    using C = compute_t<scalar_t>;
    const C step_size = static_cast<C>(step_size_d), sqrt_bc2 = static_cast<C>(sqrt_bc2_d);
    const scalar_t* a = in<scalar_t>(grad_new_params);
    const C* cm = in<C>(grad_new_exp_avg);
    const C* cv = in<C>(grad_new_exp_avg_sq);
    const scalar_t* p = in<scalar_t>(params);
    const scalar_t* g = in<scalar_t>(grad);
    const C* m = in<C>(exp_avg);
    const C* v = in<C>(exp_avg_sq);
    scalar_t* gp_out = outp<scalar_t>(grad_params);
    scalar_t* gg_out = outp<scalar_t>(grad_grad);
    C* gm_out = outp<C>(grad_exp_avg);
    C* gv_out = outp<C>(grad_exp_avg_sq);
    at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        C gp, gg, gm, gv;
        optim::adam_backward<C>(static_cast<C>(a[i]), cm[i], cv[i],
                                p != nullptr ? static_cast<C>(p[i]) : C(0), static_cast<C>(g[i]),
                                m[i], v[i], step_size, sqrt_bc2, hp, gp, gg, gm, gv);
        gp_out[i] = static_cast<scalar_t>(gp);
        gg_out[i] = static_cast<scalar_t>(gg);
        gm_out[i] = gm;
        gv_out[i] = gv;
      }
    });
  });
}

void flat_rmsprop_forward_cpu(const at::Tensor& params, const at::Tensor& grad,
                              const at::Tensor& square_avg, const at::Tensor& grad_avg,
                              at::Tensor& out_params, at::Tensor& out_square_avg,
                              at::Tensor& out_grad_avg, const SfRmspropHp& hp) {
  SF_DISPATCH(params.scalar_type(), "flat_rmsprop_forward_cpu", [&] {
    using C = compute_t<scalar_t>;
    const scalar_t* p = in<scalar_t>(params);
    const scalar_t* g = in<scalar_t>(grad);
    const C* v = in<C>(square_avg);
    const C* ga = in<C>(grad_avg);
    scalar_t* op = outp<scalar_t>(out_params);
    C* ov = outp<C>(out_square_avg);
    C* oga = outp<C>(out_grad_avg);
    const bool centered = ga != nullptr;
    at::parallel_for(0, params.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        C np, nv, nga = C(0);
        optim::rmsprop_forward<C>(static_cast<C>(p[i]), static_cast<C>(g[i]), v[i],
                                  centered ? ga[i] : C(0), centered, hp, np, nv, nga);
        op[i] = static_cast<scalar_t>(np);
        ov[i] = nv;
        if (centered) oga[i] = nga;
      }
    });
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
    const scalar_t* a = in<scalar_t>(grad_new_params);
    const C* cv = in<C>(grad_new_square_avg);
    const C* cga = in<C>(grad_new_grad_avg);
    const scalar_t* p = in<scalar_t>(params);
    const scalar_t* g = in<scalar_t>(grad);
    const C* v = in<C>(square_avg);
    const C* ga = in<C>(grad_avg);
    scalar_t* gp_out = outp<scalar_t>(grad_params);
    scalar_t* gg_out = outp<scalar_t>(grad_grad);
    C* gv_out = outp<C>(grad_square_avg);
    C* gga_out = outp<C>(grad_grad_avg);
    const bool centered = ga != nullptr;
    at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        C gp, gg, gv, gga = C(0);
        optim::rmsprop_backward<C>(static_cast<C>(a[i]), cv[i], centered ? cga[i] : C(0),
                                   p != nullptr ? static_cast<C>(p[i]) : C(0), static_cast<C>(g[i]),
                                   v[i], centered ? ga[i] : C(0), centered, hp, gp, gg, gv, gga);
        gp_out[i] = static_cast<scalar_t>(gp);
        gg_out[i] = static_cast<scalar_t>(gg);
        gv_out[i] = gv;
        if (centered) gga_out[i] = gga;
      }
    });
  });
}

double flat_sum_of_squares_cpu(const at::Tensor& x) {
  double total = 0.0;
  SF_DISPATCH(x.scalar_type(), "flat_sum_of_squares_cpu", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    // Per-task sums in double: the clip coefficient of a 11 M-param buffer stays
    // exact to ~1e-16 instead of fp32's ~1e-4 sequential error.
    total = at::parallel_reduce(
        0, x.numel(), kGrain, 0.0,
        [&](int64_t begin, int64_t end, double acc) {
          for (int64_t i = begin; i < end; ++i) {
            const double v = static_cast<double>(data[i]);
            acc += v * v;
          }
          return acc;
        },
        [](double a, double b) { return a + b; });
  });
  return total;
}

void flat_accumulate_cpu(at::Tensor& acc, const at::Tensor& grad, double weight) {
  SF_DISPATCH(grad.scalar_type(), "flat_accumulate_cpu", [&] {
    using C = compute_t<scalar_t>;
    const C w = static_cast<C>(weight);
    C* out = outp<C>(acc);
    const scalar_t* g = in<scalar_t>(grad);
    at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) out[i] += w * static_cast<C>(g[i]);
    });
  });
}

}  // namespace sophon_fast
