// losses, CUDA twin: torch-free kernels and extern "C" launchers.
//
// classification: one block per row; block reductions give the row maximum and
// the sum of exponentials (twice for ice_paper, with its own maximum over
// j != y), then a second sweep writes the gradient. The row is read twice from
// L2 at most (rows of <= 48 KB stay cached): ~8 B per logit of DRAM traffic at
// fp32. mean square: grid-stride blocks write grad and one partial sum each.
//
// Maths in fp32 for fp32/fp16/bf16 storage (fp64 for fp64), as the other
// backends. Only CUDA headers: compiles with plain nvcc, without torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../cuda_elementwise.cuh"
#include "losses_cuda.h"

namespace {

using sophon_fast::cuda::by_dtype;
using sophon_fast::cuda::Compute;
using sophon_fast::cuda::grid_for;
using sophon_fast::cuda::load_as;
using sophon_fast::cuda::store_as;

__device__ __forceinline__ float exp_c(float x) { return __expf(x); }
__device__ __forceinline__ double exp_c(double x) { return exp(x); }
__device__ __forceinline__ float log_c(float x) { return __logf(x); }
__device__ __forceinline__ double log_c(double x) { return log(x); }

constexpr int kThreads = 256;

// Block-wide max or sum; every thread gets the result.
template <typename C, bool kMax>
__device__ C block_reduce(C v, C* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const C other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = kMax ? (other > v ? other : v) : v + other;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = shared[0];
  for (int w = 1; w < kThreads / 32; ++w)
    v = kMax ? (shared[w] > v ? shared[w] : v) : v + shared[w];
  return v;
}

template <typename T>
__global__ void classification_loss_kernel(const T* __restrict__ logits, int64_t ld,
                                           const int64_t* __restrict__ labels, T* __restrict__ grad,
                                           typename Compute<T>::type* __restrict__ row_loss,
                                           int64_t classes, int kind) {
  using C = typename Compute<T>::type;
  __shared__ C shared[kThreads / 32];
  const int64_t row = blockIdx.x;
  const T* z = logits + row * ld;
  T* g = grad + row * classes;
  const int64_t y = kind == 3 ? 0 : labels[row];
  const bool valid = y >= 0 && y < classes;
  const C sign = kind == 1 ? C(-1) : C(1);
  const C neg_inf = -INFINITY;
  C m = neg_inf, mo = neg_inf, z_sum = 0;
  for (int64_t j = threadIdx.x; j < classes; j += kThreads) {
    const C v = load_as(z, j);
    m = fmax(m, sign * v);
    if (j != y) mo = fmax(mo, v);
    z_sum += v;
  }
  m = block_reduce<C, true>(m, shared);
  if (kind == 2) mo = block_reduce<C, true>(mo, shared);
  if (kind == 3) z_sum = block_reduce<C, false>(z_sum, shared);
  C s = 0, so = 0;
  for (int64_t j = threadIdx.x; j < classes; j += kThreads) {
    const C v = load_as(z, j);
    s += exp_c(sign * v - m);
    if (kind == 2 && j != y) so += exp_c(v - mo);
  }
  s = block_reduce<C, false>(s, shared);
  if (kind == 2) so = block_reduce<C, false>(so, shared);
  const C inv_batch = C(1) / static_cast<C>(gridDim.x);
  const C lse = m + log_c(s);
  for (int64_t j = threadIdx.x; j < classes; j += kThreads) {
    const C v = load_as(z, j);
    const C soft = exp_c(sign * v - m) / s;
    const C one = j == y ? C(1) : C(0);
    C d;
    if (kind == 0) {
      d = soft - one;
    } else if (kind == 1) {
      d = one - soft;
    } else if (kind == 2) {
      d = soft - (j == y ? C(0) : exp_c(v - mo) / so);
    } else {
      d = soft - C(1) / static_cast<C>(classes);
    }
    g[j] = store_as<T>(d * inv_batch);
  }
  if (threadIdx.x == 0) {
    C loss;
    if (kind == 3) {
      loss = lse - z_sum / static_cast<C>(classes) - log_c(static_cast<C>(classes));
    } else if (!valid) {
      loss = NAN;
    } else {
      const C zy = load_as(z, y);
      loss = kind == 0 ? lse - zy : kind == 1 ? zy + lse : lse - (mo + log_c(so));
    }
    row_loss[row] = loss;
  }
}

constexpr int64_t kMaxBlocks = 1024;

int64_t blocks_for(int64_t n) { return grid_for(n, kThreads, kMaxBlocks); }

template <typename T>
__global__ void mean_square_kernel(const T* __restrict__ prediction, const T* __restrict__ target,
                                   T* __restrict__ grad, typename Compute<T>::type* partial,
                                   int64_t n, typename Compute<T>::type scale) {
  using C = typename Compute<T>::type;
  __shared__ C shared[kThreads / 32];
  C acc = 0;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    C d = load_as(prediction, i);
    if (target != nullptr) d -= load_as(target, i);
    grad[i] = store_as<T>(scale * d);
    acc += d * d;
  }
  acc = block_reduce<C, false>(acc, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

template <typename T>
int launch_classification(const void* logits, int64_t ld, const int64_t* labels, void* grad,
                          void* row_loss, int64_t batch, int64_t classes, int kind,
                          cudaStream_t stream) {
  using C = typename Compute<T>::type;
  if (batch == 0) return static_cast<int>(cudaSuccess);
  classification_loss_kernel<T><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), ld, labels, static_cast<T*>(grad), static_cast<C*>(row_loss),
      classes, kind);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_mean_square(const void* prediction, const void* target, void* grad, void* partial,
                       int64_t n, double scale, cudaStream_t stream) {
  using C = typename Compute<T>::type;
  mean_square_kernel<T><<<static_cast<unsigned>(blocks_for(n)), kThreads, 0, stream>>>(
      static_cast<const T*>(prediction), static_cast<const T*>(target), static_cast<T*>(grad),
      static_cast<C*>(partial), n, static_cast<C>(scale));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int sophon_fast_classification_loss_cuda(int dtype, const void* logits,
                                                    int64_t logits_stride_row,
                                                    const int64_t* labels, void* grad,
                                                    void* row_loss, int64_t batch, int64_t classes,
                                                    int kind, cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    return launch_classification<decltype(tag)>(logits, logits_stride_row, labels, grad, row_loss,
                                                batch, classes, kind, stream);
  });
}

extern "C" int sophon_fast_mean_square_blocks(int64_t n) { return static_cast<int>(blocks_for(n)); }

extern "C" int sophon_fast_mean_square_loss_cuda(int dtype, const void* prediction,
                                                 const void* target, void* grad, void* partial,
                                                 int64_t n, double grad_scale,
                                                 cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    return launch_mean_square<decltype(tag)>(prediction, target, grad, partial, n, grad_scale,
                                             stream);
  });
}
