// bn_relu_pool, CUDA twin: torch-free kernels and extern "C" launchers.
//
// The CUDA mirror of the Triton kernels (sophon_fast/ops/bn_relu_pool.py),
// over (channel, chunk) grids (../cuda_channel.cuh). Forward: the BatchNorm
// per-chunk statistics (count, mean, M2 of x; Chan's combine), then a pass
// over the 2x2 windows writing only the pooled output relu(max z), z = a x +
// b. Backward: per-chunk sums of the pooled gradient routed to each window's
// first maximum (torch's max_pool2d rule, strict > in row-major order), then a
// pass writing dx over every window of ceil(H / 2) x ceil(W / 2) an image,
// those of an odd last row or column partial (no pooled output, only the
// BatchNorm terms). Window rows are (n, oh) pairs: one 32-bit divide by the
// pooled height per row index, none 64-bit. Partial sums go to a workspace the
// binding allocates (sophon_fast_bn_relu_pool_cuda_workspace). Maths as
// csrc/bn_relu_pool/bn_relu_pool_cpu.cpp, in fp32 for fp32/fp16/bf16 storage,
// fp64 for fp64. Only CUDA headers: compiles with plain nvcc. Compiled by make
// cuda-check; not run on a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../cuda_channel.cuh"
#include "../cuda_elementwise.cuh"
#include "bn_relu_pool_cuda.h"

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

struct Geometry {
  int64_t height, width, pooled_h, pooled_w;
  // Offsets of channel c's window (n, oh, ow) top-left value and of its pooled
  // output, NCHW.
  __device__ __forceinline__ int64_t corner(int64_t n, int64_t c, int64_t oh, int64_t ow) const {
    return (n * gridDim.x + c) * height * width + 2 * oh * width + 2 * ow;
  }
  __device__ __forceinline__ int64_t pooled(int64_t n, int64_t c, int64_t oh, int64_t ow) const {
    return (n * gridDim.x + c) * pooled_h * pooled_w + oh * pooled_w + ow;
  }
};

// Walks this thread's windows of chunk blockIdx.y of a window plan (rows = (n,
// oh) pairs, rows_per_image of them an image; columns = ow): fn(n, oh, ow).
template <typename Fn>
__device__ __forceinline__ void for_windows(const ChunkPlan& p, int64_t rows_per_image, Fn&& fn) {
  const int tr = p.thread_row(), ts = p.thread_col();
  const bool narrow = p.rows <= 0xffffffffll;  // 32-bit row split (every realistic size)
  for (int64_t t = p.first_tile(); t < p.end_tile(); ++t) {
    int64_t r0, s0;
    p.tile_origin(t, r0, s0);
    const int64_t r = r0 + tr, ow = s0 + ts;
    if (r >= p.rows || ow >= p.cols) continue;
    const int64_t n =
        narrow
            ? static_cast<int64_t>(static_cast<uint32_t>(r) / static_cast<uint32_t>(rows_per_image))
            : r / rows_per_image;
    fn(n, r - n * rows_per_image, ow);
  }
}

// The window's choice: the index (0..3, row-major) of the first maximum of z.
template <typename C>
__device__ __forceinline__ int choose(C z0, C z1, C z2, C z3, C& best) {
  int k = 0;
  best = z0;
  if (z1 > best) best = z1, k = 1;
  if (z2 > best) best = z2, k = 2;
  if (z3 > best) best = z3, k = 3;
  return k;
}

