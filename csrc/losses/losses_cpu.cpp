// losses, CPU kernels. Each row of logits is one (or, for ice_paper, two)
// logsumexp problems solved while the row sits in L1 (4 KB at 1000 classes):
// max, sum of exponentials (stored into the gradient row), then rescale. The
// logits are read once from memory and the gradient written once: 8 B per
// logit at fp32, against ~24-40 B and 5-23 kernels for the eager formulas.
//
// Rows of few classes (<= 32, e.g. 150 x 10) go through a block path whose
// exponentials run as one flat vector loop over 64 rows at a time.
//
// exp is a branch-free Cephes polynomial (~1 ulp) so the loops vectorise; the
// float32 row kernel is compiled for AVX-512, AVX2 and baseline x86-64 and
// picked at load time (target_clones), since the extension is built for the
// baseline ISA. fp16/bf16 rows are converted to a float32 scratch row first;
// fp64 uses std::exp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "losses.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SOPHON_FAST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SOPHON_FAST_CLONES
#endif

namespace sophon_fast {
namespace {

// exp(x) = 2^n exp(r), n = round(x log2 e), |r| <= ln2 / 2; Cephes expf
// coefficients. Inputs are clamped to [-87, 88]: exp(-87) = 1.6e-38 stands for
// 0 (every caller adds it to a sum >= 1).
inline __attribute__((always_inline)) float exp_fast(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline __attribute__((always_inline)) double exp_fast(double x) { return std::exp(x); }

// One row: writes the gradient row (already divided by the batch) and returns
// the row's loss. T is float or double.
template <typename T>
inline __attribute__((always_inline)) double loss_row(const T* __restrict__ z, int64_t label,
                                                      T* __restrict__ g, int64_t classes,
                                                      int64_t kind, T inv_batch) {
  const T sign = kind == kLossIce ? T(-1) : T(1);
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < classes; ++j) m = std::max(m, sign * z[j]);
  T s = 0;
  T z_sum = 0;
#pragma omp simd reduction(+ : s, z_sum)
  for (int64_t j = 0; j < classes; ++j) {
    const T e = exp_fast(sign * z[j] - m);
    g[j] = e;
    s += e;
    z_sum += z[j];
  }
  const T lse = m + std::log(s);
  const T scale = inv_batch / s;
  const T true_logit = kind == kLossKlu ? T(0) : z[label];
  if (kind == kLossCe || kind == kLossKlu) {
    const T shift = kind == kLossKlu ? inv_batch / static_cast<T>(classes) : T(0);
#pragma omp simd
    for (int64_t j = 0; j < classes; ++j) g[j] = g[j] * scale - shift;
    if (kind == kLossCe) {
      g[label] -= inv_batch;
      return static_cast<double>(lse - true_logit);
    }
    return static_cast<double>(lse) - static_cast<double>(z_sum) / static_cast<double>(classes) -
           std::log(static_cast<double>(classes));
  }
  if (kind == kLossIce) {
#pragma omp simd
    for (int64_t j = 0; j < classes; ++j) g[j] = -g[j] * scale;
    g[label] += inv_batch;
    return static_cast<double>(true_logit + lse);
  }
  // ice_paper: a second logsumexp over j != label with its own maximum, so a
  // true logit 100 above the rest leaves both sums >= 1 (finite, no
  // cancellation).
  // The label is masked through the operand (a select), not around the call:
  // the loops stay branch-free and vectorise (7 ns -> ~1 ns per logit at
  // 4096 x 1000). The label's term is then computed at -inf and zeroed.
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T mo = neg_inf;
#pragma omp simd reduction(max : mo)
  for (int64_t j = 0; j < classes; ++j) mo = std::max(mo, j == label ? neg_inf : z[j]);
  T so = 0;
#pragma omp simd reduction(+ : so)
  for (int64_t j = 0; j < classes; ++j) {
    const T e = exp_fast(z[j] - mo);
    so += j == label ? T(0) : e;
  }
  const T scale_o = inv_batch / so;
#pragma omp simd
  for (int64_t j = 0; j < classes; ++j) {
    const T e = exp_fast(z[j] - mo) * scale_o;
    g[j] = g[j] * scale - (j == label ? T(0) : e);
  }
  return static_cast<double>(lse - (mo + std::log(so)));
}

SOPHON_FAST_CLONES void rows_float(const float* z, int64_t ld_z, const int64_t* labels, float* g,
                                   int64_t ld_g, double* row_loss, int64_t classes, int64_t kind,
                                   float inv_batch, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r)
    row_loss[r] = loss_row<float>(z + r * ld_z, labels[r], g + r * ld_g, classes, kind, inv_batch);
}

void rows_double(const double* z, int64_t ld_z, const int64_t* labels, double* g, int64_t ld_g,
                 double* row_loss, int64_t classes, int64_t kind, double inv_batch, int64_t begin,
                 int64_t end) {
  for (int64_t r = begin; r < end; ++r)
    row_loss[r] = loss_row<double>(z + r * ld_z, labels[r], g + r * ld_g, classes, kind, inv_batch);
}

// Rows of at most kSmallClasses logits, kBlockRows rows at a time. A 10-wide
// row loop is all vector prologue and epilogue (~67 ns a row at 150 x 10,
// whatever the class count), so the per-row work here is short scalar loops
// (max, shift, sum, scale) and the exponentials, the only costly part, run as
// one flat vector loop over the whole block.
constexpr int64_t kSmallClasses = 32;
constexpr int64_t kBlockRows = 64;

SOPHON_FAST_CLONES void rows_float_small(const float* z, int64_t ld_z, const int64_t* labels,
                                         float* g, int64_t ld_g, double* row_loss, int64_t classes,
                                         int64_t kind, float inv_batch, int64_t begin,
                                         int64_t end) {
  alignas(64) float e[kBlockRows * kSmallClasses];   // exp(sign z - max) of each row
  alignas(64) float eo[kBlockRows * kSmallClasses];  // ice_paper: exp(z - max_{j != y})
  float top[kBlockRows], top_o[kBlockRows];
  const float sign = kind == kLossIce ? -1.0f : 1.0f;
  const bool paper = kind == kLossIcePaper;
  for (int64_t r0 = begin; r0 < end; r0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, end - r0);
    const int64_t n = rows * classes;
    for (int64_t r = 0; r < rows; ++r) {
      const float* zr = z + (r0 + r) * ld_z;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < classes; ++j) m = std::max(m, sign * zr[j]);
      top[r] = m;
      for (int64_t j = 0; j < classes; ++j) e[r * classes + j] = sign * zr[j] - m;
      if (paper) {
        const int64_t y = labels[r0 + r];
        float mo = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < classes; ++j) mo = j == y ? mo : std::max(mo, zr[j]);
        top_o[r] = mo;
        for (int64_t j = 0; j < classes; ++j) eo[r * classes + j] = zr[j] - mo;
      }
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) e[i] = exp_fast(e[i]);
    if (paper) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) eo[i] = exp_fast(eo[i]);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = r0 + r;
      const float* zr = z + row * ld_z;
      const float* er = e + r * classes;
      float* gr = g + row * ld_g;
      float s = 0.0f;
      for (int64_t j = 0; j < classes; ++j) s += er[j];
      const float lse = top[r] + std::log(s);
      const float scale = inv_batch / s;
      if (kind == kLossCe) {
        for (int64_t j = 0; j < classes; ++j) gr[j] = er[j] * scale;
        gr[labels[row]] -= inv_batch;
        row_loss[row] = static_cast<double>(lse - zr[labels[row]]);
      } else if (kind == kLossIce) {
        for (int64_t j = 0; j < classes; ++j) gr[j] = -er[j] * scale;
        gr[labels[row]] += inv_batch;
        row_loss[row] = static_cast<double>(zr[labels[row]] + lse);
      } else if (kind == kLossKlu) {
        const float shift = inv_batch / static_cast<float>(classes);
        float z_sum = 0.0f;
        for (int64_t j = 0; j < classes; ++j) {
          gr[j] = er[j] * scale - shift;
          z_sum += zr[j];
        }
        row_loss[row] = static_cast<double>(lse) -
                        static_cast<double>(z_sum) / static_cast<double>(classes) -
                        std::log(static_cast<double>(classes));
      } else {
        const int64_t y = labels[row];
        const float* eor = eo + r * classes;
        float so = 0.0f;
        for (int64_t j = 0; j < classes; ++j) so += j == y ? 0.0f : eor[j];
        const float scale_o = inv_batch / so;
        for (int64_t j = 0; j < classes; ++j)
          gr[j] = er[j] * scale - (j == y ? 0.0f : eor[j] * scale_o);
        row_loss[row] = static_cast<double>(lse - (top_o[r] + std::log(so)));
      }
    }
  }
}

