// Element load/store helpers shared by every torch-free CUDA kernel file.
//
// Storage dtypes float32, float16 and bfloat16 compute in float32; float64 in float64, so every
// backend rounds the same way (the reference twins do the same).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

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

}  // namespace cuda
}  // namespace sophon_fast
