"""Triton kernels of batch_norm_relu_maxpool2d (:mod:`sophon_fast.ops.bn_relu_pool`).

The forward is batch_norm's per-chunk statistics (:mod:`sophon_fast.ops.channel_stats_triton`)
then one pass over the 2x2 windows; the backward one pass of window sums then one writing dx over
every window, those of an odd last row or column partial. The launchers take the compiled
backends' arguments (csrc/bn_relu_pool/bn_relu_pool.cpp) and return the same outputs.
"""

from __future__ import annotations

import torch

from . import _triton
from . import channel_stats_triton as common
from .channel_stats_triton import _channel_affine, _channel_moments, _channel_sum

OP_NAME = "bn_relu_pool"

tl = _triton.tl

# Work split, as in ops/batch_norm_triton.py: the statistics are batch_norm's per-chunk
# (count, mean, M2) partials over x; the pooled passes run over matrices of 2x2 windows, rows
# the (n, oh) pairs and columns ow, in tiles and chunks of tiles (channel_stats_triton.chunk_plan), one
# program per (channel, chunk). A row index splits into (n, oh) once per row (a 32-bit divide
# by the pooled height), never per element.


@_triton.jit
def _window_tile(
    t, rows, cols, n_col_tiles, rows_per_image, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr
):
    """(n as int64, oh, ow, mask) of tile t of a matrix of windows, rows = (n, oh) pairs with
    rows_per_image windows down an image, columns = ow."""
    row_tile = t // n_col_tiles  # one scalar divide per tile
    col_tile = t - row_tile * n_col_tiles
    r = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    ow = col_tile * BLOCK_S + tl.arange(0, BLOCK_S)
    n = r // rows_per_image  # per row
    oh = r - n * rows_per_image
    mask = (r < rows)[:, None] & (ow < cols)[None, :]
    return n.to(tl.int64), oh, ow, mask


@_triton.jit
def _corners(n, oh, ow, stride_n, stride_h, stride_w):
    """Offsets of windows' top-left values, [rows, cols] from per-row n, oh and per-column ow."""
    row = n * stride_n + (2 * oh).to(tl.int64) * stride_h
    return row[:, None] + ((2 * ow).to(tl.int64) * stride_w)[None, :]


@_triton.jit
def _pooled(n, oh, ow, stride_n, stride_h, stride_w):
    """Offsets of pooled values (n, oh, ow)."""
    row = n * stride_n + oh.to(tl.int64) * stride_h
    return row[:, None] + (ow.to(tl.int64) * stride_w)[None, :]


