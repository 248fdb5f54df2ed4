// Torch-free interface of the Adam / AdamW CUDA launchers and of the clip
// norm pass of the clip + Adam meta step (flat_adam_cuda.cu); the conventions
// every flat optimizer launcher follows: flat_optim_cuda.h.
#pragma once

#include "flat_optim_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct SfAdamHp {
  double lr, beta1, beta2, eps, weight_decay;
  int decoupled;
} SfAdamHp;

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

// Number of state-dtype partial sums the norm pass writes.
int sophon_fast_norm_partials(void);

int sophon_fast_flat_sum_of_squares_cuda(int dtype, const void* x, void* partials, int64_t n,
                                         cudaStream_t stream);

#ifdef __cplusplus
}
#endif
