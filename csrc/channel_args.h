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

inline const void* cptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
inline void* mptr(at::Tensor& t) { return t.defined() ? t.mutable_data_ptr() : nullptr; }

}  // namespace channel_args
}  // namespace sophon_fast
