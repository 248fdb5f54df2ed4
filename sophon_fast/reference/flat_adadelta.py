"""Pure-PyTorch twin of :mod:`sophon_fast.ops.flat_adadelta` (oracle, baseline and fallback).

Adadelta (torch.optim.Adadelta semantics) on a (n_params,) buffer with float32 state (float64 for
float64 parameters). With d = grad + weight_decay * params:

    v' = rho v + (1-rho) d^2,   delta = sqrt(u + eps) / sqrt(v' + eps) * d
    u' = rho u + (1-rho) delta^2,   p' = p - lr * delta

(v: ``square_avg``, u: ``acc_delta``). The square roots are zero-safe
(:func:`sophon_fast.reference.flat_common.safe_sqrt`: only eps = 0 can bring a radicand to 0).
Maths in the state dtype; new parameters cast back to the parameter dtype. Differentiable to any
order by autograd; :func:`flat_adadelta_step_backward` is the VJP the fused backward kernels
compute.
"""

from __future__ import annotations

import torch

from .flat_common import safe_sqrt, state_dtype, vjp

__all__ = ["flat_adadelta_step", "flat_adadelta_step_", "flat_adadelta_step_backward"]


def flat_adadelta_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    acc_delta: torch.Tensor,
    lr: float = 1.0,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adadelta step -> (new_params, new_square_avg, new_acc_delta)."""
    dtype = state_dtype(params.dtype)
    p, d = params.to(dtype), grad.to(dtype)
    if weight_decay:
        d = d + weight_decay * p
    new_square_avg = rho * square_avg + (1.0 - rho) * d * d
    std = safe_sqrt(new_square_avg + eps)
    delta = safe_sqrt(acc_delta + eps) / std * d
    new_acc_delta = rho * acc_delta + (1.0 - rho) * delta * delta
    result = ((p - lr * delta).to(params.dtype), new_square_avg, new_acc_delta)
    return result if out is None else tuple(o.copy_(r) for o, r in zip(out, result))


def flat_adadelta_step_backward(
    grad_new_params, grad_new_square_avg, grad_new_acc_delta, params, grad, square_avg,
    acc_delta, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0,
):  # fmt: skip
    """(d_params, d_grad, d_square_avg, d_acc_delta) of :func:`flat_adadelta_step`."""
    return vjp(
        lambda p, g, v, u: flat_adadelta_step(p, g, v, u, lr, rho, eps, weight_decay),
        (params, grad, square_avg, acc_delta),
        (grad_new_params, grad_new_square_avg, grad_new_acc_delta),
    )


@torch.no_grad()
def flat_adadelta_step_(params, grad, square_avg, acc_delta, lr=1.0, rho=0.9, eps=1e-6,
                        weight_decay=0.0):  # fmt: skip
    """In-place Adadelta step: updates params, square_avg and acc_delta. Returns params."""
    flat_adadelta_step(
        params, grad, square_avg, acc_delta, lr, rho, eps, weight_decay,
        out=(params, square_avg, acc_delta),
    )  # fmt: skip
    return params
