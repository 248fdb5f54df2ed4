"""Typed stub of the compiled extension sophon_fast._C (csrc/extension.cpp)."""

from collections.abc import Sequence

from torch import Tensor

with_cuda: bool

def flat_sgd_step_forward(
    params: Tensor, grad: Tensor, lr: float, weight_decay: float, out: Tensor | None = None
) -> Tensor: ...
def flat_sgd_step_backward(
    grad_out: Tensor, lr: float, weight_decay: float
) -> tuple[Tensor, Tensor]: ...
def flat_momentum_step_forward(
    params: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor,
    step: Tensor,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    out: Sequence[Tensor] | None = None,
) -> list[Tensor]: ...
def flat_momentum_step_backward(
    grad_new_params: Tensor,
    grad_new_buffer: Tensor,
    step: Tensor,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
) -> list[Tensor]: ...
def flat_adam_step_forward(
    params: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    out: Sequence[Tensor] | None = None,
) -> list[Tensor]: ...
def flat_adam_step_backward(
    grad_new_params: Tensor,
    grad_new_exp_avg: Tensor,
    grad_new_exp_avg_sq: Tensor,
    params: Tensor | None,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> list[Tensor]: ...
def flat_rmsprop_step_forward(
    params: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    grad_avg: Tensor | None,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    out: Sequence[Tensor] | None = None,
) -> list[Tensor]: ...
def flat_rmsprop_step_backward(
    grad_new_params: Tensor,
    grad_new_square_avg: Tensor,
    grad_new_grad_avg: Tensor | None,
    params: Tensor | None,
    grad: Tensor,
    square_avg: Tensor,
    grad_avg: Tensor | None,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
) -> list[Tensor]: ...
def flat_adagrad_step_forward(
    params: Tensor,
    grad: Tensor,
    state_sum: Tensor,
    step: Tensor,
    lr: float,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    out: Sequence[Tensor] | None = None,
) -> list[Tensor]: ...
def flat_adagrad_step_backward(
    grad_new_params: Tensor,
    grad_new_state_sum: Tensor,
    params: Tensor | None,
    grad: Tensor,
    state_sum: Tensor,
    step: Tensor,
    lr: float,
    lr_decay: float,
    weight_decay: float,
    eps: float,
) -> list[Tensor]: ...
def flat_adadelta_step_forward(
    params: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    acc_delta: Tensor,
    lr: float,
    rho: float,
    eps: float,
    weight_decay: float,
    out: Sequence[Tensor] | None = None,
) -> list[Tensor]: ...
def flat_adadelta_step_backward(
    grad_new_params: Tensor,
    grad_new_square_avg: Tensor,
    grad_new_acc_delta: Tensor,
    params: Tensor | None,
    grad: Tensor,
    square_avg: Tensor,
    acc_delta: Tensor,
    lr: float,
    rho: float,
    eps: float,
    weight_decay: float,
) -> list[Tensor]: ...
def flat_clip_adam_step_(
    params: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    max_norm: float | None = None,
) -> Tensor: ...
def flat_accumulate_(acc: Tensor, grad: Tensor, weight: float) -> Tensor: ...
def classification_loss_forward(
    logits: Tensor, labels: Tensor, kind: int
) -> tuple[Tensor, Tensor]: ...
def mean_square_loss_forward(
    prediction: Tensor, target: Tensor | None, sign: float
) -> tuple[Tensor, Tensor]: ...
def batch_norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]: ...
def batch_norm_backward(
    x: Tensor, weight: Tensor | None, grad_y: Tensor, mean: Tensor, invstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]: ...
def batch_norm_double_backward(
    x: Tensor,
    weight: Tensor | None,
    grad_y: Tensor,
    mean: Tensor,
    invstd: Tensor,
    grad_dx: Tensor | None,
    grad_dweight: Tensor | None,
    grad_dbias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]: ...
def bn_relu_pool_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]: ...
def bn_relu_pool_backward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    grad_y: Tensor,
    mean: Tensor,
    invstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor]: ...
def relu_maxpool2d_forward(x: Tensor) -> tuple[Tensor, Tensor]: ...
def relu_maxpool2d_scatter(grad: Tensor, code: Tensor, height: int, width: int) -> Tensor: ...
def relu_maxpool2d_gather(v: Tensor, code: Tensor) -> Tensor: ...
def cpu_cache_stats() -> dict[str, int]: ...
def cpu_cache_release() -> None: ...
def cpu_cache_set_limit(bytes: int) -> None: ...
