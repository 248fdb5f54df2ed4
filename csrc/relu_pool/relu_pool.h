// relu_pool: y = max_pool2d(relu(x), 2, 2) on NCHW planes, with its gradient
// as a linear map that is differentiable to any order (scatter <-> gather).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace sophon_fast {

// x: (N, C, H, W) contiguous float32/float64 on the CPU. Returns (y, code):
// y (N, C, H/2, W/2) and code (y's shape and dtype): the window position 0..3
// (row-major) of the first maximum, or -1 where the window's maximum is <= 0
// (the ReLU clips it: no gradient flows).
std::tuple<at::Tensor, at::Tensor> relu_maxpool2d_forward(const at::Tensor& x);

// dx (N, C, H, W) = grad scattered to the coded positions, zero elsewhere
// (odd last rows/columns included). grad: y's shape and dtype.
at::Tensor relu_maxpool2d_scatter(const at::Tensor& grad, const at::Tensor& code, int64_t height,
                                  int64_t width);

// The transpose of the scatter: (N, C, H/2, W/2) = v at the coded positions,
// 0 where code is -1. v: x's shape and dtype.
at::Tensor relu_maxpool2d_gather(const at::Tensor& v, const at::Tensor& code);

}  // namespace sophon_fast
