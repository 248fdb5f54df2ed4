// Torch-free interface of the flat_optim CUDA launchers: raw pointers, sizes,
// plain-C hyper-parameter structs and a stream. Each returns a cudaError_t as
// int (0 = success). `dtype` is the parameter dtype (csrc/dtypes.h); state
// buffers are float32 (float64 for float64 parameters). Outputs of the forward
// launchers (and acc) may alias their inputs (in-place steps, out= buffers):
// those kernels take no __restrict__ pointers; backward outputs are fresh.
// `step` points to the count of steps taken before this one, on the same
// device, in the floating dtype `step_dtype` (a csrc/dtypes.h code); kernels
// read it, nothing reads it on the host.
#pragma once

#include <stdint.h>

#include "../dtypes.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st* cudaStream_t;

typedef struct SfMomentumHp {
  double lr, momentum, dampening, weight_decay;
  int nesterov;
} SfMomentumHp;

typedef struct SfAdamHp {
  double lr, beta1, beta2, eps, weight_decay;
  int decoupled;
} SfAdamHp;

typedef struct SfRmspropHp {
  double lr, alpha, eps, weight_decay;
} SfRmspropHp;

int sophon_fast_flat_momentum_forward_cuda(int dtype, const void* params, const void* grad,
                                           const void* buf, const void* step, int step_dtype,
                                           void* out_params, void* out_buf, int64_t n,
                                           SfMomentumHp hp, cudaStream_t stream);

// grad_params may be NULL (weight_decay == 0: it equals grad_new_params).
int sophon_fast_flat_momentum_backward_cuda(int dtype, const void* grad_new_params,
                                            const void* grad_new_buf, const void* step,
                                            int step_dtype, void* grad_params, void* grad_grad,
                                            void* grad_buf, int64_t n, SfMomentumHp hp,
                                            cudaStream_t stream);

// partials: NULL (no clipping) or sophon_fast_norm_partials() state-dtype
// sums of squares of grad written by sophon_fast_flat_sum_of_squares_cuda;
// the kernel then scales grad by min(1, max_norm / (norm + 1e-6)).
int sophon_fast_flat_adam_forward_cuda(int dtype, const void* params, const void* grad,
                                       const void* exp_avg, const void* exp_avg_sq,
                                       const void* step, int step_dtype, const void* partials,
                                       double max_norm, void* out_params, void* out_exp_avg,
                                       void* out_exp_avg_sq, int64_t n, SfAdamHp hp,
                                       cudaStream_t stream);

// params may be NULL unless L2 (not decoupled) weight decay is non-zero.
int sophon_fast_flat_adam_backward_cuda(
    int dtype, const void* grad_new_params, const void* grad_new_exp_avg,
    const void* grad_new_exp_avg_sq, const void* params, const void* grad, const void* exp_avg,
    const void* exp_avg_sq, const void* step, int step_dtype, void* grad_params, void* grad_grad,
    void* grad_exp_avg, void* grad_exp_avg_sq, int64_t n, SfAdamHp hp, cudaStream_t stream);

// grad_avg / out_grad_avg NULL: not centered.
int sophon_fast_flat_rmsprop_forward_cuda(int dtype, const void* params, const void* grad,
                                          const void* square_avg, const void* grad_avg,
                                          void* out_params, void* out_square_avg,
                                          void* out_grad_avg, int64_t n, SfRmspropHp hp,
                                          cudaStream_t stream);

int sophon_fast_flat_rmsprop_backward_cuda(int dtype, const void* grad_new_params,
                                           const void* grad_new_square_avg,
                                           const void* grad_new_grad_avg, const void* params,
                                           const void* grad, const void* square_avg,
                                           const void* grad_avg, void* grad_params, void* grad_grad,
                                           void* grad_square_avg, void* grad_grad_avg, int64_t n,
                                           SfRmspropHp hp, cudaStream_t stream);

// Number of state-dtype partial sums the norm pass writes.
int sophon_fast_norm_partials(void);

int sophon_fast_flat_sum_of_squares_cuda(int dtype, const void* x, void* partials, int64_t n,
                                         cudaStream_t stream);

// acc (state dtype) += weight * grad (dtype).
int sophon_fast_flat_accumulate_cuda(int dtype, void* acc, const void* grad, int64_t n,
                                     double weight, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
