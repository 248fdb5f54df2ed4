// Per-channel arguments and memory-format helpers shared by the
// BatchNorm-family dispatchers (batch_norm.cpp, bn_relu_pool.cpp). `op`
// names the calling op in error messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace sophon_fast {
namespace channel_args {

// x of a BatchNorm-family op: a float (N, C, H, W) tensor. The op adds its own
// shape rules between this and check_x_device.
inline void check_x_dtype_and_rank(const char* op, const at::Tensor& x) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      op, ": x must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be (batch, channels, height, width), got shape ",
                    x.sizes());
}

inline void check_x_device(const char* op, const at::Tensor& x) {
#ifdef SOPHON_FAST_WITH_CUDA
  TORCH_CHECK_VALUE(x.is_cpu() || x.is_cuda(), op, ": x on ", x.device(),
                    " is not supported by the compiled kernels (CPU and CUDA only); use the "
                    "reference backend");
#else
  TORCH_CHECK_VALUE(x.is_cpu(), op, ": x on ", x.device(),
                    " is not supported by the compiled kernels (CPU only); use the reference "
                    "backend");
#endif
}

// A (C,) per-channel tensor as float64 values (empty when absent).
inline std::vector<double> channel_values(const char* op, const c10::optional<at::Tensor>& t,
                                          int64_t channels, const char* name) {
  if (!t.has_value() || !t->defined()) return {};
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == channels, op, ": ", name,
                    " must be (channels,) = (", channels, ",), got shape ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == at::kCPU, op, ": ", name, " must be on the CPU like x");
  const auto values = t->detach().to(at::kDouble).contiguous();
  const double* p = values.const_data_ptr<double>();
  return std::vector<double>(p, p + channels);
}

inline const double* ptr(const std::vector<double>& v) { return v.empty() ? nullptr : v.data(); }

inline bool is_channels_last(const at::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast && !x.is_contiguous();
}

inline at::MemoryFormat format(bool nhwc) {
  return nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline at::Tensor like_input(const at::Tensor& out, bool channels_last) {
  return channels_last ? out.contiguous(at::MemoryFormat::ChannelsLast) : out;
}

inline at::Tensor from_values(const std::vector<double>& v, const at::TensorOptions& options) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, options.dtype(at::kDouble));
  std::copy(v.begin(), v.end(), t.mutable_data_ptr<double>());
  return t.to(options.dtype());
}

// The CUDA launchers take per-channel arrays in the compute dtype (float32,
// float64 for float64 x).
inline at::TensorOptions compute_options(const at::Tensor& x) {
  return x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

// A (C,) tensor on x's device as a contiguous compute-dtype tensor (undefined
// when absent).
inline at::Tensor channel_tensor(const char* op, const c10::optional<at::Tensor>& t,
                                 const at::Tensor& x, const char* name) {
  if (!t.has_value() || !t->defined()) return {};
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == x.size(1), op, ": ", name,
                    " must be (channels,) = (", x.size(1), ",), got shape ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x on ",
                    x.device());
  return t->detach().to(compute_options(x).dtype()).contiguous();
}

// Running statistics after a CPU forward, exactly as torch: momentum * batch
// + (1 - momentum) * running, the variance unbiased (count / (count - 1)).
// mean / var: the batch statistics per channel; count: values per channel.
inline void update_running_stats_cpu(const char* op, const c10::optional<at::Tensor>& running_mean,
                                     const c10::optional<at::Tensor>& running_var,
                                     const std::vector<double>& mean,
                                     const std::vector<double>& var, double count,
                                     double momentum) {
  const auto channels = static_cast<int64_t>(mean.size());
  for (const auto* running : {&running_mean, &running_var}) {
    if (!running->has_value() || !(*running)->defined()) continue;
    at::Tensor r = **running;
    TORCH_CHECK_VALUE(r.dim() == 1 && r.size(0) == channels && r.is_contiguous() && r.is_cpu(), op,
                      ": running statistics must be contiguous CPU (channels,) tensors");
    const bool is_var = running == &running_var;
    const auto current = r.to(at::kDouble);
    const double* cur = current.const_data_ptr<double>();
    std::vector<double> updated(channels);
    for (int64_t c = 0; c < channels; ++c) {
      const double batch_stat = is_var ? var[c] * count / (count - 1.0) : mean[c];
      updated[c] = momentum * batch_stat + (1.0 - momentum) * cur[c];
    }
    r.copy_(from_values(updated, r.options()));
  }
}

// Running statistics for a device kernel: compute-dtype working copies (the
// tensor itself when it already is one), copied back by copy_back().
class RunningStats {
 public:
  RunningStats(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& running_mean,
               const c10::optional<at::Tensor>& running_var)
      : given_{&running_mean, &running_var} {
    for (int k = 0; k < 2; ++k) {
      if (!given_[k]->has_value() || !(*given_[k])->defined()) continue;
      const at::Tensor& r = **given_[k];
      TORCH_CHECK_VALUE(
          r.dim() == 1 && r.size(0) == x.size(1) && r.is_contiguous() && r.device() == x.device(),
          op, ": running statistics must be contiguous (channels,) tensors on ", x.device());
      working_[k] = r.scalar_type() == compute_options(x).dtype() ? r : r.to(compute_options(x));
    }
  }
  void* mean() { return data(working_[0]); }
  void* var() { return data(working_[1]); }
  void copy_back() {
    for (int k = 0; k < 2; ++k)
      if (working_[k].defined() && !working_[k].is_same(**given_[k]))
        (*given_[k])->copy_(working_[k]);
  }

 private:
  static void* data(at::Tensor& t) { return t.defined() ? t.mutable_data_ptr() : nullptr; }

  const c10::optional<at::Tensor>* given_[2];
  at::Tensor working_[2];
};

inline const void* cptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

}  // namespace channel_args
}  // namespace sophon_fast
