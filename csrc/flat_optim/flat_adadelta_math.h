// flat_adadelta: the per-element maths of the Adadelta update and its
// vector-Jacobian product, shared by the C++ CPU loops (flat_adadelta_cpu.cpp,
// flat_adadelta_cpu_packed.h) and the CUDA kernels (flat_adadelta_cuda.cu).
// Torch-free. Split at the square roots as flat_optim_math.h describes (two
// radicands here: v' + eps and u + eps).
#pragma once

#include "flat_adadelta_cuda.h"
#include "flat_optim_math.h"

namespace sophon_fast {
namespace optim {

// Returns d in g, the new square average and the radicands q_v = v' + eps
// and q_u = u + eps.
template <typename C>
SF_HD void adadelta_moments(C p, C& g, C v, C u, const SfAdadeltaHp& hp, C& new_v, C& q_v, C& q_u) {
  const C rho = static_cast<C>(hp.rho);
  const C eps = static_cast<C>(hp.eps);
  const C d = g + static_cast<C>(hp.weight_decay) * p;
  g = d;
  new_v = rho * v + (C(1) - rho) * d * d;
  q_v = new_v + eps;
  q_u = u + eps;
}

// std_root = sqrt(max(q_v, 0)), num_root = sqrt(max(q_u, 0)).
template <typename C>
SF_HD void adadelta_finish(C p, C d, C u, C std_root, C num_root, const SfAdadeltaHp& hp, C& new_p,
                           C& new_u) {
  const C rho = static_cast<C>(hp.rho);
  const C delta = num_root / std_root * d;
  new_u = rho * u + (C(1) - rho) * delta * delta;
  new_p = p - static_cast<C>(hp.lr) * delta;
}

template <typename C>
SF_HD void adadelta_forward(C p, C g, C v, C u, const SfAdadeltaHp& hp, C& new_p, C& new_v,
                            C& new_u) {
  C q_v, q_u;
  adadelta_moments<C>(p, g, v, u, hp, new_v, q_v, q_u);
  adadelta_finish<C>(p, g, u, sqrt_pos(q_v), sqrt_pos(q_u), hp, new_p, new_u);
}

// VJP from d, the radicands and their roots. a, c_v, c_u: gradients w.r.t.
// (params', square_avg', acc_delta'). Each root's derivative is masked to 0
// where its radicand is not positive (the zero-safe root; only eps = 0 gets
// there), branch-free as adam_vjp (flat_adam_math.h).
template <typename C>
SF_HD void adadelta_vjp(C a, C c_v, C c_u, C d, C q_v, C q_u, C std_raw, C num_raw,
                        const SfAdadeltaHp& hp, C& gp, C& gg, C& gv, C& gu) {
  const C rho = static_cast<C>(hp.rho);
  const C lr = static_cast<C>(hp.lr);
  const C std_positive = static_cast<C>(q_v > C(0));
  const C num_positive = static_cast<C>(q_u > C(0));
  const C std_divisor = std_raw + (C(1) - std_positive);
  const C num_divisor = num_raw + (C(1) - num_positive);
  const C ratio = num_raw / std_raw;
  const C delta = ratio * d;
  const C g_delta = -lr * a + (C(1) - rho) * C(2) * delta * c_u;
  const C g_ratio = g_delta * d;
  const C g_std = -g_ratio * ratio / std_raw;
  const C g_v = c_v + g_std * C(0.5) / std_divisor * std_positive;
  const C g_u = rho * c_u + g_ratio / std_raw * C(0.5) / num_divisor * num_positive;
  const C g_d = g_delta * ratio + (C(1) - rho) * C(2) * d * g_v;
  gp = a + static_cast<C>(hp.weight_decay) * g_d;
  gg = g_d;
  gv = rho * g_v;
  gu = g_u;
}

template <typename C>
SF_HD void adadelta_backward(C a, C c_v, C c_u, C p, C g, C v, C u, const SfAdadeltaHp& hp, C& gp,
                             C& gg, C& gv, C& gu) {
  C new_v, q_v, q_u;
  adadelta_moments<C>(p, g, v, u, hp, new_v, q_v, q_u);
  adadelta_vjp<C>(a, c_v, c_u, g, q_v, q_u, sqrt_pos(q_v), sqrt_pos(q_u), hp, gp, gg, gv, gu);
}

}  // namespace optim
}  // namespace sophon_fast
