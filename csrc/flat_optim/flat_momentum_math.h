// flat_momentum: the per-element maths of the momentum SGD update and its
// vector-Jacobian product, shared by the C++ CPU loops (flat_momentum_cpu.cpp,
// flat_momentum_cpu_packed.h) and the CUDA kernel (flat_momentum_cuda.cu).
// Torch-free.
#pragma once

#include "flat_momentum_cuda.h"
#include "flat_optim_math.h"

namespace sophon_fast {
namespace optim {

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

}  // namespace optim
}  // namespace sophon_fast
