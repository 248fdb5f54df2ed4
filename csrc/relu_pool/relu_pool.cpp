// relu_pool: checks and the CPU kernels (one pass each, parallel over planes).
//
// Because relu is increasing, max_pool(relu(x)) = relu(max_pool(x)): one read
// of x finds each window's first maximum m and writes max(m, 0) and a code
// (the window position 0..3, or -1 when m <= 0 and the ReLU blocks the
// gradient) in x's dtype, so every loop runs at one vector width. The
// backward writes every element of dx in the same pass (no zero fill, no
// separate threshold_backward); its derivative is the gather below, and the
// gather's is the scatter, so the pair nests to any order.
//
// Rows are standalone functions over restrict pointers with branch-free
// selects, so GCC vectorises them. The forward's fast row ignores NaN; a plane
// holding a NaN takes the exact row instead (max_pool2d's rule: a NaN wins and
// a later NaN replaces it; relu keeps NaN and its backward passes the gradient).
#include "relu_pool.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

namespace sophon_fast {
namespace {

void check_input(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": ", name,
                   " must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4 && x.is_contiguous(), op, ": ", name,
                    " must be a contiguous (N, C, H, W) tensor, got shape ", x.sizes());
}

void check_code(const at::Tensor& code, const at::Tensor& like, const char* op) {
  TORCH_CHECK_TYPE(code.scalar_type() == like.scalar_type(), op, ": code must have dtype ",
                   like.scalar_type(), ", got ", code.scalar_type());
  TORCH_CHECK_VALUE(code.dim() == 4 && code.is_contiguous() && code.device().is_cpu(), op,
                    ": code must be a contiguous (N, C, H/2, W/2) CPU tensor, got shape ",
                    code.sizes());
}

// Planes per task: ~16 K elements (a 28 x 28 plane is 784).
int64_t plane_grain(int64_t plane) {
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, plane));
}

template <typename T>
bool has_nan(const T* __restrict__ x, int64_t n) {
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= x[i] != x[i];
  return bad != 0;
}

template <typename T>
void pool_row_fast(const T* __restrict__ r0, const T* __restrict__ r1, T* __restrict__ y,
                   T* __restrict__ code, int64_t wo) {
  for (int64_t j = 0; j < wo; ++j) {
    const T a = r0[2 * j], b = r0[2 * j + 1], c = r1[2 * j], d = r1[2 * j + 1];
    const bool tb = b > a;
    T m = tb ? b : a;
    T k = tb ? T(1) : T(0);
    const bool tc = c > m;
    m = tc ? c : m;
    k = tc ? T(2) : k;
    const bool td = d > m;
    m = td ? d : m;
    k = td ? T(3) : k;
    const bool pass = m > T(0);
    y[j] = pass ? m : T(0);
    code[j] = pass ? k : T(-1);
  }
}

template <typename T>
void pool_row_exact(const T* r0, const T* r1, T* y, T* code, int64_t wo) {
  for (int64_t j = 0; j < wo; ++j) {
    const T v[4] = {r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]};
    T m = v[0];
    int k = 0;
    for (int q = 1; q < 4; ++q) {
      if (v[q] > m || v[q] != v[q]) m = v[q], k = q;
    }
    const bool pass = !(m <= T(0));  // NaN passes value and gradient, as relu's backward
    y[j] = pass ? m : T(0);
    code[j] = pass ? T(k) : T(-1);
  }
}

template <typename T>
void scatter_row(const T* __restrict__ g, const T* __restrict__ code, T* __restrict__ r0,
                 T* __restrict__ r1, int64_t wo) {
  for (int64_t j = 0; j < wo; ++j) {
    const T gj = g[j], k = code[j];
    r0[2 * j] = k == T(0) ? gj : T(0);
    r0[2 * j + 1] = k == T(1) ? gj : T(0);
    r1[2 * j] = k == T(2) ? gj : T(0);
    r1[2 * j + 1] = k == T(3) ? gj : T(0);
  }
}

