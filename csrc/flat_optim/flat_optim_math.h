// flat_optim: the per-element maths of every update and its vector-Jacobian
// product, shared by the C++ CPU loops and the CUDA kernels so the two cannot
// drift apart. Torch-free. C is the compute type (float, or double for float64
// buffers); bias corrections arrive precomputed (step_size = lr / (1 - b1^t),
// sqrt_bc2 = sqrt(1 - b2^t), both in double then rounded once, as
// torch.optim does).
#pragma once

#include <cmath>

#include "flat_optim_cuda.h"

#if defined(__CUDACC__)
#define SF_HD __host__ __device__ __forceinline__
#else
#define SF_HD inline
#endif

namespace sophon_fast {
namespace optim {

template <typename C>
SF_HD C sqrt_pos(C x) {
  return x > C(0) ? std::sqrt(x) : C(0);
}

// momentum: first = (step == 0); dampening is already 0 for Nesterov.
template <typename C>
SF_HD void momentum_forward(C p, C g, C b, bool first, const SfMomentumHp& hp, C& new_p, C& new_b) {
  const C d = g + static_cast<C>(hp.weight_decay) * p;
  const C mu = static_cast<C>(hp.momentum);
  new_b = first ? d : mu * b + (C(1) - static_cast<C>(hp.dampening)) * d;
  const C direction = hp.nesterov ? d + mu * new_b : new_b;
  new_p = p - static_cast<C>(hp.lr) * direction;
}

// Linear update: the VJP needs no saved values, only whether it was the first
// step.
template <typename C>
SF_HD void momentum_backward(C a, C c, bool first, const SfMomentumHp& hp, C& gp, C& gg, C& gb) {
  const C lr = static_cast<C>(hp.lr);
  const C mu = static_cast<C>(hp.momentum);
  const C g_new_b = hp.nesterov ? c - lr * mu * a : c - lr * a;
  C g_d = first ? g_new_b : (C(1) - static_cast<C>(hp.dampening)) * g_new_b;
  if (hp.nesterov) g_d -= lr * a;
  gb = first ? C(0) : mu * g_new_b;
  gg = g_d;
  gp = a + static_cast<C>(hp.weight_decay) * g_d;
}

// adam / adamw: g arrives already multiplied by the clip coefficient.
template <typename C>
SF_HD void adam_forward(C p, C g, C m, C v, C step_size, C sqrt_bc2, const SfAdamHp& hp, C& new_p,
                        C& new_m, C& new_v) {
  const C wd = static_cast<C>(hp.weight_decay);
  C d = g;
  if (hp.decoupled) {
    p = p * (C(1) - static_cast<C>(hp.lr) * wd);
  } else {
    d = g + wd * p;
  }
  const C b1 = static_cast<C>(hp.beta1), b2 = static_cast<C>(hp.beta2);
  new_m = b1 * m + (C(1) - b1) * d;
  new_v = b2 * v + (C(1) - b2) * d * d;
  const C denom = sqrt_pos(new_v) / sqrt_bc2 + static_cast<C>(hp.eps);
  new_p = p - step_size * new_m / denom;
}

// Recomputes d, m', v' from the saved inputs (p only matters for L2 decay).
template <typename C>
SF_HD void adam_backward(C a, C c_m, C c_v, C p, C g, C m, C v, C step_size, C sqrt_bc2,
                         const SfAdamHp& hp, C& gp, C& gg, C& gm, C& gv) {
  const C wd = static_cast<C>(hp.weight_decay);
  const C d = hp.decoupled ? g : g + wd * p;
  const C b1 = static_cast<C>(hp.beta1), b2 = static_cast<C>(hp.beta2);
  const C new_m = b1 * m + (C(1) - b1) * d;
  const C new_v = b2 * v + (C(1) - b2) * d * d;
  const bool positive = new_v > C(0);
  const C root = positive ? std::sqrt(new_v) : C(1);
  const C denom = (positive ? root : C(0)) / sqrt_bc2 + static_cast<C>(hp.eps);
  const C g_m = c_m - a * step_size / denom;
  // d root / d v = 1 / (2 root) for v > 0, 0 at v = 0 (the zero-safe root).
  const C g_v =
      c_v + (positive ? a * step_size * new_m / (denom * denom) / sqrt_bc2 * C(0.5) / root : C(0));
  const C g_d = (C(1) - b1) * g_m + (C(1) - b2) * C(2) * d * g_v;
  gp = hp.decoupled ? a * (C(1) - static_cast<C>(hp.lr) * wd) : a + wd * g_d;
  gg = g_d;
  gm = b1 * g_m;
  gv = b2 * g_v;
}

template <typename C>
SF_HD void rmsprop_forward(C p, C g, C v, C ga, bool centered, const SfRmspropHp& hp, C& new_p,
                           C& new_v, C& new_ga) {
  const C alpha = static_cast<C>(hp.alpha);
  const C d = g + static_cast<C>(hp.weight_decay) * p;
  new_v = alpha * v + (C(1) - alpha) * d * d;
  C q = new_v;
  if (centered) {
    new_ga = alpha * ga + (C(1) - alpha) * d;
    q = new_v - new_ga * new_ga;
  }
  new_p = p - static_cast<C>(hp.lr) * d / (sqrt_pos(q) + static_cast<C>(hp.eps));
}

template <typename C>
SF_HD void rmsprop_backward(C a, C c_v, C c_ga, C p, C g, C v, C ga, bool centered,
                            const SfRmspropHp& hp, C& gp, C& gg, C& gv, C& gga) {
  const C alpha = static_cast<C>(hp.alpha);
  const C lr = static_cast<C>(hp.lr);
  const C wd = static_cast<C>(hp.weight_decay);
  const C d = g + wd * p;
  const C new_v = alpha * v + (C(1) - alpha) * d * d;
  C q = new_v, new_ga = C(0);
  if (centered) {
    new_ga = alpha * ga + (C(1) - alpha) * d;
    q = new_v - new_ga * new_ga;
  }
  const bool positive = q > C(0);
  const C root = positive ? std::sqrt(q) : C(1);
  const C denom = (positive ? root : C(0)) + static_cast<C>(hp.eps);
  const C g_q = positive ? a * lr * d / (denom * denom) * C(0.5) / root : C(0);
  const C g_v = c_v + g_q;
  C g_d = -lr * a / denom + (C(1) - alpha) * C(2) * d * g_v;
  if (centered) {
    const C g_ga = c_ga - C(2) * new_ga * g_q;
    g_d += (C(1) - alpha) * g_ga;
    gga = alpha * g_ga;
  }
  gp = a + wd * g_d;
  gg = g_d;
  gv = alpha * g_v;
}

}  // namespace optim
}  // namespace sophon_fast
