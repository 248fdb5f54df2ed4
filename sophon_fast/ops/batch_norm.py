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
kernels below, through the input's strides, so NCHW and channels_last run without a copy: every
stage is two launches over a (channel, chunk) grid, per-chunk partial statistics then a pass
that combines them and maps the chunk's values; the chunk count comes from the channel's M so a
ResNet-18 layer fills an H100's 132 SMs; see chunk_plan) and ``reference`` (``F.batch_norm``:
eager autograd). Sums accumulate in float32 (float64 for float64 inputs); the forward's variance
is the chunks' M2 joined by Chan's parallel combine (no cancellation for a large mean).
Derivatives beyond the second are not supported by the fused path (the double backward is once
differentiable), which second-order simulation never needs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .. import _backend
from ..reference import batch_norm as _reference
from . import _triton

OP_NAME = "batch_norm"
FUSED_BACKENDS = ("cpu", "cuda", "triton")

tl = _triton.tl

# Work split (Triton): a channel's values are a (rows, cols) matrix, rows = batch and cols =
# height * width for BatchNorm (one stride for both spatial dims: dense layouts only), cut into
# [BLOCK_R, BLOCK_S] tiles; a chunk is TILES consecutive tiles in row-major tile order and one
# program runs one (channel, chunk). Index math is per tile (a scalar divide by the number of
# column tiles) and per row (n * stride_n), never a divide per element. Statistics are
# per-chunk partials (count, mean, M2 or plain sums) combined by every program of the second
# pass (Chan's parallel combine), so the grid is channels x chunks in both passes.
#
# Sizes. Interpreted (tests, CPU tensors): 1024-value tiles and chunks of at least 2^20 values,
# so a test channel is one program (the interpreter pays per program and per lane, not per
# value). Compiled: 1024-value tiles over 8 warps (4 values a thread). AOT-compiled for sm_90
# and sm_80 (triton 3.8, every kernel of this file and ops/bn_relu_pool.py, fp16/fp32/fp64, tiles
# 1x1024 and 16x64, TILES 8, MAX_CHUNKS 1024): no spills (0 bytes of local memory; only sm_80's
# fp64 forward keeps an 8-byte stack frame, the fp64 divide's slow-path call) and at most 64
# registers a thread for fp16/fp32 storage (the BN+ReLU+MaxPool backward; 31-48 for the
# BatchNorm passes), so 4 programs of 256 threads fit an SM's 64 K registers: 32 warps, the
# PROGRAMS_PER_SM below. fp64 needs 40-108 registers (2-6 programs an SM). 4 warps would hold 8
# values a thread: up to 92 registers at fp32 (5 programs, 20 warps an SM) and 152 at fp64;
# 2048-value tiles over 8 warps need up to 108 (fp32) and 154 (fp64). Chunks of >= 4096 values
# (16 KiB of fp32: a chunk's partials and its combine cost ~1 % of its traffic).
if _triton.INTERPRETED:
    BLOCK_SIZE, NUM_WARPS, MIN_CHUNK_VALUES = 1024, 4, 1 << 20
else:
    BLOCK_SIZE, NUM_WARPS, MIN_CHUNK_VALUES = 1024, 8, 4096
PROGRAMS_PER_SM = 4
NOMINAL_SMS = 132  # an H100 SXM: the SM count planned for when no CUDA device is queried


@_triton.jit
def _tile(
    t, rows, cols, n_col_tiles, stride_r, stride_s, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr
):
    """Offsets (int64, channel excluded), mask and valid-value count of tile t of a (rows, cols)
    matrix: row r at r * stride_r, column s at s * stride_s."""
    row_tile = t // n_col_tiles  # one scalar divide per tile
    col_tile = t - row_tile * n_col_tiles
    r = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    s = col_tile * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (r < rows)[:, None] & (s < cols)[None, :]
    offsets = (r.to(tl.int64) * stride_r)[:, None] + (s.to(tl.int64) * stride_s)[None, :]
    n_r = tl.minimum(tl.maximum(rows - row_tile * BLOCK_R, 0), BLOCK_R)
    n_s = tl.minimum(tl.maximum(cols - col_tile * BLOCK_S, 0), BLOCK_S)
    return offsets, mask, n_r * n_s