// Rows per task: ~32 K logits, so 150 x 10 runs on one thread (no hand-off)
// and 4096 x 1000 splits evenly across cores.
int64_t row_grain(int64_t classes) { return std::max<int64_t>(1, (1 << 15) / classes); }

}  // namespace

template <typename scalar_t>
void classification_rows(const at::Tensor& logits, const int64_t* y, at::Tensor& grad,
                         double* losses, int64_t kind) {
  const int64_t batch = logits.size(0), classes = logits.size(1);
  const int64_t ld_z = logits.stride(0), ld_g = grad.stride(0);
  const int64_t grain = row_grain(classes);
  const scalar_t* z = logits.const_data_ptr<scalar_t>();
  scalar_t* g = grad.mutable_data_ptr<scalar_t>();
  if constexpr (std::is_same_v<scalar_t, float>) {
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      if (classes <= kSmallClasses) {
        rows_float_small(z, ld_z, y, g, ld_g, losses, classes, kind, 1.0f / batch, begin, end);
      } else {
        rows_float(z, ld_z, y, g, ld_g, losses, classes, kind, 1.0f / batch, begin, end);
      }
    });
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      rows_double(z, ld_z, y, g, ld_g, losses, classes, kind, 1.0 / batch, begin, end);
    });
  } else {
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> zin(classes), gout(classes);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* zr = z + r * ld_z;
        for (int64_t j = 0; j < classes; ++j) zin[j] = static_cast<float>(zr[j]);
        rows_float(zin.data(), 0, y + r, gout.data(), 0, losses + r, classes, kind, 1.0f / batch, 0,
                   1);
        scalar_t* gr = g + r * ld_g;
        for (int64_t j = 0; j < classes; ++j) gr[j] = static_cast<scalar_t>(gout[j]);
      }
    });
  }
}

