// flat_rmsprop, CUDA twin: torch-free kernels and extern "C" launchers of the
// RMSprop update (plain and centered) and its fused backward. One grid-stride
// kernel per update: 20 B/param at fp32 (plain). The per-element maths is
// flat_rmsprop_math.h, shared with the CPU loops. Only CUDA headers here: the
// file compiles with plain nvcc in CI, without torch.
#include <cuda_runtime.h>

#include <cstdint>

#include "../cuda_elementwise.cuh"
#include "flat_optim_device.cuh"
#include "flat_rmsprop_cuda.h"
#include "flat_rmsprop_math.h"

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
__global__ void rmsprop_forward_kernel(const T* p, const T* g, const typename Compute<T>::type* v,
                                       const typename Compute<T>::type* ga, T* out_p,
                                       typename Compute<T>::type* out_v,
                                       typename Compute<T>::type* out_ga, int64_t n,
                                       SfRmspropHp hp) {
  using C = typename Compute<T>::type;
  const bool centered = ga != nullptr;
  SF_GRID_STRIDE(i, n) {
    C new_p, new_v, new_ga = C(0);
    rmsprop_forward<C>(load_as(p, i), load_as(g, i), v[i], centered ? ga[i] : C(0), centered, hp,
                       new_p, new_v, new_ga);
    out_p[i] = store_as<T>(new_p);
    out_v[i] = new_v;
    if (centered) out_ga[i] = new_ga;
  }
}

template <typename T>
__global__ void rmsprop_backward_kernel(
    const T* __restrict__ a, const typename Compute<T>::type* __restrict__ c_v,
    const typename Compute<T>::type* __restrict__ c_ga, const T* __restrict__ p,
    const T* __restrict__ g, const typename Compute<T>::type* __restrict__ v,
    const typename Compute<T>::type* __restrict__ ga, T* __restrict__ gp_out,
    T* __restrict__ gg_out, typename Compute<T>::type* __restrict__ gv_out,
    typename Compute<T>::type* __restrict__ gga_out, int64_t n, SfRmspropHp hp) {
  using C = typename Compute<T>::type;
  const bool centered = ga != nullptr;
  SF_GRID_STRIDE(i, n) {
    C gp, gg, gv, gga = C(0);
    rmsprop_backward<C>(load_as(a, i), c_v[i], centered ? c_ga[i] : C(0),
                        p != nullptr ? load_as(p, i) : C(0), load_as(g, i), v[i],
                        centered ? ga[i] : C(0), centered, hp, gp, gg, gv, gga);
    gp_out[i] = store_as<T>(gp);
    gg_out[i] = store_as<T>(gg);
    gv_out[i] = gv;
    if (centered) gga_out[i] = gga;
  }
}

}  // namespace

extern "C" int sophon_fast_flat_rmsprop_forward_cuda(int dtype, const void* params,
                                                     const void* grad, const void* square_avg,
                                                     const void* grad_avg, void* out_params,
                                                     void* out_square_avg, void* out_grad_avg,
                                                     int64_t n, SfRmspropHp hp,
                                                     cudaStream_t stream) {
  if (n == 0) return 0;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    rmsprop_forward_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const T*>(params), static_cast<const T*>(grad),
        static_cast<const S<T>*>(square_avg), static_cast<const S<T>*>(grad_avg),
        static_cast<T*>(out_params), static_cast<S<T>*>(out_square_avg),
        static_cast<S<T>*>(out_grad_avg), n, hp);
    return last_error();
  });
}

extern "C" int sophon_fast_flat_rmsprop_backward_cuda(
    int dtype, const void* grad_new_params, const void* grad_new_square_avg,
    const void* grad_new_grad_avg, const void* params, const void* grad, const void* square_avg,
    const void* grad_avg, void* grad_params, void* grad_grad, void* grad_square_avg,
    void* grad_grad_avg, int64_t n, SfRmspropHp hp, cudaStream_t stream) {
  if (n == 0) return 0;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    rmsprop_backward_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const T*>(grad_new_params), static_cast<const S<T>*>(grad_new_square_avg),
        static_cast<const S<T>*>(grad_new_grad_avg), static_cast<const T*>(params),
        static_cast<const T*>(grad), static_cast<const S<T>*>(square_avg),
        static_cast<const S<T>*>(grad_avg), static_cast<T*>(grad_params),
        static_cast<T*>(grad_grad), static_cast<S<T>*>(grad_square_avg),
        static_cast<S<T>*>(grad_grad_avg), n, hp);
    return last_error();
  });
}