// Pass 2 of the forward: windows of chunk blockIdx.y of plan p (rows n * oh).
template <typename T>
__global__ void forward_kernel(const T* __restrict__ x,
                               const typename Compute<T>::type* __restrict__ weight,
                               const typename Compute<T>::type* __restrict__ bias,
                               T* __restrict__ y, typename Compute<T>::type* __restrict__ mean_out,
                               typename Compute<T>::type* __restrict__ invstd_out,
                               typename Compute<T>::type* __restrict__ running_mean,
                               typename Compute<T>::type* __restrict__ running_var,
                               const typename Compute<T>::type* __restrict__ partial,
                               int64_t stats_chunks, int64_t count_values, Geometry g, ChunkPlan p,
                               double momentum, double eps) {
  using C = typename Compute<T>::type;
  __shared__ C shared[kThreads / 32];
  const int64_t c = blockIdx.x;
  const C count = static_cast<C>(count_values);
  C mean, var;
  channel_moments(partial, c, static_cast<int64_t>(gridDim.x), stats_chunks, count, shared, mean,
                  var);
  const C invstd = rsqrt_c(var + static_cast<C>(eps));
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    mean_out[c] = mean;
    invstd_out[c] = invstd;
    update_running(running_mean, running_var, c, mean, var, count, momentum);
  }
  const C a = invstd * (weight != nullptr ? weight[c] : C(1));
  const C b = (bias != nullptr ? bias[c] : C(0)) - mean * a;
  for_windows(p, g.pooled_h, [&](int64_t n, int64_t oh, int64_t ow) {
    const int64_t o = g.corner(n, c, oh, ow);
    const C z0 = a * load_as(x, o) + b, z1 = a * load_as(x, o + 1) + b;
    const C z2 = a * load_as(x, o + g.width) + b, z3 = a * load_as(x, o + g.width + 1) + b;
    C best;
    choose(z0, z1, z2, z3, best);
    y[g.pooled(n, c, oh, ow)] =
        store_as<T>(best <= C(0) ? C(0) : best);  // NaN stays NaN, as torch.relu
  });
}

// Backward pass 1: this chunk's sums of dz and dz (x - mean) (planes 0, 1);
// dz is the pooled gradient at each window's choice where its z > 0.
template <typename T>
__global__ void grad_sums_kernel(const T* __restrict__ x,
                                 const typename Compute<T>::type* __restrict__ weight,
                                 const typename Compute<T>::type* __restrict__ bias,
                                 const T* __restrict__ grad_y,
                                 const typename Compute<T>::type* __restrict__ mean_in,
                                 const typename Compute<T>::type* __restrict__ invstd_in,
                                 typename Compute<T>::type* __restrict__ partial, Geometry g,
                                 ChunkPlan p) {
  using C = typename Compute<T>::type;
  __shared__ C shared[kThreads / 32];
  const int64_t c = blockIdx.x;
  const C mean = mean_in[c], invstd = invstd_in[c];
  const C a = invstd * (weight != nullptr ? weight[c] : C(1));
  const C b = (bias != nullptr ? bias[c] : C(0)) - mean * a;
  C s_g = 0, s_gd = 0;
  for_windows(p, g.pooled_h, [&](int64_t n, int64_t oh, int64_t ow) {
    const int64_t o = g.corner(n, c, oh, ow);
    const C x0 = load_as(x, o), x1 = load_as(x, o + 1);
    const C x2 = load_as(x, o + g.width), x3 = load_as(x, o + g.width + 1);
    C best;
    const int k = choose(a * x0 + b, a * x1 + b, a * x2 + b, a * x3 + b, best);
    if (best > C(0)) {
      const C gy = load_as(grad_y, g.pooled(n, c, oh, ow));
      const C xs = k == 0 ? x0 : k == 1 ? x1 : k == 2 ? x2 : x3;
      s_g += gy;
      s_gd += gy * (xs - mean);
    }
  });
  s_g = block_sum(s_g, shared);
  s_gd = block_sum(s_gd, shared);
  if (threadIdx.x == 0) {
    const int64_t plane = static_cast<int64_t>(gridDim.x) * p.n_chunks;
    C* out = partial + c * p.n_chunks + blockIdx.y;
    out[0] = s_g;
    out[plane] = s_gd;
  }
}

