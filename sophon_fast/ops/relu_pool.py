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
``reference`` (:mod:`sophon_fast.reference.relu_pool`: the eager modules; the table's reference
entries are the kernels' pure-torch forms). Any other input (channels_last, half precision, CUDA
tensors) or any other backend runs the reference composition: there is no Triton or CUDA kernel
for this op.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import relu_pool as _reference
from . import _library

__all__ = ["relu_maxpool2d"]

OP_NAME = "relu_maxpool2d"
SCATTER_OP = OP_NAME + ".scatter"
GATHER_OP = OP_NAME + ".gather"

_backend.register_op(
    OP_NAME, reference=_reference.relu_maxpool2d_forward, cpu="ext:relu_maxpool2d_forward"
)
_backend.register_op(
    SCATTER_OP, reference=_reference.relu_maxpool2d_scatter, cpu="ext:relu_maxpool2d_scatter"
)
_backend.register_op(
    GATHER_OP, reference=_reference.relu_maxpool2d_gather, cpu="ext:relu_maxpool2d_gather"
)


def _pooled(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2))


_library.define(OP_NAME, "(Tensor x) -> (Tensor, Tensor)", lambda x: (_pooled(x), _pooled(x)))
_library.define(
    SCATTER_OP,
    "(Tensor grad_y, Tensor code, int height, int width) -> Tensor",
    lambda grad_y, code, height, width: grad_y.new_empty((*grad_y.shape[:2], height, width)),
)
_library.define(
    GATHER_OP, "(Tensor v, Tensor code) -> Tensor", lambda v, code: v.new_empty(code.shape)
)


def _use_kernel(x: torch.Tensor) -> bool:
    if not (
        x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.is_contiguous()
    ):
        return False
    # A forced backend without a kernel here (no Triton or CUDA kernel; an extension built
    # without this op) runs the reference composition, as any other input does.
    return _backend.resolve_backend(OP_NAME, x.device, fallback="reference") == "cpu"


class ReluMaxPool2dFunction(torch.autograd.Function):
    """y = relu_maxpool2d(x); backward = :class:`ReluMaxPool2dScatter` of the saved code."""

    @staticmethod
    def forward(ctx, x, backend):
        y, code = _library.call(OP_NAME, backend, x)
        ctx.mark_non_differentiable(code)
        ctx.save_for_backward(code)
        ctx.in_size = (x.shape[2], x.shape[3])
        ctx.backend = backend
        return y, code

    @staticmethod
    def backward(ctx, grad_y, _grad_code):
        (code,) = ctx.saved_tensors
        dx = ReluMaxPool2dScatter.apply(grad_y.contiguous(), code, *ctx.in_size, ctx.backend)
        return dx, None


class ReluMaxPool2dScatter(torch.autograd.Function):
    """dx = S(dy) (linear in dy); its backward is the gather G, its transpose."""

    @staticmethod
    def forward(ctx, grad_y, code, height, width, backend):
        ctx.save_for_backward(code)
        ctx.backend = backend
        return _library.call(SCATTER_OP, backend, grad_y, code, height, width)

    @staticmethod
    def backward(ctx, v):
        (code,) = ctx.saved_tensors
        return ReluMaxPool2dGather.apply(v.contiguous(), code, ctx.backend), None, None, None, None


class ReluMaxPool2dGather(torch.autograd.Function):
    """G(v) = v at the coded positions (0 where the ReLU clipped); its backward is S."""

    @staticmethod
    def forward(ctx, v, code, backend):
        ctx.save_for_backward(code)
        ctx.in_size = (v.shape[2], v.shape[3])
        ctx.backend = backend
        return _library.call(GATHER_OP, backend, v, code)

    @staticmethod
    def backward(ctx, grad):
        (code,) = ctx.saved_tensors
        dx = ReluMaxPool2dScatter.apply(grad.contiguous(), code, *ctx.in_size, ctx.backend)
        return dx, None, None


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
    return ReluMaxPool2dFunction.apply(x, "cpu")[0]
