// flat_momentum, CUDA twin: torch-free kernels and extern "C" launchers of the
// momentum SGD update and its fused backward. One grid-stride kernel per
// update: 20 B/param at fp32. The per-element maths is flat_momentum_math.h,
// shared with the CPU loops. Only CUDA headers here: the file compiles with
// plain nvcc in CI, without torch.
#include <cuda_runtime.h>

#include <cstdint>

#include "../cuda_elementwise.cuh"
#include "flat_momentum_cuda.h"
#include "flat_momentum_math.h"
#include "flat_optim_device.cuh"

namespace {

using namespace sophon_fast::optim;
using namespace sophon_fast::optim_cuda;

using sophon_fast::cuda::by_dtype;
using sophon_fast::cuda::Compute;
using sophon_fast::cuda::grid_for;
using sophon_fast::cuda::load_as;
using sophon_fast::cuda::store_as;

// Forward kernel: no __restrict__, the outputs may alias the inputs (in-place
// steps, out= buffers). The backward kernel writes fresh buffers only.
template <typename T>
__global__ void momentum_forward_kernel(const T* p, const T* g, const typename Compute<T>::type* b,
                                        const void* step, int step_dtype, T* out_p,
                                        typename Compute<T>::type* out_b, int64_t n,
                                        SfMomentumHp hp) {
  using C = typename Compute<T>::type;
  const bool first = read_step(step, step_dtype) == 0.0;
  SF_GRID_STRIDE(i, n) {
    C new_p, new_b;
    momentum_forward<C>(load_as(p, i), load_as(g, i), b[i], first, hp, new_p, new_b);
    out_p[i] = store_as<T>(new_p);
    out_b[i] = new_b;
  }
}

template <typename T>
__global__ void momentum_backward_kernel(const T* __restrict__ a,
                                         const typename Compute<T>::type* __restrict__ c,
                                         const void* step, int step_dtype, T* grad_params,
                                         T* __restrict__ grad_grad,
                                         typename Compute<T>::type* __restrict__ grad_buf,
                                         int64_t n, SfMomentumHp hp) {
  using C = typename Compute<T>::type;
  const bool first = read_step(step, step_dtype) == 0.0;
  SF_GRID_STRIDE(i, n) {
    C gp, gg, gb;
    momentum_backward<C>(load_as(a, i), c[i], first, hp, gp, gg, gb);
    if (grad_params != nullptr) grad_params[i] = store_as<T>(gp);
    grad_grad[i] = store_as<T>(gg);
    grad_buf[i] = gb;
  }
}

}  // namespace

extern "C" int sophon_fast_flat_momentum_forward_cuda(int dtype, const void* params,
                                                      const void* grad, const void* buf,
                                                      const void* step, int step_dtype,
                                                      void* out_params, void* out_buf, int64_t n,
                                                      SfMomentumHp hp, cudaStream_t stream) {
  if (n == 0) return 0;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    momentum_forward_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const T*>(params), static_cast<const T*>(grad), static_cast<const S<T>*>(buf),
        step, step_dtype, static_cast<T*>(out_params), static_cast<S<T>*>(out_buf), n, hp);
    return last_error();
  });
}

extern "C" int sophon_fast_flat_momentum_backward_cuda(int dtype, const void* grad_new_params,
                                                       const void* grad_new_buf, const void* step,
                                                       int step_dtype, void* grad_params,
                                                       void* grad_grad, void* grad_buf, int64_t n,
                                                       SfMomentumHp hp, cudaStream_t stream) {
  if (n == 0) return 0;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    momentum_backward_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const T*>(grad_new_params), static_cast<const S<T>*>(grad_new_buf), step,
        step_dtype, static_cast<T*>(grad_params), static_cast<T*>(grad_grad),
        static_cast<S<T>*>(grad_buf), n, hp);
    return last_error();
  });
}