// Backward pass 2: dx = a dz + bc (x - mean) + k0 over the windows of chunk
// blockIdx.y of plan p (ceil(H / 2) window rows an image, ceil(W / 2)
// columns); the channel's first block stores dweight and dbias.
template <typename T>
__global__ void backward_kernel(
    const T* __restrict__ x, const typename Compute<T>::type* __restrict__ weight,
    const typename Compute<T>::type* __restrict__ bias, const T* __restrict__ grad_y,
    const typename Compute<T>::type* __restrict__ mean_in,
    const typename Compute<T>::type* __restrict__ invstd_in, T* __restrict__ dx,
    typename Compute<T>::type* __restrict__ dweight, typename Compute<T>::type* __restrict__ dbias,
    const typename Compute<T>::type* __restrict__ partial, int64_t sums_chunks,
    int64_t count_values, Geometry g, ChunkPlan p) {
  using C = typename Compute<T>::type;
  __shared__ C shared[kThreads / 32];
  const int64_t c = blockIdx.x, channels = gridDim.x;
  const C mean = mean_in[c], invstd = invstd_in[c];
  const C a = invstd * (weight != nullptr ? weight[c] : C(1));
  const C b = (bias != nullptr ? bias[c] : C(0)) - mean * a;
  const C s_g = channel_sum(partial, 0, c, channels, sums_chunks, shared);
  const C s_gd = channel_sum(partial, 1, c, channels, sums_chunks, shared);
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    dbias[c] = s_g;
    dweight[c] = s_gd * invstd;
  }
  const C count = static_cast<C>(count_values);
  // dx = a dz + bc (x - mean) + k0, the BatchNorm backward with dz sparse.
  const C bc = -a * invstd * invstd * s_gd / count;
  const C k0 = -a * s_g / count;
  for_windows(p, (g.height + 1) / 2, [&](int64_t n, int64_t oh, int64_t ow) {
    const int64_t o = g.corner(n, c, oh, ow);
    const bool right = 2 * ow + 1 < g.width, below = 2 * oh + 1 < g.height;
    const C x0 = load_as(x, o);
    const C x1 = right ? load_as(x, o + 1) : C(0);
    const C x2 = below ? load_as(x, o + g.width) : C(0);
    const C x3 = right && below ? load_as(x, o + g.width + 1) : C(0);
    int k = -1;
    C ag = 0;
    if (right && below) {  // a full window: it has a pooled output
      C best;
      k = choose(a * x0 + b, a * x1 + b, a * x2 + b, a * x3 + b, best);
      if (best > C(0)) ag = a * load_as(grad_y, g.pooled(n, c, oh, ow));
    }
    dx[o] = store_as<T>(bc * (x0 - mean) + k0 + (k == 0 ? ag : C(0)));
    if (right) dx[o + 1] = store_as<T>(bc * (x1 - mean) + k0 + (k == 1 ? ag : C(0)));
    if (below) dx[o + g.width] = store_as<T>(bc * (x2 - mean) + k0 + (k == 2 ? ag : C(0)));
    if (right && below)
      dx[o + g.width + 1] = store_as<T>(bc * (x3 - mean) + k0 + (k == 3 ? ag : C(0)));
  });
}

struct Plans {
  ChunkPlan stats, windows, all_windows;
  Geometry g;
};

Plans plans_of(int64_t batch, int64_t channels, int64_t height, int64_t width) {
  const int64_t ph = height / 2, pw = width / 2;
  Plans p;
  p.stats = sophon_fast::cuda::chunk_plan(batch, height * width, channels);
  p.windows = sophon_fast::cuda::chunk_plan(batch * ph, pw, channels, 4);
  p.all_windows =
      sophon_fast::cuda::chunk_plan(batch * ((height + 1) / 2), (width + 1) / 2, channels, 4);
  p.g = Geometry{height, width, ph, pw};
  return p;
}

dim3 grid_of(const ChunkPlan& p, int64_t channels) {
  return dim3(static_cast<unsigned>(channels), static_cast<unsigned>(p.n_chunks));
}

