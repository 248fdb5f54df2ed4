// flat optimizer family: the input checks and output handling that every
// optimizer's dispatch (flat_momentum.cpp, flat_adam.cpp, flat_rmsprop.cpp,
// flat_adagrad.cpp, flat_adadelta.cpp) shares, defined in flat_optim.cpp.
// Included by dispatch files only: it sees SOPHON_FAST_WITH_CUDA, so whatever
// includes it is compiled once per extension module.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

#ifdef SOPHON_FAST_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

namespace sophon_fast {
namespace optim_dispatch {

// float32 state, float64 for float64 params.
at::ScalarType state_type(const at::Tensor& params);

// t: a flat state buffer matching params (size, state dtype, device).
void check_state(const at::Tensor& params, const at::Tensor& t, const char* name);

// step: a 0-d floating tensor on the params' device.
void check_step(const at::Tensor& params, const at::Tensor& step);

// Outputs: the given buffers (checked) or fresh ones like the inputs.
std::vector<at::Tensor> outputs(const at::Tensor& params, const std::vector<at::Tensor>& states,
                                const c10::optional<std::vector<at::Tensor>>& out);

// Outputs whose pages are mapped and were written before (out= buffers, or
// buffers the CPU cache reused): the CPU kernels stream their stores there
// when the outputs are large and distinct from the inputs. Into freshly
// mapped pages plain stores are faster (the kernel's zeroing just cached the
// lines).
bool resident(const std::vector<at::Tensor>& result,
              const c10::optional<std::vector<at::Tensor>>& out);

// Raises: op has no kernel for t's device in this build.
[[noreturn]] void unsupported(const char* op, const at::Tensor& t);

inline at::Tensor value_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

#ifdef SOPHON_FAST_WITH_CUDA
inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
inline const void* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr() : nullptr;
}
inline void* mut_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr() : nullptr;
}
#endif

}  // namespace optim_dispatch
}  // namespace sophon_fast
