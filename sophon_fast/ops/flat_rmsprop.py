"""flat_rmsprop: fused RMSprop updates (torch.optim.RMSprop without momentum, plain or centered)
on a flat parameter buffer.

One kernel per update and one per backward, on a (n_params,) parameter buffer (float32, float64,
float16 or bfloat16) with float32 state (float64 for float64 parameters); maths in the state
dtype. With d = grad + wd * params:

    v' = a v + (1-a) d^2,  g' = a g + (1-a) d (centered);  p' = p - lr d / (sqrt(v' [- g'^2]) + eps)

Memory traffic per parameter at float32: forward 20 B (read p, g, v; write p', v'), centered 28 B;
fused backward 28 B (read dp', dv', g, v; write dp, dg, dv), centered 40 B, +4 B with weight
decay. The eager per-tensor differentiable update moves 56 B (5 ops) plus one launch per op per
tensor.

The backward saves grad, square_avg (and grad_avg when centered), params only with weight decay;
everything else is recomputed in the backward kernel. When the backward itself is differentiated
the Function switches to the reference twin's autograd VJP.

Backends (:mod:`sophon_fast._backend`): ``flat_rmsprop_step`` and ``flat_rmsprop_step.backward``,
both in the extension's signature (``grad_avg`` / its gradient None when not centered; a None in
the results is dropped by the callers here).
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import flat_rmsprop as _reference
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

__all__ = ["FlatRmspropStepFunction", "flat_rmsprop_step", "flat_rmsprop_step_"]

OP_NAME = "flat_rmsprop_step"
BACKWARD_OP = OP_NAME + ".backward"

tl = _triton.tl

# ---------------------------------------------------------------------------------------- kernels


@_triton.jit
def _rmsprop_forward_kernel(
    params_ptr, grad_ptr, square_avg_ptr, grad_avg_ptr, out_params_ptr, out_square_avg_ptr,
    out_grad_avg_ptr, n_elements, lr: tl.float64, alpha: tl.float64, eps: tl.float64,
    weight_decay: tl.float64,
    CENTERED: tl.constexpr, COMPUTE_F64: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    lr, alpha = hp_scalar(lr, ctype), hp_scalar(alpha, ctype)
    eps, weight_decay = hp_scalar(eps, ctype), hp_scalar(weight_decay, ctype)
    p = tl.load(params_ptr + offsets, mask=mask).to(ctype)
    d = tl.load(grad_ptr + offsets, mask=mask).to(ctype) + weight_decay * p
    v = alpha * tl.load(square_avg_ptr + offsets, mask=mask).to(ctype) + (1.0 - alpha) * d * d
    q = v
    if CENTERED:
        ga = alpha * tl.load(grad_avg_ptr + offsets, mask=mask).to(ctype) + (1.0 - alpha) * d
        q = v - ga * ga
        tl.store(out_grad_avg_ptr + offsets, ga, mask=mask)
    root, positive, divisor = safe_root(q, COMPUTE_F64)
    new_p = p - lr * d / (root + eps)
    tl.store(out_params_ptr + offsets, new_p.to(out_params_ptr.dtype.element_ty), mask=mask)
    tl.store(out_square_avg_ptr + offsets, v, mask=mask)


@_triton.jit
def _rmsprop_backward_kernel(
    grad_new_params_ptr, grad_new_square_avg_ptr, grad_new_grad_avg_ptr, params_ptr, grad_ptr,
    square_avg_ptr, grad_avg_ptr, grad_params_ptr, grad_grad_ptr, grad_square_avg_ptr,
    grad_grad_avg_ptr, n_elements, lr: tl.float64, alpha: tl.float64, eps: tl.float64,
    weight_decay: tl.float64,
    CENTERED: tl.constexpr, NEEDS_PARAMS: tl.constexpr, COMPUTE_F64: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    lr, alpha = hp_scalar(lr, ctype), hp_scalar(alpha, ctype)
    eps, weight_decay = hp_scalar(eps, ctype), hp_scalar(weight_decay, ctype)
    a = tl.load(grad_new_params_ptr + offsets, mask=mask).to(ctype)
    c_v = tl.load(grad_new_square_avg_ptr + offsets, mask=mask).to(ctype)
    d = tl.load(grad_ptr + offsets, mask=mask).to(ctype)
    if NEEDS_PARAMS:
        d = d + weight_decay * tl.load(params_ptr + offsets, mask=mask).to(ctype)
    v = alpha * tl.load(square_avg_ptr + offsets, mask=mask).to(ctype) + (1.0 - alpha) * d * d
    q = v
    if CENTERED:
        ga = alpha * tl.load(grad_avg_ptr + offsets, mask=mask).to(ctype) + (1.0 - alpha) * d
        q = v - ga * ga
    root, positive, divisor = safe_root(q, COMPUTE_F64)
    denom = root + eps
    g_q = tl.where(positive, a * lr * d / (denom * denom) * 0.5 / divisor, 0.0)
    g_v = c_v + g_q
    g_d = -lr * a / denom + (1.0 - alpha) * 2.0 * d * g_v
    if CENTERED:
        g_ga = tl.load(grad_new_grad_avg_ptr + offsets, mask=mask).to(ctype) - 2.0 * ga * g_q
        g_d = g_d + (1.0 - alpha) * g_ga
        tl.store(grad_grad_avg_ptr + offsets, alpha * g_ga, mask=mask)
    g_p = a + weight_decay * g_d
    tl.store(grad_params_ptr + offsets, g_p.to(grad_params_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_grad_ptr + offsets, g_d.to(grad_grad_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_square_avg_ptr + offsets, alpha * g_v, mask=mask)


# -------------------------------------------------------------------------------------- launchers


def _triton_rmsprop_forward(
    params, grad, square_avg, grad_avg, lr, alpha, eps, weight_decay, out=None
):
    centered = grad_avg is not None
    if out is None:
        out = empty_outputs(params, square_avg, *((grad_avg,) if centered else ()))
    n = params.numel()
    if n:
        launch(
            _rmsprop_forward_kernel, n,
            (params, grad, square_avg, grad_avg if centered else square_avg, out[0], out[1],
             out[2] if centered else out[1], n, lr, alpha, eps, weight_decay),
            CENTERED=centered, COMPUTE_F64=is_f64(params),
        )  # fmt: skip
    return tuple(out)


def _triton_rmsprop_backward(
    grad_new_params, grad_new_square_avg, grad_new_grad_avg, params, grad, square_avg, grad_avg,
    lr, alpha, eps, weight_decay,
):  # fmt: skip
    centered = grad_avg is not None
    grad_params, grad_grad = torch.empty_like(grad), torch.empty_like(grad)
    grad_square_avg = torch.empty_like(square_avg)
    grad_grad_avg = torch.empty_like(grad_avg) if centered else grad_square_avg
    needs_params = params is not None
    n = grad.numel()
    if n:
        launch(
            _rmsprop_backward_kernel, n,
            (grad_new_params, grad_new_square_avg,
             grad_new_grad_avg if centered else grad_new_square_avg,
             params if needs_params else grad, grad, square_avg,
             grad_avg if centered else square_avg, grad_params, grad_grad, grad_square_avg,
             grad_grad_avg, n, lr, alpha, eps, weight_decay),
            CENTERED=centered, NEEDS_PARAMS=needs_params, COMPUTE_F64=is_f64(grad),
        )  # fmt: skip
    result = (grad_params, grad_grad, grad_square_avg)
    return result + ((grad_grad_avg,) if centered else ())


def _reference_forward(params, grad, square_avg, grad_avg, lr, alpha, eps, weight_decay, out=None):
    """The reference twin in the forward kernels' signature."""
    return _reference.flat_rmsprop_step(
        params, grad, square_avg, lr, alpha, eps, weight_decay, grad_avg=grad_avg, out=out
    )