template <typename T>
void gather_row(const T* __restrict__ r0, const T* __restrict__ r1, const T* __restrict__ code,
                T* __restrict__ out, int64_t wo) {
  for (int64_t j = 0; j < wo; ++j) {
    const T k = code[j];
    const T a = r0[2 * j], b = r0[2 * j + 1], c = r1[2 * j], d = r1[2 * j + 1];
    T o = k == T(0) ? a : T(0);  // a chain of selects (a nested ?: does not vectorise)
    o = k == T(1) ? b : o;
    o = k == T(2) ? c : o;
    o = k == T(3) ? d : o;
    out[j] = o;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> relu_maxpool2d_forward(const at::Tensor& x) {
  const char* op = "relu_maxpool2d_forward";
  check_input(x, op, "x");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t ho = h / 2, wo = w / 2;
  TORCH_CHECK_VALUE(ho > 0 && wo > 0, op, ": H and W must be >= 2 for a 2x2 pool, got ", h, "x", w);
  auto y = at::empty({n, c, ho, wo}, x.options());
  auto code = at::empty({n, c, ho, wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "relu_maxpool2d_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    scalar_t* cp = code.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n * c, plane_grain(h * w), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* xs = xp + p * h * w;
        const bool exact = has_nan(xs, h * w);
        for (int64_t i = 0; i < ho; ++i) {
          const scalar_t* r0 = xs + 2 * i * w;
          scalar_t* yi = yp + (p * ho + i) * wo;
          scalar_t* ci = cp + (p * ho + i) * wo;
          if (exact) {
            pool_row_exact<scalar_t>(r0, r0 + w, yi, ci, wo);
          } else {
            pool_row_fast<scalar_t>(r0, r0 + w, yi, ci, wo);
          }
        }
      }
    });
  });
  return {y, code};
}

at::Tensor relu_maxpool2d_scatter(const at::Tensor& grad, const at::Tensor& code, int64_t height,
                                  int64_t width) {
  const char* op = "relu_maxpool2d_scatter";
  check_input(grad, op, "grad");
  check_code(code, grad, op);
  TORCH_CHECK_VALUE(code.sizes() == grad.sizes(), op, ": code has shape ", code.sizes(),
                    " but grad ", grad.sizes());
  const int64_t n = grad.size(0), c = grad.size(1), ho = grad.size(2), wo = grad.size(3);
  TORCH_CHECK_VALUE(height / 2 == ho && width / 2 == wo, op, ": a ", height, "x", width,
                    " input pools to ", height / 2, "x", width / 2, ", not ", ho, "x", wo);
  auto dx = at::empty({n, c, height, width}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "relu_maxpool2d_scatter", [&] {
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* cp = code.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    const int64_t h = height, w = width;
    at::parallel_for(0, n * c, plane_grain(h * w), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        scalar_t* ds = dp + p * h * w;
        for (int64_t i = 0; i < ho; ++i) {
          scalar_t* r0 = ds + 2 * i * w;
          scalar_t* r1 = r0 + w;
          scatter_row<scalar_t>(gp + (p * ho + i) * wo, cp + (p * ho + i) * wo, r0, r1, wo);
          if (w % 2) r0[w - 1] = r1[w - 1] = scalar_t(0);  // the column no window covers
        }
        if (h % 2) std::fill(ds + (h - 1) * w, ds + h * w, scalar_t(0));
      }
    });
  });
  return dx;
}

at::Tensor relu_maxpool2d_gather(const at::Tensor& v, const at::Tensor& code) {
  const char* op = "relu_maxpool2d_gather";
  check_input(v, op, "v");
  check_code(code, v, op);
  const int64_t n = v.size(0), c = v.size(1), h = v.size(2), w = v.size(3);
  const int64_t ho = h / 2, wo = w / 2;
  TORCH_CHECK_VALUE(
      code.size(0) == n && code.size(1) == c && code.size(2) == ho && code.size(3) == wo, op,
      ": code has shape ", code.sizes(), " but a ", v.sizes(), " input pools to (", n, ", ", c,
      ", ", ho, ", ", wo, ")");
  auto out = at::empty({n, c, ho, wo}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "relu_maxpool2d_gather", [&] {
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const scalar_t* cp = code.const_data_ptr<scalar_t>();
    scalar_t* outp = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n * c, plane_grain(h * w), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        for (int64_t i = 0; i < ho; ++i) {
          const scalar_t* r0 = vp + p * h * w + 2 * i * w;
          gather_row<scalar_t>(r0, r0 + w, cp + (p * ho + i) * wo, outp + (p * ho + i) * wo, wo);
        }
      }
    });
  });
  return out;
}

}  // namespace sophon_fast
