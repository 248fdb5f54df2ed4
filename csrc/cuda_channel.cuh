// Per-channel reductions shared by the BatchNorm-family CUDA kernels
// (batch_norm_cuda.cu, bn_relu_pool_cuda.cu), the CUDA mirror of the Triton
// kernels in sophon_fast/ops/batch_norm.py.
//
// Work split: a channel's values are a (rows, cols) matrix (BatchNorm: rows =
// batch, cols = height * width of an NCHW plane; the pooling passes: rows =
// (n, oh) pairs, cols = ow), cut into tiles of kChannelThreads threads =
// block_r x block_s (block_s a power of two, so a thread's (row, column) in the
// tile is a shift and a mask). A chunk is `tiles` consecutive tiles in
// row-major tile order; one block runs one (channel, chunk), grid (channels,
// chunks). Index math: one divide per tile (by the number of column tiles),
// row * row stride + column, never a 64-bit divide per element. Statistics are
// per-chunk partials in a (planes, channels, chunks) workspace, combined by
// every block of the second pass (Chan's parallel combine for mean / M2, plain
// sums for the backward sums), so both passes fill the GPU: ResNet-18's BN
// layers at batch 128 run 512 blocks where one block per channel ran 64-512.
// Only CUDA headers: compiles with plain nvcc.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_elementwise.cuh"

