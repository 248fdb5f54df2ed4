// Torch-free interface of the loss CUDA launchers (raw pointers, sizes, a
// stream). Returns a cudaError_t as int (0 = success).
#pragma once

#include <cstdint>

#include "../dtypes.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st* cudaStream_t;

// One block per row. row_loss: (batch,) float32 (float64 for float64 logits);
// a row whose label is outside [0, classes) gets a NaN loss.
int sophon_fast_classification_loss_cuda(int dtype, const void* logits, int64_t logits_stride_row,
                                         const int64_t* labels, void* grad, void* row_loss,
                                         int64_t batch, int64_t classes, int kind,
                                         cudaStream_t stream);

// partial: (blocks,) float32 (float64 for float64) sums of squares; blocks =
// sophon_fast_mean_square_blocks(n). target may be NULL (zeros).
int sophon_fast_mean_square_blocks(int64_t n);
int sophon_fast_mean_square_loss_cuda(int dtype, const void* prediction, const void* target,
                                      void* grad, void* partial, int64_t n, double grad_scale,
                                      cudaStream_t stream);

#ifdef __cplusplus
}
#endif