def _reference_backward(grad_new_params, grad_new_square_avg, grad_new_grad_avg, params, grad,
                        square_avg, grad_avg, lr, alpha, eps, weight_decay):  # fmt: skip
    """The reference twin's VJP in the backward kernels' signature (params None: not needed)."""
    grad_outputs = (grad_new_params, grad_new_square_avg)
    grad_outputs += () if grad_avg is None else (grad_new_grad_avg,)
    return _reference.flat_rmsprop_step_backward(
        grad_outputs, torch.zeros_like(grad) if params is None else params, grad, square_avg,
        lr, alpha, eps, weight_decay, grad_avg=grad_avg,
    )  # fmt: skip


_backend.register_op(
    OP_NAME,
    reference=_reference_forward,
    cpu="ext:flat_rmsprop_step_forward",
    cuda="ext:flat_rmsprop_step_forward",
    triton=_triton_rmsprop_forward,
)
_backend.register_op(
    BACKWARD_OP,
    reference=_reference_backward,
    cpu="ext:flat_rmsprop_step_backward",
    cuda="ext:flat_rmsprop_step_backward",
    triton=_triton_rmsprop_backward,
)


def _present(tensors) -> tuple[torch.Tensor, ...]:
    """The tensors of a kernel's result (the extension returns None for an absent grad_avg)."""
    return tuple(t for t in tensors if t is not None)


# ------------------------------------------------------------------------------ autograd Function


