// flat_optim: checks, device dispatch and the CPU kernels' entry points of the
// fused momentum / Adam / AdamW / RMSprop updates, their fused backwards, the
// clip + Adam meta step and the accumulate. Buffers are (n_params,)
// contiguous; params-like tensors share the parameter dtype, state tensors
// are float32 (float64 for float64 params); step is a 0-d floating tensor.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

#include "flat_optim_cuda.h"

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

// In place: clip grad's global L2 norm to max_norm (none when absent), Adam
// step on params / exp_avg / exp_avg_sq, step += 1. Returns the 0-d norm.
at::Tensor flat_clip_adam_step_(const at::Tensor& params, const at::Tensor& grad,
                                const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                const at::Tensor& step, double lr, double beta1, double beta2,
                                double eps, double weight_decay, c10::optional<double> max_norm);

// acc += weight * grad in place. Returns acc.
at::Tensor flat_accumulate_(const at::Tensor& acc, const at::Tensor& grad, double weight);

// CPU kernels (flat_optim_cpu.cpp). Undefined tensors mean "absent".
// outputs_resident: the caller passed reused out= buffers (streamed stores pay off
// there; into freshly allocated pages they cost 15 %).
void flat_momentum_forward_cpu(const at::Tensor& params, const at::Tensor& grad,
                               const at::Tensor& buf, bool first, at::Tensor& out_params,
                               at::Tensor& out_buf, const SfMomentumHp& hp, bool outputs_resident);
void flat_momentum_backward_cpu(const at::Tensor& grad_new_params, const at::Tensor& grad_new_buf,
                                bool first, at::Tensor& grad_params, at::Tensor& grad_grad,
                                at::Tensor& grad_buf, const SfMomentumHp& hp);
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
double flat_sum_of_squares_cpu(const at::Tensor& x);
void flat_accumulate_cpu(at::Tensor& acc, const at::Tensor& grad, double weight);

}  // namespace sophon_fast
