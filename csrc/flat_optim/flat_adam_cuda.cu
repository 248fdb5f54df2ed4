// flat_adam, CUDA twin: torch-free kernels and extern "C" launchers of the
// Adam / AdamW update, its fused backward, and the clip norm pass of the
// clip + Adam meta step (the update kernel applies the clip itself). One
// grid-stride kernel per update: 28 B/param at fp32. The per-element maths is
// flat_adam_math.h, shared with the CPU loops. Only CUDA headers here: the
// file compiles with plain nvcc in CI, without torch.
#include <cuda_runtime.h>

#include <cstdint>

#include "../cuda_elementwise.cuh"
#include "flat_adam_cuda.h"
#include "flat_adam_math.h"
#include "flat_optim_device.cuh"

namespace {

using namespace sophon_fast::optim;
using namespace sophon_fast::optim_cuda;

using sophon_fast::cuda::by_dtype;
using sophon_fast::cuda::Compute;
using sophon_fast::cuda::grid_for;
using sophon_fast::cuda::load_as;
using sophon_fast::cuda::store_as;

// The norm pass writes this many partial sums; the update kernel's every
// thread block reduces them again (4 KiB, L2-resident), so no host read.
constexpr int kNormPartials = 1024;

// (lr / (1 - b1^t), sqrt(1 - b2^t)) in double, rounded once: as torch.optim.
template <typename C>
__device__ __forceinline__ void adam_corrections(const void* step, int step_dtype,
                                                 const SfAdamHp& hp, C& step_size, C& sqrt_bc2) {
  const double t = read_step(step, step_dtype) + 1.0;
  step_size = static_cast<C>(hp.lr / (1.0 - pow(hp.beta1, t)));
  sqrt_bc2 = static_cast<C>(sqrt(1.0 - pow(hp.beta2, t)));
}

// Forward kernel: no __restrict__, the outputs may alias the inputs (in-place
// steps, out= buffers). The backward kernel writes fresh buffers only.
template <typename T>
__global__ void adam_forward_kernel(const T* p, const T* g, const typename Compute<T>::type* m,
                                    const typename Compute<T>::type* v, const void* step,
                                    int step_dtype, const typename Compute<T>::type* partials,
                                    double max_norm, T* out_p, typename Compute<T>::type* out_m,
                                    typename Compute<T>::type* out_v, int64_t n, SfAdamHp hp) {
  using C = typename Compute<T>::type;
  C step_size, sqrt_bc2;
  adam_corrections<C>(step, step_dtype, hp, step_size, sqrt_bc2);
  C clip = C(1);
  if (partials != nullptr) {
    __shared__ C block_sum[kThreads];
    C s = C(0);
    for (int j = threadIdx.x; j < kNormPartials; j += blockDim.x) s += partials[j];
    block_sum[threadIdx.x] = s;
    __syncthreads();
    for (int width = kThreads / 2; width > 0; width /= 2) {
      if (threadIdx.x < width) block_sum[threadIdx.x] += block_sum[threadIdx.x + width];
      __syncthreads();
    }
    const C coef = static_cast<C>(max_norm) / (sqrt(block_sum[0]) + C(1e-6));
    clip = coef < C(1) ? coef : C(1);
  }
  SF_GRID_STRIDE(i, n) {
    C new_p, new_m, new_v;
    adam_forward<C>(load_as(p, i), load_as(g, i) * clip, m[i], v[i], step_size, sqrt_bc2, hp, new_p,
                    new_m, new_v);
    out_p[i] = store_as<T>(new_p);
    out_m[i] = new_m;
    out_v[i] = new_v;
  }
}

template <typename T>
__global__ void adam_backward_kernel(
    const T* __restrict__ a, const typename Compute<T>::type* __restrict__ c_m,
    const typename Compute<T>::type* __restrict__ c_v, const T* __restrict__ p,
    const T* __restrict__ g, const typename Compute<T>::type* __restrict__ m,
    const typename Compute<T>::type* __restrict__ v, const void* step, int step_dtype,
    T* __restrict__ gp_out, T* __restrict__ gg_out, typename Compute<T>::type* __restrict__ gm_out,
    typename Compute<T>::type* __restrict__ gv_out, int64_t n, SfAdamHp hp) {
  using C = typename Compute<T>::type;
  C step_size, sqrt_bc2;
  adam_corrections<C>(step, step_dtype, hp, step_size, sqrt_bc2);
  SF_GRID_STRIDE(i, n) {
    C gp, gg, gm, gv;
    adam_backward<C>(load_as(a, i), c_m[i], c_v[i], p != nullptr ? load_as(p, i) : C(0),
                     load_as(g, i), m[i], v[i], step_size, sqrt_bc2, hp, gp, gg, gm, gv);
    gp_out[i] = store_as<T>(gp);
    gg_out[i] = store_as<T>(gg);
    gm_out[i] = gm;
    gv_out[i] = gv;
  }
}

// The clip norm: kNormPartials blocks, each a grid-stride sum of squares then
// a shared-memory tree: partials[block] = sum over its elements.
template <typename T>
__global__ void sum_of_squares_kernel(const T* __restrict__ x,
                                      typename Compute<T>::type* __restrict__ partials, int64_t n) {
  using C = typename Compute<T>::type;
  __shared__ C block_sum[kThreads];
  C s = C(0);
  SF_GRID_STRIDE(i, n) {
    const C xi = load_as(x, i);
    s += xi * xi;
  }
  block_sum[threadIdx.x] = s;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) block_sum[threadIdx.x] += block_sum[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = block_sum[0];
}

}  // namespace

