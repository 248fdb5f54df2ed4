"""batch_norm: training-mode BatchNorm2d with a fused backward and a fused double backward.

Maths (closed forms in :mod:`sophon_fast.reference.batch_norm`, the pure-torch twin): per channel
over M = batch * height * width values, y = weight * (x - mean) * invstd + bias with the biased
variance; running_mean/var updated in place as torch does (momentum, unbiased variance).

Why: in second-order simulation every BN layer's backward sits under ``create_graph=True`` and
the meta-gradient differentiates it again. Eager PyTorch decomposes that double backward into
~100 ops per layer (~86 % of a ResNet-18 HVP's launches). Here the backward is itself an autograd
Function (BatchNorm2dBackwardFunction) whose backward is fused: one reduction pass (five sums
per channel) and one elementwise pass writing grad_x and grad_grad_y.

Memory traffic of the double backward at fp32: reads x, grad_y, grad_dx twice (reduction, then
map) and writes two tensors: 32 B/element, against ~100 eager ops of 8-12 B/element each.

Backends: ``cpu`` (C++ in csrc/batch_norm: NCHW planes, channels_last natively as rows of
channels), ``cuda`` (csrc/batch_norm/batch_norm_cuda.cu: the same two-pass (channel, chunk)
structure as the Triton kernels on NCHW planes, channels_last converted in and out;
compile-checked for sm_80 / sm_90 by make cuda-check, not yet run on a GPU), ``triton`` (the
kernels of ops/batch_norm_triton.py, through the input's strides, so NCHW and channels_last run without a copy: every
stage is two launches over a (channel, chunk) grid, per-chunk partial statistics then a pass
that combines them and maps the chunk's values; the chunk count comes from the channel's M so a
ResNet-18 layer fills an H100's 132 SMs; see chunk_plan) and ``reference`` (``F.batch_norm``:
eager autograd). Sums accumulate in float32 (float64 for float64 inputs); the forward's variance
is the chunks' M2 joined by Chan's parallel combine (no cancellation for a large mean).
Derivatives beyond the second are not supported by the fused path (the double backward is once
differentiable), which second-order simulation never needs.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import _backend
from ..reference import batch_norm as _reference
from . import _library, batch_norm_triton
from .channel_stats_triton import compute_dtype, param_dtype

OP_NAME = "batch_norm"
FUSED_BACKENDS = ("cpu", "cuda", "triton")
BACKWARD_OP = OP_NAME + ".backward"
DOUBLE_BACKWARD_OP = OP_NAME + ".double_backward"

_backend.register_op(
    OP_NAME,
    reference=_reference.batch_norm2d_forward,
    cpu="ext:batch_norm_forward",
    cuda="ext:batch_norm_forward",
    triton=batch_norm_triton.forward,
)
_backend.register_op(
    BACKWARD_OP,
    reference=_reference.batch_norm2d_backward,
    cpu="ext:batch_norm_backward",
    cuda="ext:batch_norm_backward",
    triton=batch_norm_triton.backward,
)
_backend.register_op(
    DOUBLE_BACKWARD_OP,
    reference=_reference.batch_norm2d_double_backward,
    cpu="ext:batch_norm_double_backward",
    cuda="ext:batch_norm_double_backward",
    triton=batch_norm_triton.double_backward,
)


def _per_channel(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty((x.shape[1],), dtype=dtype)


def _fake_forward(x, weight, bias, running_mean, running_var, momentum, eps):
    stats = compute_dtype(x.dtype)
    return torch.empty_like(x), _per_channel(x, stats), _per_channel(x, stats)


def _fake_backward(x, weight, grad_y, mean, invstd):
    param = param_dtype(weight, x)
    return torch.empty_like(x), _per_channel(x, param), _per_channel(x, param)


def _fake_double_backward(x, weight, grad_y, mean, invstd, grad_dx, grad_dweight, grad_dbias):
    return torch.empty_like(x), _per_channel(x, param_dtype(weight, x)), torch.empty_like(x)


_library.define(
    OP_NAME,
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
    "Tensor(b!)? running_var, float momentum, float eps) -> (Tensor, Tensor, Tensor)",
    _fake_forward,
    mutates_args=("running_mean", "running_var"),
)
_library.define(
    BACKWARD_OP,
    "(Tensor x, Tensor? weight, Tensor grad_y, Tensor mean, Tensor invstd) "
    "-> (Tensor, Tensor, Tensor)",
    _fake_backward,
)
_library.define(
    DOUBLE_BACKWARD_OP,
    "(Tensor x, Tensor? weight, Tensor grad_y, Tensor mean, Tensor invstd, Tensor? grad_dx, "
    "Tensor? grad_dweight, Tensor? grad_dbias) -> (Tensor, Tensor, Tensor)",
    _fake_double_backward,
)


class BatchNorm2dFunction(torch.autograd.Function):
    """Training-mode BatchNorm2d; its backward is the differentiable BatchNorm2dBackwardFunction."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, backend):
        y, mean, invstd = _library.call(
            OP_NAME, backend, x, weight, bias, running_mean, running_var, momentum, eps
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.has_bias = bias is not None
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, mean, invstd = ctx.saved_tensors
        dx, dweight, dbias = BatchNorm2dBackwardFunction.apply(
            x, weight, grad_y, mean, invstd, ctx.backend
        )
        return (
            dx,
            dweight if weight is not None else None,
            dbias if ctx.has_bias else None,
            None,
            None,
            None,
            None,
            None,
        )


class BatchNorm2dBackwardFunction(torch.autograd.Function):
    """(dx, dweight, dbias) of BatchNorm2d from (x, weight, grad_y); backward: the fused VJP."""

    @staticmethod
    def forward(ctx, x, weight, grad_y, mean, invstd, backend):
        ctx.save_for_backward(x, weight, grad_y, mean, invstd)
        ctx.backend = backend
        return _library.call(BACKWARD_OP, backend, x, weight, grad_y, mean, invstd)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_dx, grad_dweight, grad_dbias):
        x, weight, grad_y, mean, invstd = ctx.saved_tensors
        gx, gweight, ggrad_y = _library.call(
            DOUBLE_BACKWARD_OP,
            ctx.backend,
            x,
            weight,
            grad_y,
            mean,
            invstd,
            grad_dx,
            grad_dweight,
            grad_dbias,
        )
        return gx, gweight if weight is not None else None, ggrad_y, None, None, None


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
        BackendUnavailableError: a forced backend that cannot run here.
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
    backend = _backend.resolve_backend(OP_NAME, x.device)
    if backend == "reference":
        return _reference.batch_norm2d(x, weight, bias, running_mean, running_var, momentum, eps)
    return BatchNorm2dFunction.apply(
        x, weight, bias, running_mean, running_var, momentum, eps, backend
    )
