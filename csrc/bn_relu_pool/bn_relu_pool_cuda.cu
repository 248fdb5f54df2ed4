// bn_relu_pool, CUDA twin: torch-free kernels and extern "C" launchers.
//
// One block per channel (SmallCNN: 32-64 channels of 130 x 28 x 28 or 14 x 14
// values): the statistics are block reductions of sums shifted by the
// channel's first value; the forward then writes only the pooled output
// (each thread a window: relu(max z), z = a x + b), the backward sums the
// pooled gradient routed to each window's first maximum (torch's max_pool2d
// rule, strict > in row-major order) and writes dx window by window, the odd
// last row and column (in no window) in a third sweep. Maths as
// csrc/bn_relu_pool/bn_relu_pool_cpu.cpp, in fp32 for fp32/fp16/bf16
// storage, fp64 for fp64. Only CUDA headers: compiles with plain nvcc.
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
using sophon_fast::cuda::Compute;
using sophon_fast::cuda::load_as;
using sophon_fast::cuda::rsqrt_c;
using sophon_fast::cuda::store_as;
using sophon_fast::cuda::update_running;

constexpr int kThreads = sophon_fast::cuda::kChannelThreads;

struct Geometry {
  int64_t channels, height, width, pooled_h, pooled_w, count, pooled_count;
  // Offset of channel c's value i in [0, batch * height * width).
  __device__ int64_t offset(int64_t c, int64_t i) const {
    const int64_t hw = height * width;
    return ((i / hw) * channels + c) * hw + i % hw;
  }
  // Offset of the top-left value of channel c's window j in [0, pooled_count).
  __device__ int64_t corner(int64_t c, int64_t j) const {
    const int64_t phw = pooled_h * pooled_w, s = j % phw;
    return ((j / phw) * channels + c) * height * width + (s / pooled_w) * 2 * width +
           (s % pooled_w) * 2;
  }
  __device__ int64_t pooled(int64_t c, int64_t j) const {
    const int64_t phw = pooled_h * pooled_w;
    return ((j / phw) * channels + c) * phw + j % phw;
  }
};

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

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x,
                               const typename Compute<T>::type* __restrict__ weight,
                               const typename Compute<T>::type* __restrict__ bias,
                               T* __restrict__ y, typename Compute<T>::type* __restrict__ mean_out,
                               typename Compute<T>::type* __restrict__ invstd_out,
                               typename Compute<T>::type* __restrict__ running_mean,
                               typename Compute<T>::type* __restrict__ running_var, Geometry g,
                               double momentum, double eps) {
  using C = typename Compute<T>::type;
  __shared__ C shared[kThreads / 32];
  const int64_t c = blockIdx.x;
  const C count = static_cast<C>(g.count);
  const C shift = load_as(x, g.offset(c, 0));
  C s1 = 0, s2 = 0;
  for (int64_t i = threadIdx.x; i < g.count; i += kThreads) {
    const C d = load_as(x, g.offset(c, i)) - shift;
    s1 += d;
    s2 += d * d;
  }
  s1 = block_sum(s1, shared);
  s2 = block_sum(s2, shared);
  const C m = s1 / count;
  C var = s2 / count - m * m;
  var = var > C(0) ? var : C(0);
  const C mean = m + shift;
  const C invstd = rsqrt_c(var + static_cast<C>(eps));
  if (threadIdx.x == 0) {
    mean_out[c] = mean;
    invstd_out[c] = invstd;
    update_running(running_mean, running_var, c, mean, var, count, momentum);
  }
  const C a = invstd * (weight != nullptr ? weight[c] : C(1));
  const C b = (bias != nullptr ? bias[c] : C(0)) - mean * a;
  for (int64_t j = threadIdx.x; j < g.pooled_count; j += kThreads) {
    const int64_t o = g.corner(c, j);
    const C z0 = a * load_as(x, o) + b, z1 = a * load_as(x, o + 1) + b;
    const C z2 = a * load_as(x, o + g.width) + b, z3 = a * load_as(x, o + g.width + 1) + b;
    C best;
    choose(z0, z1, z2, z3, best);
    y[g.pooled(c, j)] = store_as<T>(best > C(0) ? best : C(0));
  }
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ x,
                                const typename Compute<T>::type* __restrict__ weight,
                                const typename Compute<T>::type* __restrict__ bias,
                                const T* __restrict__ grad_y,
                                const typename Compute<T>::type* __restrict__ mean_in,
                                const typename Compute<T>::type* __restrict__ invstd_in,
                                T* __restrict__ dx, typename Compute<T>::type* __restrict__ dweight,
                                typename Compute<T>::type* __restrict__ dbias, Geometry g) {
  using C = typename Compute<T>::type;
  __shared__ C shared[kThreads / 32];
  const int64_t c = blockIdx.x;
  const C mean = mean_in[c], invstd = invstd_in[c];
  const C w = weight != nullptr ? weight[c] : C(1);
  const C a = invstd * w;
  const C b = (bias != nullptr ? bias[c] : C(0)) - mean * a;
  // Sum dz and dz (x - mean); dz is the pooled gradient at each window's
  // choice where its z > 0.
  C s_g = 0, s_gd = 0;
  for (int64_t j = threadIdx.x; j < g.pooled_count; j += kThreads) {
    const int64_t o = g.corner(c, j);
    const C x0 = load_as(x, o), x1 = load_as(x, o + 1);
    const C x2 = load_as(x, o + g.width), x3 = load_as(x, o + g.width + 1);
    C best;
    const int k = choose(a * x0 + b, a * x1 + b, a * x2 + b, a * x3 + b, best);
    if (best > C(0)) {
      const C gy = load_as(grad_y, g.pooled(c, j));
      const C xs = k == 0 ? x0 : k == 1 ? x1 : k == 2 ? x2 : x3;
      s_g += gy;
      s_gd += gy * (xs - mean);
    }
  }
  s_g = block_sum(s_g, shared);
  s_gd = block_sum(s_gd, shared);
  if (threadIdx.x == 0) {
    dbias[c] = s_g;
    dweight[c] = s_gd * invstd;
  }
  const C count = static_cast<C>(g.count);
  // dx = a dz + bc (x - mean) + k0, the BatchNorm backward with dz sparse.
  const C bc = -a * invstd * invstd * s_gd / count;
  const C k0 = -a * s_g / count;
  for (int64_t j = threadIdx.x; j < g.pooled_count; j += kThreads) {
    const int64_t o = g.corner(c, j);
    const C x0 = load_as(x, o), x1 = load_as(x, o + 1);
    const C x2 = load_as(x, o + g.width), x3 = load_as(x, o + g.width + 1);
    C best;
    const int k = choose(a * x0 + b, a * x1 + b, a * x2 + b, a * x3 + b, best);
    const C ag = best > C(0) ? a * load_as(grad_y, g.pooled(c, j)) : C(0);
    dx[o] = store_as<T>(bc * (x0 - mean) + k0 + (k == 0 ? ag : C(0)));
    dx[o + 1] = store_as<T>(bc * (x1 - mean) + k0 + (k == 1 ? ag : C(0)));
    dx[o + g.width] = store_as<T>(bc * (x2 - mean) + k0 + (k == 2 ? ag : C(0)));
    dx[o + g.width + 1] = store_as<T>(bc * (x3 - mean) + k0 + (k == 3 ? ag : C(0)));
  }
  if (g.height % 2 == 0 && g.width % 2 == 0) return;
  for (int64_t i = threadIdx.x; i < g.count; i += kThreads) {
    const int64_t s = i % (g.height * g.width);
    if (s / g.width < 2 * g.pooled_h && s % g.width < 2 * g.pooled_w) continue;
    const int64_t o = g.offset(c, i);
    dx[o] = store_as<T>(bc * (load_as(x, o) - mean) + k0);
  }
}

