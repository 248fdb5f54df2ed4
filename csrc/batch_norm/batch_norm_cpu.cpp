// batch_norm, CPU kernels on NCHW-contiguous tensors: channels in parallel
// (at::parallel_for), each channel's (batch, H*W) plane visited twice: one
// reduction pass (sums in float64), one elementwise pass. The double backward
// reads x, gy, ggx and writes gx, ggy: 5 tensor passes + 3 reads for the sums,
// where eager autograd runs ~100 ops (each a full read and often a write) per
// BN layer.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "batch_norm.h"

namespace sophon_fast {
namespace {

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

struct Plane {
  int64_t batch, channels, spatial;
  int64_t offset(int64_t n, int64_t c) const { return (n * channels + c) * spatial; }
  int64_t count() const { return batch * spatial; }
};

Plane plane_of(const at::Tensor& x) { return {x.size(0), x.size(1), x.size(2) * x.size(3)}; }

// A grain of 1 channel: ResNet-18's BN layers have 64-512 channels, enough to
// split evenly over the cores.
template <typename F>
void for_channels(const Plane& p, const F& f) {
  at::parallel_for(0, p.channels, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c);
  });
}

template <typename T>
void forward_impl(const at::Tensor& x, const double* weight, const double* bias, at::Tensor& y,
                  double* mean, double* invstd, double* var, double eps) {
  using C = compute_t<T>;
  const Plane p = plane_of(x);
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  for_channels(p, [&](int64_t c) {
    double sum = 0.0;
    for (int64_t n = 0; n < p.batch; ++n) {
      const T* xr = xp + p.offset(n, c);
#pragma omp simd reduction(+ : sum)
      for (int64_t s = 0; s < p.spatial; ++s) sum += static_cast<double>(xr[s]);
    }
    const double mu = sum / static_cast<double>(p.count());
    double sq = 0.0;  // two-pass variance: no cancellation for large means
    for (int64_t n = 0; n < p.batch; ++n) {
      const T* xr = xp + p.offset(n, c);
#pragma omp simd reduction(+ : sq)
      for (int64_t s = 0; s < p.spatial; ++s) {
        const double d = static_cast<double>(xr[s]) - mu;
        sq += d * d;
      }
    }
    const double v = sq / static_cast<double>(p.count());
    const double is = 1.0 / std::sqrt(v + eps);
    mean[c] = mu;
    invstd[c] = is;
    var[c] = v;
    const C scale = static_cast<C>(is * (weight ? weight[c] : 1.0));
    const C shift = static_cast<C>((bias ? bias[c] : 0.0) - mu * is * (weight ? weight[c] : 1.0));
    for (int64_t n = 0; n < p.batch; ++n) {
      const T* xr = xp + p.offset(n, c);
      T* yr = yp + p.offset(n, c);
#pragma omp simd
      for (int64_t s = 0; s < p.spatial; ++s)
        yr[s] = static_cast<T>(static_cast<C>(xr[s]) * scale + shift);
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& x, const double* weight, const at::Tensor& grad_y,
                   const double* mean, const double* invstd, at::Tensor& dx, double* dweight,
                   double* dbias) {
  using C = compute_t<T>;
  const Plane p = plane_of(x);
  const T* xp = x.const_data_ptr<T>();
  const T* gp = grad_y.const_data_ptr<T>();
  T* dp = dx.mutable_data_ptr<T>();
  const double inv_count = 1.0 / static_cast<double>(p.count());
  for_channels(p, [&](int64_t c) {
    const C mu = static_cast<C>(mean[c]);
    double sum_g = 0.0, sum_gx = 0.0;  // sum gy, sum gy * (x - mu)
    for (int64_t n = 0; n < p.batch; ++n) {
      const T* xr = xp + p.offset(n, c);
      const T* gr = gp + p.offset(n, c);
#pragma omp simd reduction(+ : sum_g, sum_gx)
      for (int64_t s = 0; s < p.spatial; ++s) {
        const C g = static_cast<C>(gr[s]);
        sum_g += g;
        sum_gx += static_cast<double>(g * (static_cast<C>(xr[s]) - mu));
      }
    }
    const double is = invstd[c];
    const double w = weight ? weight[c] : 1.0;
    dbias[c] = sum_g;
    dweight[c] = sum_gx * is;
    // dx = w is (gy - bar(gy) - xhat bar(gy xhat)) = a gy + b (x - mu) + k
    const C a = static_cast<C>(w * is);
    const C b = static_cast<C>(-w * is * is * is * sum_gx * inv_count);
    const C k = static_cast<C>(-w * is * sum_g * inv_count);
    for (int64_t n = 0; n < p.batch; ++n) {
      const T* xr = xp + p.offset(n, c);
      const T* gr = gp + p.offset(n, c);
      T* dr = dp + p.offset(n, c);
#pragma omp simd
      for (int64_t s = 0; s < p.spatial; ++s)
        dr[s] = static_cast<T>(a * static_cast<C>(gr[s]) + b * (static_cast<C>(xr[s]) - mu) + k);
    }
  });
}

template <typename T>
void double_backward_impl(const at::Tensor& x, const double* weight, const at::Tensor& grad_y,
                          const double* mean, const double* invstd, const at::Tensor* grad_dx,
                          const double* grad_dweight, const double* grad_dbias, at::Tensor& gx,
                          double* gweight, at::Tensor& ggrad_y) {
  using C = compute_t<T>;
  const Plane p = plane_of(x);
  const T* xp = x.const_data_ptr<T>();
  const T* gp = grad_y.const_data_ptr<T>();
  const T* hp = grad_dx ? grad_dx->const_data_ptr<T>() : nullptr;
  T* gxp = gx.mutable_data_ptr<T>();
  T* ggp = ggrad_y.mutable_data_ptr<T>();
  const double count = static_cast<double>(p.count());
  for_channels(p, [&](int64_t c) {
    const C mu = static_cast<C>(mean[c]);
    const double is = invstd[c];
    // Sums over the channel of gy, gy d, h, h d, h gy with d = x - mu, h = ggx.
    double s_g = 0.0, s_gd = 0.0, s_h = 0.0, s_hd = 0.0, s_hg = 0.0;
    for (int64_t n = 0; n < p.batch; ++n) {
      const T* xr = xp + p.offset(n, c);
      const T* gr = gp + p.offset(n, c);
      if (hp) {
        const T* hr = hp + p.offset(n, c);
#pragma omp simd reduction(+ : s_g, s_gd, s_h, s_hd, s_hg)
        for (int64_t s = 0; s < p.spatial; ++s) {
          const C g = static_cast<C>(gr[s]);
          const C d = static_cast<C>(xr[s]) - mu;
          const C h = static_cast<C>(hr[s]);
          s_g += g;
          s_gd += g * d;
          s_h += h;
          s_hd += h * d;
          s_hg += h * g;
        }
      } else {
#pragma omp simd reduction(+ : s_g, s_gd)
        for (int64_t s = 0; s < p.spatial; ++s) {
          const C g = static_cast<C>(gr[s]);
          s_g += g;
          s_gd += g * (static_cast<C>(xr[s]) - mu);
        }
      }
    }
    const double w = weight ? weight[c] : 1.0;
    const double ggw = grad_dweight ? grad_dweight[c] : 0.0;
    const double ggb = grad_dbias ? grad_dbias[c] : 0.0;
    const double g_bar = s_g / count, h_bar = s_h / count;
    const double g_hat = s_gd * is / count;  // bar(gy xhat)
    const double a_hat = s_hd * is / count;  // bar(ggx xhat)
    const double s1 = s_hg / count - h_bar * g_bar;
    gweight[c] = is * count * (s1 - a_hat * g_hat);
    // gx = w is^2 (xhat (3 a g - s1) - g (h - h_bar) - a (gy - g_bar))
    //      + ggw is (gy - g_bar - xhat g)
    //    = cg gy + ch h + cd d + c0,   xhat = d is
    const double w2 = w * is * is;
    const C cg = static_cast<C>(-w2 * a_hat + ggw * is);
    const C ch = static_cast<C>(-w2 * g_hat);
    const C cd = static_cast<C>(w2 * is * (3.0 * a_hat * g_hat - s1) - ggw * is * is * g_hat);
    const C c0 = static_cast<C>(w2 * (g_hat * h_bar + a_hat * g_bar) - ggw * is * g_bar);
    // ggy = w is (h - h_bar - xhat a) + ggw xhat + ggb = eh h + ed d + e0
    const C eh = static_cast<C>(w * is);
    const C ed = static_cast<C>(-w * is * is * a_hat + ggw * is);
    const C e0 = static_cast<C>(-w * is * h_bar + ggb);
    for (int64_t n = 0; n < p.batch; ++n) {
      const T* xr = xp + p.offset(n, c);
      const T* gr = gp + p.offset(n, c);
      T* gxr = gxp + p.offset(n, c);
      T* ggr = ggp + p.offset(n, c);
      if (hp) {
        const T* hr = hp + p.offset(n, c);
#pragma omp simd
        for (int64_t s = 0; s < p.spatial; ++s) {
          const C d = static_cast<C>(xr[s]) - mu;
          const C h = static_cast<C>(hr[s]);
          gxr[s] = static_cast<T>(cg * static_cast<C>(gr[s]) + ch * h + cd * d + c0);
          ggr[s] = static_cast<T>(eh * h + ed * d + e0);
        }
      } else {
#pragma omp simd
        for (int64_t s = 0; s < p.spatial; ++s) {
          const C d = static_cast<C>(xr[s]) - mu;
          gxr[s] = static_cast<T>(cg * static_cast<C>(gr[s]) + cd * d + c0);
          ggr[s] = static_cast<T>(ed * d + e0);
        }
      }
    }
  });
}

}  // namespace

void batch_norm_forward_cpu(const at::Tensor& x, const double* weight, const double* bias,
                            at::Tensor& y, double* mean, double* invstd, double* var, double eps) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_forward",
      [&] { forward_impl<scalar_t>(x, weight, bias, y, mean, invstd, var, eps); });
}