@_triton.jit
def _bn_relu_pool_forward_kernel(
    x_ptr,
    weight_ptr,
    bias_ptr,
    y_ptr,
    mean_ptr,
    invstd_ptr,
    running_mean_ptr,
    running_var_ptr,
    partial_ptr,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    y_stride_n,
    y_stride_c,
    y_stride_h,
    y_stride_w,
    n_values,
    stats_chunks,
    rows,
    cols,
    pooled_height,
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
    """Pass 2: combine the channel's statistics partials, write relu(max z) of this chunk's
    windows, z = scale x + shift."""
    c = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    acc_ty = tl.float64 if COMPUTE_F64 else tl.float32
    momentum = tl.cast(momentum_hi, acc_ty) + tl.cast(momentum_lo, acc_ty)
    eps = tl.cast(eps_hi, acc_ty) + tl.cast(eps_lo, acc_ty)
    count = n_values.to(acc_ty)
    mean, var = _channel_moments(
        partial_ptr, c, stats_chunks, tl.num_programs(0), count, MAX_CHUNKS, acc_ty
    )
    scale, shift = _channel_affine(
        c, k == 0, mean, var, eps, count, momentum, mean_ptr, invstd_ptr, running_mean_ptr,
        running_var_ptr, weight_ptr, bias_ptr, HAS_RUNNING, HAS_WEIGHT, HAS_BIAS,
    )  # fmt: skip
    x_c = x_ptr + c * stride_c
    y_c = y_ptr + c * y_stride_c
    for i in range(TILES):
        t = k * TILES + i
        n, oh, ow, mask = _window_tile(t, rows, cols, n_col_tiles, pooled_height, BLOCK_R, BLOCK_S)
        mask = mask & (t < n_tiles)
        corner = _corners(n, oh, ow, stride_n, stride_h, stride_w)
        x0 = tl.load(x_c + corner, mask=mask, other=0.0).to(acc_ty)
        x1 = tl.load(x_c + corner + stride_w, mask=mask, other=0.0).to(acc_ty)
        x2 = tl.load(x_c + corner + stride_h, mask=mask, other=0.0).to(acc_ty)
        x3 = tl.load(x_c + corner + stride_h + stride_w, mask=mask, other=0.0).to(acc_ty)
        z = tl.maximum(
            tl.maximum(x0 * scale + shift, x1 * scale + shift),
            tl.maximum(x2 * scale + shift, x3 * scale + shift),
        )
        out = _pooled(n, oh, ow, y_stride_n, y_stride_h, y_stride_w)
        # relu keeping NaN as torch.relu does (tl.maximum(NaN, 0) may give 0)
        relu = tl.where(z <= 0.0, 0.0, z)
        tl.store(y_c + out, relu.to(y_ptr.dtype.element_ty), mask=mask)


@_triton.jit
def _selected(x0, x1, x2, x3, scale, shift, acc_ty: tl.constexpr):
    """Window index 0..3 of the first maximum of z = scale x + shift, and that maximum."""
    z0 = x0.to(acc_ty) * scale + shift
    z1 = x1.to(acc_ty) * scale + shift
    z2 = x2.to(acc_ty) * scale + shift
    z3 = x3.to(acc_ty) * scale + shift
    best = z0
    index = tl.zeros(z0.shape, tl.int32)
    index = tl.where(z1 > best, 1, index)
    best = tl.maximum(best, z1)
    index = tl.where(z2 > best, 2, index)
    best = tl.maximum(best, z2)
    index = tl.where(z3 > best, 3, index)
    best = tl.maximum(best, z3)
    return index, best


@_triton.jit
def _channel_scale_shift(
    c, weight_ptr, bias_ptr, mean, invstd, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr
):
    """(scale, shift) of z = scale x + shift from the saved mean and invstd."""
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + c).to(invstd.dtype)
    shift = -mean * scale
    if HAS_BIAS:
        shift = shift + tl.load(bias_ptr + c).to(invstd.dtype)
    return scale, shift


@_triton.jit
def _bn_relu_pool_grad_sums_kernel(
    x_ptr,
    weight_ptr,
    bias_ptr,
    grad_y_ptr,
    mean_ptr,
    invstd_ptr,
    partial_ptr,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    g_stride_n,
    g_stride_c,
    g_stride_h,
    g_stride_w,
    rows,
    cols,
    pooled_height,
    n_col_tiles,
    n_tiles,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPUTE_F64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    TILES: tl.constexpr,
):
    """Backward pass 1: this chunk's sums of dz and dz (x - mean) as planes 0 and 1 of the
    partials; dz is the pooled gradient at the window's arg-max where its z > 0."""
    c = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    acc_ty = tl.float64 if COMPUTE_F64 else tl.float32
    mean = tl.load(mean_ptr + c).to(acc_ty)
    invstd = tl.load(invstd_ptr + c).to(acc_ty)
    scale, shift = _channel_scale_shift(c, weight_ptr, bias_ptr, mean, invstd, HAS_WEIGHT, HAS_BIAS)
    x_c = x_ptr + c * stride_c
    g_c = grad_y_ptr + c * g_stride_c
    sum_g = tl.zeros([BLOCK_R, BLOCK_S], acc_ty)
    sum_gd = tl.zeros([BLOCK_R, BLOCK_S], acc_ty)
    for i in range(TILES):
        t = k * TILES + i
        n, oh, ow, mask = _window_tile(t, rows, cols, n_col_tiles, pooled_height, BLOCK_R, BLOCK_S)
        mask = mask & (t < n_tiles)
        corner = _corners(n, oh, ow, stride_n, stride_h, stride_w)
        x0 = tl.load(x_c + corner, mask=mask, other=0.0)
        x1 = tl.load(x_c + corner + stride_w, mask=mask, other=0.0)
        x2 = tl.load(x_c + corner + stride_h, mask=mask, other=0.0)
        x3 = tl.load(x_c + corner + stride_h + stride_w, mask=mask, other=0.0)
        index, best = _selected(x0, x1, x2, x3, scale, shift, acc_ty)
        g_off = _pooled(n, oh, ow, g_stride_n, g_stride_h, g_stride_w)
        g = tl.load(g_c + g_off, mask=mask, other=0.0).to(acc_ty)
        g = tl.where(mask & (best > 0.0), g, 0.0)
        picked = tl.where(index == 0, x0, tl.where(index == 1, x1, tl.where(index == 2, x2, x3)))
        sum_g += g
        sum_gd += g * (picked.to(acc_ty) - mean)
    plane = tl.num_programs(0) * tl.num_programs(1)
    out = partial_ptr + c * tl.num_programs(1) + k
    tl.store(out, tl.sum(tl.sum(sum_g, axis=1), axis=0))
    tl.store(out + plane, tl.sum(tl.sum(sum_gd, axis=1), axis=0))