Geometry geometry_of(int64_t batch, int64_t channels, int64_t height, int64_t width) {
  const int64_t ph = height / 2, pw = width / 2;
  return Geometry{channels, height, width, ph, pw, batch * height * width, batch * ph * pw};
}

template <typename T>
int launch_forward(const void* x, const void* weight, const void* bias, void* y, void* mean,
                   void* invstd, void* running_mean, void* running_var, int64_t batch,
                   int64_t channels, int64_t height, int64_t width, double momentum, double eps,
                   cudaStream_t stream) {
  using C = typename Compute<T>::type;
  if (channels == 0 || batch == 0) return static_cast<int>(cudaSuccess);
  forward_kernel<T><<<static_cast<unsigned>(channels), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const C*>(weight), static_cast<const C*>(bias),
      static_cast<T*>(y), static_cast<C*>(mean), static_cast<C*>(invstd),
      static_cast<C*>(running_mean), static_cast<C*>(running_var),
      geometry_of(batch, channels, height, width), momentum, eps);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_backward(const void* x, const void* weight, const void* bias, const void* grad_y,
                    const void* mean, const void* invstd, void* dx, void* dweight, void* dbias,
                    int64_t batch, int64_t channels, int64_t height, int64_t width,
                    cudaStream_t stream) {
  using C = typename Compute<T>::type;
  if (channels == 0 || batch == 0) return static_cast<int>(cudaSuccess);
  backward_kernel<T><<<static_cast<unsigned>(channels), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const C*>(weight), static_cast<const C*>(bias),
      static_cast<const T*>(grad_y), static_cast<const C*>(mean), static_cast<const C*>(invstd),
      static_cast<T*>(dx), static_cast<C*>(dweight), static_cast<C*>(dbias),
      geometry_of(batch, channels, height, width));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int sophon_fast_bn_relu_pool_forward_cuda(
    int dtype, const void* x, const void* weight, const void* bias, void* y, void* mean,
    void* invstd, void* running_mean, void* running_var, int64_t batch, int64_t channels,
    int64_t height, int64_t width, double momentum, double eps, cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    return launch_forward<decltype(tag)>(x, weight, bias, y, mean, invstd, running_mean,
                                         running_var, batch, channels, height, width, momentum, eps,
                                         stream);
  });
}

extern "C" int sophon_fast_bn_relu_pool_backward_cuda(
    int dtype, const void* x, const void* weight, const void* bias, const void* grad_y,
    const void* mean, const void* invstd, void* dx, void* dweight, void* dbias, int64_t batch,
    int64_t channels, int64_t height, int64_t width, cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    return launch_backward<decltype(tag)>(x, weight, bias, grad_y, mean, invstd, dx, dweight, dbias,
                                          batch, channels, height, width, stream);
  });
}
