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
not yet run on a GPU), ``triton`` (ops/bn_relu_pool_triton.py, through the input's strides:
(channel, chunk) grids as in ops/batch_norm_triton.py; the forward is batch_norm's per-chunk
statistics then one pass over the 2x2 windows, the backward one pass of window sums then one
writing dx over every window, those of an odd last row or column partial) and ``reference``
(the eager composition). Statistics: the CUDA and Triton kernels join per-chunk mean and M2 by
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
from . import _library, bn_relu_pool_triton
from .channel_stats_triton import compute_dtype, param_dtype

OP_NAME = "bn_relu_pool"
FUSED_BACKENDS = ("cpu", "cuda", "triton")

BACKWARD_OP = OP_NAME + ".backward"

_backend.register_op(
    OP_NAME,
    reference=_reference.batch_norm_relu_maxpool2d_forward,
    cpu="ext:bn_relu_pool_forward",
    cuda="ext:bn_relu_pool_forward",
    triton=bn_relu_pool_triton.forward,
)
_backend.register_op(
    BACKWARD_OP,
    reference=_reference.batch_norm_relu_maxpool2d_backward,
    cpu="ext:bn_relu_pool_backward",
    cuda="ext:bn_relu_pool_backward",
    triton=bn_relu_pool_triton.backward,
)


def _fake_forward(x, weight, bias, running_mean, running_var, momentum, eps):
    n, c, h, w = x.shape
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    y = torch.empty(
        (n, c, h // 2, w // 2),
        dtype=x.dtype,
        device=x.device,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
    )
    stats = compute_dtype(x.dtype)
    return y, x.new_empty((c,), dtype=stats), x.new_empty((c,), dtype=stats)


def _fake_backward(x, weight, bias, grad_y, mean, invstd):
    param = param_dtype(weight, x)
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty((c,), dtype=param), x.new_empty((c,), dtype=param)


_library.define(
    OP_NAME,
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
    "Tensor(b!)? running_var, float momentum, float eps) -> (Tensor, Tensor, Tensor)",
    _fake_forward,
    mutates_args=("running_mean", "running_var"),
)
_library.define(
    BACKWARD_OP,
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor grad_y, Tensor mean, Tensor invstd) "
    "-> (Tensor, Tensor, Tensor)",
    _fake_backward,
)


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
        y, mean, invstd = _library.call(
            OP_NAME, backend, x, weight, bias, running_mean, running_var, momentum, eps
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
        dx, dweight, dbias = _library.call(
            BACKWARD_OP, ctx.backend, x, weight, bias, grad_y, mean, invstd
        )
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
    backend = _backend.resolve_backend(OP_NAME, x.device)
    if backend == "reference":
        return _reference.batch_norm_relu_maxpool2d(
            x, weight, bias, running_mean, running_var, momentum, eps
        )
    return BatchNormReLUMaxPool2dFunction.apply(
        x, weight, bias, running_mean, running_var, momentum, eps, backend
    )