@_triton.jit
def _chunk_row(base, c, n_chunks, MAX_CHUNKS: tl.constexpr):
    """Pointers and mask of channel c's chunks in plane 0 of a (planes, channels, chunks)
    partials buffer."""
    k = tl.arange(0, MAX_CHUNKS)
    return base + c * n_chunks + k, k < n_chunks


@_triton.jit
def _channel_moments(
    partial_ptr, c, n_chunks, n_channels, count, MAX_CHUNKS: tl.constexpr, acc_ty: tl.constexpr
):
    """Channel c's (mean, biased variance) from per-chunk (count, mean, M2) partials (Chan's
    parallel combine: M2 = sum M2_k + sum n_k (mean_k - mean)^2, no cancellation)."""
    ptrs, mask = _chunk_row(partial_ptr, c, n_chunks, MAX_CHUNKS)
    plane = n_channels * n_chunks
    n_k = tl.load(ptrs, mask=mask, other=0.0).to(acc_ty)
    mean_k = tl.load(ptrs + plane, mask=mask, other=0.0).to(acc_ty)
    m2_k = tl.load(ptrs + 2 * plane, mask=mask, other=0.0).to(acc_ty)
    mean = tl.sum(n_k * mean_k, axis=0) / count
    d = mean_k - mean
    var = (tl.sum(m2_k, axis=0) + tl.sum(n_k * d * d, axis=0)) / count
    return mean, var


@_triton.jit
def _channel_sum(
    partial_ptr, plane, c, n_chunks, n_channels, MAX_CHUNKS: tl.constexpr, acc_ty: tl.constexpr
):
    """Sum over chunks of channel c's plane `plane` of a (planes, channels, chunks) buffer."""
    ptrs, mask = _chunk_row(partial_ptr, c, n_chunks, MAX_CHUNKS)
    values = tl.load(ptrs + plane * n_channels * n_chunks, mask=mask, other=0.0)
    return tl.sum(values.to(acc_ty), axis=0)


@_triton.jit
def _channel_stats_kernel(
    x_ptr,
    partial_ptr,
    stride_r,
    stride_c,
    stride_s,
    rows,
    cols,
    n_col_tiles,
    n_tiles,
    COMPUTE_F64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    TILES: tl.constexpr,
):
    """Pass 1 of the forwards: (count, mean, M2) of chunk program_id(1) of channel
    program_id(0), the mean and M2 in two sweeps over the chunk (the second from cache)."""
    c = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    acc_ty = tl.float64 if COMPUTE_F64 else tl.float32
    x_c = x_ptr + c * stride_c
    total = tl.zeros([BLOCK_R, BLOCK_S], acc_ty)
    n_k = 0
    for i in range(TILES):
        t = k * TILES + i
        offsets, mask, n = _tile(t, rows, cols, n_col_tiles, stride_r, stride_s, BLOCK_R, BLOCK_S)
        mask = mask & (t < n_tiles)
        total += tl.load(x_c + offsets, mask=mask, other=0.0).to(acc_ty)
        n_k += tl.where(t < n_tiles, n, 0)
    count = n_k.to(acc_ty)
    mean = tl.sum(tl.sum(total, axis=1), axis=0) / count
    total = tl.zeros([BLOCK_R, BLOCK_S], acc_ty)
    for i in range(TILES):
        t = k * TILES + i
        offsets, mask, _ = _tile(t, rows, cols, n_col_tiles, stride_r, stride_s, BLOCK_R, BLOCK_S)
        mask = mask & (t < n_tiles)
        d = tl.load(x_c + offsets, mask=mask, other=0.0).to(acc_ty) - mean
        total += tl.where(mask, d * d, 0.0)
    m2 = tl.sum(tl.sum(total, axis=1), axis=0)
    plane = tl.num_programs(0) * n_chunks
    out = partial_ptr + c * n_chunks + k
    tl.store(out, count)
    tl.store(out + plane, mean)
    tl.store(out + 2 * plane, m2)


