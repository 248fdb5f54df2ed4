"""Pure-PyTorch twin of :mod:`sophon_fast.ops.flat_adagrad` (oracle, baseline and fallback).

Adagrad (torch.optim.Adagrad semantics) on a (n_params,) buffer with a float32 sum of squares
(float64 for float64 parameters). ``step`` is the 0-d count of updates taken *before* this one
(t = step + 1). With d = grad + weight_decay * params:

    clr = lr / (1 + (t - 1) * lr_decay),   s' = s + d^2,   p' = p - clr * d / (sqrt(s') + eps)

The decayed learning rate is computed in float64 and rounded once to the state dtype, as
torch.optim.Adagrad computes it on the host. The square root is zero-safe
(:func:`sophon_fast.reference.flat_common.safe_sqrt`). Maths in the state dtype; new parameters
cast back to the parameter dtype. Differentiable to any order by autograd;
:func:`flat_adagrad_step_backward` is the VJP the fused backward kernels compute.
"""

from __future__ import annotations

import torch

from .flat_common import safe_sqrt, state_dtype, vjp

__all__ = [
    "adagrad_learning_rate",
    "flat_adagrad_step",
    "flat_adagrad_step_",
    "flat_adagrad_step_backward",
]


def adagrad_learning_rate(step, lr, lr_decay, dtype, device):
    """lr / (1 + step * lr_decay) as a 0-d ``dtype`` tensor (step: updates taken before this one),
    computed in float64 and rounded once, as torch.optim.Adagrad does on the host."""
    return (lr / (1.0 + step.to(device=device, dtype=torch.float64) * lr_decay)).to(dtype)


def flat_adagrad_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    state_sum: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adagrad step -> (new_params (n,) params.dtype, new_state_sum (n,) state dtype)."""
    dtype = state_dtype(params.dtype)
    p, d = params.to(dtype), grad.to(dtype)
    if weight_decay:
        d = d + weight_decay * p
    new_sum = state_sum + d * d
    clr = adagrad_learning_rate(step, lr, lr_decay, dtype, params.device)
    new = (p - clr * d / (safe_sqrt(new_sum) + eps)).to(params.dtype)
    if out is None:
        return new, new_sum
    return out[0].copy_(new), out[1].copy_(new_sum)


def flat_adagrad_step_backward(
    grad_new_params, grad_new_state_sum, params, grad, state_sum, step, lr, lr_decay=0.0,
    weight_decay=0.0, eps=1e-10,
):  # fmt: skip
    """(d_params, d_grad, d_state_sum) of :func:`flat_adagrad_step`."""
    return vjp(
        lambda p, g, s: flat_adagrad_step(p, g, s, step, lr, lr_decay, weight_decay, eps),
        (params, grad, state_sum),
        (grad_new_params, grad_new_state_sum),
    )


@torch.no_grad()
def flat_adagrad_step_(params, grad, state_sum, step, lr, lr_decay=0.0, weight_decay=0.0,
                       eps=1e-10):  # fmt: skip
    """In-place Adagrad step: updates params and state_sum, step += 1. Returns params."""
    flat_adagrad_step(
        params, grad, state_sum, step, lr, lr_decay, weight_decay, eps, out=(params, state_sum)
    )
    step.add_(1)
    return params