@_triton.jit
def _bn_relu_pool_backward_kernel(
    x_ptr,
    weight_ptr,
    bias_ptr,
    grad_y_ptr,
    mean_ptr,
    invstd_ptr,
    dx_ptr,
    dweight_ptr,
    dbias_ptr,
    partial_ptr,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    g_stride_n,
    g_stride_c,
    g_stride_h,
    g_stride_w,
    n_values,
    sums_chunks,
    height,
    width,
    rows,
    cols,
    rows_per_image,
    n_col_tiles,
    n_tiles,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPUTE_F64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    TILES: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,
):
    """Backward pass 2: dx = a dz + b (x - mean) + k0 over this chunk's windows, which tile the
    whole input: ceil(height / 2) x ceil(width / 2) windows an image, those on an odd last row
    or column partial (no pooled output: only the b (x - mean) + k0 term). The channel's first
    program stores dweight and dbias."""
    c = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    acc_ty = tl.float64 if COMPUTE_F64 else tl.float32
    mean = tl.load(mean_ptr + c).to(acc_ty)
    invstd = tl.load(invstd_ptr + c).to(acc_ty)
    scale, shift = _channel_scale_shift(c, weight_ptr, bias_ptr, mean, invstd, HAS_WEIGHT, HAS_BIAS)
    n_channels = tl.num_programs(0)
    s_g = _channel_sum(partial_ptr, 0, c, sums_chunks, n_channels, MAX_CHUNKS, acc_ty)
    s_gd = _channel_sum(partial_ptr, 1, c, sums_chunks, n_channels, MAX_CHUNKS, acc_ty)
    tl.store(dbias_ptr + c, s_g, mask=k == 0)
    tl.store(dweight_ptr + c, s_gd * invstd, mask=k == 0)
    count = n_values.to(acc_ty)
    # dx = a dz + b (x - mean) + k0, as in the BatchNorm backward.
    a = scale
    b = -a * invstd * invstd * s_gd / count
    k0 = -a * s_g / count
    x_c = x_ptr + c * stride_c
    dx_c = dx_ptr + c * stride_c
    g_c = grad_y_ptr + c * g_stride_c
    out_ty = dx_ptr.dtype.element_ty
    for i in range(TILES):
        t = k * TILES + i
        n, oh, ow, mask = _window_tile(t, rows, cols, n_col_tiles, rows_per_image, BLOCK_R, BLOCK_S)
        m0 = mask & (t < n_tiles)
        m1 = m0 & (2 * ow + 1 < width)[None, :]
        m2 = m0 & (2 * oh + 1 < height)[:, None]
        m3 = m1 & m2  # a full window: it has a pooled output
        corner = _corners(n, oh, ow, stride_n, stride_h, stride_w)
        x0 = tl.load(x_c + corner, mask=m0, other=0.0)
        x1 = tl.load(x_c + corner + stride_w, mask=m1, other=0.0)
        x2 = tl.load(x_c + corner + stride_h, mask=m2, other=0.0)
        x3 = tl.load(x_c + corner + stride_h + stride_w, mask=m3, other=0.0)
        index, best = _selected(x0, x1, x2, x3, scale, shift, acc_ty)
        g_off = _pooled(n, oh, ow, g_stride_n, g_stride_h, g_stride_w)
        g = tl.load(g_c + g_off, mask=m3, other=0.0).to(acc_ty)
        ag = tl.where(m3 & (best > 0.0), a * g, 0.0)
        d0 = b * (x0.to(acc_ty) - mean) + k0 + tl.where(index == 0, ag, 0.0)
        d1 = b * (x1.to(acc_ty) - mean) + k0 + tl.where(index == 1, ag, 0.0)
        d2 = b * (x2.to(acc_ty) - mean) + k0 + tl.where(index == 2, ag, 0.0)
        d3 = b * (x3.to(acc_ty) - mean) + k0 + tl.where(index == 3, ag, 0.0)
        tl.store(dx_c + corner, d0.to(out_ty), mask=m0)
        tl.store(dx_c + corner + stride_w, d1.to(out_ty), mask=m1)
        tl.store(dx_c + corner + stride_h, d2.to(out_ty), mask=m2)
        tl.store(dx_c + corner + stride_h + stride_w, d3.to(out_ty), mask=m3)