extern "C" int sophon_fast_norm_partials(void) { return kNormPartials; }

extern "C" int sophon_fast_flat_adam_forward_cuda(
    int dtype, const void* params, const void* grad, const void* exp_avg, const void* exp_avg_sq,
    const void* step, int step_dtype, const void* partials, double max_norm, void* out_params,
    void* out_exp_avg, void* out_exp_avg_sq, int64_t n, SfAdamHp hp, cudaStream_t stream) {
  if (n == 0) return 0;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    adam_forward_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const T*>(params), static_cast<const T*>(grad),
        static_cast<const S<T>*>(exp_avg), static_cast<const S<T>*>(exp_avg_sq), step, step_dtype,
        static_cast<const S<T>*>(partials), max_norm, static_cast<T*>(out_params),
        static_cast<S<T>*>(out_exp_avg), static_cast<S<T>*>(out_exp_avg_sq), n, hp);
    return last_error();
  });
}

extern "C" int sophon_fast_flat_adam_backward_cuda(
    int dtype, const void* grad_new_params, const void* grad_new_exp_avg,
    const void* grad_new_exp_avg_sq, const void* params, const void* grad, const void* exp_avg,
    const void* exp_avg_sq, const void* step, int step_dtype, void* grad_params, void* grad_grad,
    void* grad_exp_avg, void* grad_exp_avg_sq, int64_t n, SfAdamHp hp, cudaStream_t stream) {
  if (n == 0) return 0;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    adam_backward_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const T*>(grad_new_params), static_cast<const S<T>*>(grad_new_exp_avg),
        static_cast<const S<T>*>(grad_new_exp_avg_sq), static_cast<const T*>(params),
        static_cast<const T*>(grad), static_cast<const S<T>*>(exp_avg),
        static_cast<const S<T>*>(exp_avg_sq), step, step_dtype, static_cast<T*>(grad_params),
        static_cast<T*>(grad_grad), static_cast<S<T>*>(grad_exp_avg),
        static_cast<S<T>*>(grad_exp_avg_sq), n, hp);
    return last_error();
  });
}

extern "C" int sophon_fast_flat_sum_of_squares_cuda(int dtype, const void* x, void* partials,
                                                    int64_t n, cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    sum_of_squares_kernel<T><<<kNormPartials, kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<S<T>*>(partials), n);
    return last_error();
  });
}