@_triton.jit
def _channel_affine(
    c,
    first,
    mean,
    var,
    eps,
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
    """(scale, shift) of the normalised affine output scale * x + shift of channel c. The
    channel's first program (first true) also stores the batch mean and invstd and updates the
    running statistics as torch does (momentum * batch + (1 - momentum) * running, the variance
    unbiased over count values). Shared by the BatchNorm2d and BN + ReLU + MaxPool2d forwards."""
    acc_ty = mean.dtype
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + c, mean, mask=first)
    tl.store(invstd_ptr + c, invstd, mask=first)
    if HAS_RUNNING:
        old_mean = tl.load(running_mean_ptr + c).to(acc_ty)
        old_var = tl.load(running_var_ptr + c).to(acc_ty)
        new_mean = momentum * mean + (1.0 - momentum) * old_mean
        new_var = momentum * (var * count / (count - 1.0)) + (1.0 - momentum) * old_var
        tl.store(running_mean_ptr + c, new_mean.to(running_mean_ptr.dtype.element_ty), mask=first)
        tl.store(running_var_ptr + c, new_var.to(running_var_ptr.dtype.element_ty), mask=first)
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


class ChunkPlan(NamedTuple):
    """Grid and tiling of a (rows, cols) per-channel matrix: tiles of [block_r, block_s] values,
    chunks of `tiles` consecutive tiles, one program per (channel, chunk)."""

    block_r: int
    block_s: int
    n_col_tiles: int
    n_tiles: int
    tiles: int
    n_chunks: int

    @property
    def max_chunks(self) -> int:
        """Width of the chunk vector the second pass combines (a power of two)."""
        return _pow2(self.n_chunks)

    def sizes(self) -> tuple[int, int]:
        """(n_col_tiles, n_tiles): the kernels' tiling arguments."""
        return self.n_col_tiles, self.n_tiles

    def constexprs(self) -> dict:
        return {"BLOCK_R": self.block_r, "BLOCK_S": self.block_s, "TILES": self.tiles}


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def chunk_plan(
    rows: int,
    cols: int,
    channels: int,
    *,
    block: int | None = None,
    min_chunk: int | None = None,
    target_programs: int | None = None,
    cell_values: int = 1,
) -> ChunkPlan:
    """How a channel's rows x cols values split into tiles and chunks.

    Tile width: cols rounded up to a power of two when it fits in `block`, else the power of
    two in [128, block] wasting the fewest masked lanes (3136 = 56 x 56 values: 25 tiles of 128,
    2 % masked, against 4 of 1024 and 23 %). Rows fill the rest of the tile. Chunks: enough that
    channels x chunks reaches `target_programs` (a few programs per SM), but no chunk under
    `min_chunk` values; a chunk's tile count is a power of two (the kernels' TILES constexpr, so
    few specialisations). A matrix entry stands for `cell_values` input values (4 for the 2x2
    windows of bn_relu_pool). Defaults: the module's BLOCK_SIZE, MIN_CHUNK_VALUES and
    PROGRAMS_PER_SM * NOMINAL_SMS.
    """
    block = BLOCK_SIZE if block is None else block
    min_chunk = MIN_CHUNK_VALUES if min_chunk is None else min_chunk
    if target_programs is None:
        target_programs = PROGRAMS_PER_SM * NOMINAL_SMS
    rows, cols = max(rows, 1), max(cols, 1)
    if cols <= block:
        block_s = _pow2(cols)
    else:
        widths = [1 << b for b in range(7, block.bit_length()) if 1 << b <= block] or [block]
        block_s = min(widths, key=lambda b: (_cdiv(cols, b) * b, -b))
    block_r = min(block // block_s, max(_pow2(rows), 16 // block_s, 1))
    n_col_tiles = _cdiv(cols, block_s)
    n_tiles = _cdiv(rows, block_r) * n_col_tiles
    values = rows * cols * cell_values
    want = max(1, min(_cdiv(target_programs, channels), values // max(min_chunk, 1)))
    tiles = _pow2(_cdiv(n_tiles, want))
    return ChunkPlan(block_r, block_s, n_col_tiles, n_tiles, tiles, _cdiv(n_tiles, tiles))


def target_programs(device: torch.device) -> int:
    """PROGRAMS_PER_SM programs per SM of device (NOMINAL_SMS for a non-CUDA device)."""
    sms = NOMINAL_SMS
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    return PROGRAMS_PER_SM * sms


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


def _geometry(x: torch.Tensor) -> tuple[tuple, ChunkPlan]:
    """((stride_r, stride_c, stride_s, rows, cols, n_col_tiles, n_tiles), plan) of a dense x as
    channels of (batch, height * width) matrices: in NCHW and channels_last alike
    stride_h = width * stride_w, so one column stride walks both spatial dims."""
    n, c, h, w = x.shape
    stride_n, stride_c, stride_h, stride_w = x.stride()
    stride_s = stride_h if w == 1 else stride_w
    assert h == 1 or w == 1 or stride_h == w * stride_w, x.stride()
    plan = chunk_plan(n, h * w, c, target_programs=target_programs(x.device))
    return (stride_n, stride_c, stride_s, n, h * w, *plan.sizes()), plan


def _partials(planes: int, x: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
    return torch.empty(
        (planes, x.shape[1], plan.n_chunks), dtype=_compute_dtype(x.dtype), device=x.device
    )


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


def _channel_stats(x: torch.Tensor, geometry: tuple, plan: ChunkPlan) -> torch.Tensor:
    """Pass 1 of the forwards: (3, channels, chunks) per-chunk (count, mean, M2) of x."""
    partial = _partials(3, x, plan)
    _channel_stats_kernel[(x.shape[1], plan.n_chunks)](
        x,
        partial,
        *geometry,
        COMPUTE_F64=x.dtype == torch.float64,
        num_warps=NUM_WARPS,
        **plan.constexprs(),
    )
    return partial


def _triton_forward(x, weight, bias, running_mean, running_var, momentum, eps):
    _check_triton_inputs(
        x, eps, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var
    )
    x = _dense(x)
    weight, bias = _channel(weight), _channel(bias)
    geometry, plan = _geometry(x)
    y = torch.empty_like(x)
    stats = torch.empty((2, x.shape[1]), dtype=_compute_dtype(x.dtype), device=x.device)
    has_running = running_mean is not None and running_var is not None
    if x.shape[1] == 0:
        return y, stats[0], stats[1]
    with _triton.launch_device(x):
        partial = _channel_stats(x, geometry, plan)
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
            *_split_float(momentum),
            *_split_float(eps),
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            HAS_RUNNING=has_running,
            COMPUTE_F64=x.dtype == torch.float64,
            MAX_CHUNKS=plan.max_chunks,
            num_warps=NUM_WARPS,
            **plan.constexprs(),
        )
    return y, stats[0], stats[1]


def _channel(t: torch.Tensor | None) -> torch.Tensor | None:
    """A (C,) operand with unit stride (an incoming gradient of a sum is a stride-0 expand)."""
    return None if t is None else t.contiguous()


def _param_dtype(weight, x):
    return x.dtype if weight is None else weight.dtype


def _grad_sums(x, grad_y, grad_dx, mean, geometry, plan) -> torch.Tensor:
    """Pass 1 of the backwards: (2 or 5, channels, chunks) per-chunk sums (_grad_sums_kernel)."""
    partial = _partials(2 if grad_dx is None else 5, x, plan)
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


def _triton_backward(x, weight, grad_y, mean, invstd):
    x = _dense(x)
    grad_y = _like(grad_y, x)
    weight = _channel(weight)
    geometry, plan = _geometry(x)
    dx = torch.empty_like(x)
    sums = torch.empty((2, x.shape[1]), dtype=_compute_dtype(x.dtype), device=x.device)
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
    sums = sums.to(_param_dtype(weight, x))
    return dx, sums[0], sums[1]


def _triton_double_backward(x, weight, grad_y, mean, invstd, grad_dx, grad_dweight, grad_dbias):
    x = _dense(x)
    grad_y = _like(grad_y, x)
    grad_dx = None if grad_dx is None else _like(grad_dx, x)
    weight, grad_dweight, grad_dbias = map(_channel, (weight, grad_dweight, grad_dbias))
    geometry, plan = _geometry(x)
    gx = torch.empty_like(x)
    ggrad_y = torch.empty_like(x)
    gweight = torch.empty(x.shape[1], dtype=_compute_dtype(x.dtype), device=x.device)
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
