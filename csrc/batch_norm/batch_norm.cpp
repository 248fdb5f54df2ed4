// batch_norm: input checks and dispatch. CPU kernels work on NCHW-contiguous
// planes; a channels_last input is converted on the way in and its outputs on
// the way out (one copy each way; the kernels' per-channel sweeps want
// contiguous planes).
#include "batch_norm.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <vector>

#include "../checks.h"

namespace sophon_fast {
namespace {

constexpr const char* kOp = "batch_norm";

void check_input(const at::Tensor& x) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      kOp, ": x must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(x.dim() == 4, kOp, ": x must be (batch, channels, height, width), got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.size(0) * x.size(2) * x.size(3) > 1, kOp,
                    ": expected more than 1 value per channel when training, got input shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.is_cpu(), kOp, ": x on ", x.device(),
                    " is not supported by the compiled kernels (CPU only); use the reference "
                    "backend");
}

void check_like(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), kOp, ": ", name, " must have x's shape ", x.sizes(),
                    ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), kOp, ": ", name, " has dtype ",
                   t.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), kOp, ": ", name, " is on ", t.device(), " but x on ",
                    x.device());
}

// A (C,) per-channel tensor as float64 values (empty when absent).
std::vector<double> channel_values(const c10::optional<at::Tensor>& t, int64_t channels,
                                   const char* name) {
  if (!t.has_value() || !t->defined()) return {};
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == channels, kOp, ": ", name,
                    " must be (channels,) = (", channels, ",), got shape ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == at::kCPU, kOp, ": ", name, " must be on the CPU like x");
  const auto values = t->detach().to(at::kDouble).contiguous();
  const double* p = values.const_data_ptr<double>();
  return std::vector<double>(p, p + channels);
}

const double* ptr(const std::vector<double>& v) { return v.empty() ? nullptr : v.data(); }

bool is_channels_last(const at::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast && !x.is_contiguous();
}

at::Tensor planes(const at::Tensor& t) { return t.contiguous(); }

at::Tensor like_input(const at::Tensor& out, bool channels_last) {
  return channels_last ? out.contiguous(at::MemoryFormat::ChannelsLast) : out;
}

at::Tensor from_values(const std::vector<double>& v, const at::TensorOptions& options) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, options.dtype(at::kDouble));
  std::copy(v.begin(), v.end(), t.mutable_data_ptr<double>());
  return t.to(options.dtype());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum, double eps) {
  check_input(x_in);
  TORCH_CHECK_VALUE(eps > 0.0, kOp, ": eps must be > 0, got ", eps);
  const int64_t channels = x_in.size(1);
  const bool cl = is_channels_last(x_in);
  const auto x = planes(x_in);
  const auto w = channel_values(weight, channels, "weight");
  const auto b = channel_values(bias, channels, "bias");
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  std::vector<double> mean(channels), invstd(channels), var(channels);
  batch_norm_forward_cpu(x, ptr(w), ptr(b), y, mean.data(), invstd.data(), var.data(), eps);
  // Running statistics exactly as torch: momentum * batch + (1 - momentum) *
  // running, the variance unbiased (count / (count - 1)).
  const double count = static_cast<double>(x.numel() / channels);
  for (const auto* running : {&running_mean, &running_var}) {
    if (!running->has_value() || !(*running)->defined()) continue;
    at::Tensor r = **running;
    TORCH_CHECK_VALUE(r.dim() == 1 && r.size(0) == channels && r.is_contiguous() && r.is_cpu(), kOp,
                      ": running statistics must be contiguous CPU (channels,) tensors");
    const bool is_var = running == &running_var;
    std::vector<double> batch_stat(channels);
    for (int64_t c = 0; c < channels; ++c)
      batch_stat[c] = is_var ? var[c] * count / (count - 1.0) : mean[c];
    const auto current = r.to(at::kDouble);
    const double* cur = current.const_data_ptr<double>();
    for (int64_t c = 0; c < channels; ++c)
      batch_stat[c] = momentum * batch_stat[c] + (1.0 - momentum) * cur[c];
    r.copy_(from_values(batch_stat, r.options()));
  }
  const auto stats = x.options().dtype(at::kDouble);
  return {like_input(y, cl), from_values(mean, stats), from_values(invstd, stats)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight, const at::Tensor& grad_y_in,
    const at::Tensor& mean, const at::Tensor& invstd) {
  check_input(x_in);
  check_like(x_in, grad_y_in, "grad_y");
  const int64_t channels = x_in.size(1);
  const bool cl = is_channels_last(x_in);
  const auto x = planes(x_in);
  const auto grad_y = planes(grad_y_in);
  const auto w = channel_values(weight, channels, "weight");
  const auto mu = channel_values(mean, channels, "mean");
  const auto is = channel_values(invstd, channels, "invstd");
  auto dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  std::vector<double> dw(channels), db(channels);
  batch_norm_backward_cpu(x, ptr(w), grad_y, mu.data(), is.data(), dx, dw.data(), db.data());
  const auto param_options =
      weight.has_value() && weight->defined() ? weight->options() : x.options();
  return {like_input(dx, cl), from_values(dw, param_options), from_values(db, param_options)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_double_backward(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight, const at::Tensor& grad_y_in,
    const at::Tensor& mean, const at::Tensor& invstd, const c10::optional<at::Tensor>& grad_dx,
    const c10::optional<at::Tensor>& grad_dweight, const c10::optional<at::Tensor>& grad_dbias) {
  check_input(x_in);
  check_like(x_in, grad_y_in, "grad_y");
  const int64_t channels = x_in.size(1);
  const bool cl = is_channels_last(x_in);
  const auto x = planes(x_in);
  const auto grad_y = planes(grad_y_in);
  at::Tensor ggx;
  if (grad_dx.has_value() && grad_dx->defined()) {
    check_like(x_in, *grad_dx, "grad_dx");
    ggx = planes(*grad_dx);
  }
  const auto w = channel_values(weight, channels, "weight");
  const auto mu = channel_values(mean, channels, "mean");
  const auto is = channel_values(invstd, channels, "invstd");
  const auto ggw = channel_values(grad_dweight, channels, "grad_dweight");
  const auto ggb = channel_values(grad_dbias, channels, "grad_dbias");
  auto gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto ggy = at::empty_like(x, at::MemoryFormat::Contiguous);
  std::vector<double> gw(channels);
  batch_norm_double_backward_cpu(x, ptr(w), grad_y, mu.data(), is.data(),
                                 ggx.defined() ? &ggx : nullptr, ptr(ggw), ptr(ggb), gx, gw.data(),
                                 ggy);
  const auto param_options =
      weight.has_value() && weight->defined() ? weight->options() : x.options();
  return {like_input(gx, cl), from_values(gw, param_options), like_input(ggy, cl)};
}

}  // namespace sophon_fast