template <typename T>
int launch_forward(const void* x, const void* weight, const void* bias, void* y, void* mean,
                   void* invstd, void* running_mean, void* running_var, void* workspace,
                   int64_t batch, int64_t channels, int64_t height, int64_t width, double momentum,
                   double eps, cudaStream_t stream) {
  using C = typename Compute<T>::type;
  if (channels == 0 || batch == 0) return static_cast<int>(cudaSuccess);
  const Plans p = plans_of(batch, channels, height, width);
  C* partial = static_cast<C*>(workspace);
  channel_stats_kernel<T, C><<<grid_of(p.stats, channels), kThreads, 0, stream>>>(
      static_cast<const T*>(x), partial, p.stats);
  forward_kernel<T><<<grid_of(p.windows, channels), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const C*>(weight), static_cast<const C*>(bias),
      static_cast<T*>(y), static_cast<C*>(mean), static_cast<C*>(invstd),
      static_cast<C*>(running_mean), static_cast<C*>(running_var), partial, p.stats.n_chunks,
      batch * height * width, p.g, p.windows, momentum, eps);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_backward(const void* x, const void* weight, const void* bias, const void* grad_y,
                    const void* mean, const void* invstd, void* dx, void* dweight, void* dbias,
                    void* workspace, int64_t batch, int64_t channels, int64_t height, int64_t width,
                    cudaStream_t stream) {
  using C = typename Compute<T>::type;
  if (channels == 0 || batch == 0) return static_cast<int>(cudaSuccess);
  const Plans p = plans_of(batch, channels, height, width);
  C* partial = static_cast<C*>(workspace);
  grad_sums_kernel<T><<<grid_of(p.windows, channels), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const C*>(weight), static_cast<const C*>(bias),
      static_cast<const T*>(grad_y), static_cast<const C*>(mean), static_cast<const C*>(invstd),
      partial, p.g, p.windows);
  backward_kernel<T><<<grid_of(p.all_windows, channels), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const C*>(weight), static_cast<const C*>(bias),
      static_cast<const T*>(grad_y), static_cast<const C*>(mean), static_cast<const C*>(invstd),
      static_cast<T*>(dx), static_cast<C*>(dweight), static_cast<C*>(dbias), partial,
      p.windows.n_chunks, batch * height * width, p.g, p.all_windows);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int64_t sophon_fast_bn_relu_pool_cuda_workspace(int64_t batch, int64_t channels,
                                                           int64_t height, int64_t width) {
  const Plans p = plans_of(batch, channels, height, width);
  // The forward's statistics (3 planes) or the backward's window sums (2).
  const int64_t stats = 3 * p.stats.n_chunks, sums = 2 * p.windows.n_chunks;
  return channels * (stats > sums ? stats : sums);
}

extern "C" int sophon_fast_bn_relu_pool_forward_cuda(int dtype, const void* x, const void* weight,
                                                     const void* bias, void* y, void* mean,
                                                     void* invstd, void* running_mean,
                                                     void* running_var, void* workspace,
                                                     int64_t batch, int64_t channels,
                                                     int64_t height, int64_t width, double momentum,
                                                     double eps, cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    return launch_forward<decltype(tag)>(x, weight, bias, y, mean, invstd, running_mean,
                                         running_var, workspace, batch, channels, height, width,
                                         momentum, eps, stream);
  });
}

extern "C" int sophon_fast_bn_relu_pool_backward_cuda(
    int dtype, const void* x, const void* weight, const void* bias, const void* grad_y,
    const void* mean, const void* invstd, void* dx, void* dweight, void* dbias, void* workspace,
    int64_t batch, int64_t channels, int64_t height, int64_t width, cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    return launch_backward<decltype(tag)>(x, weight, bias, grad_y, mean, invstd, dx, dweight, dbias,
                                          workspace, batch, channels, height, width, stream);
  });
}
