// flat_adagrad: checks, device dispatch (flat_adagrad.cpp) and the CPU
// kernels' entry points (flat_adagrad_cpu.cpp) of the fused Adagrad update and
// its fused backward. Buffer conventions: flat_optim.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

#include "flat_adagrad_cuda.h"

namespace sophon_fast {

// Returns {new_params, new_state_sum}; written into out (2 buffers) if given.
std::vector<at::Tensor> flat_adagrad_step_forward(
    const at::Tensor& params, const at::Tensor& grad, const at::Tensor& state_sum,
    const at::Tensor& step, double lr, double lr_decay, double weight_decay, double eps,
    const c10::optional<std::vector<at::Tensor>>& out);

// Returns {grad_params, grad_grad, grad_state_sum}; params may be None when
// weight_decay == 0.
std::vector<at::Tensor> flat_adagrad_step_backward(
    const at::Tensor& grad_new_params, const at::Tensor& grad_new_state_sum,
    const c10::optional<at::Tensor>& params, const at::Tensor& grad, const at::Tensor& state_sum,
    const at::Tensor& step, double lr, double lr_decay, double weight_decay, double eps);

// CPU kernels. Undefined tensors mean "absent"; clr: the decayed learning rate
// (double, rounded once by the kernels). outputs_resident: as in
// flat_momentum.h.
void flat_adagrad_forward_cpu(const at::Tensor& params, const at::Tensor& grad,
                              const at::Tensor& state_sum, double clr, at::Tensor& out_params,
                              at::Tensor& out_sum, const SfAdagradHp& hp, bool outputs_resident);
void flat_adagrad_backward_cpu(const at::Tensor& grad_new_params, const at::Tensor& grad_new_sum,
                               const at::Tensor& params, const at::Tensor& grad,
                               const at::Tensor& state_sum, double clr, at::Tensor& grad_params,
                               at::Tensor& grad_grad, at::Tensor& grad_sum, const SfAdagradHp& hp);

}  // namespace sophon_fast
