"""relu_maxpool2d: ``max_pool2d(relu(x), 2, 2)`` fused, differentiable to any order.

Where it is used: second-order simulation of ReLU -> MaxPool2d(2, 2) networks (the fast engine
applies :func:`sophon_fast.nn.fuse_relu_pool` on its private model copy in order 2). There the
inner gradient is built with ``create_graph=True``, so every backward must itself be
differentiable; eager max-pooling costs a slow NCHW forward, an int64 index map, a zero-filled
scatter and a separate ``threshold_backward`` per call.

Maths: relu is increasing, so max_pool(relu(x)) = relu(max_pool(x)). One pass over x finds each
2x2 window's first maximum m (max_pool2d's tie and NaN rules) and writes y = max(m, 0) and a
code in x's dtype: the window position 0..3, or -1 where m <= 0 (the ReLU passes no gradient).
The gradient is the linear map dx = S(dy): dy scattered to the coded positions, zero elsewhere
(the odd last row / column included). Its transpose G(v) gathers v at the coded positions.
S's backward is G and G's backward is S (the code is piecewise constant in x: its derivative is
0 almost everywhere), so the pair nests to any order, like flat_sgd_step's forward/backward.

Saved for backward: the code only (4 B per output at fp32 against 8 B of int64 indices and the
input kept for ReLU's backward by eager autograd); nothing is recomputed.

Backends: ``cpu`` (the C++ kernels: NCHW-contiguous float32 / float64 on the CPU) and
``reference`` (:mod:`sophon_fast.reference.relu_pool`: the eager modules). Any other input
(channels_last, half precision, CUDA tensors) or any other backend runs the reference
composition: there is no Triton or CUDA kernel for this op.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import relu_pool as _reference

__all__ = ["relu_maxpool2d"]

OP_NAME = "relu_maxpool2d"


def _kernels():
    module = _backend.extension()
    if module is None or not hasattr(module, "relu_maxpool2d_forward"):
        return None
    return module


def _use_kernel(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.is_contiguous()
        and _kernels() is not None
        and _backend.resolve(OP_NAME, x.device) == "cpu"
    )


class ReluMaxPool2dFunction(torch.autograd.Function):
    """y = relu_maxpool2d(x); backward = :class:`ReluMaxPool2dScatter` of the saved code."""

    @staticmethod
    def forward(ctx, x):
        y, code = _kernels().relu_maxpool2d_forward(x)
        ctx.mark_non_differentiable(code)
        ctx.save_for_backward(code)
        ctx.in_size = (x.shape[2], x.shape[3])
        return y, code

    @staticmethod
    def backward(ctx, grad_y, _grad_code):
        (code,) = ctx.saved_tensors
        return ReluMaxPool2dScatter.apply(grad_y.contiguous(), code, *ctx.in_size)


class ReluMaxPool2dScatter(torch.autograd.Function):
    """dx = S(dy) (linear in dy); its backward is the gather G, its transpose."""

    @staticmethod
    def forward(ctx, grad_y, code, height, width):
        ctx.save_for_backward(code)
        return _kernels().relu_maxpool2d_scatter(grad_y, code, height, width)

    @staticmethod
    def backward(ctx, v):
        (code,) = ctx.saved_tensors
        return ReluMaxPool2dGather.apply(v.contiguous(), code), None, None, None


class ReluMaxPool2dGather(torch.autograd.Function):
    """G(v) = v at the coded positions (0 where the ReLU clipped); its backward is S."""

    @staticmethod
    def forward(ctx, v, code):
        ctx.save_for_backward(code)
        ctx.in_size = (v.shape[2], v.shape[3])
        return _kernels().relu_maxpool2d_gather(v, code)

    @staticmethod
    def backward(ctx, grad):
        (code,) = ctx.saved_tensors
        return ReluMaxPool2dScatter.apply(grad.contiguous(), code, *ctx.in_size), None


def relu_maxpool2d(x: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(relu(x), kernel_size=2, stride=2)``, fused and differentiable to any order.

    Values and gradients equal the eager composition's exactly (the same maximum is chosen, the
    same zeros written), including max_pool2d's tie rule (first maximum in row-major order) and
    NaN rule.

    Args:
        x: (N, C, H, W) floating tensor, H and W >= 2 (odd sizes drop the last row / column).

    Returns:
        (N, C, H // 2, W // 2) tensor of x's dtype.

    Raises:
        TypeError: x is not a floating tensor.
        ValueError: x is not 4-D or H or W is below 2.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"relu_maxpool2d: x must be a floating tensor, got {got}")
    if x.dim() != 4 or x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(
            f"relu_maxpool2d: x must be (N, C, H, W) with H, W >= 2, got shape {tuple(x.shape)}"
        )
    if not _use_kernel(x):
        return _reference.relu_maxpool2d(x)
    return ReluMaxPool2dFunction.apply(x)[0]
