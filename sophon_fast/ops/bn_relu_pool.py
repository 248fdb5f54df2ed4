"""batch_norm_relu_maxpool2d: training-mode BatchNorm2d -> ReLU -> MaxPool2d(2, 2) in one op.

Maths (closed forms in :mod:`sophon_fast.reference.bn_relu_pool`, the pure-torch twin): per
channel a = weight * invstd, b = bias - mean * a over M = batch * height * width values; the
pooled output is max over each 2x2 window of relu(a x + b), floor for odd sizes. z = a x + b is
monotone in x, so neither the normalised map nor the ReLU output is ever written.

Why: SmallCNN's fine-tuning step spends ~60 % of its CPU time in memory-bound BatchNorm, ReLU and
max-pool (NCHW max_pool2d alone 28 %). Eager PyTorch runs five kernels forward (stats, normalise,
relu, pool with int64 indices) and five backward (pool scatter into a zero-filled map, relu mask,
BN reductions, BN map), each a full pass over the activation.

Memory traffic at fp32 per input element: forward reads x once (the statistics pass; the pooling
pass re-reads a channel from cache on the CPU, NCHW) and writes 1/4 element: ~5 B against ~30 B
eager. Backward reads x twice, dy (1/4) twice and writes dx: ~14 B against ~45 B eager.

Saved for backward: x (the preceding convolution saves it anyway, so it costs no memory), weight,
bias and the per-channel mean and invstd. The window arg-max is recomputed from x in the backward
instead of being saved as int64 indices (2 B per input element at fp32), and no normalised or
ReLU map is kept (eager keeps both: 8 B per element at fp32).

Arg-max rule: the first maximum of z in row-major window order, torch's max_pool2d rule, computed
on z = a x + b rounded like the forward, so equal inputs route the gradient as torch does. Where
the ReLU clips (z <= 0) the gradient is 0 whichever index is picked.

Backends: ``cpu`` (csrc/bn_relu_pool: NCHW one channel per task, channels_last natively as rows
of channels), ``cuda`` (csrc/bn_relu_pool/bn_relu_pool_cuda.cu: the Triton kernels' passes on
NCHW, channels_last converted in and out; compile-checked for sm_80 / sm_90 by make cuda-check,
not yet run on a GPU), ``triton`` (the kernels below, through the input's strides: (channel,
chunk) grids as in ops/batch_norm.py; the forward is batch_norm's per-chunk statistics then one
pass over the 2x2 windows, the backward one pass of window sums then one writing dx over every
window, those of an odd last row or column partial) and ``reference`` (the eager composition). Statistics: the CUDA and Triton kernels join per-chunk mean and M2 by
Chan's parallel combine in the compute dtype (float32, float64 for float64 inputs); the CPU
kernels add blocks of 256 values in float64. The op is once differentiable: a second derivative
raises.

Measured (2-core AMD EPYC with AVX2, torch 2.13, float32, forward + backward incl. weight and
bias gradients, OMP_WAIT_POLICY=PASSIVE, medians of 5 interleaved repeats, two runs while other
processes kept the load average at 5-8): 130x32x28x28 NCHW 13.6-15.0 vs 64-84 ms eager
(4.7-5.6x), channels_last 14.1-16.0 vs 35-45 ms (2.2-3.2x); 130x64x14x14 NCHW 7.8-9.2 vs 24-26 ms
(2.6-3.3x), channels_last 3.5-7.6 vs 9.6-15 ms (2.0-2.7x). SmallCNN's whole forward + backward at
batch 130: 1.8x (NCHW) and 1.6x (channels_last) with :func:`sophon_fast.nn.fuse_bn_relu_pool`.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import _backend
from ..reference import bn_relu_pool as _reference
from . import _triton
from . import batch_norm as bn
from .batch_norm import _channel_affine, _channel_moments, _channel_sum

OP_NAME = "bn_relu_pool"
FUSED_BACKENDS = ("cpu", "cuda", "triton")

tl = _triton.tl

# Work split (Triton), as in ops/batch_norm.py: the statistics are batch_norm's per-chunk
# (count, mean, M2) partials over x; the pooled passes run over matrices of 2x2 windows, rows
# the (n, oh) pairs and columns ow, in tiles and chunks of tiles (batch_norm.chunk_plan), one
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


def _window_plan(x: torch.Tensor, rows_per_image: int, cols: int) -> bn.ChunkPlan:
    return bn.chunk_plan(
        x.shape[0] * rows_per_image,
        cols,
        x.shape[1],
        target_programs=bn.target_programs(x.device),
        cell_values=4,
    )


def _check_inputs(x, eps, **per_channel):
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


def _channel(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _triton_forward(x, weight, bias, running_mean, running_var, momentum, eps):
    _check_inputs(
        x, eps, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )
    x = bn._dense(x)
    weight, bias = _channel(weight), _channel(bias)
    n, c, h, w = x.shape
    _, _, oh, ow = _pooled_shape(x)
    memory_format = (
        torch.channels_last
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )
    y = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=memory_format)
    stats = torch.empty((2, c), dtype=bn._compute_dtype(x.dtype), device=x.device)
    has_running = running_mean is not None and running_var is not None
    if c == 0 or n == 0:
        return y, stats[0], stats[1]
    geometry, stats_plan = bn._geometry(x)
    plan = _window_plan(x, oh, ow)
    with _triton.launch_device(x):
        partial = bn._channel_stats(x, geometry, stats_plan)
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
            *bn._split_float(momentum),
            *bn._split_float(eps),
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            HAS_RUNNING=has_running,
            COMPUTE_F64=x.dtype == torch.float64,
            MAX_CHUNKS=stats_plan.max_chunks,
            num_warps=bn.NUM_WARPS,
            **plan.constexprs(),
        )
    return y, stats[0], stats[1]


def _triton_backward(x, weight, bias, grad_y, mean, invstd):
    x = bn._dense(x)
    weight, bias = _channel(weight), _channel(bias)
    n, c, h, w = x.shape
    _, _, oh, ow = _pooled_shape(x)
    dx = torch.empty_like(x)
    sums = torch.empty((2, c), dtype=bn._compute_dtype(x.dtype), device=x.device)
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
        "num_warps": bn.NUM_WARPS,
    }
    operands = (x, x if weight is None else weight, x if bias is None else bias, grad_y)
    with _triton.launch_device(x):
        partial = bn._partials(2, x, plan)
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


_TRITON = {"forward": _triton_forward, "backward": _triton_backward}


def _impl(backend: str, stage: str):
    if backend == "triton":
        return _TRITON[stage]
    return getattr(_backend.extension(), f"bn_relu_pool_{stage}")


def _extension_has_op() -> bool:
    """False for a compiled extension built before this op's kernels were added."""
    return hasattr(_backend.extension(), "bn_relu_pool_forward")


