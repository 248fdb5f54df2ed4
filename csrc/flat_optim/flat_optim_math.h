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
#elif defined(__GNUC__)
// Always inlined: the CPU instantiates these with a packed vector as C inside
// AVX2 functions, and an out-of-line copy would be built without AVX2.
#define SF_HD __attribute__((always_inline)) inline
#else
#define SF_HD inline
#endif

namespace sophon_fast {
namespace optim {

// sqrt of max(x, 0): branch-free, so the CPU loops vectorise.
template <typename C>
SF_HD C sqrt_pos(C x) {
  return std::sqrt(x > C(0) ? x : C(0));
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

// Each stateful update is split at its square root: *_moments produces the
// radicand, the caller takes the root, *_finish (or *_vjp) completes the
// element. The CPU loops take the roots of a whole chunk with SIMD
// instructions in between (a scalar sqrt call sets errno and blocks
// vectorisation: Adam was compute-bound at ~5 GB/s); CUDA calls all three
// per element. Same maths, same rounding on both.

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
  const C positive = static_cast<C>(q > C(0));  // as adam_vjp
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
