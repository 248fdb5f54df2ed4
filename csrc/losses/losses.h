// losses: checks, device dispatch and CPU entry points of the fused loss kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace sophon_fast {

// Classification loss kinds, shared with sophon_fast/ops/losses.py (KINDS).
enum LossKind : int64_t { kLossCe = 0, kLossIce = 1, kLossIcePaper = 2, kLossKlu = 3 };

// logits: (batch, classes), unit column stride; labels: (batch,) int64 (ignored
// for klu). Returns (loss () in logits' dtype, grad (batch, classes)
// contiguous) where grad = d mean_b loss_b / d logits.
std::tuple<at::Tensor, at::Tensor> classification_loss_forward(const at::Tensor& logits,
                                                               const at::Tensor& labels,
                                                               int64_t kind);

// sign * mean((prediction - target)^2) (target may be undefined: zeros).
// Returns (loss (), grad of prediction's shape).
std::tuple<at::Tensor, at::Tensor> mean_square_loss_forward(const at::Tensor& prediction,
                                                            const c10::optional<at::Tensor>& target,
                                                            double sign);

// CPU kernels: row_loss (batch,) float64 receives each row's loss; returns the
// first row with a label outside [0, classes), or -1.
int64_t classification_loss_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                at::Tensor& grad, at::Tensor& row_loss, int64_t kind);
// Returns sum((prediction - target)^2) in float64 and writes grad = grad_scale *
// (prediction - target).
double mean_square_loss_cpu(const at::Tensor& prediction, const at::Tensor* target,
                            at::Tensor& grad, double grad_scale);

}  // namespace sophon_fast
