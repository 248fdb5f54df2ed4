// flat_sgd_step, CUDA twin: torch-free kernels and extern "C" launchers.
//
//   forward   out  = p - lr * (g + weight_decay * p)         (12 B/param at
//   fp32) backward  d_p  = (1 - lr * weight_decay) * d_out,
//             d_g  = -lr * d_out                               (12 B/param at
//             fp32)
//
// With weight_decay == 0, d_p is d_out itself: the caller passes grad_params =
// nullptr and the backward only writes d_g (8 B/param), as autograd does for `p
// - lr * g`.
//
// Maths in fp32 for fp32/fp16/bf16 storage (fp64 for fp64) so every backend
// rounds the same way. Only CUDA headers here: the file compiles with plain
// nvcc in CI, without torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../cuda_elementwise.cuh"
#include "flat_sgd_step_cuda.h"

namespace {

using sophon_fast::cuda::by_dtype;
using sophon_fast::cuda::Compute;
using sophon_fast::cuda::grid_for;
using sophon_fast::cuda::load_as;
using sophon_fast::cuda::store_as;

// Grid-stride loops: one launch covers any n, and a capped grid keeps the
// launch cheap for ResNet-18-sized buffers (11.2 M params) without idle blocks.
// The forward takes no __restrict__: out may be params itself (an in-place
// step). The backward writes fresh buffers only.
template <typename T>
__global__ void flat_sgd_step_forward_kernel(const T* params, const T* grad, T* out, int64_t n,
                                             typename Compute<T>::type lr,
                                             typename Compute<T>::type weight_decay) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const auto p = load_as(params, i);
    const auto g = load_as(grad, i);
    out[i] = store_as<T>(p - lr * (g + weight_decay * p));
  }
}

template <typename T>
__global__ void flat_sgd_step_backward_kernel(const T* __restrict__ grad_out,
                                              T* __restrict__ grad_params,
                                              T* __restrict__ grad_grad, int64_t n,
                                              typename Compute<T>::type lr,
                                              typename Compute<T>::type weight_decay) {
  using C = typename Compute<T>::type;
  const C params_scale = C(1) - lr * weight_decay;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const C d = load_as(grad_out, i);
    if (grad_params != nullptr) grad_params[i] = store_as<T>(params_scale * d);
    grad_grad[i] = store_as<T>(-lr * d);
  }
}

constexpr int kThreads = 256;

template <typename T>
int launch_forward(const void* params, const void* grad, void* out, int64_t n, double lr,
                   double weight_decay, cudaStream_t stream) {
  using C = typename Compute<T>::type;
  if (n == 0) return static_cast<int>(cudaSuccess);
  flat_sgd_step_forward_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(
      static_cast<const T*>(params), static_cast<const T*>(grad), static_cast<T*>(out), n,
      static_cast<C>(lr), static_cast<C>(weight_decay));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_backward(const void* grad_out, void* grad_params, void* grad_grad, int64_t n, double lr,
                    double weight_decay, cudaStream_t stream) {
  using C = typename Compute<T>::type;
  if (n == 0) return static_cast<int>(cudaSuccess);
  flat_sgd_step_backward_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(
      static_cast<const T*>(grad_out), static_cast<T*>(grad_params), static_cast<T*>(grad_grad), n,
      static_cast<C>(lr), static_cast<C>(weight_decay));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int sophon_fast_flat_sgd_step_forward_cuda(int dtype, const void* params,
                                                      const void* grad, void* out, int64_t n,
                                                      double lr, double weight_decay,
                                                      cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    return launch_forward<decltype(tag)>(params, grad, out, n, lr, weight_decay, stream);
  });
}

extern "C" int sophon_fast_flat_sgd_step_backward_cuda(int dtype, const void* grad_out,
                                                       void* grad_params, void* grad_grad,
                                                       int64_t n, double lr, double weight_decay,
                                                       cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    return launch_backward<decltype(tag)>(grad_out, grad_params, grad_grad, n, lr, weight_decay,
                                          stream);
  });
}
