// flat optimizer family: the checks and output handling every optimizer's
// dispatch shares (flat_optim_dispatch.h), and the accumulate's checks and
// device dispatch (CPU kernel in flat_optim_cpu.cpp, CUDA through the
// torch-free launcher of flat_optim_cuda.cu when the extension is built with
// CUDA). The optimizers' own dispatch: flat_momentum.cpp, flat_adam.cpp,
// flat_rmsprop.cpp, flat_adagrad.cpp, flat_adadelta.cpp.
#include "flat_optim.h"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "../alloc.h"
#include "../checks.h"
#include "flat_optim_dispatch.h"

#ifdef SOPHON_FAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>

#include "../cuda_launch.h"
#endif

namespace sophon_fast {
namespace optim_dispatch {

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

}  // namespace optim_dispatch

at::Tensor flat_accumulate_(const at::Tensor& acc, const at::Tensor& grad, double weight) {
  using namespace optim_dispatch;  // NOLINT(build/namespaces): the shared checks
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
