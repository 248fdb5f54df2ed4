// Torch-free interface of the flat_sgd_step CUDA launchers (raw pointers,
// sizes, a stream). Returns a cudaError_t as int (0 = success) so the binding
// can report it in words. out may equal params (in-place step). grad_params may
// be NULL: only grad_grad is written.
#pragma once

#include <cstdint>

#include "../dtypes.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st* cudaStream_t;

int sophon_fast_flat_sgd_step_forward_cuda(int dtype, const void* params, const void* grad,
                                           void* out, int64_t n, double lr, double weight_decay,
                                           cudaStream_t stream);

int sophon_fast_flat_sgd_step_backward_cuda(int dtype, const void* grad_out, void* grad_params,
                                            void* grad_grad, int64_t n, double lr,
                                            double weight_decay, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