namespace sophon_fast {
namespace cuda {

constexpr int kChannelThreads = 256;
// Blocks wanted per SM (4 x 8 warps: half an SM's 64 warps), chunks of at
// least kMinChunkValues values (16 KiB of fp32: the partials and their combine
// cost ~1 % of a chunk's traffic), as the Triton plan (batch_norm.chunk_plan).
constexpr int64_t kBlocksPerSm = 4;
constexpr int64_t kMinChunkValues = 4096;

__device__ __forceinline__ float rsqrt_c(float x) { return rsqrtf(x); }
__device__ __forceinline__ double rsqrt_c(double x) { return rsqrt(x); }

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t pow2_at_least(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Tiling and chunking of a (rows, cols) per-channel matrix (see the header).
struct ChunkPlan {
  int64_t rows, cols;
  int block_r, block_s, shift_s;  // block_s == 1 << shift_s
  int64_t n_col_tiles, n_tiles, tiles, n_chunks;

  // Tile t's first row and column.
  __device__ __forceinline__ void tile_origin(int64_t t, int64_t& r0, int64_t& s0) const {
    const int64_t row_tile = t / n_col_tiles;  // once per tile
    r0 = row_tile * block_r;
    s0 = (t - row_tile * n_col_tiles) * block_s;
  }
  // This thread's (row, column) offset inside a tile.
  __device__ __forceinline__ int thread_row() const {
    return static_cast<int>(threadIdx.x) >> shift_s;
  }
  __device__ __forceinline__ int thread_col() const {
    return static_cast<int>(threadIdx.x) & (block_s - 1);
  }
  __device__ __forceinline__ int64_t first_tile() const { return blockIdx.y * tiles; }
  __device__ __forceinline__ int64_t end_tile() const {
    const int64_t end = first_tile() + tiles;
    return end < n_tiles ? end : n_tiles;
  }
};

// Chunks of a (rows, cols) matrix over `channels` on the current device:
// enough that channels x chunks reaches kBlocksPerSm blocks per SM, none under
// kMinChunkValues values (cell_values input values per matrix entry: 4 for 2x2
// windows); tiles per chunk a power of two as in Triton.
inline ChunkPlan chunk_plan(int64_t rows, int64_t cols, int64_t channels, int64_t cell_values = 1) {
  ChunkPlan p{};
  p.rows = rows < 1 ? 1 : rows;
  p.cols = cols < 1 ? 1 : cols;
  const int64_t block = kChannelThreads;
  int64_t block_s = p.cols <= block ? pow2_at_least(p.cols) : block;
  if (p.cols > block && cdiv(p.cols, 128) * 128 < cdiv(p.cols, block) * block) block_s = 128;
  p.block_s = static_cast<int>(block_s);
  p.shift_s = 0;
  while ((1 << p.shift_s) < p.block_s) ++p.shift_s;
  p.block_r = static_cast<int>(block / block_s);
  p.n_col_tiles = cdiv(p.cols, block_s);
  p.n_tiles = cdiv(p.rows, p.block_r) * p.n_col_tiles;
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess)
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t target = kBlocksPerSm * sms;
  int64_t want = cdiv(target, channels < 1 ? 1 : channels);
  const int64_t by_size = p.rows * p.cols * cell_values / kMinChunkValues;
  if (by_size < want) want = by_size;
  if (want < 1) want = 1;
  p.tiles = pow2_at_least(cdiv(p.n_tiles, want));
  p.n_chunks = cdiv(p.n_tiles, p.tiles);
  return p;
}

// Block-wide sum; every thread gets the result. shared: kChannelThreads / 32
// values.
template <typename C>
__device__ C block_sum(C v, C* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = shared[0];
  for (int w = 1; w < kChannelThreads / 32; ++w) v += shared[w];
  return v;
}

// Pass 1 of the forwards: chunk blockIdx.y of channel blockIdx.x of an NCHW
// tensor (rows = batch, cols = spatial, row stride channels * spatial) writes
// (count, mean, M2) to planes 0..2 of `partial`, the M2 about the chunk's mean
// in a second sweep over the chunk (from cache).
template <typename T, typename C>
__global__ void channel_stats_kernel(const T* __restrict__ x, C* __restrict__ partial,
                                     ChunkPlan p) {
  __shared__ C shared[kChannelThreads / 32];
  const int64_t c = blockIdx.x, channels = gridDim.x, k = blockIdx.y;
  const int64_t row_stride = channels * p.cols;
  const T* x_c = x + c * p.cols;
  const int tr = p.thread_row(), ts = p.thread_col();
  C sum = 0, n = 0;
  for (int64_t t = p.first_tile(); t < p.end_tile(); ++t) {
    int64_t r0, s0;
    p.tile_origin(t, r0, s0);
    const int64_t r = r0 + tr, s = s0 + ts;
    if (r < p.rows && s < p.cols) {
      sum += load_as(x_c, r * row_stride + s);
      n += C(1);
    }
  }
  const C count = block_sum(n, shared);
  const C mean = block_sum(sum, shared) / count;
  C m2 = 0;
  for (int64_t t = p.first_tile(); t < p.end_tile(); ++t) {
    int64_t r0, s0;
    p.tile_origin(t, r0, s0);
    const int64_t r = r0 + tr, s = s0 + ts;
    if (r < p.rows && s < p.cols) {
      const C d = load_as(x_c, r * row_stride + s) - mean;
      m2 += d * d;
    }
  }
  m2 = block_sum(m2, shared);
  if (threadIdx.x == 0) {
    const int64_t plane = channels * p.n_chunks, at = c * p.n_chunks + k;
    partial[at] = count;
    partial[plane + at] = mean;
    partial[2 * plane + at] = m2;
  }
}

// Channel c's (mean, biased variance) from its chunks' (count, mean, M2):
// Chan's combine, M2 = sum M2_k + sum n_k (mean_k - mean)^2 (no cancellation).
template <typename C>
__device__ void channel_moments(const C* __restrict__ partial, int64_t c, int64_t channels,
                                int64_t n_chunks, C count, C* shared, C& mean, C& var) {
  const int64_t plane = channels * n_chunks;
  const C* row = partial + c * n_chunks;
  C s = 0;
  for (int64_t k = threadIdx.x; k < n_chunks; k += kChannelThreads) s += row[k] * row[plane + k];
  mean = block_sum(s, shared) / count;
  C m2 = 0;
  for (int64_t k = threadIdx.x; k < n_chunks; k += kChannelThreads) {
    const C d = row[plane + k] - mean;
    m2 += row[2 * plane + k] + row[k] * d * d;
  }
  var = block_sum(m2, shared) / count;
}

// Sum over chunks of channel c's plane `plane` of a (planes, channels, chunks)
// workspace.
template <typename C>
__device__ C channel_sum(const C* __restrict__ partial, int plane, int64_t c, int64_t channels,
                         int64_t n_chunks, C* shared) {
  const C* row = partial + (plane * channels + c) * n_chunks;
  C s = 0;
  for (int64_t k = threadIdx.x; k < n_chunks; k += kChannelThreads) s += row[k];
  return block_sum(s, shared);
}

// Running statistics of channel c as torch: momentum * batch + (1 - momentum)
// * running, the variance unbiased over count values. Either may be null.
template <typename C>
__device__ __forceinline__ void update_running(C* running_mean, C* running_var, int64_t c, C mean,
                                               C var, C count, double momentum) {
  const C m = static_cast<C>(momentum);
  if (running_mean != nullptr) running_mean[c] = m * mean + (C(1) - m) * running_mean[c];
  if (running_var != nullptr)
    running_var[c] = m * var * count / (count - C(1)) + (C(1) - m) * running_var[c];
}

}  // namespace cuda
}  // namespace sophon_fast
