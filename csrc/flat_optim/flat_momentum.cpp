// flat_momentum: input checks and device dispatch of the momentum SGD update
// and its fused backward (CPU kernels in flat_momentum_cpu.cpp, CUDA through
// the torch-free launchers of flat_momentum_cuda.cu when the extension is
// built with CUDA).
#include "flat_momentum.h"

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

std::vector<at::Tensor> flat_momentum_step_forward(
    const at::Tensor& params, const at::Tensor& grad, const at::Tensor& momentum_buffer,
    const at::Tensor& step, double lr, double momentum, double dampening, double weight_decay,
    bool nesterov, const c10::optional<std::vector<at::Tensor>>& out) {
  check_flat_buffer(params, "params");
  check_same_buffer(params, "params", grad, "grad");
  check_state(params, momentum_buffer, "momentum_buffer");
  check_step(params, step);
  auto result = outputs(params, {momentum_buffer}, out);
  const SfMomentumHp hp{lr, momentum, nesterov ? 0.0 : dampening, weight_decay, nesterov ? 1 : 0};
  if (params.is_cpu()) {
    flat_momentum_forward_cpu(params, grad, momentum_buffer, step.item<double>() == 0.0, result[0],
                              result[1], hp, resident(result, out));
    return result;
  }
#ifdef SOPHON_FAST_WITH_CUDA
  if (params.is_cuda()) {
    const c10::cuda::CUDAGuard guard(params.device());
    check_launch(sophon_fast_flat_momentum_forward_cuda(
                     dtype_code(params.scalar_type()), params.const_data_ptr(),
                     grad.const_data_ptr(), momentum_buffer.const_data_ptr(), step.const_data_ptr(),
                     dtype_code(step.scalar_type()), result[0].mutable_data_ptr(),
                     result[1].mutable_data_ptr(), params.numel(), hp, stream()),
                 "flat_momentum_step forward kernel");
    return result;
  }
#endif
  unsupported("flat_momentum_step", params);
}

std::vector<at::Tensor> flat_momentum_step_backward(const at::Tensor& grad_new_params,
                                                    const at::Tensor& grad_new_buffer,
                                                    const at::Tensor& step, double lr,
                                                    double momentum, double dampening,
                                                    double weight_decay, bool nesterov) {
  check_flat_buffer(grad_new_params, "grad_new_params");
  check_state(grad_new_params, grad_new_buffer, "grad_new_buffer");
  check_step(grad_new_params, step);
  // weight_decay == 0: d_params = d_params' exactly; hand it back uncopied.
  const bool identity = weight_decay == 0.0;
  at::Tensor grad_params = identity ? at::Tensor() : fresh_like(grad_new_params);
  auto grad_grad = fresh_like(grad_new_params);
  auto grad_buf = fresh_like(grad_new_buffer);
  const SfMomentumHp hp{lr, momentum, nesterov ? 0.0 : dampening, weight_decay, nesterov ? 1 : 0};
  if (grad_new_params.is_cpu()) {
    flat_momentum_backward_cpu(grad_new_params, grad_new_buffer, step.item<double>() == 0.0,
                               grad_params, grad_grad, grad_buf, hp);
    return {identity ? grad_new_params : grad_params, grad_grad, grad_buf};
  }
#ifdef SOPHON_FAST_WITH_CUDA
  if (grad_new_params.is_cuda()) {
    const c10::cuda::CUDAGuard guard(grad_new_params.device());
    check_launch(
        sophon_fast_flat_momentum_backward_cuda(
            dtype_code(grad_new_params.scalar_type()), grad_new_params.const_data_ptr(),
            grad_new_buffer.const_data_ptr(), step.const_data_ptr(), dtype_code(step.scalar_type()),
            mut_or_null(grad_params), grad_grad.mutable_data_ptr(), grad_buf.mutable_data_ptr(),
            grad_new_params.numel(), hp, stream()),
        "flat_momentum_step backward kernel");
    return {identity ? grad_new_params : grad_params, grad_grad, grad_buf};
  }
#endif
  unsupported("flat_momentum_step", grad_new_params);
}

}  // namespace sophon_fast
