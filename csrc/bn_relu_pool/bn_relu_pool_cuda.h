// Torch-free interface of the bn_relu_pool CUDA launchers (raw pointers,
// sizes, a stream). Returns a cudaError_t as int (0 = success).
//
// x and dx are (batch, channels, height, width), y and grad_y (batch,
// channels, height / 2, width / 2), all NCHW-contiguous in the storage dtype
// `dtype`; per-channel arrays (weight, bias, running stats, mean, invstd,
// dweight, dbias) are (channels,) in the compute dtype: float32 for
// float32/float16/bfloat16 storage, float64 for float64. Optional pointers
// may be NULL (absent). height, width >= 2.
//
// workspace: sophon_fast_bn_relu_pool_cuda_workspace(batch, channels, height,
// width) compute-dtype values on x's device, asked for with that device
// current (the chunk counts depend on its SM count); scratch for per-chunk
// partial sums, stream-ordered.
#pragma once

#include <cstdint>

#include "../dtypes.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st* cudaStream_t;

// Compute-dtype values of scratch the launchers below need for these sizes.
int64_t sophon_fast_bn_relu_pool_cuda_workspace(int64_t batch, int64_t channels, int64_t height,
                                                int64_t width);

// y = max over 2x2 windows of relu(weight (x - mean) invstd + bias); writes
// mean and invstd and each given running statistic: running = momentum *
// batch + (1 - momentum) * running, the batch variance unbiased.
int sophon_fast_bn_relu_pool_forward_cuda(int dtype, const void* x, const void* weight,
                                          const void* bias, void* y, void* mean, void* invstd,
                                          void* running_mean, void* running_var, void* workspace,
                                          int64_t batch, int64_t channels, int64_t height,
                                          int64_t width, double momentum, double eps,
                                          cudaStream_t stream);

// dx (storage dtype), dweight and dbias (compute dtype) from the pooled
// gradient; each window's arg-max is recomputed from x.
int sophon_fast_bn_relu_pool_backward_cuda(int dtype, const void* x, const void* weight,
                                           const void* bias, const void* grad_y, const void* mean,
                                           const void* invstd, void* dx, void* dweight, void* dbias,
                                           void* workspace, int64_t batch, int64_t channels,
                                           int64_t height, int64_t width, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
