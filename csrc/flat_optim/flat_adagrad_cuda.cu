// flat_adagrad, CUDA twin: torch-free kernels and extern "C" launchers of the
// Adagrad update and its fused backward. One grid-stride kernel per update:
// 20 B/param at fp32. The per-element maths is flat_adagrad_math.h, shared
// with the CPU loops; the decayed learning rate is computed on the device from
// the step count (no host copy). Only CUDA headers here: the file compiles
// with plain nvcc in CI, without torch.
#include <cuda_runtime.h>

#include <cstdint>

#include "../cuda_elementwise.cuh"
#include "flat_adagrad_cuda.h"
#include "flat_adagrad_math.h"
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
__global__ void adagrad_forward_kernel(const T* p, const T* g, const typename Compute<T>::type* s,
                                       const void* step, int step_dtype, T* out_p,
                                       typename Compute<T>::type* out_s, int64_t n,
                                       SfAdagradHp hp) {
  using C = typename Compute<T>::type;
  const C clr = adagrad_learning_rate<C>(read_step(step, step_dtype), hp);
  SF_GRID_STRIDE(i, n) {
    C new_p, new_s;
    adagrad_forward<C>(load_as(p, i), load_as(g, i), s[i], clr, hp, new_p, new_s);
    out_p[i] = store_as<T>(new_p);
    out_s[i] = new_s;
  }
}

template <typename T>
__global__ void adagrad_backward_kernel(const T* __restrict__ a,
                                        const typename Compute<T>::type* __restrict__ c_s,
                                        const T* __restrict__ p, const T* __restrict__ g,
                                        const typename Compute<T>::type* __restrict__ s,
                                        const void* step, int step_dtype, T* __restrict__ gp_out,
                                        T* __restrict__ gg_out,
                                        typename Compute<T>::type* __restrict__ gs_out, int64_t n,
                                        SfAdagradHp hp) {
  using C = typename Compute<T>::type;
  const C clr = adagrad_learning_rate<C>(read_step(step, step_dtype), hp);
  SF_GRID_STRIDE(i, n) {
    C gp, gg, gs;
    adagrad_backward<C>(load_as(a, i), c_s[i], p != nullptr ? load_as(p, i) : C(0), load_as(g, i),
                        s[i], clr, hp, gp, gg, gs);
    gp_out[i] = store_as<T>(gp);
    gg_out[i] = store_as<T>(gg);
    gs_out[i] = gs;
  }
}

}  // namespace

extern "C" int sophon_fast_flat_adagrad_forward_cuda(int dtype, const void* params,
                                                     const void* grad, const void* state_sum,
                                                     const void* step, int step_dtype,
                                                     void* out_params, void* out_sum, int64_t n,
                                                     SfAdagradHp hp, cudaStream_t stream) {
  if (n == 0) return 0;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    adagrad_forward_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const T*>(params), static_cast<const T*>(grad),
        static_cast<const S<T>*>(state_sum), step, step_dtype, static_cast<T*>(out_params),
        static_cast<S<T>*>(out_sum), n, hp);
    return last_error();
  });
}

extern "C" int sophon_fast_flat_adagrad_backward_cuda(
    int dtype, const void* grad_new_params, const void* grad_new_sum, const void* params,
    const void* grad, const void* state_sum, const void* step, int step_dtype, void* grad_params,
    void* grad_grad, void* grad_sum, int64_t n, SfAdagradHp hp, cudaStream_t stream) {
  if (n == 0) return 0;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    adagrad_backward_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const T*>(grad_new_params), static_cast<const S<T>*>(grad_new_sum),
        static_cast<const T*>(params), static_cast<const T*>(grad),
        static_cast<const S<T>*>(state_sum), step, step_dtype, static_cast<T*>(grad_params),
        static_cast<T*>(grad_grad), static_cast<S<T>*>(grad_sum), n, hp);
    return last_error();
  });
}