class FlatRmspropStepFunction(torch.autograd.Function):
    """(params', square_avg'[, grad_avg']) of RMSprop; backward = one fused kernel.

    Saves grad and square_avg (and grad_avg when centered); params only with weight decay.
    """

    @staticmethod
    def forward(ctx, params, grad, square_avg, grad_avg, hp, backend):
        needs_params = hp[3] != 0.0
        ctx.needs_params, ctx.centered = needs_params, grad_avg is not None
        ctx.save_for_backward(params if needs_params else None, grad, square_avg, grad_avg)
        ctx.hp, ctx.backend = hp, backend
        forward = _backend.implementation(OP_NAME, backend)
        return _present(forward(params, grad, square_avg, grad_avg, *hp))

    @staticmethod
    def backward(ctx, *grad_outputs):
        params, grad, square_avg, grad_avg = ctx.saved_tensors
        if torch.is_grad_enabled():
            p = params if ctx.needs_params else torch.zeros_like(grad)
            states = (square_avg, grad_avg) if ctx.centered else (square_avg,)
            grads = differentiable_vjp(
                lambda p, g, v, *ga: _reference.flat_rmsprop_step(
                    p, g, v, *ctx.hp, grad_avg=ga[0] if ga else None
                ),
                (p, grad, *states),
                grad_outputs,
            )
            return (*grads[:3], grads[3] if ctx.centered else None, None, None)
        grad_outputs = tuple(g.contiguous() for g in grad_outputs)
        grads = _backend.implementation(BACKWARD_OP, ctx.backend)(
            grad_outputs[0],
            grad_outputs[1],
            grad_outputs[2] if ctx.centered else None,
            params if ctx.needs_params else None,
            grad,
            square_avg,
            grad_avg if ctx.centered else None,
            *ctx.hp,
        )
        grads = _present(grads)
        return (*grads[:3], grads[3] if ctx.centered else None, None, None)


# ------------------------------------------------------------------------------- public functions


def flat_rmsprop_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    lr: float,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    grad_avg: torch.Tensor | None = None,
    out: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, ...]:
    """One out-of-place RMSprop step on a flat buffer, fused and differentiable.

    torch.optim.RMSprop semantics without momentum; centered when ``grad_avg`` is given
    (the root is taken of ``square_avg' - grad_avg'^2``).

    Args:
        params: (n_params,) contiguous float32, float64, float16 or bfloat16 buffer.
        grad: (n_params,) same dtype, size and device as ``params``.
        square_avg: (n_params,) float32 state (float64 for float64 params).
        lr: learning rate. alpha: smoothing in [0, 1). eps: > 0. weight_decay: L2 >= 0.
            Defaults 0.99, 1e-8, 0.
        grad_avg: (n_params,) state of the centered variant, or None (not centered).
        out: optional output buffers (params, square_avg[, grad_avg]); not differentiable.

    Returns:
        (new_params, new_square_avg) or, centered, (new_params, new_square_avg, new_grad_avg).

    Raises:
        TypeError / ValueError / BackendUnavailableError: as :func:`flat_momentum_step`.
    """
    check_flat_buffer(params, "params")
    check_like(params, "params", grad, "grad")
    check_state(params, square_avg, "square_avg")
    states = (square_avg,)
    if grad_avg is not None:
        check_state(params, grad_avg, "grad_avg")
        states = (square_avg, grad_avg)
    hp = (
        check_real(lr, "lr"),
        check_fraction(alpha, "alpha"),
        check_real(eps, "eps", minimum=0.0),
        check_real(weight_decay, "weight_decay", minimum=0.0),
    )
    backend = _backend.resolve_backend(OP_NAME, params.device)
    if out is not None:
        names = ("params", "square_avg") + (("grad_avg",) if grad_avg is not None else ())
        check_out(params, states, out, (params, grad, *states), names)
        forward = _backend.implementation(OP_NAME, backend)
        return _present(forward(params, grad, square_avg, grad_avg, *hp, out=tuple(out)))
    if backend == "reference":
        return _reference.flat_rmsprop_step(params, grad, square_avg, *hp, grad_avg=grad_avg)
    return FlatRmspropStepFunction.apply(params, grad, square_avg, grad_avg, hp, backend)


@torch.no_grad()
def flat_rmsprop_step_(
    params: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    lr: float,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    grad_avg: torch.Tensor | None = None,
) -> torch.Tensor:
    """In-place, non-differentiable :func:`flat_rmsprop_step`. Returns ``params``."""
    out = (params, square_avg) + (() if grad_avg is None else (grad_avg,))
    flat_rmsprop_step(
        params, grad, square_avg, lr, alpha, eps, weight_decay, grad_avg=grad_avg, out=out
    )
    return params
