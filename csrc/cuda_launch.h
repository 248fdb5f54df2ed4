// Torch-side helpers for calling the torch-free CUDA launchers (only in CUDA builds).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include "dtypes.h"

namespace sophon_fast {

// The launchers' dtype code of a floating tensor (callers have checked the dtype).
inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return SOPHON_FAST_DTYPE_FLOAT32;
    case at::kDouble:
      return SOPHON_FAST_DTYPE_FLOAT64;
    case at::kHalf:
      return SOPHON_FAST_DTYPE_FLOAT16;
    default:
      return SOPHON_FAST_DTYPE_BFLOAT16;
  }
}

// Launchers return a cudaError_t as int; report a failure in words.
inline void check_launch(int status, const char* what) {
  TORCH_CHECK(status == 0, what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(status)));
}

}  // namespace sophon_fast
