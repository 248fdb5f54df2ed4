// flat_adadelta: checks, device dispatch (flat_adadelta.cpp) and the CPU
// kernels' entry points (flat_adadelta_cpu.cpp) of the fused Adadelta update
// and its fused backward. Buffer conventions: flat_optim.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

#include "flat_adadelta_cuda.h"

namespace sophon_fast {

// Returns {new_params, new_square_avg, new_acc_delta}; written into out (3
// buffers) if given.
std::vector<at::Tensor> flat_adadelta_step_forward(
    const at::Tensor& params, const at::Tensor& grad, const at::Tensor& square_avg,
    const at::Tensor& acc_delta, double lr, double rho, double eps, double weight_decay,
    const c10::optional<std::vector<at::Tensor>>& out);

// Returns {grad_params, grad_grad, grad_square_avg, grad_acc_delta}; params
// may be None when weight_decay == 0.
std::vector<at::Tensor> flat_adadelta_step_backward(
    const at::Tensor& grad_new_params, const at::Tensor& grad_new_square_avg,
    const at::Tensor& grad_new_acc_delta, const c10::optional<at::Tensor>& params,
    const at::Tensor& grad, const at::Tensor& square_avg, const at::Tensor& acc_delta, double lr,
    double rho, double eps, double weight_decay);

// CPU kernels. Undefined tensors mean "absent". outputs_resident: as in
// flat_momentum.h.
void flat_adadelta_forward_cpu(const at::Tensor& params, const at::Tensor& grad,
                               const at::Tensor& square_avg, const at::Tensor& acc_delta,
                               at::Tensor& out_params, at::Tensor& out_square_avg,
                               at::Tensor& out_acc_delta, const SfAdadeltaHp& hp,
                               bool outputs_resident);
void flat_adadelta_backward_cpu(const at::Tensor& grad_new_params,
                                const at::Tensor& grad_new_square_avg,
                                const at::Tensor& grad_new_acc_delta, const at::Tensor& params,
                                const at::Tensor& grad, const at::Tensor& square_avg,
                                const at::Tensor& acc_delta, at::Tensor& grad_params,
                                at::Tensor& grad_grad, at::Tensor& grad_square_avg,
                                at::Tensor& grad_acc_delta, const SfAdadeltaHp& hp);

}  // namespace sophon_fast
