// Device helpers shared by the flat optimizer family's CUDA kernels
// (flat_momentum_cuda.cu, flat_adam_cuda.cu, flat_rmsprop_cuda.cu,
// flat_adagrad_cuda.cu, flat_adadelta_cuda.cu, flat_optim_cuda.cu): the block size, the grid-stride
// loop and the on-device read of the step count. Only CUDA headers: compiles with plain nvcc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../cuda_elementwise.cuh"
#include "../dtypes.h"

namespace sophon_fast {
namespace optim_cuda {

constexpr int kThreads = 256;

#define SF_GRID_STRIDE(i, n)                                                \
  for (int64_t i = static_cast<int64_t>(blocks_x_threads_begin()); i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

__device__ __forceinline__ int64_t blocks_x_threads_begin() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// The count of steps taken, read on the device in the dtype the caller keeps
// it in: no host copy and no cast kernel per call.
__device__ __forceinline__ double read_step(const void* step, int step_dtype) {
  switch (step_dtype) {
    case SOPHON_FAST_DTYPE_FLOAT64:
      return *static_cast<const double*>(step);
    case SOPHON_FAST_DTYPE_FLOAT16:
      return __half2float(*static_cast<const __half*>(step));
    case SOPHON_FAST_DTYPE_BFLOAT16:
      return __bfloat162float(*static_cast<const __nv_bfloat16*>(step));
    default:
      return *static_cast<const float*>(step);
  }
}

// The state (compute) type of storage type T.
template <typename T>
using S = typename sophon_fast::cuda::Compute<T>::type;

inline int last_error() { return static_cast<int>(cudaGetLastError()); }

}  // namespace optim_cuda
}  // namespace sophon_fast
