// bn_relu_pool, CPU kernels. NCHW: one channel per task (at::parallel_for over
// channels), its batch planes visited twice; a 28x28 channel of SmallCNN's
// batch 130 is 400 KB, so the second visit reads L2, not memory. channels_last:
// rows of channels, per-thread float64 channel sums, then the window pass over
// pairs of input rows. Statistics: one pass of sums shifted by the
// channel's first value (no cancellation for a large mean). Per window the
// four z = a x + b are compared in row-major order with a strict >, which
// picks torch max_pool2d's index among ties; the forward writes only
// max(z, 0), the backward recomputes the choice instead of reading indices.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "bn_relu_pool.h"

namespace sophon_fast {
namespace {

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Statistics terms summed in the compute dtype per block (NCHW: 256 values,
// 64 per vector lane; channels_last: 64 rows), each block then added in
// float64: at most 64 float32 roundings in a row, and the float32 loops run
// at twice the float64 vector width (SSE2).
constexpr int64_t kStatsBlock = 256;
constexpr int64_t kStatsRows = 64;

struct Geometry {
  int64_t batch, channels, height, width;
  int64_t hw() const { return height * width; }
  int64_t pooled_h() const { return height / 2; }
  int64_t pooled_w() const { return width / 2; }
  double count() const { return static_cast<double>(batch * height * width); }
};

Geometry geometry_of(const at::Tensor& x) { return {x.size(0), x.size(1), x.size(2), x.size(3)}; }

// Statistics from shifted sums: sum d, sum d^2 with d = x - shift.
void finish_stats(double s1, double s2, double shift, double count, double eps, double* mean,
                  double* invstd, double* var) {
  const double m = s1 / count;
  const double v = std::max(s2 / count - m * m, 0.0);
  *mean = m + shift;
  *var = v;
  *invstd = 1.0 / std::sqrt(v + eps);
}

// z = a x + b: the one formula every pass uses, so forward and backward round alike.
template <typename C>
void affine(const double* weight, const double* bias, const double* mean, const double* invstd,
            int64_t c, C* a, C* b) {
  const double scale = invstd[c] * (weight ? weight[c] : 1.0);
  *a = static_cast<C>(scale);
  *b = static_cast<C>((bias ? bias[c] : 0.0) - mean[c] * scale);
}

namespace portable {
#include "bn_relu_pool_cpu_kernels.h"  // NOLINT(build/include): the kernels at the baseline ISA
}  // namespace portable

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SOPHON_FAST_BN_RELU_POOL_AVX2 1
// The build targets baseline x86-64 (SSE2: 4 floats a vector); the same loops
// compiled for AVX2 run 8 wide where the CPU has it.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "bn_relu_pool_cpu_kernels.h"  // NOLINT(build/include)
}  // namespace avx2
#pragma GCC pop_options

// SOPHON_FAST_NO_AVX2=1 (read at each call) runs the portable kernels, so
// tests check both builds of the loops on an AVX2 machine.
bool use_avx2() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* off = std::getenv("SOPHON_FAST_NO_AVX2");
  return supported && !(off != nullptr && off[0] == '1');
}
#endif

// Runs kernel<T> from the avx2 namespace where supported, else the portable one.
#ifdef SOPHON_FAST_BN_RELU_POOL_AVX2
#define SOPHON_FAST_RUN(kernel, ...) \
  (use_avx2() ? avx2::kernel<scalar_t>(__VA_ARGS__) : portable::kernel<scalar_t>(__VA_ARGS__))
#else
#define SOPHON_FAST_RUN(kernel, ...) portable::kernel<scalar_t>(__VA_ARGS__)
#endif

}  // namespace

void bn_relu_pool_forward_cpu(const at::Tensor& x, const double* weight, const double* bias,
                              at::Tensor& y, double* mean, double* invstd, double* var,
                              double eps) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_pool_forward",
      [&] { SOPHON_FAST_RUN(forward_nchw, x, weight, bias, y, mean, invstd, var, eps); });
}

void bn_relu_pool_backward_cpu(const at::Tensor& x, const double* weight, const double* bias,
                               const at::Tensor& grad_y, const double* mean, const double* invstd,
                               at::Tensor& dx, double* dweight, double* dbias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_pool_backward", [&] {
        SOPHON_FAST_RUN(backward_nchw, x, weight, bias, grad_y, mean, invstd, dx, dweight, dbias);
      });
}

void bn_relu_pool_forward_cpu_nhwc(const at::Tensor& x, const double* weight, const double* bias,
                                   at::Tensor& y, double* mean, double* invstd, double* var,
                                   double eps) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_pool_forward_nhwc",
      [&] { SOPHON_FAST_RUN(forward_nhwc, x, weight, bias, y, mean, invstd, var, eps); });
}

void bn_relu_pool_backward_cpu_nhwc(const at::Tensor& x, const double* weight, const double* bias,
                                    const at::Tensor& grad_y, const double* mean,
                                    const double* invstd, at::Tensor& dx, double* dweight,
                                    double* dbias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_pool_backward_nhwc", [&] {
        SOPHON_FAST_RUN(backward_nhwc, x, weight, bias, grad_y, mean, invstd, dx, dweight, dbias);
      });
}

#undef SOPHON_FAST_RUN

}  // namespace sophon_fast
