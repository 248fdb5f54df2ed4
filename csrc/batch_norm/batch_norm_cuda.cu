// batch_norm, CUDA twin: torch-free kernels and extern "C" launchers.
//
// The CUDA mirror of the Triton kernels (sophon_fast/ops/batch_norm.py): each
// stage is two launches over a (channel, chunk) grid (../cuda_channel.cuh):
// per-chunk partials (forward: count, mean, M2; backward: 2 sums; double
// backward: 5 sums) in a workspace the binding allocates
// (sophon_fast_batch_norm_cuda_workspace), then a pass whose blocks combine
// their channel's partials and map their chunk's values. A channel is a
// (batch, H * W) matrix of the NCHW planes; index math is a row times the row
// stride (channels * H * W) plus a column, never a divide per element. The
// double backward reads x, grad_y, grad_dx twice and writes two tensors (32
// B/element at fp32) where eager autograd runs ~100 ops per layer. Maths as
// csrc/batch_norm/batch_norm_cpu.cpp (same closed forms), in fp32 for
// fp32/fp16/bf16 storage, fp64 for fp64. Only CUDA headers: compiles with
// plain nvcc, without torch. Compiled by make cuda-check; not run on a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../cuda_channel.cuh"
#include "../cuda_elementwise.cuh"
#include "batch_norm_cuda.h"

namespace {

using sophon_fast::cuda::block_sum;
using sophon_fast::cuda::by_dtype;
using sophon_fast::cuda::channel_moments;
using sophon_fast::cuda::channel_stats_kernel;
using sophon_fast::cuda::channel_sum;
using sophon_fast::cuda::ChunkPlan;
using sophon_fast::cuda::Compute;
using sophon_fast::cuda::load_as;
using sophon_fast::cuda::rsqrt_c;
using sophon_fast::cuda::store_as;
using sophon_fast::cuda::update_running;

constexpr int kThreads = sophon_fast::cuda::kChannelThreads;

// Walks this thread's values of chunk blockIdx.y of channel blockIdx.x:
// fn(offset) for each, offset into the NCHW tensor.
template <typename Fn>
__device__ __forceinline__ void for_chunk(const ChunkPlan& p, Fn&& fn) {
  const int64_t c = blockIdx.x, row_stride = static_cast<int64_t>(gridDim.x) * p.cols;
  const int tr = p.thread_row(), ts = p.thread_col();
  for (int64_t t = p.first_tile(); t < p.end_tile(); ++t) {
    int64_t r0, s0;
    p.tile_origin(t, r0, s0);
    const int64_t r = r0 + tr, s = s0 + ts;
    if (r < p.rows && s < p.cols) fn(r * row_stride + c * p.cols + s);
  }
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x,
                               const typename Compute<T>::type* __restrict__ weight,
                               const typename Compute<T>::type* __restrict__ bias,
                               T* __restrict__ y, typename Compute<T>::type* __restrict__ mean_out,
                               typename Compute<T>::type* __restrict__ invstd_out,
                               typename Compute<T>::type* __restrict__ running_mean,
                               typename Compute<T>::type* __restrict__ running_var,
                               const typename Compute<T>::type* __restrict__ partial, ChunkPlan p,
                               double momentum, double eps) {
  using C = typename Compute<T>::type;
  __shared__ C shared[kThreads / 32];
  const int64_t c = blockIdx.x;
  const C count = static_cast<C>(p.rows * p.cols);
  C mean, var;
  channel_moments(partial, c, static_cast<int64_t>(gridDim.x), p.n_chunks, count, shared, mean,
                  var);
  const C invstd = rsqrt_c(var + static_cast<C>(eps));
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    mean_out[c] = mean;
    invstd_out[c] = invstd;
    update_running(running_mean, running_var, c, mean, var, count, momentum);
  }
  const C scale = invstd * (weight != nullptr ? weight[c] : C(1));
  const C shift = (bias != nullptr ? bias[c] : C(0)) - mean * scale;
  for_chunk(p, [&](int64_t o) { y[o] = store_as<T>(load_as(x, o) * scale + shift); });
}

