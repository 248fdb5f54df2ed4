"""Pure-PyTorch twin of :mod:`sophon_fast.ops.flat_sgd_step` (oracle, baseline and fallback).

    forward   params' = params - lr * (grad + weight_decay * params)
    backward  d_params = (1 - lr * weight_decay) * d_out,   d_grad = -lr * d_out

Maths in float32 for float32/float16/bfloat16 storage and in float64 for float64, the result cast
back to the storage dtype, exactly as the fused kernels do. Differentiable to any order by autograd.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def flat_sgd_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    weight_decay: float = 0.0,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Out-of-place SGD step on a flat buffer.

    Args:
        params: (n_params,) parameters.
        grad: (n_params,) gradient, same dtype and device as ``params``.
        lr: learning rate.
        weight_decay: L2 coefficient added to the gradient (``grad + weight_decay * params``).
        out: optional (n_params,) buffer to write the result into (may be ``params``).

    Returns:
        (n_params,) updated parameters in ``params.dtype`` (``out`` when given).
    """
    compute = _compute_dtype(params.dtype)
    p = params.to(compute)
    update = grad.to(compute)
    if weight_decay != 0.0:
        update = update + weight_decay * p
    result = (p - lr * update).to(params.dtype)
    if out is None:
        return result
    return out.copy_(result)


def flat_sgd_step_backward(
    grad_out: torch.Tensor, lr: float, weight_decay: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector-Jacobian products of :func:`flat_sgd_step`.

    Args:
        grad_out: (n_params,) gradient with respect to the updated parameters.

    Returns:
        (grad_params, grad_grad), each (n_params,) in ``grad_out.dtype``; with
        ``weight_decay == 0`` grad_params is ``grad_out`` itself (an identity Jacobian block).
    """
    compute = _compute_dtype(grad_out.dtype)
    d = grad_out.to(compute)
    if weight_decay == 0.0:
        return grad_out, (d * -lr).to(grad_out.dtype)
    grad_params = (d * (1.0 - lr * weight_decay)).to(grad_out.dtype)
    grad_grad = (d * -lr).to(grad_out.dtype)
    return grad_params, grad_grad
