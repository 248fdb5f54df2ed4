// bn_relu_pool: training-mode BatchNorm2d -> ReLU -> MaxPool2d(2, 2), forward
// and backward (checks + dispatch in bn_relu_pool.cpp, CPU kernels in
// bn_relu_pool_cpu.cpp, CUDA kernels in bn_relu_pool_cuda.cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace sophon_fast {

// x: (N, C, H, W) NCHW or channels_last, H, W >= 2; weight, bias,
// running_mean, running_var: (C,) or None. Updates the running statistics in
// place (unbiased variance, momentum). Returns (y (N, C, H/2, W/2) in x's
// layout, mean (C,), invstd (C,)), the statistics in float64 on the CPU and in
// the compute dtype (float32, float64 for float64 x) on CUDA.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum, double eps);

// grad_y: (N, C, H/2, W/2). Returns (dx like x, dweight (C,), dbias (C,)) in
// x's / weight's dtype; the window arg-max is recomputed from x.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_backward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& grad_y, const at::Tensor& mean,
    const at::Tensor& invstd);

// CPU kernels; per-channel operands as float64 (C,) arrays (nullptr = absent).
// NCHW-contiguous tensors:
void bn_relu_pool_forward_cpu(const at::Tensor& x, const double* weight, const double* bias,
                              at::Tensor& y, double* mean, double* invstd, double* var, double eps);
void bn_relu_pool_backward_cpu(const at::Tensor& x, const double* weight, const double* bias,
                               const at::Tensor& grad_y, const double* mean, const double* invstd,
                               at::Tensor& dx, double* dweight, double* dbias);
// channels_last tensors ((N*H*W, C) row matrices), no layout conversion:
void bn_relu_pool_forward_cpu_nhwc(const at::Tensor& x, const double* weight, const double* bias,
                                   at::Tensor& y, double* mean, double* invstd, double* var,
                                   double eps);
void bn_relu_pool_backward_cpu_nhwc(const at::Tensor& x, const double* weight, const double* bias,
                                    const at::Tensor& grad_y, const double* mean,
                                    const double* invstd, at::Tensor& dx, double* dweight,
                                    double* dbias);

}  // namespace sophon_fast
