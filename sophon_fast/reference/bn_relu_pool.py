"""Pure-PyTorch training-mode BatchNorm2d -> ReLU -> MaxPool2d(2, 2), and its backward.

Notation per channel c over M = batch * height * width values: mean mu, biased variance var,
invstd = 1 / sqrt(var + eps), a = weight * invstd, b = bias - mu * a, z = a x + b (the BatchNorm
output), r = relu(z), y = max over each 2x2 window of r (floor: an odd last row or column is
dropped, as ``F.max_pool2d`` does; it still counts in the statistics).

Since z is monotone in x per channel (increasing for a >= 0, decreasing for a < 0), each pooled
value is relu(a max(x) + b) or relu(a min(x) + b): the fused op never writes z or r.

Backward, for an incoming dy of the pooled shape: dz is dy at each window's arg-max of z (the
first in row-major window order among equal values, torch's max_pool2d rule) where that z > 0,
zero elsewhere; then the BatchNorm backward with xhat = (x - mu) invstd:

    dx = weight * invstd * (dz - bar(dz) - xhat * bar(dz xhat)),
    dweight = sum(dz xhat),  dbias = sum(dz).

``batch_norm_relu_maxpool2d`` here is the eager composition itself (oracle, benchmark baseline
and fallback); ``batch_norm_relu_maxpool2d_backward`` is the closed form above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "batch_norm_relu_maxpool2d",
    "batch_norm_relu_maxpool2d_backward",
    "batch_norm_relu_maxpool2d_forward",
]


def batch_norm_relu_maxpool2d(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``max_pool2d(relu(batch_norm(x, training=True)), 2, 2)`` in eager PyTorch.

    Args:
        x: (batch, channels, height, width), NCHW or channels_last; height, width >= 2.
        weight, bias: (channels,) or None (no affine).
        running_mean, running_var: (channels,) updated in place, or None (no tracking).
        momentum: running = (1 - momentum) * running + momentum * batch statistic (the variance
            unbiased). Default 0.1.
        eps: added to the variance. Default 1e-5.

    Returns:
        (batch, channels, height // 2, width // 2) pooled activations.
    """
    z = F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    return F.max_pool2d(F.relu(z), 2, 2)


def batch_norm_relu_maxpool2d_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean (C,), invstd (C,)): :func:`batch_norm_relu_maxpool2d` and the batch statistics
    its backward takes, in float32 (float64 for float64 x), as the fused kernels return them."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    var, mean = torch.var_mean(x.to(compute), dim=(0, 2, 3), correction=0)
    y = batch_norm_relu_maxpool2d(x, weight, bias, running_mean, running_var, momentum, eps)
    return y, mean, torch.rsqrt(var + eps)


def _window_argmax(z: torch.Tensor) -> torch.Tensor:
    """(N, C, OH, OW) index 0..3 of each 2x2 window's first maximum (row-major), of z (N,C,H,W)."""
    n, c, h, w = z.shape
    oh, ow = h // 2, w // 2
    windows = z[:, :, : 2 * oh, : 2 * ow].reshape(n, c, oh, 2, ow, 2)
    windows = windows.permute(0, 1, 2, 4, 3, 5).reshape(n, c, oh, ow, 4)
    return windows.argmax(-1)  # the first maximal index, as documented for torch.argmax


def batch_norm_relu_maxpool2d_backward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    grad_y: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (N, C, H, W), dweight (C,), dbias (C,)) from x and the pooled gradient, closed form.

    Args:
        x: (batch, channels, height, width) the op's input.
        weight, bias: (channels,) or None.
        grad_y: (batch, channels, height // 2, width // 2) gradient of the pooled output.
        mean, invstd: (channels,) the forward's batch statistics.

    Returns:
        (dx like x, dweight (channels,), dbias (channels,)).
    """
    shape = (1, -1, 1, 1)
    n, c, h, w = x.shape
    oh, ow = h // 2, w // 2
    a = invstd if weight is None else weight * invstd
    b = -mean * a if bias is None else bias - mean * a
    xhat = (x - mean.view(shape)) * invstd.view(shape)
    z = x * a.view(shape) + b.view(shape)
    index = _window_argmax(z)
    picked = torch.gather(
        z[:, :, : 2 * oh, : 2 * ow]
        .reshape(n, c, oh, 2, ow, 2)
        .permute(0, 1, 2, 4, 3, 5)
        .reshape(n, c, oh, ow, 4),
        -1,
        index.unsqueeze(-1),
    ).squeeze(-1)
    active = torch.where(picked > 0, grad_y, torch.zeros_like(grad_y))
    one_hot = F.one_hot(index, 4).to(x.dtype) * active.unsqueeze(-1)
    dz = torch.zeros_like(x)
    dz[:, :, : 2 * oh, : 2 * ow] = (
        one_hot.reshape(n, c, oh, ow, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * oh, 2 * ow)
    )
    scale = invstd if weight is None else weight * invstd
    bar_dz = dz.mean(dim=(0, 2, 3), keepdim=True)
    bar_dz_xhat = (dz * xhat).mean(dim=(0, 2, 3), keepdim=True)
    dx = scale.view(shape) * (dz - bar_dz - xhat * bar_dz_xhat)
    return dx, (dz * xhat).sum(dim=(0, 2, 3)), dz.sum(dim=(0, 2, 3))