void batch_norm_backward_cpu(const at::Tensor& x, const double* weight, const at::Tensor& grad_y,
                             const double* mean, const double* invstd, at::Tensor& dx,
                             double* dweight, double* dbias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_backward",
      [&] { backward_impl<scalar_t>(x, weight, grad_y, mean, invstd, dx, dweight, dbias); });
}

void batch_norm_double_backward_cpu(const at::Tensor& x, const double* weight,
                                    const at::Tensor& grad_y, const double* mean,
                                    const double* invstd, const at::Tensor* grad_dx,
                                    const double* grad_dweight, const double* grad_dbias,
                                    at::Tensor& gx, double* gweight, at::Tensor& ggrad_y) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_double_backward", [&] {
        double_backward_impl<scalar_t>(x, weight, grad_y, mean, invstd, grad_dx, grad_dweight,
                                       grad_dbias, gx, gweight, ggrad_y);
      });
}

}  // namespace sophon_fast

// channels_last (NHWC) kernels: x is a (rows = N*H*W, C) matrix. Per-channel
// sums run over row blocks in parallel, each thread adding whole rows into its
// own (K, C) float64 accumulator (contiguous, vectorised over channels), then
// the thread partials are added up; the elementwise pass runs over rows too.
// No layout conversion: a channels_last input used to cost one copy in and one
// out per call.
namespace sophon_fast {
namespace {

struct Rows {
  int64_t rows, channels;
};

Rows rows_of(const at::Tensor& x) { return {x.size(0) * x.size(2) * x.size(3), x.size(1)}; }

// ~32 K values per task: small tensors stay on one thread.
int64_t row_grain(int64_t channels) { return std::max<int64_t>(1, (1 << 15) / channels); }

// out[k * C + c] = sum over rows of the K per-channel terms add(row, acc) adds.
template <typename F>
std::vector<double> channel_sums(const Rows& p, int64_t terms, const F& add) {
  const int64_t width = terms * p.channels;
  std::vector<double> partial(static_cast<size_t>(at::get_num_threads() * width), 0.0);
  at::parallel_for(0, p.rows, row_grain(p.channels), [&](int64_t r0, int64_t r1) {
    double* acc = partial.data() + at::get_thread_num() * width;
    for (int64_t r = r0; r < r1; ++r) add(r, acc);
  });
  std::vector<double> out(static_cast<size_t>(width), 0.0);
  for (size_t t = 0; t < partial.size(); t += static_cast<size_t>(width))
    for (int64_t i = 0; i < width; ++i) out[i] += partial[t + i];
  return out;
}

template <typename F>
void for_rows(const Rows& p, const F& f) {
  at::parallel_for(0, p.rows, row_grain(p.channels), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) f(r);
  });
}

