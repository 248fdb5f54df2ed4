// flat_rmsprop: checks, device dispatch (flat_rmsprop.cpp) and the CPU
// kernels' entry points (flat_rmsprop_cpu.cpp) of the fused RMSprop update
// (plain and centered) and its fused backward. Buffer conventions:
// flat_optim.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

#include "flat_rmsprop_cuda.h"

namespace sophon_fast {

// Returns {new_params, new_square_avg[, new_grad_avg]} (centered iff grad_avg).
std::vector<at::Tensor> flat_rmsprop_step_forward(
    const at::Tensor& params, const at::Tensor& grad, const at::Tensor& square_avg,
    const c10::optional<at::Tensor>& grad_avg, double lr, double alpha, double eps,
    double weight_decay, const c10::optional<std::vector<at::Tensor>>& out);

std::vector<at::Tensor> flat_rmsprop_step_backward(
    const at::Tensor& grad_new_params, const at::Tensor& grad_new_square_avg,
    const c10::optional<at::Tensor>& grad_new_grad_avg, const c10::optional<at::Tensor>& params,
    const at::Tensor& grad, const at::Tensor& square_avg, const c10::optional<at::Tensor>& grad_avg,
    double lr, double alpha, double eps, double weight_decay);

// CPU kernels. Undefined tensors mean "absent". outputs_resident: as in
// flat_momentum.h.
void flat_rmsprop_forward_cpu(const at::Tensor& params, const at::Tensor& grad,
                              const at::Tensor& square_avg, const at::Tensor& grad_avg,
                              at::Tensor& out_params, at::Tensor& out_square_avg,
                              at::Tensor& out_grad_avg, const SfRmspropHp& hp,
                              bool outputs_resident);
void flat_rmsprop_backward_cpu(const at::Tensor& grad_new_params,
                               const at::Tensor& grad_new_square_avg,
                               const at::Tensor& grad_new_grad_avg, const at::Tensor& params,
                               const at::Tensor& grad, const at::Tensor& square_avg,
                               const at::Tensor& grad_avg, at::Tensor& grad_params,
                               at::Tensor& grad_grad, at::Tensor& grad_square_avg,
                               at::Tensor& grad_grad_avg, const SfRmspropHp& hp);

}  // namespace sophon_fast
