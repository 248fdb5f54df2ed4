// Torch-free interface of the Adagrad CUDA launchers (flat_adagrad_cuda.cu);
// the conventions every flat optimizer launcher follows: flat_optim_cuda.h.
#pragma once

#include "flat_optim_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct SfAdagradHp {
  double lr, lr_decay, weight_decay, eps;
} SfAdagradHp;

int sophon_fast_flat_adagrad_forward_cuda(int dtype, const void* params, const void* grad,
                                          const void* state_sum, const void* step, int step_dtype,
                                          void* out_params, void* out_sum, int64_t n,
                                          SfAdagradHp hp, cudaStream_t stream);

// params may be NULL (weight_decay == 0: the VJP does not read them).
int sophon_fast_flat_adagrad_backward_cuda(int dtype, const void* grad_new_params,
                                           const void* grad_new_sum, const void* params,
                                           const void* grad, const void* state_sum,
                                           const void* step, int step_dtype, void* grad_params,
                                           void* grad_grad, void* grad_sum, int64_t n,
                                           SfAdagradHp hp, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
