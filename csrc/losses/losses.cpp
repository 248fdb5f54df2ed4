// losses: input checks and device dispatch (CPU kernels in losses_cpu.cpp,
// CUDA through the torch-free launchers of losses_cuda.cu).
#include "losses.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>

#include <cmath>

#include "../checks.h"

#ifdef SOPHON_FAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "../cuda_launch.h"
#include "../dtypes.h"
#include "losses_cuda.h"
#endif

namespace sophon_fast {
namespace {

void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

#ifdef SOPHON_FAST_WITH_CUDA
#endif

at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> classification_loss_forward(const at::Tensor& logits,
                                                               const at::Tensor& labels,
                                                               int64_t kind) {
  const char* op = "classification_loss_forward";
  TORCH_CHECK_VALUE(kind >= kLossCe && kind <= kLossKlu, op,
                    ": kind must be 0 (ce), 1 (ice), 2 (ice_paper) or 3 (klu), got ", kind);
  check_floating(logits, op, "logits");
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be (batch, classes), got shape ",
                    logits.sizes());
  const int64_t batch = logits.size(0), classes = logits.size(1);
  TORCH_CHECK_VALUE(batch > 0, op, ": empty batch; the batch mean is undefined");
  TORCH_CHECK_VALUE(classes > 0, op, ": logits have no classes");
  TORCH_CHECK_VALUE(kind != kLossIcePaper || classes >= 2, op,
                    ": ice_paper needs at least 2 classes (-log(1 - p_y) is +inf with 1)");
  TORCH_CHECK_VALUE(logits.stride(1) == 1 || classes == 1, op,
                    ": logits must have unit column stride (call .contiguous() first)");
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == batch && labels.is_contiguous(), op,
                    ": labels must be a contiguous (batch,) = (", batch, ",) tensor, got shape ",
                    labels.sizes());
  TORCH_CHECK_VALUE(labels.device() == logits.device(), op, ": labels are on ", labels.device(),
                    " but logits on ", logits.device());
  auto grad = at::empty({batch, classes}, logits.options());
  if (logits.is_cpu()) {
    auto row_loss = at::empty({batch}, logits.options().dtype(at::kDouble));
    const int64_t bad = classification_loss_cpu(logits, labels, grad, row_loss, kind);
    TORCH_CHECK_VALUE(bad < 0, op, ": labels[", bad,
                      "] = ", bad < 0 ? 0 : labels.const_data_ptr<int64_t>()[bad],
                      " is outside [0, classes) = [0, ", classes, ")");
    // The batch mean summed here and returned as one 0-dim tensor: at 150 x 10
    // the three ATen ops it replaces (sum, div_, to) cost ~8 us of a ~50 us
    // fwd+bwd call.
    const double* rows = row_loss.const_data_ptr<double>();
    double total = 0.0;
    for (int64_t r = 0; r < batch; ++r) total += rows[r];
    return {at::scalar_tensor(total / static_cast<double>(batch), logits.options()), grad};
  }
#ifdef SOPHON_FAST_WITH_CUDA
  if (logits.is_cuda()) {
    const c10::cuda::CUDAGuard guard(logits.device());
    auto row_loss =
        at::empty({batch}, logits.options().dtype(accumulate_type(logits.scalar_type())));
    check_launch(
        sophon_fast_classification_loss_cuda(
            dtype_code(logits.scalar_type()), logits.const_data_ptr(), logits.stride(0),
            labels.const_data_ptr<int64_t>(), grad.mutable_data_ptr(), row_loss.mutable_data_ptr(),
            batch, classes, static_cast<int>(kind), c10::cuda::getCurrentCUDAStream().stream()),
        "classification loss kernel");
    return {row_loss.sum().div_(static_cast<double>(batch)).to(logits.scalar_type()), grad};
  }
#endif
  TORCH_CHECK_VALUE(false, op, ": logits on ", logits.device(), " are not supported by this build");
}

std::tuple<at::Tensor, at::Tensor> mean_square_loss_forward(
    const at::Tensor& prediction_in, const c10::optional<at::Tensor>& target_opt, double sign) {
  const char* op = "mean_square_loss_forward";
  check_floating(prediction_in, op, "prediction");
  TORCH_CHECK_VALUE(prediction_in.numel() > 0, op, ": empty prediction; the mean is undefined");
  TORCH_CHECK_VALUE(std::isfinite(sign), op, ": sign must be finite");
  const auto prediction = prediction_in.contiguous();
  at::Tensor target;
  if (target_opt.has_value() && target_opt->defined()) {
    TORCH_CHECK_VALUE(target_opt->sizes() == prediction.sizes(), op,
                      ": target must have the prediction's shape ", prediction.sizes(), ", got ",
                      target_opt->sizes());
    TORCH_CHECK_TYPE(target_opt->scalar_type() == prediction.scalar_type(), op,
                     ": target has dtype ", target_opt->scalar_type(), " but prediction has ",
                     prediction.scalar_type());
    TORCH_CHECK_VALUE(target_opt->device() == prediction.device(), op, ": target is on ",
                      target_opt->device(), " but prediction on ", prediction.device());
    target = target_opt->contiguous();
  }
  const int64_t n = prediction.numel();
  const double grad_scale = 2.0 * sign / static_cast<double>(n);
  auto grad = at::empty_like(prediction);
  if (prediction.is_cpu()) {
    const double total =
        mean_square_loss_cpu(prediction, target.defined() ? &target : nullptr, grad, grad_scale);
    auto loss = at::empty({}, prediction.options().dtype(at::kDouble));
    loss.fill_(sign * total / static_cast<double>(n));
    return {loss.to(prediction.scalar_type()), grad};
  }
#ifdef SOPHON_FAST_WITH_CUDA
  if (prediction.is_cuda()) {
    const c10::cuda::CUDAGuard guard(prediction.device());
    auto partial = at::empty({sophon_fast_mean_square_blocks(n)},
                             prediction.options().dtype(accumulate_type(prediction.scalar_type())));
    check_launch(
        sophon_fast_mean_square_loss_cuda(
            dtype_code(prediction.scalar_type()), prediction.const_data_ptr(),
            target.defined() ? target.const_data_ptr() : nullptr, grad.mutable_data_ptr(),
            partial.mutable_data_ptr(), n, grad_scale, c10::cuda::getCurrentCUDAStream().stream()),
        "mean square loss kernel");
    return {partial.sum().mul_(sign / static_cast<double>(n)).to(prediction.scalar_type()), grad};
  }
#endif
  TORCH_CHECK_VALUE(false, op, ": prediction on ", prediction.device(),
                    " is not supported by this build");
}

}  // namespace sophon_fast
