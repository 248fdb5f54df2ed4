// flat optimizer family, CUDA: the accumulate (acc += weight * grad), which
// every optimizer's gradient accumulation shares. The optimizers' own kernels:
// flat_momentum_cuda.cu, flat_adam_cuda.cu (with the clip norm),
// flat_rmsprop_cuda.cu, flat_adagrad_cuda.cu, flat_adadelta_cuda.cu. Only CUDA
// headers here: the file compiles with plain nvcc in CI, without torch.
#include <cuda_runtime.h>

#include <cstdint>

#include "../cuda_elementwise.cuh"
#include "flat_optim_cuda.h"
#include "flat_optim_device.cuh"

namespace {

using namespace sophon_fast::optim_cuda;

using sophon_fast::cuda::by_dtype;
using sophon_fast::cuda::Compute;
using sophon_fast::cuda::grid_for;
using sophon_fast::cuda::load_as;

template <typename T>
__global__ void accumulate_kernel(typename Compute<T>::type* acc, const T* g, int64_t n,
                                  double weight) {
  using C = typename Compute<T>::type;
  const C w = static_cast<C>(weight);
  SF_GRID_STRIDE(i, n) { acc[i] += w * load_as(g, i); }
}

}  // namespace

extern "C" int sophon_fast_flat_accumulate_cuda(int dtype, void* acc, const void* grad, int64_t n,
                                                double weight, cudaStream_t stream) {
  if (n == 0) return 0;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    accumulate_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<S<T>*>(acc), static_cast<const T*>(grad), n, weight);
    return last_error();
  });
}