def _pooled_shape(x: torch.Tensor) -> tuple[int, int, int, int]:
    n, c, h, w = x.shape
    return n, c, h // 2, w // 2


def _window_plan(x: torch.Tensor, rows_per_image: int, cols: int) -> common.ChunkPlan:
    return common.chunk_plan(
        x.shape[0] * rows_per_image,
        cols,
        x.shape[1],
        target_programs=common.target_programs(x.device),
        cell_values=4,
    )


def check_inputs(x, eps, **per_channel):
    """The compiled backends' input checks (csrc/bn_relu_pool/bn_relu_pool.cpp), for Triton."""
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(
            f"{OP_NAME}: x must be float32, float64, float16 or bfloat16, got {x.dtype}"
        )
    if eps is not None and not eps > 0.0:
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
    x = common.dense(x)
    weight, bias = common.channel(weight), common.channel(bias)
    n, c, h, w = x.shape
    _, _, oh, ow = _pooled_shape(x)
    memory_format = (
        torch.channels_last
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )
    y = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=memory_format)
    stats = torch.empty((2, c), dtype=common.compute_dtype(x.dtype), device=x.device)
    has_running = running_mean is not None and running_var is not None
    if c == 0 or n == 0:
        return y, stats[0], stats[1]
    geometry, stats_plan = common.channel_matrix(x)
    plan = _window_plan(x, oh, ow)
    with _triton.launch_device(x):
        partial = common.channel_stats(x, geometry, stats_plan)
        _bn_relu_pool_forward_kernel[(c, plan.n_chunks)](
            x,
            x if weight is None else weight,
            x if bias is None else bias,
            y,
            stats[0],
            stats[1],
            running_mean if has_running else x,
            running_var if has_running else x,
            partial,
            *x.stride(),
            *y.stride(),
            n * h * w,
            stats_plan.n_chunks,
            n * oh,
            ow,
            oh,
            *plan.sizes(),
            *common.split_float(momentum),
            *common.split_float(eps),
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            HAS_RUNNING=has_running,
            COMPUTE_F64=x.dtype == torch.float64,
            MAX_CHUNKS=stats_plan.max_chunks,
            num_warps=common.NUM_WARPS,
            **plan.constexprs(),
        )
    return y, stats[0], stats[1]


def backward(x, weight, bias, grad_y, mean, invstd):
    x = common.dense(x)
    weight, bias = common.channel(weight), common.channel(bias)
    n, c, h, w = x.shape
    _, _, oh, ow = _pooled_shape(x)
    dx = torch.empty_like(x)
    sums = torch.empty((2, c), dtype=common.compute_dtype(x.dtype), device=x.device)
    if c == 0 or n == 0:
        return dx, sums[0], sums[1]
    mean = mean.to(sums.dtype).contiguous()
    invstd = invstd.to(sums.dtype).contiguous()
    plan = _window_plan(x, oh, ow)
    # The second pass runs over every window including the partial ones of an odd last row or
    # column, so it covers all of dx.
    full_plan = _window_plan(x, -(-h // 2), -(-w // 2))
    flags = {
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
        "COMPUTE_F64": x.dtype == torch.float64,
        "num_warps": common.NUM_WARPS,
    }
    operands = (x, x if weight is None else weight, x if bias is None else bias, grad_y)
    with _triton.launch_device(x):
        partial = common.partials(2, x, plan)
        _bn_relu_pool_grad_sums_kernel[(c, plan.n_chunks)](
            *operands,
            mean,
            invstd,
            partial,
            *x.stride(),
            *grad_y.stride(),
            n * oh,
            ow,
            oh,
            *plan.sizes(),
            **flags,
            **plan.constexprs(),
        )
        _bn_relu_pool_backward_kernel[(c, full_plan.n_chunks)](
            *operands,
            mean,
            invstd,
            dx,
            sums[0],
            sums[1],
            partial,
            *x.stride(),
            *grad_y.stride(),
            n * h * w,
            plan.n_chunks,
            h,
            w,
            n * -(-h // 2),
            -(-w // 2),
            -(-h // 2),
            *full_plan.sizes(),
            MAX_CHUNKS=plan.max_chunks,
            **flags,
            **full_plan.constexprs(),
        )
    param_dtype = x.dtype if weight is None else weight.dtype
    sums = sums.to(param_dtype)
    return dx, sums[0], sums[1]
