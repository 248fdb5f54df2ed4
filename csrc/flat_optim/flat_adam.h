// flat_adam: checks, device dispatch (flat_adam.cpp) and the CPU kernels'
// entry points (flat_adam_cpu.cpp) of the fused Adam / AdamW update, its fused
// backward and the clip + Adam meta step. Buffer conventions: flat_optim.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

#include "flat_adam_cuda.h"

namespace sophon_fast {

std::vector<at::Tensor> flat_adam_step_forward(const at::Tensor& params, const at::Tensor& grad,
                                               const at::Tensor& exp_avg,
                                               const at::Tensor& exp_avg_sq, const at::Tensor& step,
                                               double lr, double beta1, double beta2, double eps,
                                               double weight_decay, bool decoupled,
                                               const c10::optional<std::vector<at::Tensor>>& out);

std::vector<at::Tensor> flat_adam_step_backward(
    const at::Tensor& grad_new_params, const at::Tensor& grad_new_exp_avg,
    const at::Tensor& grad_new_exp_avg_sq, const c10::optional<at::Tensor>& params,
    const at::Tensor& grad, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
    const at::Tensor& step, double lr, double beta1, double beta2, double eps, double weight_decay,
    bool decoupled);

// In place: clip grad's global L2 norm to max_norm (none when absent), Adam
// step on params / exp_avg / exp_avg_sq, step += 1. Returns the 0-d norm.
at::Tensor flat_clip_adam_step_(const at::Tensor& params, const at::Tensor& grad,
                                const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                const at::Tensor& step, double lr, double beta1, double beta2,
                                double eps, double weight_decay, c10::optional<double> max_norm);

// CPU kernels. Undefined tensors mean "absent". outputs_resident: as in
// flat_momentum.h. clip: the coefficient grad is scaled by (1: no clipping).
void flat_adam_forward_cpu(const at::Tensor& params, const at::Tensor& grad,
                           const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, double step,
                           double clip, at::Tensor& out_params, at::Tensor& out_exp_avg,
                           at::Tensor& out_exp_avg_sq, const SfAdamHp& hp, bool outputs_resident);
void flat_adam_backward_cpu(const at::Tensor& grad_new_params, const at::Tensor& grad_new_exp_avg,
                            const at::Tensor& grad_new_exp_avg_sq, const at::Tensor& params,
                            const at::Tensor& grad, const at::Tensor& exp_avg,
                            const at::Tensor& exp_avg_sq, double step, at::Tensor& grad_params,
                            at::Tensor& grad_grad, at::Tensor& grad_exp_avg,
                            at::Tensor& grad_exp_avg_sq, const SfAdamHp& hp);
// The clip norm's sum of squares, in double.
double flat_sum_of_squares_cpu(const at::Tensor& x);

}  // namespace sophon_fast
