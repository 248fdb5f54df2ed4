// flat_adam: input checks and device dispatch of the Adam / AdamW update, its
// fused backward and the clip + Adam meta step (CPU kernels in
// flat_adam_cpu.cpp, CUDA through the torch-free launchers of
// flat_adam_cuda.cu when the extension is built with CUDA).
#include "flat_adam.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../alloc.h"
#include "../checks.h"
#include "flat_optim_dispatch.h"

#ifdef SOPHON_FAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>

#include "../cuda_launch.h"
#endif

namespace sophon_fast {
using namespace optim_dispatch;  // NOLINT(build/namespaces): the shared checks

namespace {

// Shared by the out-of-place Adam and the clip + Adam meta step. partials: the
// norm pass's sums of squares on CUDA (undefined: no clipping); on the CPU the
// clip coefficient arrives as clip.
void adam_dispatch(const at::Tensor& params, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, const at::Tensor& step, double clip,
                   const at::Tensor& partials, double max_norm, std::vector<at::Tensor>& result,
                   const SfAdamHp& hp, bool outputs_resident) {
  if (params.is_cpu()) {
    flat_adam_forward_cpu(params, grad, exp_avg, exp_avg_sq, step.item<double>(), clip, result[0],
                          result[1], result[2], hp, outputs_resident);
    return;
  }
#ifdef SOPHON_FAST_WITH_CUDA
  if (params.is_cuda()) {
    const c10::cuda::CUDAGuard guard(params.device());
    check_launch(sophon_fast_flat_adam_forward_cuda(
                     dtype_code(params.scalar_type()), params.const_data_ptr(),
                     grad.const_data_ptr(), exp_avg.const_data_ptr(), exp_avg_sq.const_data_ptr(),
                     step.const_data_ptr(), dtype_code(step.scalar_type()), ptr_or_null(partials),
                     max_norm, result[0].mutable_data_ptr(), result[1].mutable_data_ptr(),
                     result[2].mutable_data_ptr(), params.numel(), hp, stream()),
                 "flat_adam_step forward kernel");
    return;
  }
#endif
  (void)partials;
  (void)max_norm;
  (void)outputs_resident;
  unsupported("flat_adam_step", params);
}

void check_adam(const at::Tensor& params, const at::Tensor& grad, const at::Tensor& exp_avg,
                const at::Tensor& exp_avg_sq, const at::Tensor& step) {
  check_flat_buffer(params, "params");
  check_same_buffer(params, "params", grad, "grad");
  check_state(params, exp_avg, "exp_avg");
  check_state(params, exp_avg_sq, "exp_avg_sq");
  check_step(params, step);
}

}  // namespace

std::vector<at::Tensor> flat_adam_step_forward(const at::Tensor& params, const at::Tensor& grad,
                                               const at::Tensor& exp_avg,
                                               const at::Tensor& exp_avg_sq, const at::Tensor& step,
                                               double lr, double beta1, double beta2, double eps,
                                               double weight_decay, bool decoupled,
                                               const c10::optional<std::vector<at::Tensor>>& out) {
  check_adam(params, grad, exp_avg, exp_avg_sq, step);
  auto result = outputs(params, {exp_avg, exp_avg_sq}, out);
  const SfAdamHp hp{lr, beta1, beta2, eps, weight_decay, decoupled ? 1 : 0};
  adam_dispatch(params, grad, exp_avg, exp_avg_sq, step, 1.0, at::Tensor(), 0.0, result, hp,
                resident(result, out));
  return result;
}

std::vector<at::Tensor> flat_adam_step_backward(
    const at::Tensor& grad_new_params, const at::Tensor& grad_new_exp_avg,
    const at::Tensor& grad_new_exp_avg_sq, const c10::optional<at::Tensor>& params_opt,
    const at::Tensor& grad, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
    const at::Tensor& step, double lr, double beta1, double beta2, double eps, double weight_decay,
    bool decoupled) {
  check_adam(grad, grad_new_params, exp_avg, exp_avg_sq, step);
  check_state(grad, grad_new_exp_avg, "grad_new_exp_avg");
  check_state(grad, grad_new_exp_avg_sq, "grad_new_exp_avg_sq");
  const at::Tensor params = value_or_undefined(params_opt);
  TORCH_CHECK_VALUE(params.defined() || decoupled || weight_decay == 0.0,
                    "flat_adam_step backward needs params when L2 weight_decay != 0");
  if (params.defined()) check_same_buffer(grad, "grad", params, "params");
  auto grad_params = fresh_like(grad), grad_grad = fresh_like(grad);
  auto grad_exp_avg = fresh_like(exp_avg), grad_exp_avg_sq = fresh_like(exp_avg_sq);
  const SfAdamHp hp{lr, beta1, beta2, eps, weight_decay, decoupled ? 1 : 0};
  if (grad.is_cpu()) {
    flat_adam_backward_cpu(grad_new_params, grad_new_exp_avg, grad_new_exp_avg_sq, params, grad,
                           exp_avg, exp_avg_sq, step.item<double>(), grad_params, grad_grad,
                           grad_exp_avg, grad_exp_avg_sq, hp);
    return {grad_params, grad_grad, grad_exp_avg, grad_exp_avg_sq};
  }
#ifdef SOPHON_FAST_WITH_CUDA
  if (grad.is_cuda()) {
    const c10::cuda::CUDAGuard guard(grad.device());
    check_launch(sophon_fast_flat_adam_backward_cuda(
                     dtype_code(grad.scalar_type()), grad_new_params.const_data_ptr(),
                     grad_new_exp_avg.const_data_ptr(), grad_new_exp_avg_sq.const_data_ptr(),
                     ptr_or_null(params), grad.const_data_ptr(), exp_avg.const_data_ptr(),
                     exp_avg_sq.const_data_ptr(), step.const_data_ptr(),
                     dtype_code(step.scalar_type()), grad_params.mutable_data_ptr(),
                     grad_grad.mutable_data_ptr(), grad_exp_avg.mutable_data_ptr(),
                     grad_exp_avg_sq.mutable_data_ptr(), grad.numel(), hp, stream()),
                 "flat_adam_step backward kernel");
    return {grad_params, grad_grad, grad_exp_avg, grad_exp_avg_sq};
  }
#endif
  unsupported("flat_adam_step", grad);
}

at::Tensor flat_clip_adam_step_(const at::Tensor& params, const at::Tensor& grad,
                                const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                const at::Tensor& step, double lr, double beta1, double beta2,
                                double eps, double weight_decay, c10::optional<double> max_norm) {
  check_adam(params, grad, exp_avg, exp_avg_sq, step);
  std::vector<at::Tensor> result{params, exp_avg, exp_avg_sq};
  const SfAdamHp hp{lr, beta1, beta2, eps, weight_decay, 0};
  const auto state = state_type(params);
  at::Tensor total_norm;
  if (params.is_cpu()) {
    const double norm = std::sqrt(flat_sum_of_squares_cpu(grad));
    double clip = 1.0;
    if (max_norm.has_value()) clip = std::min(1.0, *max_norm / (norm + 1e-6));
    adam_dispatch(params, grad, exp_avg, exp_avg_sq, step, clip, at::Tensor(), 0.0, result, hp,
                  true);
    total_norm = at::empty({}, params.options().dtype(state)).fill_(norm);
  } else {
#ifdef SOPHON_FAST_WITH_CUDA
    const c10::cuda::CUDAGuard guard(params.device());
    auto partials = at::empty({sophon_fast_norm_partials()}, params.options().dtype(state));
    check_launch(sophon_fast_flat_sum_of_squares_cuda(
                     dtype_code(params.scalar_type()), grad.const_data_ptr(),
                     partials.mutable_data_ptr(), grad.numel(), stream()),
                 "flat_clip_adam_step_ norm kernel");
    adam_dispatch(params, grad, exp_avg, exp_avg_sq, step, 1.0,
                  max_norm.has_value() ? partials : at::Tensor(), max_norm.value_or(0.0), result,
                  hp, true);
    total_norm = partials.sum().sqrt();
#else
    unsupported("flat_clip_adam_step_", params);
#endif
  }
  step.add_(1);
  return total_norm;
}

}  // namespace sophon_fast
