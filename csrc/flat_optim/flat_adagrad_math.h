// flat_adagrad: the per-element maths of the Adagrad update and its
// vector-Jacobian product, shared by the C++ CPU loops (flat_adagrad_cpu.cpp,
// flat_adagrad_cpu_packed.h) and the CUDA kernels (flat_adagrad_cuda.cu).
// Torch-free. The decayed learning rate arrives precomputed (clr = lr / (1 +
// step * lr_decay) in double, rounded once, as torch.optim does on the host).
// Split at the square root as flat_optim_math.h describes.
#pragma once

#include "flat_adagrad_cuda.h"
#include "flat_optim_math.h"

namespace sophon_fast {
namespace optim {

// clr from the count of steps taken before this one: in double, then rounded
// once to C.
template <typename C>
SF_HD C adagrad_learning_rate(double step, const SfAdagradHp& hp) {
  return static_cast<C>(hp.lr / (1.0 + step * hp.lr_decay));
}

// Returns d in g and the new sum of squares (the radicand).
template <typename C>
SF_HD void adagrad_moments(C p, C& g, C sum, const SfAdagradHp& hp, C& new_sum) {
  const C d = g + static_cast<C>(hp.weight_decay) * p;
  g = d;
  new_sum = sum + d * d;
}

// root = sqrt(max(new_sum, 0)).
template <typename C>
SF_HD C adagrad_finish(C p, C d, C root, C clr, const SfAdagradHp& hp) {
  return p - clr * d / (root + static_cast<C>(hp.eps));
}

template <typename C>
SF_HD void adagrad_forward(C p, C g, C sum, C clr, const SfAdagradHp& hp, C& new_p, C& new_sum) {
  adagrad_moments<C>(p, g, sum, hp, new_sum);
  new_p = adagrad_finish<C>(p, g, sqrt_pos(new_sum), clr, hp);
}

// VJP from d, the recomputed sum and its root. a, c_s: gradients w.r.t.
// (params', state_sum').
template <typename C>
SF_HD void adagrad_vjp(C a, C c_s, C d, C new_sum, C root_raw, C clr, const SfAdagradHp& hp, C& gp,
                       C& gg, C& gs) {
  const C positive = static_cast<C>(new_sum > C(0));  // as adam_vjp (flat_adam_math.h)
  const C root = root_raw + (C(1) - positive);
  const C denom = root_raw + static_cast<C>(hp.eps);
  const C through_root = a * clr * d / (denom * denom) * C(0.5) / root;  // as adam_vjp
  const C g_s = c_s + through_root * positive;
  const C g_d = -clr * a / denom + C(2) * d * g_s;
  gp = a + static_cast<C>(hp.weight_decay) * g_d;
  gg = g_d;
  gs = g_s;
}

template <typename C>
SF_HD void adagrad_backward(C a, C c_s, C p, C g, C sum, C clr, const SfAdagradHp& hp, C& gp, C& gg,
                            C& gs) {
  C new_sum;
  adagrad_moments<C>(p, g, sum, hp, new_sum);
  adagrad_vjp<C>(a, c_s, g, new_sum, sqrt_pos(new_sum), clr, hp, gp, gg, gs);
}

}  // namespace optim
}  // namespace sophon_fast
