// bn_relu_pool CPU kernel bodies, included by bn_relu_pool_cpu.cpp twice:
// once for the baseline target and, on x86-64 GCC, once inside
// `#pragma GCC target("avx2,fma")` (twice the SIMD width; chosen at run time).
// Each inclusion sits in its own namespace; needs compute_t, Geometry,
// finish_stats, affine, kStatsBlock and kStatsRows from the includer.
// NOLINT(build/header_guard): meant to be included more than once.

// Branch-free max (std::max binds references to temporaries, which keeps GCC
// from vectorising the window loops).
template <typename C>
inline C vmax(C a, C b) {
  return a > b ? a : b;
}

// relu that keeps NaN, as torch.relu does (vmax(NaN, 0) is 0: a NaN batch
// statistic came out as a finite 0). One compare and a select: still vectorised.
template <typename C>
inline C relu_nan(C z) {
  return z <= C(0) ? C(0) : z;
}

// A 2x2 window's choice in row-major order with strict >: torch's first
// maximum. f_k = 1 when z_k beats every value before it (else 0), so the
// chosen index is the last k with f_k = 1 (0 if none); best = max z. The
// masks are 0/1 floats, never branches: GCC vectorises this, where selects
// chained on the comparisons were jump-threaded into a branchy scalar loop
// that mispredicted on every other window (6x slower).
#define SOPHON_WINDOW(z0, z1, z2, z3)       \
  const C b01 = vmax<C>((z0), (z1));        \
  const C b012 = vmax<C>(b01, (z2));        \
  const C best = vmax<C>(b012, (z3));       \
  const C f1 = static_cast<C>((z1) > (z0)); \
  const C f2 = static_cast<C>((z2) > b01);  \
  const C f3 = static_cast<C>((z3) > b012); \
  const C positive = static_cast<C>(best > C(0));

// g0..g3: v at the chosen window position, 0 at the other three, by 0/1
// products (exact for finite v). The mask multiplies last: positive * a * g
// let PRE split the loop on positive (a * 0.0), which stops vectorisation.
#define SOPHON_ROUTE(v)  \
  const C g3 = f3 * (v); \
  const C r3 = (v) - g3; \
  const C g2 = f2 * r3;  \
  const C r2 = r3 - g2;  \
  const C g1 = f1 * r2;  \
  const C g0 = r2 - g1;

template <typename T>
void forward_nchw(const at::Tensor& x, const double* weight, const double* bias, at::Tensor& y,
                  double* mean, double* invstd, double* var, double eps) {
  using C = compute_t<T>;
  const Geometry g = geometry_of(x);
  const int64_t hw = g.hw(), oh = g.pooled_h(), ow = g.pooled_w();
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  at::parallel_for(0, g.channels, 1, [&](int64_t c0, int64_t c1) {
    std::vector<C> pair_max(static_cast<size_t>(2 * ow));
    for (int64_t c = c0; c < c1; ++c) {
      const double shift = static_cast<double>(xp[c * hw]);
      const C shift_c = static_cast<C>(shift);
      double s1 = 0.0, s2 = 0.0;
      for (int64_t n = 0; n < g.batch; ++n) {
        const T* plane = xp + (n * g.channels + c) * hw;
        for (int64_t i0 = 0; i0 < hw; i0 += kStatsBlock) {
          const int64_t i1 = std::min(hw, i0 + kStatsBlock);
          C p1 = C(0), p2 = C(0);
#pragma omp simd reduction(+ : p1, p2)
          for (int64_t i = i0; i < i1; ++i) {
            const C d = static_cast<C>(plane[i]) - shift_c;
            p1 += d;
            p2 += d * d;
          }
          s1 += static_cast<double>(p1);
          s2 += static_cast<double>(p2);
        }
      }
      finish_stats(s1, s2, shift, g.count(), eps, mean + c, invstd + c, var + c);
      C a, b;
      affine(weight, bias, mean, invstd, c, &a, &b);
      C* pm = pair_max.data();
      for (int64_t n = 0; n < g.batch; ++n) {
        const T* plane = xp + (n * g.channels + c) * hw;
        T* out = yp + (n * g.channels + c) * oh * ow;
        for (int64_t i = 0; i < oh; ++i) {
          const T* r0 = plane + 2 * i * g.width;
          const T* r1 = r0 + g.width;
#pragma omp simd
          for (int64_t j = 0; j < 2 * ow; ++j)
            pm[j] = vmax(a * static_cast<C>(r0[j]) + b, a * static_cast<C>(r1[j]) + b);
          T* yr = out + i * ow;
#pragma omp simd
          for (int64_t j = 0; j < ow; ++j)
            yr[j] = static_cast<T>(relu_nan(vmax(pm[2 * j], pm[2 * j + 1])));
        }
      }
    }
  });
}

