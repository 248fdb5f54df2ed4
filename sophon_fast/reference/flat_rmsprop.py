"""Pure-PyTorch twin of :mod:`sophon_fast.ops.flat_rmsprop` (oracle, baseline and fallback).

RMSprop without momentum (torch.optim.RMSprop semantics) on a (n_params,) buffer with float32
state (float64 for float64 parameters). With d = grad + weight_decay * params:

    v' = a v + (1-a) d^2,   g' = a g + (1-a) d   (centered only)
    p' = p - lr * d / (sqrt(v' - g'^2 if centered else v') + eps)

The square root is zero-safe (:func:`sophon_fast.reference.flat_common.safe_sqrt`). Maths in the
state dtype; new parameters cast back to the parameter dtype. Differentiable to any order by
autograd; :func:`flat_rmsprop_step_backward` is the VJP the fused backward kernels compute.
"""

from __future__ import annotations

import torch

from .flat_common import safe_sqrt, state_dtype, vjp

__all__ = ["flat_rmsprop_step", "flat_rmsprop_step_", "flat_rmsprop_step_backward"]


def flat_rmsprop_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    lr: float,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    grad_avg: torch.Tensor | None = None,
    out: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, ...]:
    """RMSprop step -> (new_params, new_square_avg[, new_grad_avg]); centered iff grad_avg given."""
    dtype = state_dtype(params.dtype)
    p, d = params.to(dtype), grad.to(dtype)
    if weight_decay:
        d = d + weight_decay * p
    new_square_avg = alpha * square_avg + (1.0 - alpha) * d * d
    if grad_avg is not None:
        new_grad_avg = alpha * grad_avg + (1.0 - alpha) * d
        avg = safe_sqrt(new_square_avg - new_grad_avg * new_grad_avg)
        result = (None, new_square_avg, new_grad_avg)
    else:
        avg = safe_sqrt(new_square_avg)
        result = (None, new_square_avg)
    new = (p - lr * d / (avg + eps)).to(params.dtype)
    result = (new, *result[1:])
    return result if out is None else tuple(o.copy_(r) for o, r in zip(out, result))


def flat_rmsprop_step_backward(
    grad_outputs, params, grad, square_avg, lr, alpha=0.99, eps=1e-8, weight_decay=0.0,
    grad_avg=None,
):  # fmt: skip
    """(d_params, d_grad, d_square_avg[, d_grad_avg]) of :func:`flat_rmsprop_step`."""
    inputs = (params, grad, square_avg) + (() if grad_avg is None else (grad_avg,))

    def forward(p, g, v, *rest):
        return flat_rmsprop_step(
            p, g, v, lr, alpha, eps, weight_decay, grad_avg=rest[0] if rest else None
        )

    return vjp(forward, inputs, grad_outputs)


@torch.no_grad()
def flat_rmsprop_step_(params, grad, square_avg, lr, alpha=0.99, eps=1e-8, weight_decay=0.0, *,
                       grad_avg=None):  # fmt: skip
    """In-place RMSprop step: updates params, square_avg (and grad_avg). Returns params."""
    targets = (params, square_avg) + (() if grad_avg is None else (grad_avg,))
    flat_rmsprop_step(
        params, grad, square_avg, lr, alpha, eps, weight_decay, grad_avg=grad_avg, out=targets
    )
    return params
