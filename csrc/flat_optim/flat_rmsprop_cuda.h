// Torch-free interface of the RMSprop CUDA launchers (flat_rmsprop_cuda.cu);
// the conventions every flat optimizer launcher follows: flat_optim_cuda.h.
#pragma once

#include "flat_optim_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct SfRmspropHp {
  double lr, alpha, eps, weight_decay;
} SfRmspropHp;

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

#ifdef __cplusplus
}
#endif