template <typename T>
void backward_nchw(const at::Tensor& x, const double* weight, const double* bias,
                   const at::Tensor& grad_y, const double* mean, const double* invstd,
                   at::Tensor& dx, double* dweight, double* dbias) {
  using C = compute_t<T>;
  const Geometry g = geometry_of(x);
  const int64_t hw = g.hw(), oh = g.pooled_h(), ow = g.pooled_w(), w = g.width;
  const T* xp = x.const_data_ptr<T>();
  const T* gp = grad_y.const_data_ptr<T>();
  T* dp = dx.mutable_data_ptr<T>();
  at::parallel_for(0, g.channels, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      C a, b;
      affine(weight, bias, mean, invstd, c, &a, &b);
      const C mu = static_cast<C>(mean[c]);
      // Pass 1: sum dz and sum dz (x - mean); dz is the pooled gradient at each
      // window's choice where its z > 0.
      double s_g = 0.0, s_gd = 0.0;
      for (int64_t n = 0; n < g.batch; ++n) {
        const T* plane = xp + (n * g.channels + c) * hw;
        const T* gplane = gp + (n * g.channels + c) * oh * ow;
        for (int64_t i = 0; i < oh; ++i) {
          const T* r0 = plane + 2 * i * w;
          const T* r1 = r0 + w;
          const T* gr = gplane + i * ow;
          C row_g = C(0), row_gd = C(0);  // one pooled row: ow terms, then into float64
#pragma omp simd reduction(+ : row_g, row_gd)
          for (int64_t j = 0; j < ow; ++j) {
            const C x0 = static_cast<C>(r0[2 * j]), x1 = static_cast<C>(r0[2 * j + 1]);
            const C x2 = static_cast<C>(r1[2 * j]), x3 = static_cast<C>(r1[2 * j + 1]);
            SOPHON_WINDOW(a * x0 + b, a * x1 + b, a * x2 + b, a * x3 + b)
            const C gv = static_cast<C>(gr[j]) * positive;
            SOPHON_ROUTE(gv)
            row_g += gv;
            row_gd += g0 * (x0 - mu) + g1 * (x1 - mu) + g2 * (x2 - mu) + g3 * (x3 - mu);
          }
          s_g += static_cast<double>(row_g);
          s_gd += static_cast<double>(row_gd);
        }
      }
      const double is = invstd[c], wc = weight ? weight[c] : 1.0;
      const double inv_count = 1.0 / g.count();
      dbias[c] = s_g;
      dweight[c] = s_gd * is;
      // dx = a dz + bc (x - mean) + k, the BatchNorm backward with dz sparse.
      const C bc = static_cast<C>(-wc * is * is * is * s_gd * inv_count);
      const C k = static_cast<C>(-wc * is * s_g * inv_count);
      for (int64_t n = 0; n < g.batch; ++n) {
        const T* plane = xp + (n * g.channels + c) * hw;
        const T* gplane = gp + (n * g.channels + c) * oh * ow;
        T* dplane = dp + (n * g.channels + c) * hw;
        for (int64_t i = 0; i < oh; ++i) {
          const T* r0 = plane + 2 * i * w;
          const T* r1 = r0 + w;
          T* d0 = dplane + 2 * i * w;
          T* d1 = d0 + w;
          const T* gr = gplane + i * ow;
#pragma omp simd
          for (int64_t j = 0; j < ow; ++j) {
            const C x0 = static_cast<C>(r0[2 * j]), x1 = static_cast<C>(r0[2 * j + 1]);
            const C x2 = static_cast<C>(r1[2 * j]), x3 = static_cast<C>(r1[2 * j + 1]);
            SOPHON_WINDOW(a * x0 + b, a * x1 + b, a * x2 + b, a * x3 + b)
            const C ag = a * static_cast<C>(gr[j]) * positive;
            SOPHON_ROUTE(ag)
            d0[2 * j] = static_cast<T>(bc * (x0 - mu) + k + g0);
            d0[2 * j + 1] = static_cast<T>(bc * (x1 - mu) + k + g1);
            d1[2 * j] = static_cast<T>(bc * (x2 - mu) + k + g2);
            d1[2 * j + 1] = static_cast<T>(bc * (x3 - mu) + k + g3);
          }
          if (w % 2 == 1) {  // the last column: in no window
            d0[w - 1] = static_cast<T>(bc * (static_cast<C>(r0[w - 1]) - mu) + k);
            d1[w - 1] = static_cast<T>(bc * (static_cast<C>(r1[w - 1]) - mu) + k);
          }
        }
        if (g.height % 2 == 1) {  // the last row: in no window
          const T* r = plane + (g.height - 1) * w;
          T* d = dplane + (g.height - 1) * w;
#pragma omp simd
          for (int64_t j = 0; j < w; ++j)
            d[j] = static_cast<T>(bc * (static_cast<C>(r[j]) - mu) + k);
        }
      }
    }
  });
}

