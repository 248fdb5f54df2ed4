// bn_relu_pool: input checks and device dispatch. CPU kernels
// (bn_relu_pool_cpu.cpp) run NCHW planes and channels_last row matrices
// natively; the CUDA kernels (torch-free launchers of bn_relu_pool_cuda.cu)
// work on NCHW planes, a channels_last input converted on the way in and its
// outputs on the way out.
#include "bn_relu_pool.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <vector>

#include "../channel_args.h"
#include "../checks.h"

#ifdef SOPHON_FAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "../cuda_launch.h"
#include "../dtypes.h"
#include "bn_relu_pool_cuda.h"
#endif

namespace sophon_fast {
namespace {

using channel_args::channel_tensor;
using channel_args::channel_values;
using channel_args::check_x_device;
using channel_args::check_x_dtype_and_rank;
using channel_args::compute_options;
using channel_args::cptr;
using channel_args::format;
using channel_args::from_values;
using channel_args::is_channels_last;
using channel_args::like_input;
using channel_args::ptr;
using channel_args::RunningStats;
using channel_args::update_running_stats_cpu;

constexpr const char* kOp = "bn_relu_pool";

void check_input(const at::Tensor& x) {
  check_x_dtype_and_rank(kOp, x);
  TORCH_CHECK_VALUE(x.size(2) >= 2 && x.size(3) >= 2, kOp,
                    ": a 2x2 pool needs height and width >= 2, got input shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(0) >= 1, kOp, ": x has an empty batch, shape ", x.sizes());
  check_x_device(kOp, x);
}

std::vector<int64_t> pooled_sizes(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2) / 2, x.size(3) / 2};
}

void check_grad(const at::Tensor& x, const at::Tensor& grad_y) {
  TORCH_CHECK_VALUE(grad_y.sizes() == at::IntArrayRef(pooled_sizes(x)), kOp,
                    ": grad_y must have the pooled shape ", at::IntArrayRef(pooled_sizes(x)),
                    ", got ", grad_y.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), kOp, ": grad_y has dtype ",
                   grad_y.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(grad_y.device() == x.device(), kOp, ": grad_y is on ", grad_y.device(),
                    " but x on ", x.device());
}

#ifdef SOPHON_FAST_WITH_CUDA

// Scratch for the launchers' per-chunk partial sums (compute dtype), sized on
// x's device (the caller's CUDAGuard makes it current).
at::Tensor workspace(const at::Tensor& x) {
  return at::empty(
      {sophon_fast_bn_relu_pool_cuda_workspace(x.size(0), x.size(1), x.size(2), x.size(3))},
      compute_options(x));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& x, bool cl, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto w = channel_tensor(kOp, weight, x, "weight");
  const auto b = channel_tensor(kOp, bias, x, "bias");
  RunningStats running(kOp, x, running_mean, running_var);
  auto y = at::empty(pooled_sizes(x), x.options());
  auto mean = at::empty({x.size(1)}, compute_options(x));
  auto invstd = at::empty({x.size(1)}, compute_options(x));
  auto work = workspace(x);
  check_launch(sophon_fast_bn_relu_pool_forward_cuda(
                   dtype_code(x.scalar_type()), x.const_data_ptr(), cptr(w), cptr(b),
                   y.mutable_data_ptr(), mean.mutable_data_ptr(), invstd.mutable_data_ptr(),
                   running.mean(), running.var(), work.mutable_data_ptr(), x.size(0), x.size(1),
                   x.size(2), x.size(3), momentum, eps, c10::cuda::getCurrentCUDAStream().stream()),
               "bn_relu_pool forward kernel");
  running.copy_back();
  return {like_input(y, cl), mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& x, bool cl, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& grad_y, const at::Tensor& mean,
    const at::Tensor& invstd) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto w = channel_tensor(kOp, weight, x, "weight");
  const auto b = channel_tensor(kOp, bias, x, "bias");
  const auto mu = channel_tensor(kOp, mean, x, "mean");
  const auto is = channel_tensor(kOp, invstd, x, "invstd");
  auto dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto dw = at::empty({x.size(1)}, compute_options(x));
  auto db = at::empty({x.size(1)}, compute_options(x));
  auto work = workspace(x);
  check_launch(
      sophon_fast_bn_relu_pool_backward_cuda(
          dtype_code(x.scalar_type()), x.const_data_ptr(), cptr(w), cptr(b),
          grad_y.const_data_ptr(), mu.const_data_ptr(), is.const_data_ptr(), dx.mutable_data_ptr(),
          dw.mutable_data_ptr(), db.mutable_data_ptr(), work.mutable_data_ptr(), x.size(0),
          x.size(1), x.size(2), x.size(3), c10::cuda::getCurrentCUDAStream().stream()),
      "bn_relu_pool backward kernel");
  const auto param =
      weight.has_value() && weight->defined() ? weight->scalar_type() : x.scalar_type();
  return {like_input(dx, cl), dw.to(param), db.to(param)};
}
#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_forward(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum, double eps) {
  check_input(x_in);
  TORCH_CHECK_VALUE(eps > 0.0, kOp, ": eps must be > 0, got ", eps);
  const int64_t channels = x_in.size(1);
  const bool cl = is_channels_last(x_in);
  const bool nhwc = cl && x_in.is_cpu();
  const auto x = x_in.contiguous(format(nhwc));
#ifdef SOPHON_FAST_WITH_CUDA
  if (x.is_cuda())
    return forward_cuda(x, cl, weight, bias, running_mean, running_var, momentum, eps);
#endif
  const auto w = channel_values(kOp, weight, channels, "weight");
  const auto b = channel_values(kOp, bias, channels, "bias");
  auto y = at::empty(pooled_sizes(x), x.options().memory_format(format(nhwc)));
  std::vector<double> mean(channels), invstd(channels), var(channels);
  (nhwc ? bn_relu_pool_forward_cpu_nhwc : bn_relu_pool_forward_cpu)(
      x, ptr(w), ptr(b), y, mean.data(), invstd.data(), var.data(), eps);
  update_running_stats_cpu(kOp, running_mean, running_var, mean, var,
                           static_cast<double>(x.numel() / channels), momentum);
  const auto stats = x.options().dtype(at::kDouble);
  return {y, from_values(mean, stats), from_values(invstd, stats)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_backward(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& grad_y_in, const at::Tensor& mean,
    const at::Tensor& invstd) {
  check_input(x_in);
  check_grad(x_in, grad_y_in);
  const int64_t channels = x_in.size(1);
  const bool cl = is_channels_last(x_in);
  const bool nhwc = cl && x_in.is_cpu();
  const auto x = x_in.contiguous(format(nhwc));
  const auto grad_y = grad_y_in.contiguous(format(nhwc));
#ifdef SOPHON_FAST_WITH_CUDA
  if (x.is_cuda()) return backward_cuda(x, cl, weight, bias, grad_y, mean, invstd);
#endif
  const auto w = channel_values(kOp, weight, channels, "weight");
  const auto b = channel_values(kOp, bias, channels, "bias");
  const auto mu = channel_values(kOp, mean, channels, "mean");
  const auto is = channel_values(kOp, invstd, channels, "invstd");
  TORCH_CHECK_VALUE(!mu.empty() && !is.empty(), kOp, ": mean and invstd are required");
  auto dx = at::empty_like(x, format(nhwc));
  std::vector<double> dw(channels), db(channels);
  (nhwc ? bn_relu_pool_backward_cpu_nhwc : bn_relu_pool_backward_cpu)(
      x, ptr(w), ptr(b), grad_y, mu.data(), is.data(), dx, dw.data(), db.data());
  const auto param_options =
      weight.has_value() && weight->defined() ? weight->options() : x.options();
  return {dx, from_values(dw, param_options), from_values(db, param_options)};
}

}  // namespace sophon_fast
