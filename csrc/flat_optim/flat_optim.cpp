// flat_optim: input checks and device dispatch (CPU kernels in
// flat_optim_cpu.cpp, CUDA through the torch-free launchers of
// flat_optim_cuda.cu when the extension is built with CUDA).
#include "flat_optim.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_vector_norm.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "../alloc.h"
#include "../checks.h"

#ifdef SOPHON_FAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "../cuda_launch.h"
#endif

namespace sophon_fast {
namespace {

at::ScalarType state_type(const at::Tensor& params) {
  return params.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_state(const at::Tensor& params, const at::Tensor& t, const char* name) {
  check_flat_buffer(t, name);
  TORCH_CHECK_VALUE(t.numel() == params.numel(), name, " has ", t.numel(),
                    " elements but params has ", params.numel(), "; they must match");
  TORCH_CHECK_TYPE(t.scalar_type() == state_type(params), name, " must be ", state_type(params),
                   " for ", params.scalar_type(),
                   " params (state is kept in float32, float64 for float64 params), got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == params.device(), name, " is on ", t.device(),
                    " but params is on ", params.device(), "; they must be on the same device");
}

void check_step(const at::Tensor& params, const at::Tensor& step) {
  TORCH_CHECK_VALUE(step.numel() == 1 && step.dim() <= 1, "step must be a 0-d tensor, got shape ",
                    step.sizes());
  const auto type = step.scalar_type();
  TORCH_CHECK_TYPE(
      type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16,
      "step must be a floating tensor (as torch.optim keeps it): float32, float64, "
      "float16 or bfloat16, got ",
      type);
  // The kernels read the count where it is: a step elsewhere would be copied,
  // with a host synchronisation, on every call (and break CUDA graph capture).
  TORCH_CHECK_VALUE(step.device() == params.device(), "step is on ", step.device(),
                    " but params is on ", params.device(),
                    "; keep the count on the params' device");
}

// Outputs: the given buffers (checked) or fresh ones like the inputs.
std::vector<at::Tensor> outputs(const at::Tensor& params, const std::vector<at::Tensor>& states,
                                const c10::optional<std::vector<at::Tensor>>& out) {
  std::vector<at::Tensor> result;
  if (out.has_value()) {
    TORCH_CHECK_VALUE(out->size() == 1 + states.size(), "out must hold ", 1 + states.size(),
                      " buffers (params, then each state), got ", out->size());
    check_same_buffer(params, "params", (*out)[0], "out[0]");
    for (size_t i = 0; i < states.size(); ++i) {
      const std::string name = "out[" + std::to_string(i + 1) + "]";
      check_state(params, (*out)[i + 1], name.c_str());
    }
    return *out;
  }
  result.push_back(fresh_like(params));
  for (const auto& s : states) result.push_back(fresh_like(s));
  return result;
}

// Outputs whose pages are mapped and were written before (out= buffers, or
// buffers the CPU cache reused): the CPU kernels stream their stores there
// when the outputs are large and distinct from the inputs. Into freshly
// mapped pages plain stores are faster (the kernel's zeroing just cached the
// lines).
bool resident(const std::vector<at::Tensor>& result,
              const c10::optional<std::vector<at::Tensor>>& out) {
  return out.has_value() || std::all_of(result.begin(), result.end(), [](const at::Tensor& t) {
           return !t.defined() || cpu_cache_warm(t);
         });
}

[[noreturn]] void unsupported(const char* op, const at::Tensor& t) {
  TORCH_CHECK_VALUE(false, op, ": tensors on ", t.device(), " are not supported by this build (CPU",
#ifdef SOPHON_FAST_WITH_CUDA
                    " and CUDA",
#endif
                    " only)");
  std::abort();
}

#ifdef SOPHON_FAST_WITH_CUDA
cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
void* mut_or_null(const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr() : nullptr; }
#endif

at::Tensor value_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

}  // namespace

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

at::Tensor flat_accumulate_(const at::Tensor& acc, const at::Tensor& grad, double weight) {
  check_flat_buffer(grad, "grad");
  check_flat_buffer(acc, "acc");
  TORCH_CHECK_VALUE(acc.numel() == grad.numel(), "acc has ", acc.numel(), " elements but grad has ",
                    grad.numel(), "; they must match");
  TORCH_CHECK_TYPE(acc.scalar_type() == state_type(grad), "acc must be ", state_type(grad), " for ",
                   grad.scalar_type(), " grad, got ", acc.scalar_type());
  TORCH_CHECK_VALUE(acc.device() == grad.device(), "acc is on ", acc.device(), " but grad is on ",
                    grad.device());
  at::Tensor out = acc;
  if (grad.is_cpu()) {
    flat_accumulate_cpu(out, grad, weight);
    return acc;
  }
#ifdef SOPHON_FAST_WITH_CUDA
  if (grad.is_cuda()) {
    const c10::cuda::CUDAGuard guard(grad.device());
    check_launch(
        sophon_fast_flat_accumulate_cuda(dtype_code(grad.scalar_type()), acc.mutable_data_ptr(),
                                         grad.const_data_ptr(), grad.numel(), weight, stream()),
        "flat_accumulate_ kernel");
    return acc;
  }
#endif
  unsupported("flat_accumulate_", grad);
}

}  // namespace sophon_fast
