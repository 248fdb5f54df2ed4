"""flat_momentum: fused momentum-SGD updates (torch.optim.SGD, heavy ball or Nesterov) on a flat
parameter buffer.

One kernel per update and one per backward, on a (n_params,) parameter buffer (float32, float64,
float16 or bfloat16) with a float32 momentum buffer (float64 for float64 parameters); maths in the
state dtype. ``step`` is a 0-d tensor on the params' device, the number of updates taken before
this one, read by the kernel (a step on another device is refused; the in-place form moves it
there once). With d = grad + wd * params:

    b' = d if step == 0 else mu b + (1 - dampening) d;   p' = p - lr (nesterov ? d + mu b' : b')

Memory traffic per parameter at float32: forward 20 B (read p, g, b; write p', b'); fused backward
20 B (read dp', db'; write dp, dg, db), 16 B without weight decay, where dp is dp' itself. The eager
per-tensor differentiable update moves 32 B (mul, add, add) plus one launch per op per tensor.

The backward saves only ``step``: the update is linear, its Jacobian holds only (lr, mu,
dampening, wd) and whether this is the first step. When the backward itself is differentiated
the Function switches to the reference twin's autograd VJP (:func:`._flat_common.differentiable_vjp`).

Backends (:mod:`sophon_fast._backend`): ``flat_momentum_step`` and ``flat_momentum_step.backward``
are registered with their reference, C++ (``ext:``), Triton and CUDA implementations.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import flat_momentum as _reference
from . import _triton
from ._checks import check_flat_buffer, check_like, check_real
from ._flat_common import (
    adopt_step,
    check_out,
    check_state,
    check_step,
    differentiable_vjp,
    empty_outputs,
    hp_scalar,
    is_f64,
    launch,
)

__all__ = ["FlatMomentumStepFunction", "flat_momentum_step", "flat_momentum_step_"]

OP_NAME = "flat_momentum_step"
BACKWARD_OP = OP_NAME + ".backward"

tl = _triton.tl

# ---------------------------------------------------------------------------------------- kernels
#
# Float hyper-parameters are declared ``tl.float64`` and rounded once to the compute dtype by
# hp_scalar (see ._flat_common): compiled Triton would pass an undeclared Python float as float32.


@_triton.jit
def _momentum_forward_kernel(
    params_ptr, grad_ptr, buf_ptr, step_ptr, out_params_ptr, out_buf_ptr, n_elements,
    lr: tl.float64, momentum: tl.float64, dampening: tl.float64, weight_decay: tl.float64,
    NESTEROV: tl.constexpr, COMPUTE_F64: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    lr, momentum = hp_scalar(lr, ctype), hp_scalar(momentum, ctype)
    dampening, weight_decay = hp_scalar(dampening, ctype), hp_scalar(weight_decay, ctype)
    p = tl.load(params_ptr + offsets, mask=mask).to(ctype)
    d = tl.load(grad_ptr + offsets, mask=mask).to(ctype) + weight_decay * p
    b = tl.load(buf_ptr + offsets, mask=mask).to(ctype)
    first = tl.load(step_ptr) == 0
    new_b = tl.where(first, d, momentum * b + (1.0 - dampening) * d)
    if NESTEROV:
        direction = d + momentum * new_b
    else:
        direction = new_b
    tl.store(
        out_params_ptr + offsets,
        (p - lr * direction).to(out_params_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(out_buf_ptr + offsets, new_b, mask=mask)


@_triton.jit
def _momentum_backward_kernel(
    grad_new_params_ptr, grad_new_buf_ptr, step_ptr, grad_params_ptr, grad_grad_ptr,
    grad_buf_ptr, n_elements, lr: tl.float64, momentum: tl.float64, dampening: tl.float64,
    weight_decay: tl.float64,
    NESTEROV: tl.constexpr, WRITE_PARAMS: tl.constexpr, COMPUTE_F64: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    lr, momentum = hp_scalar(lr, ctype), hp_scalar(momentum, ctype)
    dampening, weight_decay = hp_scalar(dampening, ctype), hp_scalar(weight_decay, ctype)
    a = tl.load(grad_new_params_ptr + offsets, mask=mask).to(ctype)
    c = tl.load(grad_new_buf_ptr + offsets, mask=mask).to(ctype)
    first = tl.load(step_ptr) == 0
    if NESTEROV:
        g_new_b = c - lr * momentum * a
    else:
        g_new_b = c - lr * a
    g_d = tl.where(first, g_new_b, (1.0 - dampening) * g_new_b)
    if NESTEROV:
        g_d = g_d - lr * a
    g_b = tl.where(first, 0.0, momentum * g_new_b)
    if WRITE_PARAMS:
        tl.store(
            grad_params_ptr + offsets,
            (a + weight_decay * g_d).to(grad_params_ptr.dtype.element_ty),
            mask=mask,
        )
    tl.store(grad_grad_ptr + offsets, g_d.to(grad_grad_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_buf_ptr + offsets, g_b, mask=mask)


# -------------------------------------------------------------------------------------- launchers


def _triton_momentum_forward(
    params, grad, buf, step, lr, momentum, dampening, weight_decay, nesterov, out=None
):
    out = empty_outputs(params, buf) if out is None else out
    n = params.numel()
    if n:
        launch(
            _momentum_forward_kernel, n,
            (params, grad, buf, step, out[0], out[1], n,
             lr, momentum, 0.0 if nesterov else dampening, weight_decay),
            NESTEROV=nesterov, COMPUTE_F64=is_f64(params),
        )  # fmt: skip
    return out


def _triton_momentum_backward(
    grad_new_params, grad_new_buf, step, lr, momentum, dampening, weight_decay, nesterov
):
    write_params = weight_decay != 0.0
    grad_params = torch.empty_like(grad_new_params) if write_params else grad_new_params
    grad_grad = torch.empty_like(grad_new_params)
    grad_buf = torch.empty_like(grad_new_buf)
    n = grad_new_params.numel()
    if n:
        launch(
            _momentum_backward_kernel, n,
            (grad_new_params, grad_new_buf, step, grad_params, grad_grad, grad_buf, n, lr,
             momentum, 0.0 if nesterov else dampening, weight_decay),
            NESTEROV=nesterov, WRITE_PARAMS=write_params, COMPUTE_F64=is_f64(grad_new_params),
        )  # fmt: skip
    return grad_params, grad_grad, grad_buf


def _reference_backward(grad_new_params, grad_new_buf, step, *hp):
    """The reference twin's VJP in the backward kernels' signature (linear: values not needed)."""
    zeros = torch.zeros_like(grad_new_params)
    return _reference.flat_momentum_step_backward(
        grad_new_params, grad_new_buf, zeros, zeros, torch.zeros_like(grad_new_buf), step, *hp
    )


_backend.register_op(
    OP_NAME,
    reference=_reference.flat_momentum_step,
    cpu="ext:flat_momentum_step_forward",
    cuda="ext:flat_momentum_step_forward",
    triton=_triton_momentum_forward,
)
_backend.register_op(
    BACKWARD_OP,
    reference=_reference_backward,
    cpu="ext:flat_momentum_step_backward",
    cuda="ext:flat_momentum_step_backward",
    triton=_triton_momentum_backward,
)


# ------------------------------------------------------------------------------ autograd Function


class FlatMomentumStepFunction(torch.autograd.Function):
    """(params', buf') of momentum SGD; backward = one fused kernel, saves only ``step``."""

    @staticmethod
    def forward(ctx, params, grad, buf, step, hp, backend):
        ctx.save_for_backward(step)
        ctx.hp, ctx.backend = hp, backend
        return tuple(_backend.implementation(OP_NAME, backend)(params, grad, buf, step, *hp))

    @staticmethod
    def backward(ctx, grad_new_params, grad_new_buf):
        (step,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a differentiable VJP (linear, value-free)
            zeros = torch.zeros_like(grad_new_params)
            grads = differentiable_vjp(
                lambda p, g, b: _reference.flat_momentum_step(p, g, b, step, *ctx.hp),
                (zeros, zeros, torch.zeros_like(grad_new_buf)),
                (grad_new_params, grad_new_buf),
            )
            return (*grads, None, None, None)
        grads = _backend.implementation(BACKWARD_OP, ctx.backend)(
            grad_new_params.contiguous(), grad_new_buf.contiguous(), step, *ctx.hp
        )
        return (*grads, None, None, None)


# ------------------------------------------------------------------------------- public functions


def flat_momentum_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    momentum: float = 0.9,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One out-of-place momentum-SGD step on a flat buffer, fused and differentiable.

    torch.optim.SGD semantics: d = grad + weight_decay * params; the buffer becomes d on the first
    step (``step == 0``) and ``momentum * b + (1 - dampening) * d`` after; ``params' = params -
    lr * b'`` (Nesterov: ``params - lr * (d + momentum * b')``, dampening ignored). Gradients flow
    to params, grad and momentum_buffer through one fused backward kernel (first order).

    Args:
        params: (n_params,) contiguous float32, float64, float16 or bfloat16 buffer.
        grad: (n_params,) same dtype, size and device as ``params``.
        momentum_buffer: (n_params,) float32 state (float64 for float64 params).
        step: 0-d floating tensor on ``params.device``, the number of steps taken before this
            one (read by the kernel: no host copy; the caller increments it).
        lr: learning rate (finite). momentum: mu in [0, 1]. dampening: in [0, 1].
        weight_decay: L2 coefficient >= 0. nesterov: Nesterov momentum. Defaults 0.9, 0, 0, False.
        out: optional (params_out, buffer_out) to write into (may be the inputs: in place). Not
            differentiable: refused while an input requires grad under grad mode.

    Returns:
        (new_params (n_params,) in params.dtype, new_momentum_buffer (n_params,) state dtype).

    Raises:
        TypeError: wrong dtypes (state not float32/float64 as above), non-number hyper-parameters.
        ValueError: wrong shapes, sizes or devices, non-contiguous buffers, out-of-range values.
        BackendUnavailableError: a forced backend cannot run on ``params.device``.
    """
    check_flat_buffer(params, "params")
    check_like(params, "params", grad, "grad")
    check_state(params, momentum_buffer, "momentum_buffer")
    check_step(params, step)
    hp = (
        check_real(lr, "lr"),
        check_real(momentum, "momentum", minimum=0.0),
        check_real(dampening, "dampening", minimum=0.0),
        check_real(weight_decay, "weight_decay", minimum=0.0),
        bool(nesterov),
    )
    backend = _backend.resolve_backend(OP_NAME, params.device)
    inputs = (params, grad, momentum_buffer)
    if out is not None:
        check_out(params, (momentum_buffer,), out, inputs, ("params", "momentum_buffer"))
        forward = _backend.implementation(OP_NAME, backend)
        return tuple(forward(*inputs, step, *hp, out=tuple(out)))
    if backend == "reference":
        return _reference.flat_momentum_step(*inputs, step, *hp)
    return FlatMomentumStepFunction.apply(*inputs, step, hp, backend)


@torch.no_grad()
def flat_momentum_step_(
    params: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    momentum: float = 0.9,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> torch.Tensor:
    """In-place, non-differentiable :func:`flat_momentum_step`; then ``step += 1`` on its device.

    A ``step`` on another device than ``params`` is moved there in place, once.

    Returns:
        ``params`` (updated; momentum_buffer updated too).
    """
    adopt_step(params, step)
    flat_momentum_step(params, grad, momentum_buffer, step, lr, momentum, dampening,
                       weight_decay, nesterov, out=(params, momentum_buffer))  # fmt: skip
    step.add_(1)
    return params
