// batch_norm: training-mode BatchNorm2d forward, backward and double backward
// (checks + dispatch in batch_norm.cpp, CPU kernels in batch_norm_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace sophon_fast {

// x: (N, C, H, W) NCHW or channels_last; weight, bias, running_mean,
// running_var: (C,) or None. Updates the running statistics in place
// (unbiased variance, momentum). Returns (y like x, mean (C,), invstd (C,)),
// the statistics in float32 (float64 for float64 x).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum, double eps);

// Returns (dx like x, dweight (C,), dbias (C,)) in x's / weight's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const at::Tensor& grad_y,
    const at::Tensor& mean, const at::Tensor& invstd);

// VJP of batch_norm_backward for incoming (grad_dx, grad_dweight, grad_dbias),
// any of them None (zeros). Returns (gx like x, gweight (C,), ggrad_y like x).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const at::Tensor& grad_y,
    const at::Tensor& mean, const at::Tensor& invstd, const c10::optional<at::Tensor>& grad_dx,
    const c10::optional<at::Tensor>& grad_dweight, const c10::optional<at::Tensor>& grad_dbias);

// CPU kernels on NCHW-contiguous tensors; weight etc. as float64 (C,) views
// passed as raw pointers by the dispatcher (nullptr = absent).
void batch_norm_forward_cpu(const at::Tensor& x, const double* weight, const double* bias,
                            at::Tensor& y, double* mean, double* invstd, double* var, double eps);
void batch_norm_backward_cpu(const at::Tensor& x, const double* weight, const at::Tensor& grad_y,
                             const double* mean, const double* invstd, at::Tensor& dx,
                             double* dweight, double* dbias);
void batch_norm_double_backward_cpu(const at::Tensor& x, const double* weight,
                                    const at::Tensor& grad_y, const double* mean,
                                    const double* invstd, const at::Tensor* grad_dx,
                                    const double* grad_dweight, const double* grad_dbias,
                                    at::Tensor& gx, double* gweight, at::Tensor& ggrad_y);

// The same kernels on channels_last tensors (a (N*H*W, C) row matrix), no
// layout conversion.
void batch_norm_forward_cpu_nhwc(const at::Tensor& x, const double* weight, const double* bias,
                                 at::Tensor& y, double* mean, double* invstd, double* var,
                                 double eps);
void batch_norm_backward_cpu_nhwc(const at::Tensor& x, const double* weight,
                                  const at::Tensor& grad_y, const double* mean,
                                  const double* invstd, at::Tensor& dx, double* dweight,
                                  double* dbias);
void batch_norm_double_backward_cpu_nhwc(const at::Tensor& x, const double* weight,
                                         const at::Tensor& grad_y, const double* mean,
                                         const double* invstd, const at::Tensor* grad_dx,
                                         const double* grad_dweight, const double* grad_dbias,
                                         at::Tensor& gx, double* gweight, at::Tensor& ggrad_y);

}  // namespace sophon_fast
