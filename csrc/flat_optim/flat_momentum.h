// flat_momentum: checks, device dispatch (flat_momentum.cpp) and the CPU
// kernels' entry points (flat_momentum_cpu.cpp) of the fused momentum SGD
// update and its fused backward. Buffer conventions: flat_optim.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

#include "flat_momentum_cuda.h"

namespace sophon_fast {

// Returns {new_params, new_momentum_buffer}; written into out (2 buffers) if
// given.
std::vector<at::Tensor> flat_momentum_step_forward(
    const at::Tensor& params, const at::Tensor& grad, const at::Tensor& momentum_buffer,
    const at::Tensor& step, double lr, double momentum, double dampening, double weight_decay,
    bool nesterov, const c10::optional<std::vector<at::Tensor>>& out);

// Returns {grad_params, grad_grad, grad_momentum_buffer}; grad_params is
// grad_new_params itself when weight_decay == 0.
std::vector<at::Tensor> flat_momentum_step_backward(const at::Tensor& grad_new_params,
                                                    const at::Tensor& grad_new_buffer,
                                                    const at::Tensor& step, double lr,
                                                    double momentum, double dampening,
                                                    double weight_decay, bool nesterov);

// CPU kernels. Undefined tensors mean "absent". outputs_resident: the caller
// passed reused out= buffers (streamed stores pay off there; into freshly
// allocated pages they cost 15 %).
void flat_momentum_forward_cpu(const at::Tensor& params, const at::Tensor& grad,
                               const at::Tensor& buf, bool first, at::Tensor& out_params,
                               at::Tensor& out_buf, const SfMomentumHp& hp, bool outputs_resident);
void flat_momentum_backward_cpu(const at::Tensor& grad_new_params, const at::Tensor& grad_new_buf,
                                bool first, at::Tensor& grad_params, at::Tensor& grad_grad,
                                at::Tensor& grad_buf, const SfMomentumHp& hp);

}  // namespace sophon_fast
