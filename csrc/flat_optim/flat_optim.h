// flat optimizer family: the fused momentum (flat_momentum.h), Adam / AdamW
// and clip + Adam (flat_adam.h), RMSprop (flat_rmsprop.h), Adagrad
// (flat_adagrad.h) and Adadelta (flat_adadelta.h) updates and their fused
// backwards, plus the accumulate every optimizer's gradient
// accumulation shares (declared here). Buffers are (n_params,) contiguous;
// params-like tensors share the parameter dtype, state tensors are float32
// (float64 for float64 params); step is a 0-d floating tensor.
//
// Each optimizer X has the same homes: flat_X.h (this interface), flat_X.cpp
// (checks and device dispatch), flat_X_cpu.cpp and flat_X_cpu_packed.h (CPU
// kernels), flat_X_cuda.h and flat_X_cuda.cu (torch-free CUDA launchers),
// flat_X_math.h (the per-element maths both share). The flat_optim_* files
// hold what they share.
#pragma once

#include <ATen/core/Tensor.h>

#include "flat_adadelta.h"
#include "flat_adagrad.h"
#include "flat_adam.h"
#include "flat_momentum.h"
#include "flat_optim_cuda.h"
#include "flat_rmsprop.h"

namespace sophon_fast {

// acc += weight * grad in place. Returns acc.
at::Tensor flat_accumulate_(const at::Tensor& acc, const at::Tensor& grad, double weight);

// CPU kernel (flat_optim_cpu.cpp).
void flat_accumulate_cpu(at::Tensor& acc, const at::Tensor& grad, double weight);

}  // namespace sophon_fast