// Pass 1 of the backward and double backward: this chunk's sums of gy, gy d
// and (grad_dx = h given) h, h d, h gy, d = x - mean, as planes 0..4.
template <typename T>
__global__ void grad_sums_kernel(const T* __restrict__ x, const T* __restrict__ grad_y,
                                 const T* __restrict__ grad_dx,
                                 const typename Compute<T>::type* __restrict__ mean_in,
                                 typename Compute<T>::type* __restrict__ partial, ChunkPlan p) {
  using C = typename Compute<T>::type;
  __shared__ C shared[kThreads / 32];
  const int64_t c = blockIdx.x;
  const C mean = mean_in[c];
  C s_g = 0, s_gd = 0, s_h = 0, s_hd = 0, s_hg = 0;
  for_chunk(p, [&](int64_t o) {
    const C g = load_as(grad_y, o);
    const C d = load_as(x, o) - mean;
    s_g += g;
    s_gd += g * d;
    if (grad_dx != nullptr) {
      const C h = load_as(grad_dx, o);
      s_h += h;
      s_hd += h * d;
      s_hg += h * g;
    }
  });
  const int64_t plane = static_cast<int64_t>(gridDim.x) * p.n_chunks;
  C* out = partial + c * p.n_chunks + blockIdx.y;
  s_g = block_sum(s_g, shared);
  s_gd = block_sum(s_gd, shared);
  if (threadIdx.x == 0) out[0] = s_g, out[plane] = s_gd;
  if (grad_dx == nullptr) return;
  s_h = block_sum(s_h, shared);
  s_hd = block_sum(s_hd, shared);
  s_hg = block_sum(s_hg, shared);
  if (threadIdx.x == 0) out[2 * plane] = s_h, out[3 * plane] = s_hd, out[4 * plane] = s_hg;
}

template <typename T>
__global__ void backward_kernel(
    const T* __restrict__ x, const typename Compute<T>::type* __restrict__ weight,
    const T* __restrict__ grad_y, const typename Compute<T>::type* __restrict__ mean_in,
    const typename Compute<T>::type* __restrict__ invstd_in, T* __restrict__ dx,
    typename Compute<T>::type* __restrict__ dweight, typename Compute<T>::type* __restrict__ dbias,
    const typename Compute<T>::type* __restrict__ partial, ChunkPlan p) {
  using C = typename Compute<T>::type;
  __shared__ C shared[kThreads / 32];
  const int64_t c = blockIdx.x, channels = gridDim.x;
  const C mean = mean_in[c], invstd = invstd_in[c];
  const C s_g = channel_sum(partial, 0, c, channels, p.n_chunks, shared);
  const C s_gd = channel_sum(partial, 1, c, channels, p.n_chunks, shared);
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    dbias[c] = s_g;
    dweight[c] = s_gd * invstd;
  }
  const C count = static_cast<C>(p.rows * p.cols);
  // dx = w invstd (gy - bar(gy) - xhat bar(gy xhat)) = a gy + b (x - mean) + k
  const C a = (weight != nullptr ? weight[c] : C(1)) * invstd;
  const C b = -a * invstd * invstd * s_gd / count;
  const C k = -a * s_g / count;
  for_chunk(p, [&](int64_t o) {
    dx[o] = store_as<T>(a * load_as(grad_y, o) + b * (load_as(x, o) - mean) + k);
  });
}

