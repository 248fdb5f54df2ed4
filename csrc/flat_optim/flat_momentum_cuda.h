// Torch-free interface of the momentum SGD CUDA launchers (flat_momentum_cuda.cu);
// the conventions every flat optimizer launcher follows: flat_optim_cuda.h.
#pragma once

#include "flat_optim_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct SfMomentumHp {
  double lr, momentum, dampening, weight_decay;
  int nesterov;
} SfMomentumHp;

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

#ifdef __cplusplus
}
#endif