// Sum of squares of chunk [begin, end), writing grad = scale * d on the way.
template <typename scalar_t, typename C>
double square_chunk(const scalar_t* __restrict__ p, const scalar_t* __restrict__ t,
                    scalar_t* __restrict__ g, C scale, int64_t begin, int64_t end) {
  double acc = 0.0;
  if (t != nullptr) {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = begin; i < end; ++i) {
      const C d = static_cast<C>(p[i]) - static_cast<C>(t[i]);
      g[i] = static_cast<scalar_t>(scale * d);
      acc += static_cast<double>(d) * static_cast<double>(d);
    }
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = begin; i < end; ++i) {
      const C d = static_cast<C>(p[i]);
      g[i] = static_cast<scalar_t>(scale * d);
      acc += static_cast<double>(d) * static_cast<double>(d);
    }
  }
  return acc;
}

int64_t classification_loss_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                at::Tensor& grad, at::Tensor& row_loss, int64_t kind) {
  const int64_t batch = logits.size(0), classes = logits.size(1);
  const int64_t* y = labels.const_data_ptr<int64_t>();
  // Checked before any work: a bad label must raise, never index out of the
  // row. klu takes no labels (the caller passes zeros).
  if (kind != kLossKlu) {
    for (int64_t r = 0; r < batch; ++r) {
      if (y[r] < 0 || y[r] >= classes) return r;
    }
  }
  double* losses = row_loss.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "classification_loss_cpu",
      [&] { classification_rows<scalar_t>(logits, y, grad, losses, kind); });
  return -1;
}

double mean_square_loss_cpu(const at::Tensor& prediction, const at::Tensor* target,
                            at::Tensor& grad, double grad_scale) {
  const int64_t n = prediction.numel();
  // Fixed 64 K-element chunks summed in order: the result does not depend on
  // the thread count.
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, prediction.scalar_type(), "mean_square_loss_cpu", [&] {
        using C = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        const scalar_t* p = prediction.const_data_ptr<scalar_t>();
        const scalar_t* t = target ? target->const_data_ptr<scalar_t>() : nullptr;
        scalar_t* g = grad.mutable_data_ptr<scalar_t>();
        const C scale = static_cast<C>(grad_scale);
        at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) {
            partial[c] = square_chunk<scalar_t, C>(p, t, g, scale, c * kChunk,
                                                   std::min(n, (c + 1) * kChunk));
          }
        });
      });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

}  // namespace sophon_fast
