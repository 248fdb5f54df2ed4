// flat_sgd_step: checks, device dispatch and the CPU kernels' entry points.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace sophon_fast {

// params, grad: (n_params,) contiguous, same dtype and device. Returns new
// params, written into `out` when given (out may be params itself: an in-place
// step).
at::Tensor flat_sgd_step_forward(const at::Tensor& params, const at::Tensor& grad, double lr,
                                 double weight_decay, const c10::optional<at::Tensor>& out);

// grad_out: (n_params,). Returns (grad_params, grad_grad); with weight_decay ==
// 0 grad_params is grad_out itself (the Jacobian block is the identity) and
// only grad_grad is computed.
std::tuple<at::Tensor, at::Tensor> flat_sgd_step_backward(const at::Tensor& grad_out, double lr,
                                                          double weight_decay);

void flat_sgd_step_forward_cpu(const at::Tensor& params, const at::Tensor& grad, at::Tensor& out,
                               double lr, double weight_decay);

// grad_params may be undefined: then only grad_grad is written.
void flat_sgd_step_backward_cpu(const at::Tensor& grad_out, at::Tensor& grad_params,
                                at::Tensor& grad_grad, double lr, double weight_decay);

}  // namespace sophon_fast
