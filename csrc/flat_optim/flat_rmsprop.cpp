// flat_rmsprop: input checks and device dispatch of the RMSprop update (plain
// and centered) and its fused backward (CPU kernels in flat_rmsprop_cpu.cpp,
// CUDA through the torch-free launchers of flat_rmsprop_cuda.cu when the
// extension is built with CUDA).
#include "flat_rmsprop.h"

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

std::vector<at::Tensor> flat_rmsprop_step_forward(
    const at::Tensor& params, const at::Tensor& grad, const at::Tensor& square_avg,
    const c10::optional<at::Tensor>& grad_avg_opt, double lr, double alpha, double eps,
    double weight_decay, const c10::optional<std::vector<at::Tensor>>& out) {
  check_flat_buffer(params, "params");
  check_same_buffer(params, "params", grad, "grad");
  check_state(params, square_avg, "square_avg");
  const at::Tensor grad_avg = value_or_undefined(grad_avg_opt);
  std::vector<at::Tensor> states{square_avg};
  if (grad_avg.defined()) {
    check_state(params, grad_avg, "grad_avg");
    states.push_back(grad_avg);
  }
  auto result = outputs(params, states, out);
  at::Tensor out_grad_avg = grad_avg.defined() ? result[2] : at::Tensor();
  const SfRmspropHp hp{lr, alpha, eps, weight_decay};
  if (params.is_cpu()) {
    flat_rmsprop_forward_cpu(params, grad, square_avg, grad_avg, result[0], result[1], out_grad_avg,
                             hp, resident(result, out));
    return result;
  }
#ifdef SOPHON_FAST_WITH_CUDA
  if (params.is_cuda()) {
    const c10::cuda::CUDAGuard guard(params.device());
    check_launch(
        sophon_fast_flat_rmsprop_forward_cuda(
            dtype_code(params.scalar_type()), params.const_data_ptr(), grad.const_data_ptr(),
            square_avg.const_data_ptr(), ptr_or_null(grad_avg), result[0].mutable_data_ptr(),
            result[1].mutable_data_ptr(), mut_or_null(out_grad_avg), params.numel(), hp, stream()),
        "flat_rmsprop_step forward kernel");
    return result;
  }
#endif
  unsupported("flat_rmsprop_step", params);
}

std::vector<at::Tensor> flat_rmsprop_step_backward(
    const at::Tensor& grad_new_params, const at::Tensor& grad_new_square_avg,
    const c10::optional<at::Tensor>& grad_new_grad_avg_opt,
    const c10::optional<at::Tensor>& params_opt, const at::Tensor& grad,
    const at::Tensor& square_avg, const c10::optional<at::Tensor>& grad_avg_opt, double lr,
    double alpha, double eps, double weight_decay) {
  check_flat_buffer(grad, "grad");
  check_same_buffer(grad, "grad", grad_new_params, "grad_new_params");
  check_state(grad, square_avg, "square_avg");
  check_state(grad, grad_new_square_avg, "grad_new_square_avg");
  const at::Tensor params = value_or_undefined(params_opt);
  const at::Tensor grad_avg = value_or_undefined(grad_avg_opt);
  const at::Tensor grad_new_grad_avg = value_or_undefined(grad_new_grad_avg_opt);
  TORCH_CHECK_VALUE(params.defined() || weight_decay == 0.0,
                    "flat_rmsprop_step backward needs params when weight_decay != 0");
  if (params.defined()) check_same_buffer(grad, "grad", params, "params");
  TORCH_CHECK_VALUE(grad_avg.defined() == grad_new_grad_avg.defined(),
                    "grad_avg and grad_new_grad_avg must be given together (centered RMSprop)");
  if (grad_avg.defined()) {
    check_state(grad, grad_avg, "grad_avg");
    check_state(grad, grad_new_grad_avg, "grad_new_grad_avg");
  }
  auto grad_params = fresh_like(grad), grad_grad = fresh_like(grad);
  auto grad_square_avg = fresh_like(square_avg);
  at::Tensor grad_grad_avg = grad_avg.defined() ? fresh_like(grad_avg) : at::Tensor();
  const SfRmspropHp hp{lr, alpha, eps, weight_decay};
  std::vector<at::Tensor> result{grad_params, grad_grad, grad_square_avg};
  if (grad_avg.defined()) result.push_back(grad_grad_avg);
  if (grad.is_cpu()) {
    flat_rmsprop_backward_cpu(grad_new_params, grad_new_square_avg, grad_new_grad_avg, params, grad,
                              square_avg, grad_avg, grad_params, grad_grad, grad_square_avg,
                              grad_grad_avg, hp);
    return result;
  }
#ifdef SOPHON_FAST_WITH_CUDA
  if (grad.is_cuda()) {
    const c10::cuda::CUDAGuard guard(grad.device());
    check_launch(sophon_fast_flat_rmsprop_backward_cuda(
                     dtype_code(grad.scalar_type()), grad_new_params.const_data_ptr(),
                     grad_new_square_avg.const_data_ptr(), ptr_or_null(grad_new_grad_avg),
                     ptr_or_null(params), grad.const_data_ptr(), square_avg.const_data_ptr(),
                     ptr_or_null(grad_avg), grad_params.mutable_data_ptr(),
                     grad_grad.mutable_data_ptr(), grad_square_avg.mutable_data_ptr(),
                     mut_or_null(grad_grad_avg), grad.numel(), hp, stream()),
                 "flat_rmsprop_step backward kernel");
    return result;
  }
#endif
  unsupported("flat_rmsprop_step", grad);
}

}  // namespace sophon_fast
