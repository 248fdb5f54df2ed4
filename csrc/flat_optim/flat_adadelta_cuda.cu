// flat_adadelta, CUDA twin: torch-free kernels and extern "C" launchers of the
// Adadelta update and its fused backward. One grid-stride kernel per update:
// 28 B/param at fp32. The per-element maths is flat_adadelta_math.h, shared
// with the CPU loops. Only CUDA headers here: the file compiles with plain
// nvcc in CI, without torch.
#include <cuda_runtime.h>

#include <cstdint>

#include "../cuda_elementwise.cuh"
#include "flat_adadelta_cuda.h"
#include "flat_adadelta_math.h"
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
__global__ void adadelta_forward_kernel(const T* p, const T* g, const typename Compute<T>::type* v,
                                        const typename Compute<T>::type* u, T* out_p,
                                        typename Compute<T>::type* out_v,
                                        typename Compute<T>::type* out_u, int64_t n,
                                        SfAdadeltaHp hp) {
  using C = typename Compute<T>::type;
  SF_GRID_STRIDE(i, n) {
    C new_p, new_v, new_u;
    adadelta_forward<C>(load_as(p, i), load_as(g, i), v[i], u[i], hp, new_p, new_v, new_u);
    out_p[i] = store_as<T>(new_p);
    out_v[i] = new_v;
    out_u[i] = new_u;
  }
}

template <typename T>
__global__ void adadelta_backward_kernel(
    const T* __restrict__ a, const typename Compute<T>::type* __restrict__ c_v,
    const typename Compute<T>::type* __restrict__ c_u, const T* __restrict__ p,
    const T* __restrict__ g, const typename Compute<T>::type* __restrict__ v,
    const typename Compute<T>::type* __restrict__ u, T* __restrict__ gp_out, T* __restrict__ gg_out,
    typename Compute<T>::type* __restrict__ gv_out, typename Compute<T>::type* __restrict__ gu_out,
    int64_t n, SfAdadeltaHp hp) {
  using C = typename Compute<T>::type;
  SF_GRID_STRIDE(i, n) {
    C gp, gg, gv, gu;
    adadelta_backward<C>(load_as(a, i), c_v[i], c_u[i], p != nullptr ? load_as(p, i) : C(0),
                         load_as(g, i), v[i], u[i], hp, gp, gg, gv, gu);
    gp_out[i] = store_as<T>(gp);
    gg_out[i] = store_as<T>(gg);
    gv_out[i] = gv;
    gu_out[i] = gu;
  }
}

}  // namespace

extern "C" int sophon_fast_flat_adadelta_forward_cuda(int dtype, const void* params,
                                                      const void* grad, const void* square_avg,
                                                      const void* acc_delta, void* out_params,
                                                      void* out_square_avg, void* out_acc_delta,
                                                      int64_t n, SfAdadeltaHp hp,
                                                      cudaStream_t stream) {
  if (n == 0) return 0;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    adadelta_forward_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const T*>(params), static_cast<const T*>(grad),
        static_cast<const S<T>*>(square_avg), static_cast<const S<T>*>(acc_delta),
        static_cast<T*>(out_params), static_cast<S<T>*>(out_square_avg),
        static_cast<S<T>*>(out_acc_delta), n, hp);
    return last_error();
  });
}

extern "C" int sophon_fast_flat_adadelta_backward_cuda(
    int dtype, const void* grad_new_params, const void* grad_new_square_avg,
    const void* grad_new_acc_delta, const void* params, const void* grad, const void* square_avg,
    const void* acc_delta, void* grad_params, void* grad_grad, void* grad_square_avg,
    void* grad_acc_delta, int64_t n, SfAdadeltaHp hp, cudaStream_t stream) {
  if (n == 0) return 0;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    adadelta_backward_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const T*>(grad_new_params), static_cast<const S<T>*>(grad_new_square_avg),
        static_cast<const S<T>*>(grad_new_acc_delta), static_cast<const T*>(params),
        static_cast<const T*>(grad), static_cast<const S<T>*>(square_avg),
        static_cast<const S<T>*>(acc_delta), static_cast<T*>(grad_params),
        static_cast<T*>(grad_grad), static_cast<S<T>*>(grad_square_avg),
        static_cast<S<T>*>(grad_acc_delta), n, hp);
    return last_error();
  });
}
