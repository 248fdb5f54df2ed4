// Helpers shared by every torch-free CUDA kernel file: element load/store in the compute dtype,
// the dtype-code dispatch of the extern "C" launchers, and the grid size of grid-stride loops.
//
// Storage dtypes float32, float16 and bfloat16 compute in float32; float64 in float64, so every
// backend rounds the same way (the reference twins do the same).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dtypes.h"

namespace sophon_fast {
namespace cuda {

template <typename T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

template <typename T>
__device__ __forceinline__ typename Compute<T>::type load_as(const T* ptr, int64_t i) {
  return static_cast<typename Compute<T>::type>(ptr[i]);
}
template <>
__device__ __forceinline__ float load_as<__half>(const __half* ptr, int64_t i) {
  return __half2float(ptr[i]);
}
template <>
__device__ __forceinline__ float load_as<__nv_bfloat16>(const __nv_bfloat16* ptr, int64_t i) {
  return __bfloat162float(ptr[i]);
}

template <typename T>
__device__ __forceinline__ T store_as(typename Compute<T>::type v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half store_as<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Calls fn(T{}) for the storage type T of a launcher's dtype code; cudaErrorInvalidValue for an
// unknown code. Launchers write `by_dtype(dtype, [&](auto tag) { using T = decltype(tag); ... })`.
template <typename Fn>
int by_dtype(int dtype, Fn&& fn) {
  switch (dtype) {
    case SOPHON_FAST_DTYPE_FLOAT32:
      return fn(float{});
    case SOPHON_FAST_DTYPE_FLOAT64:
      return fn(double{});
    case SOPHON_FAST_DTYPE_FLOAT16:
      return fn(__half{});
    case SOPHON_FAST_DTYPE_BFLOAT16:
      return fn(__nv_bfloat16{});
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

// Blocks for a grid-stride loop over n elements: at least 1, at most max_blocks (a capped grid
// keeps the launch cheap for ResNet-18-sized buffers without idle blocks).
inline unsigned grid_for(int64_t n, int threads = 256, int64_t max_blocks = 65535) {
  int64_t blocks = (n + threads - 1) / threads;
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

}  // namespace cuda
}  // namespace sophon_fast
