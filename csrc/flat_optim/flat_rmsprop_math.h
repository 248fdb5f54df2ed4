// flat_rmsprop: the per-element maths of the RMSprop update (plain and
// centered) and its vector-Jacobian product, shared by the C++ CPU loops
// (flat_rmsprop_cpu.cpp, flat_rmsprop_cpu_packed.h) and the CUDA kernels
// (flat_rmsprop_cuda.cu). Torch-free. Split at the square root as
// flat_optim_math.h describes.
#pragma once

#include "flat_optim_math.h"
#include "flat_rmsprop_cuda.h"

namespace sophon_fast {
namespace optim {

// rmsprop: returns d in g, the new averages and the radicand q (v' or, centered,
// v' - ga'^2).
template <typename C>
SF_HD void rmsprop_moments(C p, C& g, C v, C ga, bool centered, const SfRmspropHp& hp, C& new_v,
                           C& new_ga, C& q) {
  const C alpha = static_cast<C>(hp.alpha);
  const C d = g + static_cast<C>(hp.weight_decay) * p;
  g = d;
  new_v = alpha * v + (C(1) - alpha) * d * d;
  new_ga = centered ? alpha * ga + (C(1) - alpha) * d : C(0);
  q = centered ? new_v - new_ga * new_ga : new_v;
}

template <typename C>
SF_HD C rmsprop_finish(C p, C d, C root, const SfRmspropHp& hp) {
  return p - static_cast<C>(hp.lr) * d / (root + static_cast<C>(hp.eps));
}

template <typename C>
SF_HD void rmsprop_forward(C p, C g, C v, C ga, bool centered, const SfRmspropHp& hp, C& new_p,
                           C& new_v, C& new_ga) {
  C q;
  rmsprop_moments<C>(p, g, v, ga, centered, hp, new_v, new_ga, q);
  new_p = rmsprop_finish<C>(p, g, sqrt_pos(q), hp);
}

template <typename C>
SF_HD void rmsprop_vjp(C a, C c_v, C c_ga, C d, C new_ga, C q, C root_raw, bool centered,
                       const SfRmspropHp& hp, C& gp, C& gg, C& gv, C& gga) {
  const C alpha = static_cast<C>(hp.alpha);
  const C lr = static_cast<C>(hp.lr);
  const C positive = static_cast<C>(q > C(0));  // as adam_vjp (flat_adam_math.h)
  const C root = root_raw + (C(1) - positive);
  const C denom = root_raw + static_cast<C>(hp.eps);
  const C through_root = a * lr * d / (denom * denom) * C(0.5) / root;  // as adam_vjp
  const C g_q = through_root * positive;
  const C g_v = c_v + g_q;
  const C g_ga = c_ga - C(2) * new_ga * g_q;
  const C centered_term = (C(1) - alpha) * g_ga;
  const C g_d =
      -lr * a / denom + (C(1) - alpha) * C(2) * d * g_v + centered_term * static_cast<C>(centered);
  const C scaled_g_ga = alpha * g_ga;
  gga = scaled_g_ga * static_cast<C>(centered);
  gp = a + static_cast<C>(hp.weight_decay) * g_d;
  gg = g_d;
  gv = alpha * g_v;
}

template <typename C>
SF_HD void rmsprop_backward(C a, C c_v, C c_ga, C p, C g, C v, C ga, bool centered,
                            const SfRmspropHp& hp, C& gp, C& gg, C& gv, C& gga) {
  C new_v, new_ga, q;
  rmsprop_moments<C>(p, g, v, ga, centered, hp, new_v, new_ga, q);
  rmsprop_vjp<C>(a, c_v, c_ga, g, new_ga, q, sqrt_pos(q), centered, hp, gp, gg, gv, gga);
}

}  // namespace optim
}  // namespace sophon_fast