// ---- channels_last: x is a (rows = N*H*W, C) matrix -------------------------

// Row pairs (n, i) per task: ~32 K input values, small tensors on one thread.
inline int64_t pair_grain(const Geometry& g) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, 2 * g.width * g.channels));
}

// out[k * C + c] = sum over row pairs of the K per-channel terms add(pair, acc) adds.
template <typename F>
std::vector<double> pair_sums(const Geometry& g, int64_t n_pairs, int64_t grain, int64_t terms,
                              const F& add) {
  const int64_t width = terms * g.channels;
  std::vector<double> partial(static_cast<size_t>(at::get_num_threads() * width), 0.0);
  at::parallel_for(0, n_pairs, grain, [&](int64_t p0, int64_t p1) {
    double* acc = partial.data() + at::get_thread_num() * width;
    for (int64_t p = p0; p < p1; ++p) add(p, acc);
  });
  std::vector<double> out(static_cast<size_t>(width), 0.0);
  for (size_t t = 0; t < partial.size(); t += static_cast<size_t>(width))
    for (int64_t i = 0; i < width; ++i) out[i] += partial[t + i];
  return out;
}

template <typename T>
void forward_nhwc(const at::Tensor& x, const double* weight, const double* bias, at::Tensor& y,
                  double* mean, double* invstd, double* var, double eps) {
  using C = compute_t<T>;
  const Geometry g = geometry_of(x);
  const int64_t nc = g.channels, oh = g.pooled_h(), ow = g.pooled_w(), w = g.width;
  const int64_t rows = g.batch * g.hw();
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  std::vector<double> shift(nc);
  std::vector<C> shift_c(nc);
  for (int64_t c = 0; c < nc; ++c) {
    shift_c[c] = static_cast<C>(xp[c]);
    shift[c] = static_cast<double>(shift_c[c]);
  }
  const C* sh = shift_c.data();
  const int64_t row_block = std::max<int64_t>(1, (int64_t(1) << 15) / nc);
  const auto sums =
      pair_sums(g, (rows + row_block - 1) / row_block, 1, 2, [&](int64_t blk, double* acc) {
        const int64_t r_end = std::min(rows, (blk + 1) * row_block);
        std::vector<C> part(static_cast<size_t>(2 * nc));
        C* p = part.data();
        for (int64_t r0 = blk * row_block; r0 < r_end; r0 += kStatsRows) {
          std::fill(part.begin(), part.end(), C(0));
          const int64_t r1 = std::min(r_end, r0 + kStatsRows);
          for (int64_t r = r0; r < r1; ++r) {
            const T* xr = xp + r * nc;
#pragma omp simd
            for (int64_t c = 0; c < nc; ++c) {
              const C d = static_cast<C>(xr[c]) - sh[c];
              p[c] += d;
              p[nc + c] += d * d;
            }
          }
#pragma omp simd
          for (int64_t c = 0; c < 2 * nc; ++c) acc[c] += static_cast<double>(p[c]);
        }
      });
  std::vector<C> av(nc), bv(nc);
  for (int64_t c = 0; c < nc; ++c) {
    finish_stats(sums[c], sums[nc + c], shift[c], g.count(), eps, mean + c, invstd + c, var + c);
    affine(weight, bias, mean, invstd, c, &av[c], &bv[c]);
  }
  const C* a = av.data();
  const C* b = bv.data();
  at::parallel_for(0, g.batch * oh, pair_grain(g), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / oh, i = p % oh;
      const T* r0 = xp + ((n * g.height + 2 * i) * w) * nc;
      const T* r1 = r0 + w * nc;
      T* yr = yp + p * ow * nc;
      for (int64_t j = 0; j < ow; ++j) {
        const T* p00 = r0 + 2 * j * nc;
        const T* p10 = r1 + 2 * j * nc;
        T* out = yr + j * nc;
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c) {
          const C z0 = a[c] * static_cast<C>(p00[c]) + b[c];
          const C z1 = a[c] * static_cast<C>(p00[nc + c]) + b[c];
          const C z2 = a[c] * static_cast<C>(p10[c]) + b[c];
          const C z3 = a[c] * static_cast<C>(p10[nc + c]) + b[c];
          out[c] = static_cast<T>(relu_nan(vmax(vmax(z0, z1), vmax(z2, z3))));
        }
      }
    }
  });
}

