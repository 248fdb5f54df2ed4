"""Pure-PyTorch twin of :mod:`sophon_fast.ops.flat_adam` (oracle, baseline and fallback).

Adam / AdamW (torch.optim semantics) on a (n_params,) buffer with float32 moments (float64 for
float64 parameters). ``step`` is the 0-d count of updates taken *before* this one; t = step + 1.
With d = grad + weight_decay * params (adam) or d = grad (adamw):

    adam       m' = b1 m + (1-b1) d,   v' = b2 v + (1-b2) d^2
               p' = p - lr / (1 - b1^t) * m' / (sqrt(v') / sqrt(1 - b2^t) + eps)
    adamw      as adam, with p decayed first: p <- p * (1 - lr * weight_decay)
    clip_adam  grad scaled by min(1, max_norm / (||grad||_2 + 1e-6)) (clip_grad_norm_), then adam

The bias corrections are computed in float64 and rounded once to the state dtype, as
torch.optim.Adam computes them on the host. The square root is zero-safe
(:func:`sophon_fast.reference.flat_common.safe_sqrt`). Differentiable to any order by autograd;
:func:`flat_adam_step_backward` is the vector-Jacobian product the fused backward kernels compute.
"""

from __future__ import annotations

import torch

from .flat_common import safe_sqrt, state_dtype, vjp

__all__ = [
    "adam_bias_corrections",
    "adam_update",
    "clip_coefficient",
    "flat_adam_step",
    "flat_adam_step_",
    "flat_adam_step_backward",
    "flat_adamw_step",
    "flat_clip_adam_step_",
]


def adam_bias_corrections(step, lr, betas, dtype, device):
    """(lr / (1 - b1^t), sqrt(1 - b2^t)) as 0-d ``dtype`` tensors, t = step + 1.

    Computed in float64 and rounded once, as torch.optim.Adam does on the host: in float32,
    1 - 0.999^t would otherwise lose 1e-5 of its value to the rounding of 0.999^t.
    """
    t = step.to(device=device, dtype=torch.float64) + 1
    bias_correction1 = 1.0 - torch.pow(betas[0], t)
    bias_correction2 = 1.0 - torch.pow(betas[1], t)
    return (lr / bias_correction1).to(dtype), bias_correction2.sqrt().to(dtype)


def adam_update(params, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay, decoupled):
    """(new_params, new_exp_avg, new_exp_avg_sq) of Adam (AdamW when ``decoupled``)."""
    dtype = state_dtype(params.dtype)
    p, d = params.to(dtype), grad.to(dtype)
    beta1, beta2 = betas
    if decoupled:
        p = p * (1.0 - lr * weight_decay)
    elif weight_decay:
        d = d + weight_decay * p
    new_exp_avg = beta1 * exp_avg + (1.0 - beta1) * d
    new_exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * d * d
    step_size, sqrt_bias_correction2 = adam_bias_corrections(step, lr, betas, dtype, params.device)
    denom = safe_sqrt(new_exp_avg_sq) / sqrt_bias_correction2 + eps
    new = p - step_size * new_exp_avg / denom
    return new.to(params.dtype), new_exp_avg, new_exp_avg_sq


def flat_adam_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam step (L2 decay in the gradient) -> (new_params, new_exp_avg, new_exp_avg_sq)."""
    result = adam_update(
        params, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay, False
    )
    return result if out is None else tuple(o.copy_(r) for o, r in zip(out, result))


def flat_adamw_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    *,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AdamW step (decoupled decay) -> (new_params, new_exp_avg, new_exp_avg_sq)."""
    result = adam_update(
        params, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay, True
    )
    return result if out is None else tuple(o.copy_(r) for o, r in zip(out, result))


def flat_adam_step_backward(
    grad_new_params, grad_new_exp_avg, grad_new_exp_avg_sq, params, grad, exp_avg, exp_avg_sq,
    step, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False,
):  # fmt: skip
    """(d_params, d_grad, d_exp_avg, d_exp_avg_sq) of :func:`flat_adam_step` (adamw: decoupled)."""
    return vjp(
        lambda p, g, m, v: adam_update(p, g, m, v, step, lr, betas, eps, weight_decay, decoupled),
        (params, grad, exp_avg, exp_avg_sq),
        (grad_new_params, grad_new_exp_avg, grad_new_exp_avg_sq),
    )


@torch.no_grad()
def flat_adam_step_(params, grad, exp_avg, exp_avg_sq, step, lr, betas=(0.9, 0.999), eps=1e-8,
                    weight_decay=0.0, decoupled=False):  # fmt: skip
    """In-place Adam/AdamW step: updates params, exp_avg, exp_avg_sq, step += 1. Returns params."""
    result = adam_update(
        params, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay, decoupled
    )
    for o, r in zip((params, exp_avg, exp_avg_sq), result):
        o.copy_(r)
    step.add_(1)
    return params


def clip_coefficient(total_norm: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """min(1, max_norm / (total_norm + 1e-6)) as torch.nn.utils.clip_grad_norm_; 1 without clip."""
    if max_norm is None:
        return torch.ones_like(total_norm)
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


@torch.no_grad()
def flat_clip_adam_step_(params, grad, exp_avg, exp_avg_sq, step, lr, betas=(0.9, 0.999),
                         eps=1e-8, weight_decay=0.0, max_norm=None):  # fmt: skip
    """Clip grad to global L2 norm ``max_norm`` then an in-place Adam step (step += 1).

    Returns:
        0-d total L2 norm of ``grad`` before clipping (state dtype), as clip_grad_norm_ returns.
    """
    dtype = state_dtype(params.dtype)
    total_norm = torch.linalg.vector_norm(grad.to(dtype))
    clipped = grad.to(dtype) * clip_coefficient(total_norm, max_norm)
    result = adam_update(
        params, clipped, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay, False
    )
    for o, r in zip((params, exp_avg, exp_avg_sq), result):
        o.copy_(r)
    step.add_(1)
    return total_norm