template <typename T>
void forward_nhwc(const at::Tensor& x, const double* weight, const double* bias, at::Tensor& y,
                  double* mean, double* invstd, double* var, double eps) {
  using C = compute_t<T>;
  const Rows p = rows_of(x);
  const int64_t nc = p.channels;
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const auto sums = channel_sums(p, 1, [&](int64_t r, double* acc) {
    const T* xr = xp + r * nc;
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c) acc[c] += static_cast<double>(xr[c]);
  });
  const double count = static_cast<double>(p.rows);
  for (int64_t c = 0; c < nc; ++c) mean[c] = sums[c] / count;
  const auto squares = channel_sums(p, 1, [&](int64_t r, double* acc) {
    const T* xr = xp + r * nc;
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c) {
      const double d = static_cast<double>(xr[c]) - mean[c];
      acc[c] += d * d;
    }
  });
  std::vector<C> scale(nc), shift(nc);
  for (int64_t c = 0; c < nc; ++c) {
    var[c] = squares[c] / count;
    invstd[c] = 1.0 / std::sqrt(var[c] + eps);
    const double w = weight ? weight[c] : 1.0;
    scale[c] = static_cast<C>(invstd[c] * w);
    shift[c] = static_cast<C>((bias ? bias[c] : 0.0) - mean[c] * invstd[c] * w);
  }
  for_rows(p, [&](int64_t r) {
    const T* xr = xp + r * nc;
    T* yr = yp + r * nc;
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c)
      yr[c] = static_cast<T>(static_cast<C>(xr[c]) * scale[c] + shift[c]);
  });
}

