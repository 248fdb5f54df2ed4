"""flat_adadelta: fused Adadelta updates (torch.optim.Adadelta semantics) on a flat parameter
buffer.

One kernel per update and one per backward, on a (n_params,) parameter buffer (float32, float64,
float16 or bfloat16) with float32 state (float64 for float64 parameters); maths in the state
dtype. With d = grad + wd * params (v: ``square_avg``, u: ``acc_delta``):

    v' = rho v + (1-rho) d^2,   delta = sqrt(u + eps) / sqrt(v' + eps) * d
    u' = rho u + (1-rho) delta^2,   p' = p - lr delta

Memory traffic per parameter at float32: forward 28 B (read p, g, v, u; write p', v', u'); fused
backward 40 B (read dp', dv', du', g, v, u; write dp, dg, dv, du), +4 B with weight decay. The
eager per-tensor differentiable update moves 116 B (11 ops) plus one launch per op per tensor.

The backward saves grad, square_avg and acc_delta (params only with weight decay); v', both roots
and delta are recomputed in the backward kernel. When the backward itself is differentiated the
Function switches to the reference twin's autograd VJP.

Backends (:mod:`sophon_fast._backend`): ``flat_adadelta_step`` and ``flat_adadelta_step.backward``
(``params`` None in the backward when weight_decay is 0).
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import flat_adadelta as _reference
from . import _triton
from ._checks import check_flat_buffer, check_like, check_real
from ._flat_common import (
    check_fraction,
    check_out,
    check_state,
    differentiable_vjp,
    empty_outputs,
    hp_scalar,
    is_f64,
    launch,
    safe_root,
)

__all__ = ["FlatAdadeltaStepFunction", "flat_adadelta_step", "flat_adadelta_step_"]

OP_NAME = "flat_adadelta_step"
BACKWARD_OP = OP_NAME + ".backward"

tl = _triton.tl

# ---------------------------------------------------------------------------------------- kernels
#
# Float hyper-parameters are declared ``tl.float64`` and rounded once to the compute dtype by
# hp_scalar (see ._flat_common): compiled Triton would pass an undeclared Python float as float32.


@_triton.jit
def _adadelta_forward_kernel(
    params_ptr, grad_ptr, square_avg_ptr, acc_delta_ptr, out_params_ptr, out_square_avg_ptr,
    out_acc_delta_ptr, n_elements, lr: tl.float64, rho: tl.float64, eps: tl.float64,
    weight_decay: tl.float64,
    COMPUTE_F64: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    lr, rho = hp_scalar(lr, ctype), hp_scalar(rho, ctype)
    eps, weight_decay = hp_scalar(eps, ctype), hp_scalar(weight_decay, ctype)
    p = tl.load(params_ptr + offsets, mask=mask).to(ctype)
    d = tl.load(grad_ptr + offsets, mask=mask).to(ctype) + weight_decay * p
    u = tl.load(acc_delta_ptr + offsets, mask=mask).to(ctype)
    v = rho * tl.load(square_avg_ptr + offsets, mask=mask).to(ctype) + (1.0 - rho) * d * d
    std, std_positive, std_divisor = safe_root(v + eps, COMPUTE_F64)
    num, num_positive, num_divisor = safe_root(u + eps, COMPUTE_F64)
    delta = num / std * d
    new_u = rho * u + (1.0 - rho) * delta * delta
    new_p = p - lr * delta
    tl.store(out_params_ptr + offsets, new_p.to(out_params_ptr.dtype.element_ty), mask=mask)
    tl.store(out_square_avg_ptr + offsets, v, mask=mask)
    tl.store(out_acc_delta_ptr + offsets, new_u, mask=mask)


@_triton.jit
def _adadelta_backward_kernel(
    grad_new_params_ptr, grad_new_square_avg_ptr, grad_new_acc_delta_ptr, params_ptr, grad_ptr,
    square_avg_ptr, acc_delta_ptr, grad_params_ptr, grad_grad_ptr, grad_square_avg_ptr,
    grad_acc_delta_ptr, n_elements, lr: tl.float64, rho: tl.float64, eps: tl.float64,
    weight_decay: tl.float64,
    NEEDS_PARAMS: tl.constexpr, COMPUTE_F64: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    lr, rho = hp_scalar(lr, ctype), hp_scalar(rho, ctype)
    eps, weight_decay = hp_scalar(eps, ctype), hp_scalar(weight_decay, ctype)
    a = tl.load(grad_new_params_ptr + offsets, mask=mask).to(ctype)
    c_v = tl.load(grad_new_square_avg_ptr + offsets, mask=mask).to(ctype)
    c_u = tl.load(grad_new_acc_delta_ptr + offsets, mask=mask).to(ctype)
    d = tl.load(grad_ptr + offsets, mask=mask).to(ctype)
    if NEEDS_PARAMS:
        d = d + weight_decay * tl.load(params_ptr + offsets, mask=mask).to(ctype)
    u = tl.load(acc_delta_ptr + offsets, mask=mask).to(ctype)
    v = rho * tl.load(square_avg_ptr + offsets, mask=mask).to(ctype) + (1.0 - rho) * d * d
    std, std_positive, std_divisor = safe_root(v + eps, COMPUTE_F64)
    num, num_positive, num_divisor = safe_root(u + eps, COMPUTE_F64)
    ratio = num / std
    delta = ratio * d
    g_delta = -lr * a + (1.0 - rho) * 2.0 * delta * c_u
    g_ratio = g_delta * d
    g_std = -g_ratio * ratio / std
    g_v = c_v + tl.where(std_positive, g_std * 0.5 / std_divisor, 0.0)
    g_u = rho * c_u + tl.where(num_positive, g_ratio / std * 0.5 / num_divisor, 0.0)
    g_d = g_delta * ratio + (1.0 - rho) * 2.0 * d * g_v
    g_p = a + weight_decay * g_d
    tl.store(grad_params_ptr + offsets, g_p.to(grad_params_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_grad_ptr + offsets, g_d.to(grad_grad_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_square_avg_ptr + offsets, rho * g_v, mask=mask)
    tl.store(grad_acc_delta_ptr + offsets, g_u, mask=mask)


# -------------------------------------------------------------------------------------- launchers


def _triton_adadelta_forward(
    params, grad, square_avg, acc_delta, lr, rho, eps, weight_decay, out=None
):
    out = empty_outputs(params, square_avg, acc_delta) if out is None else out
    n = params.numel()
    if n:
        launch(
            _adadelta_forward_kernel, n,
            (params, grad, square_avg, acc_delta, out[0], out[1], out[2], n, lr, rho, eps,
             weight_decay),
            COMPUTE_F64=is_f64(params),
        )  # fmt: skip
    return tuple(out)


def _triton_adadelta_backward(
    grad_new_params, grad_new_square_avg, grad_new_acc_delta, params, grad, square_avg,
    acc_delta, lr, rho, eps, weight_decay,
):  # fmt: skip
    grad_params, grad_grad = torch.empty_like(grad), torch.empty_like(grad)
    grad_square_avg, grad_acc_delta = torch.empty_like(square_avg), torch.empty_like(acc_delta)
    needs_params = params is not None
    n = grad.numel()
    if n:
        launch(
            _adadelta_backward_kernel, n,
            (grad_new_params, grad_new_square_avg, grad_new_acc_delta,
             params if needs_params else grad, grad, square_avg, acc_delta, grad_params,
             grad_grad, grad_square_avg, grad_acc_delta, n, lr, rho, eps, weight_decay),
            NEEDS_PARAMS=needs_params, COMPUTE_F64=is_f64(grad),
        )  # fmt: skip
    return grad_params, grad_grad, grad_square_avg, grad_acc_delta


def _reference_backward(grad_new_params, grad_new_square_avg, grad_new_acc_delta, params, grad,
                        square_avg, acc_delta, *hp):  # fmt: skip
    """The reference twin's VJP in the backward kernels' signature (params None: not needed)."""
    return _reference.flat_adadelta_step_backward(
        grad_new_params, grad_new_square_avg, grad_new_acc_delta,
        torch.zeros_like(grad) if params is None else params, grad, square_avg, acc_delta, *hp,
    )  # fmt: skip


_backend.register_op(
    OP_NAME,
    reference=_reference.flat_adadelta_step,
    cpu="ext:flat_adadelta_step_forward",
    cuda="ext:flat_adadelta_step_forward",
    triton=_triton_adadelta_forward,
)
_backend.register_op(
    BACKWARD_OP,
    reference=_reference_backward,
    cpu="ext:flat_adadelta_step_backward",
    cuda="ext:flat_adadelta_step_backward",
    triton=_triton_adadelta_backward,
)


# ------------------------------------------------------------------------------ autograd Function


class FlatAdadeltaStepFunction(torch.autograd.Function):
    """(params', square_avg', acc_delta') of Adadelta; backward = one fused kernel.

    Saves grad, square_avg and acc_delta; params only with weight decay.
    """

    @staticmethod
    def forward(ctx, params, grad, square_avg, acc_delta, hp, backend):
        ctx.needs_params = hp[3] != 0.0
        ctx.save_for_backward(params if ctx.needs_params else None, grad, square_avg, acc_delta)
        ctx.hp, ctx.backend = hp, backend
        forward = _backend.implementation(OP_NAME, backend)
        return tuple(forward(params, grad, square_avg, acc_delta, *hp))

    @staticmethod
    def backward(ctx, grad_new_params, grad_new_square_avg, grad_new_acc_delta):
        params, grad, square_avg, acc_delta = ctx.saved_tensors
        grad_outputs = (grad_new_params, grad_new_square_avg, grad_new_acc_delta)
        if torch.is_grad_enabled():
            p = params if ctx.needs_params else torch.zeros_like(grad)
            grads = differentiable_vjp(
                lambda p, g, v, u: _reference.flat_adadelta_step(p, g, v, u, *ctx.hp),
                (p, grad, square_avg, acc_delta),
                grad_outputs,
            )
            return (*grads, None, None)
        grads = _backend.implementation(BACKWARD_OP, ctx.backend)(
            *(g.contiguous() for g in grad_outputs),
            params if ctx.needs_params else None, grad, square_avg, acc_delta, *ctx.hp,
        )  # fmt: skip
        return (*grads, None, None)


# ------------------------------------------------------------------------------- public functions


def flat_adadelta_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    acc_delta: torch.Tensor,
    lr: float = 1.0,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One out-of-place Adadelta step on a flat buffer, fused and differentiable.

    torch.optim.Adadelta semantics (see the module docstring). Gradients flow to params, grad,
    square_avg and acc_delta through one fused backward kernel (first order).

    Args:
        params: (n_params,) contiguous float32, float64, float16 or bfloat16 buffer.
        grad: (n_params,) same dtype, size and device as ``params``.
        square_avg, acc_delta: (n_params,) float32 state (float64 for float64 params).
        lr: learning rate. rho: smoothing in [0, 1). eps: >= 0. weight_decay: L2 >= 0.
            Defaults 1.0, 0.9, 1e-6, 0.
        out: optional (params, square_avg, acc_delta) buffers to write into (may be the inputs:
            in place). Not differentiable: refused while an input requires grad under grad mode.

    Returns:
        (new_params (n_params,) in params.dtype, new_square_avg, new_acc_delta (state dtype)).

    Raises:
        TypeError / ValueError / BackendUnavailableError: as :func:`flat_momentum_step`.
    """
    check_flat_buffer(params, "params")
    check_like(params, "params", grad, "grad")
    check_state(params, square_avg, "square_avg")
    check_state(params, acc_delta, "acc_delta")
    hp = (
        check_real(lr, "lr"),
        check_fraction(rho, "rho"),
        check_real(eps, "eps", minimum=0.0),
        check_real(weight_decay, "weight_decay", minimum=0.0),
    )
    backend = _backend.resolve_backend(OP_NAME, params.device)
    inputs = (params, grad, square_avg, acc_delta)
    if out is not None:
        names = ("params", "square_avg", "acc_delta")
        check_out(params, (square_avg, acc_delta), out, inputs, names)
        forward = _backend.implementation(OP_NAME, backend)
        return tuple(forward(*inputs, *hp, out=tuple(out)))
    if backend == "reference":
        return _reference.flat_adadelta_step(*inputs, *hp)
    return FlatAdadeltaStepFunction.apply(*inputs, hp, backend)


@torch.no_grad()
def flat_adadelta_step_(
    params: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    acc_delta: torch.Tensor,
    lr: float = 1.0,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
) -> torch.Tensor:
    """In-place, non-differentiable :func:`flat_adadelta_step`. Returns ``params``."""
    flat_adadelta_step(params, grad, square_avg, acc_delta, lr, rho, eps, weight_decay,
                       out=(params, square_avg, acc_delta))  # fmt: skip
    return params
