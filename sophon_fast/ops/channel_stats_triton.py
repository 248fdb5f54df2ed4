"""Triton building blocks of the per-channel ops (batch_norm, bn_relu_pool): the work split.

A channel's values are a (rows, cols) matrix cut into tiles and chunks of tiles, one program per
(channel, chunk) (:func:`chunk_plan`); the statistics pass writes per-chunk (count, mean, M2)
partials that every program of the second pass combines (Chan's parallel combine). The kernels of
:mod:`sophon_fast.ops.batch_norm_triton` and :mod:`sophon_fast.ops.bn_relu_pool_triton` build on
the helpers here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _triton

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
# and sm_80 (triton 3.8, every kernel of ops/batch_norm_triton.py and ops/bn_relu_pool_triton.py,
# fp16/fp32/fp64, tiles 1x1024 and 16x64, TILES 8, MAX_CHUNKS 1024): no spills (0 bytes of
# local memory; only sm_80's fp64 forward keeps an 8-byte stack frame, the fp64 divide's
# slow-path call) and at most 64 registers a thread for fp16/fp32 storage (the BN+ReLU+MaxPool
# backward; 31-48 for the BatchNorm passes), so 4 programs of 256 threads fit an SM's 64 K registers: 32 warps, the
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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_float(value: float) -> tuple[float, float]:
    """value as float32 hi + lo (hi + lo == value to ~1e-14 relative)."""
    hi = float(torch.tensor(value, dtype=torch.float32))
    return hi, float(torch.tensor(value - hi, dtype=torch.float32))


def dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when its strides are a permutation of a dense layout, else an NCHW copy."""
    return (
        x
        if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
        else (x.contiguous())
    )


def like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t with x's strides (the kernels index every (N, C, H, W) operand with x's)."""
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


def channel_matrix(x: torch.Tensor) -> tuple[tuple, ChunkPlan]:
    """((stride_r, stride_c, stride_s, rows, cols, n_col_tiles, n_tiles), plan) of a dense x as
    channels of (batch, height * width) matrices: in NCHW and channels_last alike
    stride_h = width * stride_w, so one column stride walks both spatial dims."""
    n, c, h, w = x.shape
    stride_n, stride_c, stride_h, stride_w = x.stride()
    stride_s = stride_h if w == 1 else stride_w
    assert h == 1 or w == 1 or stride_h == w * stride_w, x.stride()
    plan = chunk_plan(n, h * w, c, target_programs=target_programs(x.device))
    return (stride_n, stride_c, stride_s, n, h * w, *plan.sizes()), plan


def partials(planes: int, x: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
    return torch.empty(
        (planes, x.shape[1], plan.n_chunks), dtype=compute_dtype(x.dtype), device=x.device
    )


def channel_stats(x: torch.Tensor, geometry: tuple, plan: ChunkPlan) -> torch.Tensor:
    """Pass 1 of the forwards: (3, channels, chunks) per-chunk (count, mean, M2) of x."""
    partial = partials(3, x, plan)
    _channel_stats_kernel[(x.shape[1], plan.n_chunks)](
        x,
        partial,
        *geometry,
        COMPUTE_F64=x.dtype == torch.float64,
        num_warps=NUM_WARPS,
        **plan.constexprs(),
    )
    return partial


def channel(t: torch.Tensor | None) -> torch.Tensor | None:
    """A (C,) operand with unit stride (an incoming gradient of a sum is a stride-0 expand)."""
    return None if t is None else t.contiguous()


def param_dtype(weight, x):
    return x.dtype if weight is None else weight.dtype