template <typename T>
void backward_nhwc(const at::Tensor& x, const double* weight, const at::Tensor& grad_y,
                   const double* mean, const double* invstd, at::Tensor& dx, double* dweight,
                   double* dbias) {
  using C = compute_t<T>;
  const Rows p = rows_of(x);
  const int64_t nc = p.channels;
  const T* xp = x.const_data_ptr<T>();
  const T* gp = grad_y.const_data_ptr<T>();
  T* dp = dx.mutable_data_ptr<T>();
  std::vector<C> mu(nc);
  for (int64_t c = 0; c < nc; ++c) mu[c] = static_cast<C>(mean[c]);
  // sum gy, sum gy * (x - mu)
  const auto sums = channel_sums(p, 2, [&](int64_t r, double* acc) {
    const T* xr = xp + r * nc;
    const T* gr = gp + r * nc;
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c) {
      const C g = static_cast<C>(gr[c]);
      acc[c] += g;
      acc[nc + c] += static_cast<double>(g * (static_cast<C>(xr[c]) - mu[c]));
    }
  });
  const double inv_count = 1.0 / static_cast<double>(p.rows);
  std::vector<C> a(nc), b(nc), k(nc);
  for (int64_t c = 0; c < nc; ++c) {
    const double is = invstd[c], w = weight ? weight[c] : 1.0;
    dbias[c] = sums[c];
    dweight[c] = sums[nc + c] * is;
    a[c] = static_cast<C>(w * is);
    b[c] = static_cast<C>(-w * is * is * is * sums[nc + c] * inv_count);
    k[c] = static_cast<C>(-w * is * sums[c] * inv_count);
  }
  for_rows(p, [&](int64_t r) {
    const T* xr = xp + r * nc;
    const T* gr = gp + r * nc;
    T* dr = dp + r * nc;
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c)
      dr[c] = static_cast<T>(a[c] * static_cast<C>(gr[c]) + b[c] * (static_cast<C>(xr[c]) - mu[c]) +
                             k[c]);
  });
}

