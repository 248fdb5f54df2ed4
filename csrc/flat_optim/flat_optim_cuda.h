// Torch-free interface of the flat optimizer family's CUDA launchers, the part
// every optimizer shares: the stream type, and the accumulate
// (flat_optim_cuda.cu). Each optimizer's own launchers and hyper-parameter
// struct: flat_momentum_cuda.h, flat_adam_cuda.h, flat_rmsprop_cuda.h,
// flat_adagrad_cuda.h, flat_adadelta_cuda.h.
//
// Every launcher takes raw pointers, sizes, plain-C hyper-parameter structs
// and a stream, and returns a cudaError_t as int (0 = success). `dtype` is
// the parameter dtype (csrc/dtypes.h); state buffers are float32 (float64
// for float64 parameters). Outputs of the forward launchers (and acc) may
// alias their inputs (in-place steps, out= buffers): those kernels take no
// __restrict__ pointers; backward outputs are fresh. `step` points to the
// count of steps taken before this one, on the same device, in the floating
// dtype `step_dtype` (a csrc/dtypes.h code); kernels read it, nothing reads
// it on the host.
#pragma once

#include <stdint.h>

#include "../dtypes.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st* cudaStream_t;

// acc (state dtype) += weight * grad (dtype).
int sophon_fast_flat_accumulate_cuda(int dtype, void* acc, const void* grad, int64_t n,
                                     double weight, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