template <typename T>
void backward_nhwc(const at::Tensor& x, const double* weight, const double* bias,
                   const at::Tensor& grad_y, const double* mean, const double* invstd,
                   at::Tensor& dx, double* dweight, double* dbias) {
  using C = compute_t<T>;
  const Geometry g = geometry_of(x);
  const int64_t nc = g.channels, oh = g.pooled_h(), ow = g.pooled_w(), w = g.width;
  const T* xp = x.const_data_ptr<T>();
  const T* gp = grad_y.const_data_ptr<T>();
  T* dp = dx.mutable_data_ptr<T>();
  std::vector<C> av(nc), bv(nc), muv(nc);
  for (int64_t c = 0; c < nc; ++c) {
    affine(weight, bias, mean, invstd, c, &av[c], &bv[c]);
    muv[c] = static_cast<C>(mean[c]);
  }
  const C* a = av.data();
  const C* b = bv.data();
  const C* mu = muv.data();
  const int64_t grain = pair_grain(g);
  // Pass 1: per channel sum dz, sum dz (x - mean) (rows 0 and 1 of the sums).
  const auto sums = pair_sums(g, g.batch * oh, grain, 2, [&](int64_t p, double* acc) {
    const int64_t n = p / oh, i = p % oh;
    const T* r0 = xp + ((n * g.height + 2 * i) * w) * nc;
    const T* r1 = r0 + w * nc;
    const T* gr = gp + p * ow * nc;
    for (int64_t j = 0; j < ow; ++j) {
      const T* p00 = r0 + 2 * j * nc;
      const T* p10 = r1 + 2 * j * nc;
      const T* gj = gr + j * nc;
#pragma omp simd
      for (int64_t c = 0; c < nc; ++c) {
        const C x0 = static_cast<C>(p00[c]), x1 = static_cast<C>(p00[nc + c]);
        const C x2 = static_cast<C>(p10[c]), x3 = static_cast<C>(p10[nc + c]);
        SOPHON_WINDOW(a[c] * x0 + b[c], a[c] * x1 + b[c], a[c] * x2 + b[c], a[c] * x3 + b[c])
        const C gv = static_cast<C>(gj[c]) * positive;
        SOPHON_ROUTE(gv)
        acc[c] += static_cast<double>(gv);
        acc[nc + c] += static_cast<double>(g0 * (x0 - mu[c]) + g1 * (x1 - mu[c]) +
                                           g2 * (x2 - mu[c]) + g3 * (x3 - mu[c]));
      }
    }
  });
  const double inv_count = 1.0 / g.count();
  std::vector<C> bcv(nc), kv(nc);
  for (int64_t c = 0; c < nc; ++c) {
    const double is = invstd[c], wc = weight ? weight[c] : 1.0;
    dbias[c] = sums[c];
    dweight[c] = sums[nc + c] * is;
    bcv[c] = static_cast<C>(-wc * is * is * is * sums[nc + c] * inv_count);
    kv[c] = static_cast<C>(-wc * is * sums[c] * inv_count);
  }
  const C* bc = bcv.data();
  const C* k = kv.data();
  auto plain_row = [&](const T* xr, T* dr, int64_t pixels) {  // values in no window
    for (int64_t q = 0; q < pixels; ++q) {
#pragma omp simd
      for (int64_t c = 0; c < nc; ++c)
        dr[q * nc + c] = static_cast<T>(bc[c] * (static_cast<C>(xr[q * nc + c]) - mu[c]) + k[c]);
    }
  };
  // Pass 2: dx = a dz + bc (x - mean) + k, each window's four pixels at once.
  at::parallel_for(0, g.batch * oh, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / oh, i = p % oh;
      const int64_t row0 = (n * g.height + 2 * i) * w;
      const T* r0 = xp + row0 * nc;
      const T* r1 = r0 + w * nc;
      T* d0 = dp + row0 * nc;
      T* d1 = d0 + w * nc;
      const T* gr = gp + p * ow * nc;
      for (int64_t j = 0; j < ow; ++j) {
        const T* p00 = r0 + 2 * j * nc;
        const T* p10 = r1 + 2 * j * nc;
        T* q00 = d0 + 2 * j * nc;
        T* q10 = d1 + 2 * j * nc;
        const T* gj = gr + j * nc;
#pragma omp simd
        for (int64_t c = 0; c < nc; ++c) {
          const C x0 = static_cast<C>(p00[c]), x1 = static_cast<C>(p00[nc + c]);
          const C x2 = static_cast<C>(p10[c]), x3 = static_cast<C>(p10[nc + c]);
          SOPHON_WINDOW(a[c] * x0 + b[c], a[c] * x1 + b[c], a[c] * x2 + b[c], a[c] * x3 + b[c])
          const C ag = a[c] * static_cast<C>(gj[c]) * positive;
          SOPHON_ROUTE(ag)
          q00[c] = static_cast<T>(bc[c] * (x0 - mu[c]) + k[c] + g0);
          q00[nc + c] = static_cast<T>(bc[c] * (x1 - mu[c]) + k[c] + g1);
          q10[c] = static_cast<T>(bc[c] * (x2 - mu[c]) + k[c] + g2);
          q10[nc + c] = static_cast<T>(bc[c] * (x3 - mu[c]) + k[c] + g3);
        }
      }
      if (w % 2 == 1) {
        plain_row(r0 + (w - 1) * nc, d0 + (w - 1) * nc, 1);
        plain_row(r1 + (w - 1) * nc, d1 + (w - 1) * nc, 1);
      }
      if (g.height % 2 == 1 && i == oh - 1) {
        const int64_t last = (n * g.height + g.height - 1) * w * nc;
        plain_row(xp + last, dp + last, w);
      }
    }
  });
}

#undef SOPHON_WINDOW
#undef SOPHON_ROUTE
