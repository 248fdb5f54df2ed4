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

#include <cmath>
#include <type_traits>

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
