// flat_sgd_step: input checks and device dispatch (CPU kernels here, CUDA via
// the torch-free launchers of flat_sgd_step_cuda.cu when the extension is built
// with CUDA).
#include "flat_sgd_step.h"

#include "../alloc.h"
#include "../checks.h"

#ifdef SOPHON_FAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "../cuda_launch.h"
#include "../dtypes.h"
#include "flat_sgd_step_cuda.h"
#endif

namespace sophon_fast {

at::Tensor flat_sgd_step_forward(const at::Tensor& params, const at::Tensor& grad, double lr,
                                 double weight_decay, const c10::optional<at::Tensor>& out_opt) {
  check_flat_buffer(params, "params");
  check_same_buffer(params, "params", grad, "grad");
  at::Tensor out;
  if (out_opt.has_value() && out_opt->defined()) {
    out = *out_opt;
    check_same_buffer(params, "params", out, "out");
  } else {
    out = fresh_like(params);
  }
  if (params.is_cpu()) {
    flat_sgd_step_forward_cpu(params, grad, out, lr, weight_decay);
    return out;
  }
#ifdef SOPHON_FAST_WITH_CUDA
  if (params.is_cuda()) {
    const c10::cuda::CUDAGuard guard(params.device());
    check_launch(sophon_fast_flat_sgd_step_forward_cuda(
                     dtype_code(params.scalar_type()), params.const_data_ptr(),
                     grad.const_data_ptr(), out.mutable_data_ptr(), params.numel(), lr,
                     weight_decay, c10::cuda::getCurrentCUDAStream().stream()),
                 "flat_sgd_step forward kernel");
    return out;
  }
#endif
  TORCH_CHECK_VALUE(false, "flat_sgd_step: params on ", params.device(),
                    " is not supported by this build (CPU",
#ifdef SOPHON_FAST_WITH_CUDA
                    " and CUDA",
#endif
                    " only)");
}

std::tuple<at::Tensor, at::Tensor> flat_sgd_step_backward(const at::Tensor& grad_out, double lr,
                                                          double weight_decay) {
  check_flat_buffer(grad_out, "grad_out");
  // weight_decay == 0: d_params = d_out exactly, so hand d_out back instead of
  // copying it.
  const bool identity = weight_decay == 0.0;
  at::Tensor grad_params = identity ? at::Tensor() : fresh_like(grad_out);
  auto grad_grad = fresh_like(grad_out);
  if (grad_out.is_cpu()) {
    flat_sgd_step_backward_cpu(grad_out, grad_params, grad_grad, lr, weight_decay);
    return {identity ? grad_out : grad_params, grad_grad};
  }
#ifdef SOPHON_FAST_WITH_CUDA
  if (grad_out.is_cuda()) {
    const c10::cuda::CUDAGuard guard(grad_out.device());
    check_launch(
        sophon_fast_flat_sgd_step_backward_cuda(
            dtype_code(grad_out.scalar_type()), grad_out.const_data_ptr(),
            identity ? nullptr : grad_params.mutable_data_ptr(), grad_grad.mutable_data_ptr(),
            grad_out.numel(), lr, weight_decay, c10::cuda::getCurrentCUDAStream().stream()),
        "flat_sgd_step backward kernel");
    return {identity ? grad_out : grad_params, grad_grad};
  }
#endif
  TORCH_CHECK_VALUE(false, "flat_sgd_step: grad_out on ", grad_out.device(),
                    " is not supported by this build");
}

}  // namespace sophon_fast
