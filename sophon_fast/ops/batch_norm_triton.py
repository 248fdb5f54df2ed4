"""Triton kernels of batch_norm (:mod:`sophon_fast.ops.batch_norm`): forward, backward, double
backward, each two launches over a (channel, chunk) grid (:mod:`sophon_fast.ops.channel_stats_triton`).

The launchers take the compiled backends' arguments (csrc/batch_norm/batch_norm.cpp) and return
the same outputs, so the op's table (:func:`sophon_fast._backend.register_op`) holds them beside
the extension's functions.
"""

from __future__ import annotations

import torch

from . import _triton
from .channel_stats_triton import (
    NUM_WARPS,
    _channel_affine,
    _channel_moments,
    _channel_sum,
    _tile,
    channel,
    channel_matrix,
    channel_stats,
    compute_dtype,
    dense,
    like,
    param_dtype,
    partials,
    split_float,
)

OP_NAME = "batch_norm"

tl = _triton.tl


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
    partial_ptr,
    stride_r,
    stride_c,
    stride_s,
    rows,
    cols,
    n_col_tiles,
    n_tiles,
    momentum_hi,
    momentum_lo,
    eps_hi,
    eps_lo,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RUNNING: tl.constexpr,
    COMPUTE_F64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    TILES: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,
):
    """Pass 2: combine the channel's partials, y = scale x + shift over this chunk."""
    c = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    acc_ty = tl.float64 if COMPUTE_F64 else tl.float32
    # Float arguments arrive as float32 when compiled: momentum and eps come split in two float32
    # halves (hi + lo) so float64 inputs keep ~1e-14 of relative accuracy.
    momentum = tl.cast(momentum_hi, acc_ty) + tl.cast(momentum_lo, acc_ty)
    eps = tl.cast(eps_hi, acc_ty) + tl.cast(eps_lo, acc_ty)
    count = (rows * cols).to(acc_ty)
    mean, var = _channel_moments(
        partial_ptr, c, tl.num_programs(1), tl.num_programs(0), count, MAX_CHUNKS, acc_ty
    )
    scale, shift = _channel_affine(
        c, k == 0, mean, var, eps, count, momentum, mean_ptr, invstd_ptr, running_mean_ptr,
        running_var_ptr, weight_ptr, bias_ptr, HAS_RUNNING, HAS_WEIGHT, HAS_BIAS,
    )  # fmt: skip
    x_c = x_ptr + c * stride_c
    y_c = y_ptr + c * stride_c
    for i in range(TILES):
        t = k * TILES + i
        offsets, mask, _ = _tile(t, rows, cols, n_col_tiles, stride_r, stride_s, BLOCK_R, BLOCK_S)
        mask = mask & (t < n_tiles)
        x = tl.load(x_c + offsets, mask=mask, other=0.0).to(acc_ty)
        tl.store(y_c + offsets, (x * scale + shift).to(y_ptr.dtype.element_ty), mask=mask)


