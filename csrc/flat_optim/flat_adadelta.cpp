// flat_adadelta: input checks and device dispatch of the Adadelta update and
// its fused backward (CPU kernels in flat_adadelta_cpu.cpp, CUDA through the
// torch-free launchers of flat_adadelta_cuda.cu when the extension is built
// with CUDA).
#include "flat_adadelta.h"

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

std::vector<at::Tensor> flat_adadelta_step_forward(
    const at::Tensor& params, const at::Tensor& grad, const at::Tensor& square_avg,
    const at::Tensor& acc_delta, double lr, double rho, double eps, double weight_decay,
    const c10::optional<std::vector<at::Tensor>>& out) {
  check_flat_buffer(params, "params");
  check_same_buffer(params, "params", grad, "grad");
  check_state(params, square_avg, "square_avg");
  check_state(params, acc_delta, "acc_delta");
  auto result = outputs(params, {square_avg, acc_delta}, out);
  const SfAdadeltaHp hp{lr, rho, eps, weight_decay};
  if (params.is_cpu()) {
    flat_adadelta_forward_cpu(params, grad, square_avg, acc_delta, result[0], result[1], result[2],
                              hp, resident(result, out));
    return result;
  }
#ifdef SOPHON_FAST_WITH_CUDA
  if (params.is_cuda()) {
    const c10::cuda::CUDAGuard guard(params.device());
    check_launch(sophon_fast_flat_adadelta_forward_cuda(
                     dtype_code(params.scalar_type()), params.const_data_ptr(),
                     grad.const_data_ptr(), square_avg.const_data_ptr(), acc_delta.const_data_ptr(),
                     result[0].mutable_data_ptr(), result[1].mutable_data_ptr(),
                     result[2].mutable_data_ptr(), params.numel(), hp, stream()),
                 "flat_adadelta_step forward kernel");
    return result;
  }
#endif
  unsupported("flat_adadelta_step", params);
}

std::vector<at::Tensor> flat_adadelta_step_backward(
    const at::Tensor& grad_new_params, const at::Tensor& grad_new_square_avg,
    const at::Tensor& grad_new_acc_delta, const c10::optional<at::Tensor>& params_opt,
    const at::Tensor& grad, const at::Tensor& square_avg, const at::Tensor& acc_delta, double lr,
    double rho, double eps, double weight_decay) {
  check_flat_buffer(grad, "grad");
  check_same_buffer(grad, "grad", grad_new_params, "grad_new_params");
  check_state(grad, square_avg, "square_avg");
  check_state(grad, acc_delta, "acc_delta");
  check_state(grad, grad_new_square_avg, "grad_new_square_avg");
  check_state(grad, grad_new_acc_delta, "grad_new_acc_delta");
  const at::Tensor params = value_or_undefined(params_opt);
  TORCH_CHECK_VALUE(params.defined() || weight_decay == 0.0,
                    "flat_adadelta_step backward needs params when weight_decay != 0");
  if (params.defined()) check_same_buffer(grad, "grad", params, "params");
  auto grad_params = fresh_like(grad), grad_grad = fresh_like(grad);
  auto grad_square_avg = fresh_like(square_avg), grad_acc_delta = fresh_like(acc_delta);
  const SfAdadeltaHp hp{lr, rho, eps, weight_decay};
  if (grad.is_cpu()) {
    flat_adadelta_backward_cpu(grad_new_params, grad_new_square_avg, grad_new_acc_delta, params,
                               grad, square_avg, acc_delta, grad_params, grad_grad, grad_square_avg,
                               grad_acc_delta, hp);
    return {grad_params, grad_grad, grad_square_avg, grad_acc_delta};
  }
#ifdef SOPHON_FAST_WITH_CUDA
  if (grad.is_cuda()) {
    const c10::cuda::CUDAGuard guard(grad.device());
    check_launch(sophon_fast_flat_adadelta_backward_cuda(
                     dtype_code(grad.scalar_type()), grad_new_params.const_data_ptr(),
                     grad_new_square_avg.const_data_ptr(), grad_new_acc_delta.const_data_ptr(),
                     ptr_or_null(params), grad.const_data_ptr(), square_avg.const_data_ptr(),
                     acc_delta.const_data_ptr(), grad_params.mutable_data_ptr(),
                     grad_grad.mutable_data_ptr(), grad_square_avg.mutable_data_ptr(),
                     grad_acc_delta.mutable_data_ptr(), grad.numel(), hp, stream()),
                 "flat_adadelta_step backward kernel");
    return {grad_params, grad_grad, grad_square_avg, grad_acc_delta};
  }
#endif
  unsupported("flat_adadelta_step", grad);
}

}  // namespace sophon_fast