template <typename T>
__global__ void double_backward_kernel(
    const T* __restrict__ x, const typename Compute<T>::type* __restrict__ weight,
    const T* __restrict__ grad_y, const typename Compute<T>::type* __restrict__ mean_in,
    const typename Compute<T>::type* __restrict__ invstd_in, const T* __restrict__ grad_dx,
    const typename Compute<T>::type* __restrict__ grad_dweight,
    const typename Compute<T>::type* __restrict__ grad_dbias, T* __restrict__ gx,
    typename Compute<T>::type* __restrict__ gweight, T* __restrict__ ggrad_y,
    const typename Compute<T>::type* __restrict__ partial, ChunkPlan p) {
  using C = typename Compute<T>::type;
  __shared__ C shared[kThreads / 32];
  const int64_t c = blockIdx.x, channels = gridDim.x;
  const C mean = mean_in[c], invstd = invstd_in[c];
  const C count = static_cast<C>(p.rows * p.cols);
  // Sums over the channel of gy, gy d, h, h d, h gy with d = x - mean, h = grad_dx.
  const C s_g = channel_sum(partial, 0, c, channels, p.n_chunks, shared);
  const C s_gd = channel_sum(partial, 1, c, channels, p.n_chunks, shared);
  C s_h = 0, s_hd = 0, s_hg = 0;
  if (grad_dx != nullptr) {
    s_h = channel_sum(partial, 2, c, channels, p.n_chunks, shared);
    s_hd = channel_sum(partial, 3, c, channels, p.n_chunks, shared);
    s_hg = channel_sum(partial, 4, c, channels, p.n_chunks, shared);
  }
  const C w = weight != nullptr ? weight[c] : C(1);
  const C ggw = grad_dweight != nullptr ? grad_dweight[c] : C(0);
  const C ggb = grad_dbias != nullptr ? grad_dbias[c] : C(0);
  const C g_bar = s_g / count, h_bar = s_h / count;
  const C g_hat = s_gd * invstd / count;  // bar(gy xhat)
  const C a_hat = s_hd * invstd / count;  // bar(grad_dx xhat)
  const C s1 = s_hg / count - h_bar * g_bar;
  if (blockIdx.y == 0 && threadIdx.x == 0) gweight[c] = invstd * count * (s1 - a_hat * g_hat);
  // gx = cg gy + ch h + cd d + c0;  ggy = eh h + ed d + e0
  const C w2 = w * invstd * invstd;
  const C cg = -w2 * a_hat + ggw * invstd;
  const C ch = -w2 * g_hat;
  const C cd = w2 * invstd * (C(3) * a_hat * g_hat - s1) - ggw * invstd * invstd * g_hat;
  const C c0 = w2 * (g_hat * h_bar + a_hat * g_bar) - ggw * invstd * g_bar;
  const C eh = w * invstd;
  const C ed = -w * invstd * invstd * a_hat + ggw * invstd;
  const C e0 = -w * invstd * h_bar + ggb;
  for_chunk(p, [&](int64_t o) {
    const C d = load_as(x, o) - mean;
    const C h = grad_dx != nullptr ? load_as(grad_dx, o) : C(0);
    gx[o] = store_as<T>(cg * load_as(grad_y, o) + ch * h + cd * d + c0);
    ggrad_y[o] = store_as<T>(eh * h + ed * d + e0);
  });
}

ChunkPlan plan_of(int64_t batch, int64_t channels, int64_t spatial) {
  return sophon_fast::cuda::chunk_plan(batch, spatial, channels);
}

dim3 grid_of(const ChunkPlan& p, int64_t channels) {
  return dim3(static_cast<unsigned>(channels), static_cast<unsigned>(p.n_chunks));
}

