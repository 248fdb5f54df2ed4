"""Pure-PyTorch training-mode BatchNorm2d and the closed forms of its backward and double backward.

Notation per channel c over M = batch * height * width values: mean mu, biased variance var,
invstd = 1 / sqrt(var + eps), xhat = (x - mu) * invstd, y = weight * xhat + bias, gy = dL/dy,
and bar(.) the channel mean.

    backward         dx = weight * invstd * (gy - bar(gy) - xhat * bar(gy xhat))
                     dweight = sum(gy xhat),  dbias = sum(gy)

The double backward takes incoming (ggx, ggw, ggb) for (dx, dweight, dbias) and returns the
gradients for (x, weight, gy); with a = bar(ggx xhat), g = bar(gy xhat),
s1 = bar(ggx gy) - bar(ggx) bar(gy):

    gx   = weight * invstd^2 * (xhat (3 a g - s1) - g (ggx - bar(ggx)) - a (gy - bar(gy)))
           + ggw * invstd * (gy - bar(gy) - xhat g)
    gw   = invstd * M * (s1 - a g)
    ggy  = weight * invstd * (ggx - bar(ggx) - xhat a) + ggw * xhat + ggb

Eager PyTorch builds these from ~100 small ops per BN layer; the fused op
(:mod:`sophon_fast.ops.batch_norm`) does each in two passes over the channel. The functions here
are its oracle and fallback (``batch_norm2d`` is ``F.batch_norm`` itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "batch_norm2d",
    "batch_norm2d_backward",
    "batch_norm2d_double_backward",
    "batch_norm2d_forward",
]


def batch_norm2d(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Training-mode BatchNorm2d: ``F.batch_norm(..., training=True)``.

    Args:
        x: (batch, channels, height, width), NCHW or channels_last.
        weight, bias: (channels,) or None (no affine).
        running_mean, running_var: (channels,) updated in place, or None (no tracking).
        momentum: running = (1 - momentum) * running + momentum * batch statistic (the variance
            unbiased). Default 0.1.
        eps: added to the variance. Default 1e-5.

    Returns:
        (batch, channels, height, width) normalised x.
    """
    return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)


def batch_norm2d_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean (C,), invstd (C,)): :func:`batch_norm2d` and the batch statistics its backward
    takes, in float32 (float64 for float64 x), as the fused kernels return them."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    var, mean = torch.var_mean(x.to(compute), dim=(0, 2, 3), correction=0)
    y = batch_norm2d(x, weight, bias, running_mean, running_var, momentum, eps)
    return y, mean, torch.rsqrt(var + eps)


def _stats(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor):
    shape = (1, -1, 1, 1)
    return (x - mean.view(shape)) * invstd.view(shape), x[0, 0].numel() * x.shape[0]


def _bar(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=(0, 2, 3), keepdim=True)


def batch_norm2d_backward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    grad_y: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (N, C, H, W), dweight (C,), dbias (C,)) of training-mode BatchNorm2d."""
    xhat, _ = _stats(x, mean, invstd)
    w = 1.0 if weight is None else weight.view(1, -1, 1, 1)
    scale = w * invstd.view(1, -1, 1, 1)
    dx = scale * (grad_y - _bar(grad_y) - xhat * _bar(grad_y * xhat))
    return dx, (grad_y * xhat).sum(dim=(0, 2, 3)), grad_y.sum(dim=(0, 2, 3))


def batch_norm2d_double_backward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    grad_y: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    grad_dx: torch.Tensor | None,
    grad_dweight: torch.Tensor | None,
    grad_dbias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gx (N, C, H, W), gweight (C,), ggrad_y (N, C, H, W)): the backward's VJP, closed form."""
    xhat, count = _stats(x, mean, invstd)
    shape = (1, -1, 1, 1)
    inv = invstd.view(shape)
    w = 1.0 if weight is None else weight.view(shape)
    ggx = torch.zeros_like(x) if grad_dx is None else grad_dx
    gy_c = grad_y - _bar(grad_y)
    a, g = _bar(ggx * xhat), _bar(grad_y * xhat)
    ggx_c = ggx - _bar(ggx)
    s1 = _bar(ggx * gy_c)
    gx = w * inv * inv * (xhat * (3 * a * g - s1) - g * ggx_c - a * gy_c)
    ggy = w * inv * (ggx_c - xhat * a)
    if grad_dweight is not None:
        ggw = grad_dweight.view(shape)
        gx = gx + ggw * inv * (gy_c - xhat * g)
        ggy = ggy + ggw * xhat
    if grad_dbias is not None:
        ggy = ggy + grad_dbias.view(shape)
    gw = (inv * count * (s1 - a * g)).view(-1)
    return gx, gw, ggy