@_triton.jit
def _grad_sums_kernel(
    x_ptr,
    grad_y_ptr,
    grad_dx_ptr,
    mean_ptr,
    partial_ptr,
    stride_r,
    stride_c,
    stride_s,
    rows,
    cols,
    n_col_tiles,
    n_tiles,
    HAS_GRAD_DX: tl.constexpr,
    COMPUTE_F64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    TILES: tl.constexpr,
):
    """Pass 1 of the backward and double backward: this chunk's sums of gy, gy d and (with
    grad_dx = h) h, h d, h gy, d = x - mean, as planes 0..4 of the partials buffer."""
    c = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    acc_ty = tl.float64 if COMPUTE_F64 else tl.float32
    mean = tl.load(mean_ptr + c).to(acc_ty)
    acc_g = tl.zeros([BLOCK_R, BLOCK_S], acc_ty)
    acc_gd = tl.zeros([BLOCK_R, BLOCK_S], acc_ty)
    acc_h = tl.zeros([BLOCK_R, BLOCK_S], acc_ty)
    acc_hd = tl.zeros([BLOCK_R, BLOCK_S], acc_ty)
    acc_hg = tl.zeros([BLOCK_R, BLOCK_S], acc_ty)
    base = c * stride_c
    for i in range(TILES):
        t = k * TILES + i
        offsets, mask, _ = _tile(t, rows, cols, n_col_tiles, stride_r, stride_s, BLOCK_R, BLOCK_S)
        mask = mask & (t < n_tiles)
        g = tl.load(grad_y_ptr + base + offsets, mask=mask, other=0.0).to(acc_ty)
        d = tl.load(x_ptr + base + offsets, mask=mask, other=0.0).to(acc_ty) - mean
        acc_g += g
        acc_gd += g * d  # g = 0 where masked
        if HAS_GRAD_DX:
            h = tl.load(grad_dx_ptr + base + offsets, mask=mask, other=0.0).to(acc_ty)
            acc_h += h
            acc_hd += h * d
            acc_hg += h * g
    plane = tl.num_programs(0) * tl.num_programs(1)
    out = partial_ptr + c * tl.num_programs(1) + k
    tl.store(out, tl.sum(tl.sum(acc_g, axis=1), axis=0))
    tl.store(out + plane, tl.sum(tl.sum(acc_gd, axis=1), axis=0))
    if HAS_GRAD_DX:
        tl.store(out + 2 * plane, tl.sum(tl.sum(acc_h, axis=1), axis=0))
        tl.store(out + 3 * plane, tl.sum(tl.sum(acc_hd, axis=1), axis=0))
        tl.store(out + 4 * plane, tl.sum(tl.sum(acc_hg, axis=1), axis=0))


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
    partial_ptr,
    stride_r,
    stride_c,
    stride_s,
    rows,
    cols,
    n_col_tiles,
    n_tiles,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_F64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    TILES: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,
):
    """Pass 2: dx over this chunk; the channel's first program stores dweight and dbias."""
    c = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    acc_ty = tl.float64 if COMPUTE_F64 else tl.float32
    n_chunks = tl.num_programs(1)
    n_channels = tl.num_programs(0)
    mean = tl.load(mean_ptr + c).to(acc_ty)
    invstd = tl.load(invstd_ptr + c).to(acc_ty)
    s_g = _channel_sum(partial_ptr, 0, c, n_chunks, n_channels, MAX_CHUNKS, acc_ty)
    s_gd = _channel_sum(partial_ptr, 1, c, n_chunks, n_channels, MAX_CHUNKS, acc_ty)
    tl.store(dbias_ptr + c, s_g, mask=k == 0)
    tl.store(dweight_ptr + c, s_gd * invstd, mask=k == 0)
    w = 1.0
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + c).to(acc_ty)
    count = (rows * cols).to(acc_ty)
    # dx = w invstd (gy - bar(gy) - xhat bar(gy xhat)) = a gy + b (x - mean) + k0
    a = w * invstd
    b = -a * invstd * invstd * s_gd / count
    k0 = -a * s_g / count
    base = c * stride_c
    for i in range(TILES):
        t = k * TILES + i
        offsets, mask, _ = _tile(t, rows, cols, n_col_tiles, stride_r, stride_s, BLOCK_R, BLOCK_S)
        mask = mask & (t < n_tiles)
        g = tl.load(grad_y_ptr + base + offsets, mask=mask, other=0.0).to(acc_ty)
        d = tl.load(x_ptr + base + offsets, mask=mask, other=0.0).to(acc_ty) - mean
        dx = a * g + b * d + k0
        tl.store(dx_ptr + base + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


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
    partial_ptr,
    stride_r,
    stride_c,
    stride_s,
    rows,
    cols,
    n_col_tiles,
    n_tiles,
    HAS_WEIGHT: tl.constexpr,
    HAS_GRAD_DX: tl.constexpr,
    HAS_GRAD_DWEIGHT: tl.constexpr,
    HAS_GRAD_DBIAS: tl.constexpr,
    COMPUTE_F64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    TILES: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,
):
    """Pass 2: gx and ggrad_y over this chunk; the channel's first program stores gweight."""
    c = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    acc_ty = tl.float64 if COMPUTE_F64 else tl.float32
    n_chunks = tl.num_programs(1)
    n_channels = tl.num_programs(0)
    mean = tl.load(mean_ptr + c).to(acc_ty)
    invstd = tl.load(invstd_ptr + c).to(acc_ty)
    count = (rows * cols).to(acc_ty)
    g_bar = _channel_sum(partial_ptr, 0, c, n_chunks, n_channels, MAX_CHUNKS, acc_ty) / count
    # bar(gy xhat)
    g_hat = _channel_sum(partial_ptr, 1, c, n_chunks, n_channels, MAX_CHUNKS, acc_ty) * invstd
    g_hat = g_hat / count
    h_bar = 0.0
    a_hat = 0.0  # bar(grad_dx xhat)
    s1 = 0.0
    if HAS_GRAD_DX:
        h_bar = _channel_sum(partial_ptr, 2, c, n_chunks, n_channels, MAX_CHUNKS, acc_ty) / count
        a_hat = _channel_sum(partial_ptr, 3, c, n_chunks, n_channels, MAX_CHUNKS, acc_ty)
        a_hat = a_hat * invstd / count
        s1 = _channel_sum(partial_ptr, 4, c, n_chunks, n_channels, MAX_CHUNKS, acc_ty) / count
        s1 = s1 - h_bar * g_bar
    tl.store(gweight_ptr + c, invstd * count * (s1 - a_hat * g_hat), mask=k == 0)
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
    base = c * stride_c
    for i in range(TILES):
        t = k * TILES + i
        offsets, mask, _ = _tile(t, rows, cols, n_col_tiles, stride_r, stride_s, BLOCK_R, BLOCK_S)
        mask = mask & (t < n_tiles)
        g = tl.load(grad_y_ptr + base + offsets, mask=mask, other=0.0).to(acc_ty)
        d = tl.load(x_ptr + base + offsets, mask=mask, other=0.0).to(acc_ty) - mean
        gx = cg * g + cd * d + c0
        ggy = ed * d + e0
        if HAS_GRAD_DX:
            h = tl.load(grad_dx_ptr + base + offsets, mask=mask, other=0.0).to(acc_ty)
            gx += ch * h
            ggy += eh * h
        tl.store(gx_ptr + base + offsets, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        tl.store(ggrad_y_ptr + base + offsets, ggy.to(ggrad_y_ptr.dtype.element_ty), mask=mask)


def check_inputs(x, eps, **per_channel):
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


def forward(x, weight, bias, running_mean, running_var, momentum, eps):
    check_inputs(
        x, eps, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )
    x = dense(x)
    weight, bias = channel(weight), channel(bias)
    geometry, plan = channel_matrix(x)
    y = torch.empty_like(x)
    stats = torch.empty((2, x.shape[1]), dtype=compute_dtype(x.dtype), device=x.device)
    has_running = running_mean is not None and running_var is not None
    if x.shape[1] == 0:
        return y, stats[0], stats[1]
    with _triton.launch_device(x):
        partial = channel_stats(x, geometry, plan)
        _batch_norm_forward_kernel[(x.shape[1], plan.n_chunks)](
            x,
            x if weight is None else weight,
            x if bias is None else bias,
            y,
            stats[0],
            stats[1],
            running_mean if has_running else x,
            running_var if has_running else x,
            partial,
            *geometry,
            *split_float(momentum),
            *split_float(eps),
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            HAS_RUNNING=has_running,
            COMPUTE_F64=x.dtype == torch.float64,
            MAX_CHUNKS=plan.max_chunks,
            num_warps=NUM_WARPS,
            **plan.constexprs(),
        )
    return y, stats[0], stats[1]


def _grad_sums(x, grad_y, grad_dx, mean, geometry, plan) -> torch.Tensor:
    """Pass 1 of the backwards: (2 or 5, channels, chunks) per-chunk sums (_grad_sums_kernel)."""
    partial = partials(2 if grad_dx is None else 5, x, plan)
    _grad_sums_kernel[(x.shape[1], plan.n_chunks)](
        x,
        grad_y,
        x if grad_dx is None else grad_dx,
        mean,
        partial,
        *geometry,
        HAS_GRAD_DX=grad_dx is not None,
        COMPUTE_F64=x.dtype == torch.float64,
        num_warps=NUM_WARPS,
        **plan.constexprs(),
    )
    return partial


def backward(x, weight, grad_y, mean, invstd):
    x = dense(x)
    grad_y = like(grad_y, x)
    weight = channel(weight)
    geometry, plan = channel_matrix(x)
    dx = torch.empty_like(x)
    sums = torch.empty((2, x.shape[1]), dtype=compute_dtype(x.dtype), device=x.device)
    with _triton.launch_device(x):
        partial = _grad_sums(x, grad_y, None, mean, geometry, plan)
        _batch_norm_backward_kernel[(x.shape[1], plan.n_chunks)](
            x,
            x if weight is None else weight,
            grad_y,
            mean,
            invstd,
            dx,
            sums[0],
            sums[1],
            partial,
            *geometry,
            HAS_WEIGHT=weight is not None,
            COMPUTE_F64=x.dtype == torch.float64,
            MAX_CHUNKS=plan.max_chunks,
            num_warps=NUM_WARPS,
            **plan.constexprs(),
        )
    sums = sums.to(param_dtype(weight, x))
    return dx, sums[0], sums[1]


def double_backward(x, weight, grad_y, mean, invstd, grad_dx, grad_dweight, grad_dbias):
    x = dense(x)
    grad_y = like(grad_y, x)
    grad_dx = None if grad_dx is None else like(grad_dx, x)
    weight, grad_dweight, grad_dbias = map(channel, (weight, grad_dweight, grad_dbias))
    geometry, plan = channel_matrix(x)
    gx = torch.empty_like(x)
    ggrad_y = torch.empty_like(x)
    gweight = torch.empty(x.shape[1], dtype=compute_dtype(x.dtype), device=x.device)
    with _triton.launch_device(x):
        partial = _grad_sums(x, grad_y, grad_dx, mean, geometry, plan)
        _batch_norm_double_backward_kernel[(x.shape[1], plan.n_chunks)](
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
            partial,
            *geometry,
            HAS_WEIGHT=weight is not None,
            HAS_GRAD_DX=grad_dx is not None,
            HAS_GRAD_DWEIGHT=grad_dweight is not None,
            HAS_GRAD_DBIAS=grad_dbias is not None,
            COMPUTE_F64=x.dtype == torch.float64,
            MAX_CHUNKS=plan.max_chunks,
            num_warps=NUM_WARPS,
            **plan.constexprs(),
        )
    return gx, gweight.to(param_dtype(weight, x)), ggrad_y
