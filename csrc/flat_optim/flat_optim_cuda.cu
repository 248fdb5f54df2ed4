// flat_optim, CUDA twin: torch-free kernels and extern "C" launchers for the
// momentum, Adam/AdamW and RMSprop updates, their fused backwards, the clip
// norm and the accumulate. One grid-stride kernel per update: 20 B/param
// (momentum), 28 B/param (Adam), 20 B/param (RMSprop) at fp32. The per-element
// maths is flat_optim_math.h, shared with the CPU loops. Only CUDA headers
// here: the file compiles with plain nvcc in CI, without torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../cuda_elementwise.cuh"
#include "flat_optim_cuda.h"
#include "flat_optim_math.h"

namespace {

using namespace sophon_fast::optim;

using sophon_fast::cuda::by_dtype;
using sophon_fast::cuda::Compute;
using sophon_fast::cuda::grid_for;
using sophon_fast::cuda::load_as;
using sophon_fast::cuda::store_as;

constexpr int kThreads = 256;
// The norm pass writes this many partial sums; the update kernel's every
// thread block reduces them again (4 KiB, L2-resident), so no host read.
constexpr int kNormPartials = 1024;

#define SF_GRID_STRIDE(i, n)                                                \
  for (int64_t i = static_cast<int64_t>(blocks_x_threads_begin()); i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

__device__ __forceinline__ int64_t blocks_x_threads_begin() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// The count of steps taken, read on the device in the dtype the caller keeps
// it in: no host copy and no cast kernel per call.
__device__ __forceinline__ double read_step(const void* step, int step_dtype) {
  switch (step_dtype) {
    case SOPHON_FAST_DTYPE_FLOAT64:
      return *static_cast<const double*>(step);
    case SOPHON_FAST_DTYPE_FLOAT16:
      return __half2float(*static_cast<const __half*>(step));
    case SOPHON_FAST_DTYPE_BFLOAT16:
      return __bfloat162float(*static_cast<const __nv_bfloat16*>(step));
    default:
      return *static_cast<const float*>(step);
  }
}

// (lr / (1 - b1^t), sqrt(1 - b2^t)) in double, rounded once: as torch.optim.
template <typename C>
__device__ __forceinline__ void adam_corrections(const void* step, int step_dtype,
                                                 const SfAdamHp& hp, C& step_size, C& sqrt_bc2) {
  const double t = read_step(step, step_dtype) + 1.0;
  step_size = static_cast<C>(hp.lr / (1.0 - pow(hp.beta1, t)));
  sqrt_bc2 = static_cast<C>(sqrt(1.0 - pow(hp.beta2, t)));
}

// Forward kernels: no __restrict__, the outputs may alias the inputs (in-place
// steps, out= buffers). Backward kernels write fresh buffers only.
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

// kNormPartials blocks, each a grid-stride sum of squares then a shared-memory
// tree: partials[block] = sum over its elements.
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

template <typename T>
__global__ void accumulate_kernel(typename Compute<T>::type* acc, const T* g, int64_t n,
                                  double weight) {
  using C = typename Compute<T>::type;
  const C w = static_cast<C>(weight);
  SF_GRID_STRIDE(i, n) { acc[i] += w * load_as(g, i); }
}

template <typename T>
using S = typename Compute<T>::type;

inline int last_error() { return static_cast<int>(cudaGetLastError()); }

}  // namespace

extern "C" int sophon_fast_norm_partials(void) { return kNormPartials; }

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

extern "C" int sophon_fast_flat_sum_of_squares_cuda(int dtype, const void* x, void* partials,
                                                    int64_t n, cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    sum_of_squares_kernel<T><<<kNormPartials, kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<S<T>*>(partials), n);
    return last_error();
  });
}

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
