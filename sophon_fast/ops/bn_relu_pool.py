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
of channels), ``cuda`` (csrc/bn_relu_pool/bn_relu_pool_cuda.cu: one block per channel, NCHW;
channels_last converted in and out), ``triton`` (the kernels below: one program per channel
through the input's strides) and ``reference`` (the eager composition). Statistics are one pass
of sums shifted by the channel's first value, in the compute dtype (float32, float64 for float64
inputs); the CPU kernels add blocks of 256 values in float64. The op is once differentiable: a
second derivative raises.

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
from .batch_norm import _channel_affine, _compute_dtype, _dense, _split_float

OP_NAME = "bn_relu_pool"
FUSED_BACKENDS = ("cpu", "cuda", "triton")
# Values per loop step of a channel's program (fewer for small channels: the interpreter pays per
# lane).
BLOCK_SIZE = 1024

tl = _triton.tl


@_triton.jit
def _offsets(i, n_hw, width, stride_n, stride_h, stride_w):
    """Element offsets (channel excluded) of flat indices i over (batch, height, width)."""
    n = (i // n_hw).to(tl.int64)  # n * stride_n passes 2^31 on large activations
    s = i % n_hw
    return n * stride_n + (s // width) * stride_h + (s % width) * stride_w


@_triton.jit
def _window(x_ptr, j, n_pooled_hw, pooled_width, stride_n, stride_h, stride_w, mask):
    """Offsets of pooled index j's window corner and its four values (row-major order)."""
    n = (j // n_pooled_hw).to(tl.int64)
    s = j % n_pooled_hw
    corner = n * stride_n + (s // pooled_width) * 2 * stride_h + (s % pooled_width) * 2 * stride_w
    x0 = tl.load(x_ptr + corner, mask=mask, other=0.0)
    x1 = tl.load(x_ptr + corner + stride_w, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + corner + stride_h, mask=mask, other=0.0)
    x3 = tl.load(x_ptr + corner + stride_h + stride_w, mask=mask, other=0.0)
    return corner, x0, x1, x2, x3


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
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    y_stride_n,
    y_stride_c,
    y_stride_h,
    y_stride_w,
    n_values,
    n_hw,
    width,
    n_pooled,
    n_pooled_hw,
    pooled_width,
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
    momentum = tl.cast(momentum_hi, acc_ty) + tl.cast(momentum_lo, acc_ty)
    eps = tl.cast(eps_hi, acc_ty) + tl.cast(eps_lo, acc_ty)
    count = n_values.to(acc_ty)
    x_c = x_ptr + c * stride_c
    # One pass of sums shifted by the channel's first value: no cancellation for large means.
    shift = tl.load(x_c).to(acc_ty)
    total = tl.full([BLOCK_SIZE], 0.0, acc_ty)
    total_sq = tl.full([BLOCK_SIZE], 0.0, acc_ty)
    for start in range(0, n_values, BLOCK_SIZE):
        i = start + tl.arange(0, BLOCK_SIZE)
        mask = i < n_values
        offsets = _offsets(i, n_hw, width, stride_n, stride_h, stride_w)
        d = tl.load(x_c + offsets, mask=mask, other=0.0).to(acc_ty) - shift
        d = tl.where(mask, d, 0.0)
        total += d
        total_sq += d * d
    mean_shifted = tl.sum(total, axis=0) / count
    var = tl.maximum(tl.sum(total_sq, axis=0) / count - mean_shifted * mean_shifted, 0.0)
    mean = mean_shifted + shift
    invstd = 1.0 / tl.sqrt(var + eps)
    scale, shift_out = _channel_affine(
        c, mean, var, invstd, count, momentum, mean_ptr, invstd_ptr, running_mean_ptr,
        running_var_ptr, weight_ptr, bias_ptr, HAS_RUNNING, HAS_WEIGHT, HAS_BIAS,
    )  # fmt: skip
    for start in range(0, n_pooled, BLOCK_SIZE):
        j = start + tl.arange(0, BLOCK_SIZE)
        mask = j < n_pooled
        _, x0, x1, x2, x3 = _window(
            x_c, j, n_pooled_hw, pooled_width, stride_n, stride_h, stride_w, mask
        )
        z = tl.maximum(
            tl.maximum(x0.to(acc_ty) * scale + shift_out, x1.to(acc_ty) * scale + shift_out),
            tl.maximum(x2.to(acc_ty) * scale + shift_out, x3.to(acc_ty) * scale + shift_out),
        )
        out = _offsets(j, n_pooled_hw, pooled_width, y_stride_n, y_stride_h, y_stride_w)
        tl.store(
            y_ptr + c * y_stride_c + out,
            tl.maximum(z, 0.0).to(y_ptr.dtype.element_ty),
            mask=mask,
        )


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
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    g_stride_n,
    g_stride_c,
    g_stride_h,
    g_stride_w,
    n_values,
    n_hw,
    height,
    width,
    n_pooled,
    n_pooled_hw,
    pooled_width,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPUTE_F64: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    acc_ty = tl.float64 if COMPUTE_F64 else tl.float32
    mean = tl.load(mean_ptr + c).to(acc_ty)
    invstd = tl.load(invstd_ptr + c).to(acc_ty)
    w = 1.0
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + c).to(acc_ty)
    scale = w * invstd
    shift = -mean * scale
    if HAS_BIAS:
        shift = shift + tl.load(bias_ptr + c).to(acc_ty)
    x_c = x_ptr + c * stride_c
    dx_c = dx_ptr + c * stride_c
    g_c = grad_y_ptr + c * g_stride_c
    # Pass 1 over the pooled gradient: dz is g at the window's arg-max where z > 0.
    sum_g = tl.full([BLOCK_SIZE], 0.0, acc_ty)
    sum_gd = tl.full([BLOCK_SIZE], 0.0, acc_ty)
    for start in range(0, n_pooled, BLOCK_SIZE):
        j = start + tl.arange(0, BLOCK_SIZE)
        mask = j < n_pooled
        _, x0, x1, x2, x3 = _window(
            x_c, j, n_pooled_hw, pooled_width, stride_n, stride_h, stride_w, mask
        )
        index, best = _selected(x0, x1, x2, x3, scale, shift, acc_ty)
        g_off = _offsets(j, n_pooled_hw, pooled_width, g_stride_n, g_stride_h, g_stride_w)
        g = tl.load(g_c + g_off, mask=mask, other=0.0).to(acc_ty)
        g = tl.where(mask & (best > 0.0), g, 0.0)
        picked = tl.where(index == 0, x0, tl.where(index == 1, x1, tl.where(index == 2, x2, x3)))
        sum_g += g
        sum_gd += g * (picked.to(acc_ty) - mean)
    s_g = tl.sum(sum_g, axis=0)
    s_gd = tl.sum(sum_gd, axis=0)
    tl.store(dbias_ptr + c, s_g)
    tl.store(dweight_ptr + c, s_gd * invstd)
    count = n_values.to(acc_ty)
    # dx = a dz + b (x - mean) + k, as in the BatchNorm backward.
    a = scale
    b = -a * invstd * invstd * s_gd / count
    k = -a * s_g / count
    # Pass 2 writes each window's four values, pass 3 the odd row and column no window covers:
    # disjoint stores, no ordering between them needed.
    for start in range(0, n_pooled, BLOCK_SIZE):
        j = start + tl.arange(0, BLOCK_SIZE)
        mask = j < n_pooled
        corner, x0, x1, x2, x3 = _window(
            x_c, j, n_pooled_hw, pooled_width, stride_n, stride_h, stride_w, mask
        )
        index, best = _selected(x0, x1, x2, x3, scale, shift, acc_ty)
        g_off = _offsets(j, n_pooled_hw, pooled_width, g_stride_n, g_stride_h, g_stride_w)
        g = tl.load(g_c + g_off, mask=mask, other=0.0).to(acc_ty)
        ag = tl.where(best > 0.0, a * g, 0.0)
        out_ty = dx_ptr.dtype.element_ty
        d0 = b * (x0.to(acc_ty) - mean) + k + tl.where(index == 0, ag, 0.0)
        d1 = b * (x1.to(acc_ty) - mean) + k + tl.where(index == 1, ag, 0.0)
        d2 = b * (x2.to(acc_ty) - mean) + k + tl.where(index == 2, ag, 0.0)
        d3 = b * (x3.to(acc_ty) - mean) + k + tl.where(index == 3, ag, 0.0)
        tl.store(dx_c + corner, d0.to(out_ty), mask=mask)
        tl.store(dx_c + corner + stride_w, d1.to(out_ty), mask=mask)
        tl.store(dx_c + corner + stride_h, d2.to(out_ty), mask=mask)
        tl.store(dx_c + corner + stride_h + stride_w, d3.to(out_ty), mask=mask)
    if (height % 2 == 1) or (width % 2 == 1):
        for start in range(0, n_values, BLOCK_SIZE):
            i = start + tl.arange(0, BLOCK_SIZE)
            s = i % n_hw
            row = s // width
            col = s % width
            mask = (i < n_values) & ((row >= height - height % 2) | (col >= width - width % 2))
            offsets = _offsets(i, n_hw, width, stride_n, stride_h, stride_w)
            x = tl.load(x_c + offsets, mask=mask, other=0.0).to(acc_ty)
            tl.store(dx_c + offsets, (b * (x - mean) + k).to(dx_ptr.dtype.element_ty), mask=mask)


def _pooled_shape(x: torch.Tensor) -> tuple[int, int, int, int]:
    n, c, h, w = x.shape
    return n, c, h // 2, w // 2


def _block(n: int) -> int:
    return min(BLOCK_SIZE, 1 << max(4, (max(n, 1) - 1).bit_length()))


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
    x = _dense(x)
    weight, bias = _channel(weight), _channel(bias)
    n, c, h, w = x.shape
    _, _, oh, ow = _pooled_shape(x)
    memory_format = (
        torch.channels_last
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )
    y = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device, memory_format=memory_format)
    stats = torch.empty((2, c), dtype=_compute_dtype(x.dtype), device=x.device)
    has_running = running_mean is not None and running_var is not None
    _bn_relu_pool_forward_kernel[(c,)](
        x,
        x if weight is None else weight,
        x if bias is None else bias,
        y,
        stats[0],
        stats[1],
        running_mean if has_running else x,
        running_var if has_running else x,
        *x.stride(),
        *y.stride(),
        n * h * w,
        h * w,
        w,
        n * oh * ow,
        oh * ow,
        ow,
        *_split_float(momentum),
        *_split_float(eps),
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_RUNNING=has_running,
        COMPUTE_F64=x.dtype == torch.float64,
        BLOCK_SIZE=_block(max(n * h * w, 1)),
    )
    return y, stats[0], stats[1]


def _triton_backward(x, weight, bias, grad_y, mean, invstd):
    x = _dense(x)
    weight, bias = _channel(weight), _channel(bias)
    n, c, h, w = x.shape
    _, _, oh, ow = _pooled_shape(x)
    dx = torch.empty_like(x)
    sums = torch.empty((2, c), dtype=_compute_dtype(x.dtype), device=x.device)
    _bn_relu_pool_backward_kernel[(c,)](
        x,
        x if weight is None else weight,
        x if bias is None else bias,
        grad_y,
        mean.to(sums.dtype).contiguous(),
        invstd.to(sums.dtype).contiguous(),
        dx,
        sums[0],
        sums[1],
        *x.stride(),
        *grad_y.stride(),
        n * h * w,
        h * w,
        h,
        w,
        n * oh * ow,
        oh * ow,
        ow,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        COMPUTE_F64=x.dtype == torch.float64,
        BLOCK_SIZE=_block(max(n * h * w, 1)),
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
