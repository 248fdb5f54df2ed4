// Per-channel block reductions shared by the BatchNorm-family CUDA kernels
// (batch_norm_cuda.cu, bn_relu_pool_cuda.cu): one block of kChannelThreads
// threads per channel. Only CUDA headers: compiles with plain nvcc.
#pragma once

#include <cuda_runtime.h>

namespace sophon_fast {
namespace cuda {

constexpr int kChannelThreads = 256;

__device__ __forceinline__ float rsqrt_c(float x) { return rsqrtf(x); }
__device__ __forceinline__ double rsqrt_c(double x) { return rsqrt(x); }

// Block-wide sum; every thread gets the result. shared: kChannelThreads / 32
// values.
template <typename C>
__device__ C block_sum(C v, C* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = shared[0];
  for (int w = 1; w < kChannelThreads / 32; ++w) v += shared[w];
  return v;
}

// Running statistics of channel c as torch: momentum * batch + (1 - momentum)
// * running, the variance unbiased over count values. Either may be null.
template <typename C>
__device__ __forceinline__ void update_running(C* running_mean, C* running_var, int64_t c, C mean,
                                               C var, C count, double momentum) {
  const C m = static_cast<C>(momentum);
  if (running_mean != nullptr) running_mean[c] = m * mean + (C(1) - m) * running_mean[c];
  if (running_var != nullptr)
    running_var[c] = m * var * count / (count - C(1)) + (C(1) - m) * running_var[c];
}

}  // namespace cuda
}  // namespace sophon_fast
