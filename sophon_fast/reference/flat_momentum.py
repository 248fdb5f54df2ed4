"""Pure-PyTorch twin of :mod:`sophon_fast.ops.flat_momentum` (oracle, baseline and fallback).

Momentum SGD (torch.optim.SGD semantics) on a (n_params,) buffer with float32 state (float64 for
float64 parameters). ``step`` is the 0-d count of updates taken *before* this one (a tensor, so
nothing reads it on the host). With d = grad + weight_decay * params:

    b' = d if step == 0 else mu * b + (1 - dampening) * d
    p' = p - lr * (d + mu * b' if nesterov else b')        (nesterov: dampening ignored)

Maths in the state dtype; new parameters cast back to the parameter dtype. Differentiable to any
order by autograd; :func:`flat_momentum_step_backward` is the vector-Jacobian product the fused
backward kernels compute.
"""

from __future__ import annotations

import torch

from .flat_common import state_dtype, vjp

__all__ = ["flat_momentum_step", "flat_momentum_step_", "flat_momentum_step_backward"]


def flat_momentum_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    momentum: float = 0.9,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Momentum SGD step -> (new_params (n,) params.dtype, new_momentum_buffer (n,) state dtype)."""
    dtype = state_dtype(params.dtype)
    p, d = params.to(dtype), grad.to(dtype)
    if weight_decay:
        d = d + weight_decay * p
    dampening = 0.0 if nesterov else dampening
    buf = torch.where(
        step.to(device=params.device) == 0, d, momentum * momentum_buffer + (1.0 - dampening) * d
    )
    direction = d + momentum * buf if nesterov else buf
    new = (p - lr * direction).to(params.dtype)
    if out is None:
        return new, buf
    return out[0].copy_(new), out[1].copy_(buf)


def flat_momentum_step_backward(
    grad_new_params, grad_new_buffer, params, grad, momentum_buffer, step, lr, momentum=0.9,
    dampening=0.0, weight_decay=0.0, nesterov=False,
):  # fmt: skip
    """(d_params, d_grad, d_momentum_buffer) of :func:`flat_momentum_step`."""
    return vjp(
        lambda p, g, b: flat_momentum_step(
            p, g, b, step, lr, momentum, dampening, weight_decay, nesterov
        ),
        (params, grad, momentum_buffer),
        (grad_new_params, grad_new_buffer),
    )


@torch.no_grad()
def flat_momentum_step_(params, grad, momentum_buffer, step, lr, momentum=0.9, dampening=0.0,
                        weight_decay=0.0, nesterov=False):  # fmt: skip
    """In-place momentum step: updates params and momentum_buffer, step += 1. Returns params."""
    flat_momentum_step(
        params, grad, momentum_buffer, step, lr, momentum, dampening, weight_decay, nesterov,
        out=(params, momentum_buffer),
    )  # fmt: skip
    step.add_(1)
    return params
