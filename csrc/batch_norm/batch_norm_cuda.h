// Torch-free interface of the batch_norm CUDA launchers (raw pointers, sizes,
// a stream). Returns a cudaError_t as int (0 = success).
//
// workspace: sophon_fast_batch_norm_cuda_workspace(batch, channels, spatial)
// compute-dtype values on x's device, asked for with that device current
// (the chunk count depends on its SM count); the launchers use it as scratch
// for per-chunk partial sums, stream-ordered.
//
// Tensors of shape (batch, channels, spatial) are NCHW-contiguous in the
// storage dtype `dtype`; per-channel arrays (weight, bias, running stats,
// mean, invstd, dweight, dbias, gweight, grad_dweight, grad_dbias) are
// (channels,) in the compute dtype: float32 for float32/float16/bfloat16
// storage, float64 for float64. Optional pointers may be NULL (absent).
#pragma once

#include <cstdint>

#include "../dtypes.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st* cudaStream_t;

// Compute-dtype values of scratch the launchers below need for these sizes.
int64_t sophon_fast_batch_norm_cuda_workspace(int64_t batch, int64_t channels, int64_t spatial);

// y = weight (x - mean) invstd + bias; writes mean and invstd and each given
// running statistic: running = momentum * batch + (1 - momentum) * running,
// the batch variance unbiased.
int sophon_fast_batch_norm_forward_cuda(int dtype, const void* x, const void* weight,
                                        const void* bias, void* y, void* mean, void* invstd,
                                        void* running_mean, void* running_var, void* workspace,
                                        int64_t batch, int64_t channels, int64_t spatial,
                                        double momentum, double eps, cudaStream_t stream);

// dx (storage dtype), dweight and dbias (compute dtype).
int sophon_fast_batch_norm_backward_cuda(int dtype, const void* x, const void* weight,
                                         const void* grad_y, const void* mean, const void* invstd,
                                         void* dx, void* dweight, void* dbias, void* workspace,
                                         int64_t batch, int64_t channels, int64_t spatial,
                                         cudaStream_t stream);

// VJP of the backward for (grad_dx, grad_dweight, grad_dbias): gx and ggrad_y
// (storage dtype), gweight (compute dtype).
int sophon_fast_batch_norm_double_backward_cuda(int dtype, const void* x, const void* weight,
                                                const void* grad_y, const void* mean,
                                                const void* invstd, const void* grad_dx,
                                                const void* grad_dweight, const void* grad_dbias,
                                                void* gx, void* gweight, void* ggrad_y,
                                                void* workspace, int64_t batch, int64_t channels,
                                                int64_t spatial, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