class _NoDoubleBackward(torch.autograd.Function):
    """Identity whose backward raises: names the op when a second derivative is attempted."""

    @staticmethod
    def forward(ctx, n_grads, *tensors):
        # tensors[n_grads:] (grad_y, x, weight, bias) only link this node into the graph, so a
        # second backward reaches it and raises here (once_differentiable alone detaches its
        # outputs: torch.autograd.grad would report the inputs as unused instead).
        return tuple(g.view_as(g) for g in tensors[:n_grads])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "batch_norm_relu_maxpool2d is once differentiable: its backward cannot be "
            "differentiated again (create_graph=True then a second backward). For second-order "
            "simulation run the model unfused (BatchNorm2d, ReLU and MaxPool2d modules, or "
            "sophon_fast.nn.convert_batchnorm) or force the 'reference' backend."
        )


class BatchNormReLUMaxPool2dFunction(torch.autograd.Function):
    """Training-mode BatchNorm2d -> ReLU -> MaxPool2d(2, 2); once-differentiable fused backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, backend):
        y, mean, invstd = _impl(backend, "forward")(
            x, weight, bias, running_mean, running_var, momentum, eps
        )
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, grad_y):
        dx, dweight, dbias = BatchNormReLUMaxPool2dFunction._fused_backward(ctx, grad_y)
        if torch.is_grad_enabled():  # create_graph=True: a second derivative would be wrong
            grads = [g for g in (dx, dweight, dbias) if g is not None]
            x, weight, bias, _, _ = ctx.saved_tensors
            links = [t for t in (grad_y, x, weight, bias) if t is not None and t.requires_grad]
            guarded = iter(_NoDoubleBackward.apply(len(grads), *grads, *links))
            dx, dweight, dbias = (
                None if g is None else next(guarded) for g in (dx, dweight, dbias)
            )
        return dx, dweight, dbias, None, None, None, None, None

    @staticmethod
    @once_differentiable
    def _fused_backward(ctx, grad_y):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        dx, dweight, dbias = _impl(ctx.backend, "backward")(x, weight, bias, grad_y, mean, invstd)
        return (
            dx,
            dweight if weight is not None else None,
            dbias if bias is not None else None,
        )


def batch_norm_relu_maxpool2d(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``max_pool2d(relu(batch_norm(x, training=True)), 2, 2)`` fused, forward and backward.

    Same result as ``F.max_pool2d(F.relu(F.batch_norm(x, running_mean, running_var, weight,
    bias, True, momentum, eps)), 2, 2)``, including the in-place running-statistic update and
    torch's gradient routing for ties inside a window. Only the pooled output is written; the
    backward recomputes each window's arg-max from x.

    Args:
        x: (batch, channels, height, width) float32/float64/float16/bfloat16, NCHW or
            channels_last (the output keeps x's layout); height, width >= 2 (an odd last row
            or column is pooled away, as max_pool2d's floor does, but counts in the statistics).
        weight, bias: (channels,) affine parameters, or None.
        running_mean, running_var: (channels,) buffers updated in place, or None.
        momentum: running = (1 - momentum) * running + momentum * batch statistic (variance
            unbiased). Default 0.1.
        eps: added to the biased variance. Default 1e-5.

    Returns:
        (batch, channels, height // 2, width // 2) pooled activations.

    Raises:
        ValueError: not 4-D, height or width < 2, a single value per channel, eps <= 0, wrong
            per-channel shapes.
        TypeError: non-floating x.
        BackendUnavailableError: a forced backend that cannot run here.
        RuntimeError: on a second derivative (the op is once differentiable).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(
            "batch_norm_relu_maxpool2d: x must be a (batch, channels, height, width) tensor, got "
            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
        )
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(
            "batch_norm_relu_maxpool2d: a 2x2 pool needs height and width >= 2, got input shape "
            f"{tuple(x.shape)}"
        )
    backend = _backend.resolve(OP_NAME, x.device)
    if backend in ("cpu", "cuda") and not _extension_has_op():
        if _backend._forced() is not None:
            raise _backend.BackendUnavailableError(
                f"backend {backend!r} was forced but the compiled extension sophon_fast._C was "
                f"built without {OP_NAME} (rebuild it: pip install --no-build-isolation -e .)"
            )
        backend = "reference"
    if backend == "reference":
        return _reference.batch_norm_relu_maxpool2d(
            x, weight, bias, running_mean, running_var, momentum, eps
        )
    return BatchNormReLUMaxPool2dFunction.apply(
        x, weight, bias, running_mean, running_var, momentum, eps, backend
    )
