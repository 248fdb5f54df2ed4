// flat optimizer family: what the per-element maths of every optimizer shares
// (flat_momentum_math.h, flat_adam_math.h, flat_rmsprop_math.h,
// flat_adagrad_math.h, flat_adadelta_math.h), used by the C++ CPU loops and the CUDA kernels alike
// so the two cannot drift apart. Torch-free. C is the compute type (float, or double for float64
// buffers).
//
// Each stateful update is split at its square root: *_moments produces the
// radicand, the caller takes the root, *_finish (or *_vjp) completes the
// element. The CPU loops take the roots of a whole chunk with SIMD
// instructions in between (a scalar sqrt call sets errno and blocks
// vectorisation: Adam was compute-bound at ~5 GB/s); CUDA calls all three
// per element. Same maths, same rounding on both.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define SF_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined: the CPU instantiates these with a packed vector as C inside
// AVX2 functions, and an out-of-line copy would be built without AVX2.
#define SF_HD __attribute__((always_inline)) inline
#else
#define SF_HD inline
#endif

namespace sophon_fast {
namespace optim {

// sqrt of max(x, 0): branch-free, so the CPU loops vectorise.
template <typename C>
SF_HD C sqrt_pos(C x) {
  return std::sqrt(x > C(0) ? x : C(0));
}

}  // namespace optim
}  // namespace sophon_fast
