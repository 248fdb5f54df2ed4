// flat_adagrad: input checks and device dispatch of the Adagrad update and its
// fused backward (CPU kernels in flat_adagrad_cpu.cpp, CUDA through the
// torch-free launchers of flat_adagrad_cuda.cu when the extension is built
// with CUDA).
#include "flat_adagrad.h"

#include <vector>

#include "../alloc.h"
#include "../checks.h"
#include "flat_adagrad_math.h"
#include "flat_optim_dispatch.h"

#ifdef SOPHON_FAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>

#include "../cuda_launch.h"
#endif

namespace sophon_fast {
using namespace optim_dispatch;  // NOLINT(build/namespaces): the shared checks

std::vector<at::Tensor> flat_adagrad_step_forward(
    const at::Tensor& params, const at::Tensor& grad, const at::Tensor& state_sum,
    const at::Tensor& step, double lr, double lr_decay, double weight_decay, double eps,
    const c10::optional<std::vector<at::Tensor>>& out) {
  check_flat_buffer(params, "params");
  check_same_buffer(params, "params", grad, "grad");
  check_state(params, state_sum, "state_sum");
  check_step(params, step);
  auto result = outputs(params, {state_sum}, out);
  const SfAdagradHp hp{lr, lr_decay, weight_decay, eps};
  if (params.is_cpu()) {
    flat_adagrad_forward_cpu(params, grad, state_sum,
                             optim::adagrad_learning_rate<double>(step.item<double>(), hp),
                             result[0], result[1], hp, resident(result, out));
    return result;
  }
#ifdef SOPHON_FAST_WITH_CUDA
  if (params.is_cuda()) {
    const c10::cuda::CUDAGuard guard(params.device());
    check_launch(sophon_fast_flat_adagrad_forward_cuda(
                     dtype_code(params.scalar_type()), params.const_data_ptr(),
                     grad.const_data_ptr(), state_sum.const_data_ptr(), step.const_data_ptr(),
                     dtype_code(step.scalar_type()), result[0].mutable_data_ptr(),
                     result[1].mutable_data_ptr(), params.numel(), hp, stream()),
                 "flat_adagrad_step forward kernel");
    return result;
  }
#endif
  unsupported("flat_adagrad_step", params);
}

std::vector<at::Tensor> flat_adagrad_step_backward(
    const at::Tensor& grad_new_params, const at::Tensor& grad_new_state_sum,
    const c10::optional<at::Tensor>& params_opt, const at::Tensor& grad,
    const at::Tensor& state_sum, const at::Tensor& step, double lr, double lr_decay,
    double weight_decay, double eps) {
  check_flat_buffer(grad, "grad");
  check_same_buffer(grad, "grad", grad_new_params, "grad_new_params");
  check_state(grad, state_sum, "state_sum");
  check_state(grad, grad_new_state_sum, "grad_new_state_sum");
  check_step(grad, step);
  const at::Tensor params = value_or_undefined(params_opt);
  TORCH_CHECK_VALUE(params.defined() || weight_decay == 0.0,
                    "flat_adagrad_step backward needs params when weight_decay != 0");
  if (params.defined()) check_same_buffer(grad, "grad", params, "params");
  auto grad_params = fresh_like(grad), grad_grad = fresh_like(grad);
  auto grad_sum = fresh_like(state_sum);
  const SfAdagradHp hp{lr, lr_decay, weight_decay, eps};
  if (grad.is_cpu()) {
    flat_adagrad_backward_cpu(grad_new_params, grad_new_state_sum, params, grad, state_sum,
                              optim::adagrad_learning_rate<double>(step.item<double>(), hp),
                              grad_params, grad_grad, grad_sum, hp);
    return {grad_params, grad_grad, grad_sum};
  }
#ifdef SOPHON_FAST_WITH_CUDA
  if (grad.is_cuda()) {
    const c10::cuda::CUDAGuard guard(grad.device());
    check_launch(
        sophon_fast_flat_adagrad_backward_cuda(
            dtype_code(grad.scalar_type()), grad_new_params.const_data_ptr(),
            grad_new_state_sum.const_data_ptr(), ptr_or_null(params), grad.const_data_ptr(),
            state_sum.const_data_ptr(), step.const_data_ptr(), dtype_code(step.scalar_type()),
            grad_params.mutable_data_ptr(), grad_grad.mutable_data_ptr(),
            grad_sum.mutable_data_ptr(), grad.numel(), hp, stream()),
        "flat_adagrad_step backward kernel");
    return {grad_params, grad_grad, grad_sum};
  }
#endif
  unsupported("flat_adagrad_step", grad);
}

}  // namespace sophon_fast
