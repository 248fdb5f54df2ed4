// flat_adam: the per-element maths of the Adam / AdamW update and its
// vector-Jacobian product, shared by the C++ CPU loops (flat_adam_cpu.cpp,
// flat_adam_cpu_packed.h) and the CUDA kernels (flat_adam_cuda.cu); the
// clip + Adam meta step runs the same update on a pre-scaled gradient.
// Torch-free. Bias corrections arrive precomputed (step_size = lr / (1 - b1^t),
// sqrt_bc2 = sqrt(1 - b2^t), both in double then rounded once, as
// torch.optim does). Split at the square root as flat_optim_math.h describes.
#pragma once

#include "flat_adam_cuda.h"
#include "flat_optim_math.h"

namespace sophon_fast {
namespace optim {

// adam / adamw: g arrives already multiplied by the clip coefficient.
// Returns the (decayed) params in p, d in g, and the new moments.
template <typename C>
SF_HD void adam_moments(C& p, C& g, C m, C v, const SfAdamHp& hp, C& new_m, C& new_v) {
  const C wd = static_cast<C>(hp.weight_decay);
  const C d = hp.decoupled ? g : g + wd * p;
  p = hp.decoupled ? p * (C(1) - static_cast<C>(hp.lr) * wd) : p;
  g = d;
  const C b1 = static_cast<C>(hp.beta1), b2 = static_cast<C>(hp.beta2);
  new_m = b1 * m + (C(1) - b1) * d;
  new_v = b2 * v + (C(1) - b2) * d * d;
}

// root = sqrt(max(new_v, 0)).
template <typename C>
SF_HD C adam_finish(C p, C new_m, C root, C step_size, C sqrt_bc2, const SfAdamHp& hp) {
  const C denom = root / sqrt_bc2 + static_cast<C>(hp.eps);
  return p - step_size * new_m / denom;
}

template <typename C>
SF_HD void adam_forward(C p, C g, C m, C v, C step_size, C sqrt_bc2, const SfAdamHp& hp, C& new_p,
                        C& new_m, C& new_v) {
  adam_moments<C>(p, g, m, v, hp, new_m, new_v);
  new_p = adam_finish<C>(p, new_m, sqrt_pos(new_v), step_size, sqrt_bc2, hp);
}

// VJP from d, the recomputed moments and root = sqrt(max(new_v, 0)). a, c_m,
// c_v: gradients w.r.t. (params', exp_avg', exp_avg_sq').
template <typename C>
SF_HD void adam_vjp(C a, C c_m, C c_v, C d, C new_m, C new_v, C root_raw, C step_size, C sqrt_bc2,
                    const SfAdamHp& hp, C& gp, C& gg, C& gm, C& gv) {
  const C wd = static_cast<C>(hp.weight_decay);
  const C b1 = static_cast<C>(hp.beta1), b2 = static_cast<C>(hp.beta2);
  const C positive = static_cast<C>(new_v > C(0));  // 1 or 0: a mask, not a branch
  const C root = root_raw + (C(1) - positive);      // 1, not 0, off the positive side
  const C denom = root_raw / sqrt_bc2 + static_cast<C>(hp.eps);
  const C g_m = c_m - a * step_size / denom;
  // d root / d v = 1 / (2 root) for v > 0, 0 at v = 0 (the zero-safe root).
  // Branch-free: computed unconditionally (root stays finite) and masked;
  // under GCC's default -ftrapping-math any division behind a branch kept
  // the CPU loop scalar (Adam backward 1.8x -> see bench).
  const C through_root = a * step_size * new_m / (denom * denom) / sqrt_bc2 * C(0.5) / root;
  const C g_v = c_v + through_root * positive;
  const C g_d = (C(1) - b1) * g_m + (C(1) - b2) * C(2) * d * g_v;
  // decoupled: a (1 - lr wd); L2: a + wd g_d. x * 1 and y + 0 * z are exact.
  const C decay = C(1) - static_cast<C>(hp.lr) * wd;
  const C scale_a = hp.decoupled ? decay : C(1);
  const C scale_d = hp.decoupled ? C(0) : wd;
  gp = a * scale_a + scale_d * g_d;
  gg = g_d;
  gm = b1 * g_m;
  gv = b2 * g_v;
}

// Recomputes d, m', v' from the saved inputs (p only matters for L2 decay).
template <typename C>
SF_HD void adam_backward(C a, C c_m, C c_v, C p, C g, C m, C v, C step_size, C sqrt_bc2,
                         const SfAdamHp& hp, C& gp, C& gg, C& gm, C& gv) {
  C new_m, new_v;
  adam_moments<C>(p, g, m, v, hp, new_m, new_v);
  adam_vjp<C>(a, c_m, c_v, g, new_m, new_v, sqrt_pos(new_v), step_size, sqrt_bc2, hp, gp, gg, gm,
              gv);
}

}  // namespace optim
}  // namespace sophon_fast
