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

Backends: ``cpu`` (C++ in csrc/batch_norm: NCHW planes, channels_last natively as rows of
channels), ``cuda`` (csrc/batch_norm/batch_norm_cuda.cu: one block per channel, NCHW planes;
channels_last converted in and out), ``triton``
(the kernels below: one program per channel looping over its M values through the input's
strides, so NCHW and channels_last run without a copy) and ``reference`` (``F.batch_norm``: eager
autograd). Sums accumulate in float32 (float64 for float64 inputs). Derivatives beyond the second
are not supported by the fused path (the double backward is once differentiable), which
second-order simulation never needs.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import _backend
from ..reference import batch_norm as _reference
from . import _triton

OP_NAME = "batch_norm"
FUSED_BACKENDS = ("cpu", "cuda", "triton")
# Values per loop step of a channel's program: 4 KiB of fp32 per operand in flight (fewer for a
# channel with fewer values: the interpreter pays per lane, 0.1 s a launch at 1024 on 2 values).
BLOCK_SIZE = 1024

tl = _triton.tl


@_triton.jit
def _channel_offsets(
    start, c, n_hw, width, stride_n, stride_c, stride_h, stride_w, BLOCK_SIZE: tl.constexpr
):
    """Element offsets and mask of values [start, start + BLOCK_SIZE) of channel c, any layout."""
    i = start + tl.arange(0, BLOCK_SIZE)
    n = (i // n_hw).to(tl.int64)  # n * stride_n passes 2^31 on large activations
    s = i % n_hw
    offsets = n * stride_n + c * stride_c + (s // width) * stride_h + (s % width) * stride_w
    return offsets, i


@_triton.jit
def _channel_affine(
    c,
    mean,
    var,
    invstd,
    count,
    momentum,
    mean_ptr,
    invstd_ptr,
    running_mean_ptr,
    running_var_ptr,
    weight_ptr,
    bias_ptr,
    HAS_RUNNING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Stores channel c's batch mean and invstd, updates its running statistics as torch does
    (momentum * batch + (1 - momentum) * running, the variance unbiased over count values) and
    returns (scale, shift) of the normalised affine output scale * x + shift. Shared by the
    BatchNorm2d and BN + ReLU + MaxPool2d forward kernels."""
    acc_ty = invstd.dtype
    tl.store(mean_ptr + c, mean)
    tl.store(invstd_ptr + c, invstd)
    if HAS_RUNNING:
        old_mean = tl.load(running_mean_ptr + c).to(acc_ty)
        old_var = tl.load(running_var_ptr + c).to(acc_ty)
        new_mean = momentum * mean + (1.0 - momentum) * old_mean
        new_var = momentum * (var * count / (count - 1.0)) + (1.0 - momentum) * old_var
        tl.store(running_mean_ptr + c, new_mean.to(running_mean_ptr.dtype.element_ty))
        tl.store(running_var_ptr + c, new_var.to(running_var_ptr.dtype.element_ty))
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + c).to(acc_ty)
    shift = -mean * scale
    if HAS_BIAS:
        shift = shift + tl.load(bias_ptr + c).to(acc_ty)
    return scale, shift


@_triton.jit
def _batch_norm_forward_kernel(
    x_ptr,
    weight_ptr,
    bias_ptr,
    y_ptr,
    mean_ptr,
    invstd_ptr,
    running_mean_ptr,
    running_var_ptr,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    n_values,
    n_hw,
    width,
    momentum_hi,
    momentum_lo,
    eps_hi,
    eps_lo,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RUNNING: tl.constexpr,
    COMPUTE_F64: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    acc_ty = tl.float64 if COMPUTE_F64 else tl.float32
    # Float arguments arrive as float32 when compiled: momentum and eps come split in two float32
    # halves (hi + lo) so float64 inputs keep ~1e-14 of relative accuracy.
    momentum = tl.cast(momentum_hi, acc_ty) + tl.cast(momentum_lo, acc_ty)
    eps = tl.cast(eps_hi, acc_ty) + tl.cast(eps_lo, acc_ty)
    count = n_values.to(acc_ty)
    total = tl.full([BLOCK_SIZE], 0.0, acc_ty)
    for start in range(0, n_values, BLOCK_SIZE):
        offsets, i = _channel_offsets(
            start, c, n_hw, width, stride_n, stride_c, stride_h, stride_w, BLOCK_SIZE
        )
        total += tl.load(x_ptr + offsets, mask=i < n_values, other=0.0).to(acc_ty)
    mean = tl.sum(total, axis=0) / count
    # Two-pass variance: no cancellation for channels with a large mean.
    total = tl.full([BLOCK_SIZE], 0.0, acc_ty)
    for start in range(0, n_values, BLOCK_SIZE):
        offsets, i = _channel_offsets(
            start, c, n_hw, width, stride_n, stride_c, stride_h, stride_w, BLOCK_SIZE
        )
        mask = i < n_values
        d = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc_ty) - mean
        total += tl.where(mask, d * d, 0.0)
    var = tl.sum(total, axis=0) / count
    invstd = 1.0 / tl.sqrt(var + eps)
    scale, shift = _channel_affine(
        c, mean, var, invstd, count, momentum, mean_ptr, invstd_ptr, running_mean_ptr,
        running_var_ptr, weight_ptr, bias_ptr, HAS_RUNNING, HAS_WEIGHT, HAS_BIAS,
    )  # fmt: skip
    for start in range(0, n_values, BLOCK_SIZE):
        offsets, i = _channel_offsets(
            start, c, n_hw, width, stride_n, stride_c, stride_h, stride_w, BLOCK_SIZE
        )
        mask = i < n_values
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc_ty)
        tl.store(y_ptr + offsets, (x * scale + shift).to(y_ptr.dtype.element_ty), mask=mask)


@_triton.jit
def _batch_norm_backward_kernel(
    x_ptr,
    weight_ptr,
    grad_y_ptr,
    mean_ptr,
    invstd_ptr,
    dx_ptr,
    dweight_ptr,
    dbias_ptr,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    n_values,
    n_hw,
    width,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_F64: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    acc_ty = tl.float64 if COMPUTE_F64 else tl.float32
    mean = tl.load(mean_ptr + c).to(acc_ty)
    invstd = tl.load(invstd_ptr + c).to(acc_ty)
    sum_g = tl.full([BLOCK_SIZE], 0.0, acc_ty)
    sum_gd = tl.full([BLOCK_SIZE], 0.0, acc_ty)  # sum gy (x - mean)
    for start in range(0, n_values, BLOCK_SIZE):
        offsets, i = _channel_offsets(
            start, c, n_hw, width, stride_n, stride_c, stride_h, stride_w, BLOCK_SIZE
        )
        mask = i < n_values
        g = tl.load(grad_y_ptr + offsets, mask=mask, other=0.0).to(acc_ty)
        d = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc_ty) - mean
        sum_g += g
        sum_gd += g * d  # g = 0 where masked
    s_g = tl.sum(sum_g, axis=0)
    s_gd = tl.sum(sum_gd, axis=0)
    tl.store(dbias_ptr + c, s_g)
    tl.store(dweight_ptr + c, s_gd * invstd)
    w = 1.0
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + c).to(acc_ty)
    count = n_values.to(acc_ty)
    # dx = w invstd (gy - bar(gy) - xhat bar(gy xhat)) = a gy + b (x - mean) + k
    a = w * invstd
    b = -a * invstd * invstd * s_gd / count
    k = -a * s_g / count
    for start in range(0, n_values, BLOCK_SIZE):
        offsets, i = _channel_offsets(
            start, c, n_hw, width, stride_n, stride_c, stride_h, stride_w, BLOCK_SIZE
        )
        mask = i < n_values
        g = tl.load(grad_y_ptr + offsets, mask=mask, other=0.0).to(acc_ty)
        d = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc_ty) - mean
        tl.store(dx_ptr + offsets, (a * g + b * d + k).to(dx_ptr.dtype.element_ty), mask=mask)


@_triton.jit
def _batch_norm_double_backward_kernel(
    x_ptr,
    weight_ptr,
    grad_y_ptr,
    mean_ptr,
    invstd_ptr,
    grad_dx_ptr,
    grad_dweight_ptr,
    grad_dbias_ptr,
    gx_ptr,
    gweight_ptr,
    ggrad_y_ptr,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    n_values,
    n_hw,
    width,
    HAS_WEIGHT: tl.constexpr,
    HAS_GRAD_DX: tl.constexpr,
    HAS_GRAD_DWEIGHT: tl.constexpr,
    HAS_GRAD_DBIAS: tl.constexpr,
    COMPUTE_F64: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    acc_ty = tl.float64 if COMPUTE_F64 else tl.float32
    mean = tl.load(mean_ptr + c).to(acc_ty)
    invstd = tl.load(invstd_ptr + c).to(acc_ty)
    # Sums over the channel of gy, gy d, h, h d, h gy with d = x - mean, h = grad_dx.
    acc_g = tl.full([BLOCK_SIZE], 0.0, acc_ty)
    acc_gd = tl.full([BLOCK_SIZE], 0.0, acc_ty)
    acc_h = tl.full([BLOCK_SIZE], 0.0, acc_ty)
    acc_hd = tl.full([BLOCK_SIZE], 0.0, acc_ty)
    acc_hg = tl.full([BLOCK_SIZE], 0.0, acc_ty)
    for start in range(0, n_values, BLOCK_SIZE):
        offsets, i = _channel_offsets(
            start, c, n_hw, width, stride_n, stride_c, stride_h, stride_w, BLOCK_SIZE
        )
        mask = i < n_values
        g = tl.load(grad_y_ptr + offsets, mask=mask, other=0.0).to(acc_ty)
        d = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc_ty) - mean
        acc_g += g
        acc_gd += g * d
        if HAS_GRAD_DX:
            h = tl.load(grad_dx_ptr + offsets, mask=mask, other=0.0).to(acc_ty)
            acc_h += h
            acc_hd += h * d
            acc_hg += h * g
    count = n_values.to(acc_ty)
    g_bar = tl.sum(acc_g, axis=0) / count
    h_bar = tl.sum(acc_h, axis=0) / count
    g_hat = tl.sum(acc_gd, axis=0) * invstd / count  # bar(gy xhat)
    a_hat = tl.sum(acc_hd, axis=0) * invstd / count  # bar(grad_dx xhat)
    s1 = tl.sum(acc_hg, axis=0) / count - h_bar * g_bar
    tl.store(gweight_ptr + c, invstd * count * (s1 - a_hat * g_hat))
    w = 1.0
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + c).to(acc_ty)
    ggw = 0.0
    if HAS_GRAD_DWEIGHT:
        ggw = tl.load(grad_dweight_ptr + c).to(acc_ty)
    ggb = 0.0
    if HAS_GRAD_DBIAS:
        ggb = tl.load(grad_dbias_ptr + c).to(acc_ty)
    # gx = cg gy + ch h + cd d + c0;  ggy = eh h + ed d + e0  (the reference's closed forms with
    # xhat = d invstd expanded, as in csrc/batch_norm/batch_norm_cpu.cpp).
    w2 = w * invstd * invstd
    cg = -w2 * a_hat + ggw * invstd
    ch = -w2 * g_hat
    cd = w2 * invstd * (3.0 * a_hat * g_hat - s1) - ggw * invstd * invstd * g_hat
    c0 = w2 * (g_hat * h_bar + a_hat * g_bar) - ggw * invstd * g_bar
    eh = w * invstd
    ed = -w * invstd * invstd * a_hat + ggw * invstd
    e0 = -w * invstd * h_bar + ggb
    for start in range(0, n_values, BLOCK_SIZE):
        offsets, i = _channel_offsets(
            start, c, n_hw, width, stride_n, stride_c, stride_h, stride_w, BLOCK_SIZE
        )
        mask = i < n_values
        g = tl.load(grad_y_ptr + offsets, mask=mask, other=0.0).to(acc_ty)
        d = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc_ty) - mean
        gx = cg * g + cd * d + c0
        ggy = ed * d + e0
        if HAS_GRAD_DX:
            h = tl.load(grad_dx_ptr + offsets, mask=mask, other=0.0).to(acc_ty)
            gx += ch * h
            ggy += eh * h
        tl.store(gx_ptr + offsets, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(ggrad_y_ptr + offsets, ggy.to(ggrad_y_ptr.dtype.element_ty), mask=mask)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split_float(value: float) -> tuple[float, float]:
    """value as float32 hi + lo (hi + lo == value to ~1e-14 relative)."""
    hi = float(torch.tensor(value, dtype=torch.float32))
    return hi, float(torch.tensor(value - hi, dtype=torch.float32))


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when its strides are a permutation of a dense layout, else an NCHW copy."""
    return (
        x
        if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
        else (x.contiguous())
    )


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t with x's strides (the kernels index every (N, C, H, W) operand with x's)."""
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


def _geometry(x: torch.Tensor) -> tuple:
    """(grid, stride and size arguments, block size) of the per-channel kernels."""
    n, c, h, w = x.shape
    block = min(BLOCK_SIZE, 1 << max(4, (n * h * w - 1).bit_length()))
    return (c,), (*x.stride(), n * h * w, h * w, w), block


def _check_triton_inputs(x, eps, **per_channel):
    """The compiled backends' input checks (csrc/batch_norm/batch_norm.cpp), for the Triton path."""
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(
            f"{OP_NAME}: x must be float32, float64, float16 or bfloat16, got {x.dtype}"
        )
    if not eps > 0.0:
        raise ValueError(f"{OP_NAME}: eps must be > 0, got {eps}")
    for name, t in per_channel.items():
        if t is None:
            continue
        if t.shape != (x.shape[1],) or t.device != x.device:
            raise ValueError(
                f"{OP_NAME}: {name} must be (channels,) = ({x.shape[1]},) on {x.device}, got "
                f"{tuple(t.shape)} on {t.device}"
            )
        if name.startswith("running") and not t.is_contiguous():
            raise ValueError(f"{OP_NAME}: {name} must be contiguous (it is updated in place)")


def _triton_forward(x, weight, bias, running_mean, running_var, momentum, eps):
    _check_triton_inputs(
        x, eps, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )
    x = _dense(x)
    weight, bias = _channel(weight), _channel(bias)
    grid, geometry, block = _geometry(x)
    y = torch.empty_like(x)
    stats = torch.empty((2, x.shape[1]), dtype=_compute_dtype(x.dtype), device=x.device)
    has_running = running_mean is not None and running_var is not None
    _batch_norm_forward_kernel[grid](
        x,
        x if weight is None else weight,
        x if bias is None else bias,
        y,
        stats[0],
        stats[1],
        running_mean if has_running else x,
        running_var if has_running else x,
        *geometry,
        *_split_float(momentum),
        *_split_float(eps),
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_RUNNING=has_running,
        COMPUTE_F64=x.dtype == torch.float64,
        BLOCK_SIZE=block,
    )
    return y, stats[0], stats[1]


def _channel(t: torch.Tensor | None) -> torch.Tensor | None:
    """A (C,) operand with unit stride (an incoming gradient of a sum is a stride-0 expand)."""
    return None if t is None else t.contiguous()


def _param_dtype(weight, x):
    return x.dtype if weight is None else weight.dtype


def _triton_backward(x, weight, grad_y, mean, invstd):
    x = _dense(x)
    grad_y = _like(grad_y, x)
    weight = _channel(weight)
    grid, geometry, block = _geometry(x)
    dx = torch.empty_like(x)
    sums = torch.empty((2, x.shape[1]), dtype=_compute_dtype(x.dtype), device=x.device)
    _batch_norm_backward_kernel[grid](
        x,
        x if weight is None else weight,
        grad_y,
        mean,
        invstd,
        dx,
        sums[0],
        sums[1],
        *geometry,
        HAS_WEIGHT=weight is not None,
        COMPUTE_F64=x.dtype == torch.float64,
        BLOCK_SIZE=block,
    )
    sums = sums.to(_param_dtype(weight, x))
    return dx, sums[0], sums[1]


def _triton_double_backward(x, weight, grad_y, mean, invstd, grad_dx, grad_dweight, grad_dbias):
    x = _dense(x)
    grad_y = _like(grad_y, x)
    grad_dx = None if grad_dx is None else _like(grad_dx, x)
    weight, grad_dweight, grad_dbias = map(_channel, (weight, grad_dweight, grad_dbias))
    grid, geometry, block = _geometry(x)
    gx = torch.empty_like(x)
    ggrad_y = torch.empty_like(x)
    gweight = torch.empty(x.shape[1], dtype=_compute_dtype(x.dtype), device=x.device)
    _batch_norm_double_backward_kernel[grid](
        x,
        x if weight is None else weight,
        grad_y,
        mean,
        invstd,
        x if grad_dx is None else grad_dx,
        x if grad_dweight is None else grad_dweight,
        x if grad_dbias is None else grad_dbias,
        gx,
        gweight,
        ggrad_y,
        *geometry,
        HAS_WEIGHT=weight is not None,
        HAS_GRAD_DX=grad_dx is not None,
        HAS_GRAD_DWEIGHT=grad_dweight is not None,
        HAS_GRAD_DBIAS=grad_dbias is not None,
        COMPUTE_F64=x.dtype == torch.float64,
        BLOCK_SIZE=block,
    )
    return gx, gweight.to(_param_dtype(weight, x)), ggrad_y


_TRITON = {
    "forward": _triton_forward,
    "backward": _triton_backward,
    "double_backward": _triton_double_backward,
}


def _impl(backend: str, stage: str):
    if backend == "triton":
        return _TRITON[stage]
    return getattr(_backend.extension(), f"batch_norm_{stage}")


class BatchNorm2dFunction(torch.autograd.Function):
    """Training-mode BatchNorm2d; its backward is the differentiable BatchNorm2dBackwardFunction."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, backend):
        y, mean, invstd = _impl(backend, "forward")(
            x, weight, bias, running_mean, running_var, momentum, eps
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
        return _impl(backend, "backward")(x, weight, grad_y, mean, invstd)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_dx, grad_dweight, grad_dbias):
        x, weight, grad_y, mean, invstd = ctx.saved_tensors
        gx, gweight, ggrad_y = _impl(ctx.backend, "double_backward")(
            x, weight, grad_y, mean, invstd, grad_dx, grad_dweight, grad_dbias
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
    backend = _backend.resolve(OP_NAME, x.device)
    if backend == "reference":
        return _reference.batch_norm2d(x, weight, bias, running_mean, running_var, momentum, eps)
    return BatchNorm2dFunction.apply(
        x, weight, bias, running_mean, running_var, momentum, eps, backend
    )