template <typename T>
void double_backward_nhwc(const at::Tensor& x, const double* weight, const at::Tensor& grad_y,
                          const double* mean, const double* invstd, const at::Tensor* grad_dx,
                          const double* grad_dweight, const double* grad_dbias, at::Tensor& gx,
                          double* gweight, at::Tensor& ggrad_y) {
  using C = compute_t<T>;
  const Rows p = rows_of(x);
  const int64_t nc = p.channels;
  const T* xp = x.const_data_ptr<T>();
  const T* gp = grad_y.const_data_ptr<T>();
  const T* hp = grad_dx ? grad_dx->const_data_ptr<T>() : nullptr;
  T* gxp = gx.mutable_data_ptr<T>();
  T* ggp = ggrad_y.mutable_data_ptr<T>();
  std::vector<C> mu(nc);
  for (int64_t c = 0; c < nc; ++c) mu[c] = static_cast<C>(mean[c]);
  // Sums of gy, gy d, h, h d, h gy with d = x - mu, h = grad_dx (rows k * C).
  const auto sums = channel_sums(p, 5, [&](int64_t r, double* acc) {
    const T* xr = xp + r * nc;
    const T* gr = gp + r * nc;
    const T* hr = hp ? hp + r * nc : nullptr;
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c) {
      const C g = static_cast<C>(gr[c]);
      const C d = static_cast<C>(xr[c]) - mu[c];
      const C h = hr ? static_cast<C>(hr[c]) : C(0);
      acc[c] += g;
      acc[nc + c] += g * d;
      acc[2 * nc + c] += h;
      acc[3 * nc + c] += h * d;
      acc[4 * nc + c] += h * g;
    }
  });
  const double count = static_cast<double>(p.rows);
  std::vector<C> cg(nc), ch(nc), cd(nc), c0(nc), eh(nc), ed(nc), e0(nc);
  for (int64_t c = 0; c < nc; ++c) {
    const double is = invstd[c], w = weight ? weight[c] : 1.0;
    const double ggw = grad_dweight ? grad_dweight[c] : 0.0;
    const double ggb = grad_dbias ? grad_dbias[c] : 0.0;
    const double g_bar = sums[c] / count, h_bar = sums[2 * nc + c] / count;
    const double g_hat = sums[nc + c] * is / count;
    const double a_hat = sums[3 * nc + c] * is / count;
    const double s1 = sums[4 * nc + c] / count - h_bar * g_bar;
    gweight[c] = is * count * (s1 - a_hat * g_hat);
    const double w2 = w * is * is;  // same closed forms as double_backward_impl
    cg[c] = static_cast<C>(-w2 * a_hat + ggw * is);
    ch[c] = static_cast<C>(-w2 * g_hat);
    cd[c] = static_cast<C>(w2 * is * (3.0 * a_hat * g_hat - s1) - ggw * is * is * g_hat);
    c0[c] = static_cast<C>(w2 * (g_hat * h_bar + a_hat * g_bar) - ggw * is * g_bar);
    eh[c] = static_cast<C>(w * is);
    ed[c] = static_cast<C>(-w * is * is * a_hat + ggw * is);
    e0[c] = static_cast<C>(-w * is * h_bar + ggb);
  }
  for_rows(p, [&](int64_t r) {
    const T* xr = xp + r * nc;
    const T* gr = gp + r * nc;
    const T* hr = hp ? hp + r * nc : nullptr;
    T* gxr = gxp + r * nc;
    T* ggr = ggp + r * nc;
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c) {
      const C d = static_cast<C>(xr[c]) - mu[c];
      const C h = hr ? static_cast<C>(hr[c]) : C(0);
      gxr[c] = static_cast<T>(cg[c] * static_cast<C>(gr[c]) + ch[c] * h + cd[c] * d + c0[c]);
      ggr[c] = static_cast<T>(eh[c] * h + ed[c] * d + e0[c]);
    }
  });
}

}  // namespace

void batch_norm_forward_cpu_nhwc(const at::Tensor& x, const double* weight, const double* bias,
                                 at::Tensor& y, double* mean, double* invstd, double* var,
                                 double eps) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_forward_nhwc",
      [&] { forward_nhwc<scalar_t>(x, weight, bias, y, mean, invstd, var, eps); });
}

void batch_norm_backward_cpu_nhwc(const at::Tensor& x, const double* weight,
                                  const at::Tensor& grad_y, const double* mean,
                                  const double* invstd, at::Tensor& dx, double* dweight,
                                  double* dbias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_backward_nhwc",
      [&] { backward_nhwc<scalar_t>(x, weight, grad_y, mean, invstd, dx, dweight, dbias); });
}

void batch_norm_double_backward_cpu_nhwc(const at::Tensor& x, const double* weight,
                                         const at::Tensor& grad_y, const double* mean,
                                         const double* invstd, const at::Tensor* grad_dx,
                                         const double* grad_dweight, const double* grad_dbias,
                                         at::Tensor& gx, double* gweight, at::Tensor& ggrad_y) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_double_backward_nhwc", [&] {
        double_backward_nhwc<scalar_t>(x, weight, grad_y, mean, invstd, grad_dx, grad_dweight,
                                       grad_dbias, gx, gweight, ggrad_y);
      });
}

}  // namespace sophon_fast