template <typename T>
int launch_forward(const void* x, const void* weight, const void* bias, void* y, void* mean,
                   void* invstd, void* running_mean, void* running_var, void* workspace,
                   int64_t batch, int64_t channels, int64_t spatial, double momentum, double eps,
                   cudaStream_t stream) {
  using C = typename Compute<T>::type;
  if (channels == 0 || batch * spatial == 0) return static_cast<int>(cudaSuccess);
  const ChunkPlan p = plan_of(batch, channels, spatial);
  C* partial = static_cast<C*>(workspace);
  channel_stats_kernel<T, C>
      <<<grid_of(p, channels), kThreads, 0, stream>>>(static_cast<const T*>(x), partial, p);
  forward_kernel<T><<<grid_of(p, channels), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const C*>(weight), static_cast<const C*>(bias),
      static_cast<T*>(y), static_cast<C*>(mean), static_cast<C*>(invstd),
      static_cast<C*>(running_mean), static_cast<C*>(running_var), partial, p, momentum, eps);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_backward(const void* x, const void* weight, const void* grad_y, const void* mean,
                    const void* invstd, void* dx, void* dweight, void* dbias, void* workspace,
                    int64_t batch, int64_t channels, int64_t spatial, cudaStream_t stream) {
  using C = typename Compute<T>::type;
  if (channels == 0 || batch * spatial == 0) return static_cast<int>(cudaSuccess);
  const ChunkPlan p = plan_of(batch, channels, spatial);
  C* partial = static_cast<C*>(workspace);
  grad_sums_kernel<T><<<grid_of(p, channels), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(grad_y), nullptr, static_cast<const C*>(mean),
      partial, p);
  backward_kernel<T><<<grid_of(p, channels), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const C*>(weight), static_cast<const T*>(grad_y),
      static_cast<const C*>(mean), static_cast<const C*>(invstd), static_cast<T*>(dx),
      static_cast<C*>(dweight), static_cast<C*>(dbias), partial, p);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_double_backward(const void* x, const void* weight, const void* grad_y, const void* mean,
                           const void* invstd, const void* grad_dx, const void* grad_dweight,
                           const void* grad_dbias, void* gx, void* gweight, void* ggrad_y,
                           void* workspace, int64_t batch, int64_t channels, int64_t spatial,
                           cudaStream_t stream) {
  using C = typename Compute<T>::type;
  if (channels == 0 || batch * spatial == 0) return static_cast<int>(cudaSuccess);
  const ChunkPlan p = plan_of(batch, channels, spatial);
  C* partial = static_cast<C*>(workspace);
  grad_sums_kernel<T><<<grid_of(p, channels), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(grad_y), static_cast<const T*>(grad_dx),
      static_cast<const C*>(mean), partial, p);
  double_backward_kernel<T><<<grid_of(p, channels), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const C*>(weight), static_cast<const T*>(grad_y),
      static_cast<const C*>(mean), static_cast<const C*>(invstd), static_cast<const T*>(grad_dx),
      static_cast<const C*>(grad_dweight), static_cast<const C*>(grad_dbias), static_cast<T*>(gx),
      static_cast<C*>(gweight), static_cast<T*>(ggrad_y), partial, p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int64_t sophon_fast_batch_norm_cuda_workspace(int64_t batch, int64_t channels,
                                                         int64_t spatial) {
  // Five planes: the double backward's sums (the forward needs 3, the backward 2).
  return 5 * channels * plan_of(batch, channels, spatial).n_chunks;
}

extern "C" int sophon_fast_batch_norm_forward_cuda(
    int dtype, const void* x, const void* weight, const void* bias, void* y, void* mean,
    void* invstd, void* running_mean, void* running_var, void* workspace, int64_t batch,
    int64_t channels, int64_t spatial, double momentum, double eps, cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    return launch_forward<decltype(tag)>(x, weight, bias, y, mean, invstd, running_mean,
                                         running_var, workspace, batch, channels, spatial, momentum,
                                         eps, stream);
  });
}

extern "C" int sophon_fast_batch_norm_backward_cuda(int dtype, const void* x, const void* weight,
                                                    const void* grad_y, const void* mean,
                                                    const void* invstd, void* dx, void* dweight,
                                                    void* dbias, void* workspace, int64_t batch,
                                                    int64_t channels, int64_t spatial,
                                                    cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    return launch_backward<decltype(tag)>(x, weight, grad_y, mean, invstd, dx, dweight, dbias,
                                          workspace, batch, channels, spatial, stream);
  });
}

extern "C" int sophon_fast_batch_norm_double_backward_cuda(
    int dtype, const void* x, const void* weight, const void* grad_y, const void* mean,
    const void* invstd, const void* grad_dx, const void* grad_dweight, const void* grad_dbias,
    void* gx, void* gweight, void* ggrad_y, void* workspace, int64_t batch, int64_t channels,
    int64_t spatial, cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    return launch_double_backward<decltype(tag)>(x, weight, grad_y, mean, invstd, grad_dx,
                                                 grad_dweight, grad_dbias, gx, gweight, ggrad_y,
                                                 workspace, batch, channels, spatial, stream);
  });
}
