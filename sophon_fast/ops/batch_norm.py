"""batch_norm: training-mode BatchNorm2d with a fused backward and a fused double backward.

Maths (closed forms in :mod:`sophon_fast.reference.batch_norm`, the pure-torch twin): per channel
over M = batch * height * width values, y = weight * (x - mean) * invstd + bias with the biased
variance; running_mean/var updated in place as torch does (momentum, unbiased variance).

Why: in second-order simulation every BN layer's backward sits under ``create_graph=True`` and
the meta-gradient differentiates it again. Eager PyTorch decomposes that double backward into
~100 ops per layer (~86 % of a ResNet-18 HVP's launches). Here the backward is itself an autograd
Function (BatchNorm2dBackwardFunction) whose backward is one fused kernel: per channel one
reduction pass (five sums) and one elementwise pass writing grad_x and grad_grad_y.

Memory traffic of the double backward at fp32: reads x, grad_y, grad_dx twice (reduction, then
map) and writes two tensors: 32 B/element, against ~100 eager ops of 8-12 B/element each.

Backends: ``cpu`` (C++ in csrc/batch_norm, NCHW planes; channels_last converted in and out) and
``reference`` (``F.batch_norm``: eager autograd). Triton and CUDA kernels for this op are not
written yet: forcing them raises BackendUnavailableError, and ``auto`` on CUDA tensors picks
``reference``. Derivatives beyond the second are not supported by the fused path (the double
backward is once differentiable), which second-order simulation never needs.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import _backend
from ..reference import batch_norm as _reference

OP_NAME = "batch_norm"
FUSED_BACKENDS = ("cpu",)
# No GPU kernels yet: on CUDA tensors auto must not pick the CPU-only extension.
_backend.AUTO_ORDER_BY_OP.setdefault(OP_NAME, {})["cuda"] = ("reference",)


def _ext():
    return _backend.extension()


class BatchNorm2dFunction(torch.autograd.Function):
    """Training-mode BatchNorm2d; its backward is the differentiable BatchNorm2dBackwardFunction."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        y, mean, invstd = _ext().batch_norm_forward(
            x, weight, bias, running_mean, running_var, momentum, eps
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, mean, invstd = ctx.saved_tensors
        dx, dweight, dbias = BatchNorm2dBackwardFunction.apply(x, weight, grad_y, mean, invstd)
        return (
            dx,
            dweight if weight is not None else None,
            dbias if ctx.has_bias else None,
            None,
            None,
            None,
            None,
        )


class BatchNorm2dBackwardFunction(torch.autograd.Function):
    """(dx, dweight, dbias) of BatchNorm2d from (x, weight, grad_y); backward: the fused VJP."""

    @staticmethod
    def forward(ctx, x, weight, grad_y, mean, invstd):
        ctx.save_for_backward(x, weight, grad_y, mean, invstd)
        return _ext().batch_norm_backward(x, weight, grad_y, mean, invstd)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_dx, grad_dweight, grad_dbias):
        x, weight, grad_y, mean, invstd = ctx.saved_tensors
        gx, gweight, ggrad_y = _ext().batch_norm_double_backward(
            x, weight, grad_y, mean, invstd, grad_dx, grad_dweight, grad_dbias
        )
        return gx, gweight if weight is not None else None, ggrad_y, None, None


def batch_norm2d(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Training-mode BatchNorm2d with fused backward and double backward.

    Same result as ``F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum,
    eps)``, including the in-place running-statistic update; first and second derivatives
    (``create_graph=True`` then a second backward) run fused kernels.

    Args:
        x: (batch, channels, height, width) float32/float64/float16/bfloat16, NCHW or
            channels_last (the output keeps x's layout); batch * height * width >= 2.
        weight, bias: (channels,) affine parameters, or None.
        running_mean, running_var: (channels,) buffers updated in place, or None.
        momentum: running = (1 - momentum) * running + momentum * batch statistic (variance
            unbiased). Default 0.1.
        eps: added to the biased variance. Default 1e-5.

    Returns:
        (batch, channels, height, width) normalised x.

    Raises:
        ValueError: wrong shapes, a single value per channel, eps <= 0.
        TypeError: non-floating x.
        BackendUnavailableError: a forced backend without BN kernels (triton, cuda) or an
            unavailable one.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(
            "batch_norm2d: x must be a (batch, channels, height, width) tensor, got "
            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
        )
    if x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise ValueError(
            "batch_norm2d: expected more than 1 value per channel when training, got input "
            f"shape {tuple(x.shape)}"
        )
    backend = _backend.resolve(OP_NAME, x.device)
    if backend == "reference":
        return _reference.batch_norm2d(x, weight, bias, running_mean, running_var, momentum, eps)
    if backend not in FUSED_BACKENDS:
        raise _backend.BackendUnavailableError(
            f"backend {backend!r} was forced but {OP_NAME} has no {backend} kernels yet "
            f"(fused backends: {', '.join(FUSED_BACKENDS)}; or use 'reference')"
        )
    return BatchNorm2dFunction.apply(x, weight, bias, running_mean, running_var, momentum, eps)
