// Input checks shared by every binding: messages name the argument and say what
// was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace sophon_fast {

inline void check_flat_buffer(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1, name,
                    " must be a 1-D flat buffer of shape (n_params,), got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (call .contiguous() first)");
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

inline void check_same_buffer(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                              const char* name) {
  check_flat_buffer(t, name);
  TORCH_CHECK_VALUE(t.numel() == ref.numel(), name, " has ", t.numel(), " elements but ", ref_name,
                    " has ", ref.numel(), "; they must match");
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(),
                   " but ", ref_name, " has dtype ", ref.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device(), "; they must be on the same device");
}

}  // namespace sophon_fast
