// Torch-free interface of the Adadelta CUDA launchers (flat_adadelta_cuda.cu);
// the conventions every flat optimizer launcher follows: flat_optim_cuda.h.
#pragma once

#include "flat_optim_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct SfAdadeltaHp {
  double lr, rho, eps, weight_decay;
} SfAdadeltaHp;

int sophon_fast_flat_adadelta_forward_cuda(int dtype, const void* params, const void* grad,
                                           const void* square_avg, const void* acc_delta,
                                           void* out_params, void* out_square_avg,
                                           void* out_acc_delta, int64_t n, SfAdadeltaHp hp,
                                           cudaStream_t stream);

// params may be NULL (weight_decay == 0: the VJP does not read them).
int sophon_fast_flat_adadelta_backward_cuda(
    int dtype, const void* grad_new_params, const void* grad_new_square_avg,
    const void* grad_new_acc_delta, const void* params, const void* grad, const void* square_avg,
    const void* acc_delta, void* grad_params, void* grad_grad, void* grad_square_avg,
    void* grad_acc_delta, int64_t n, SfAdadeltaHp hp, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
