"""flat_adagrad: fused Adagrad updates (torch.optim.Adagrad semantics) on a flat parameter buffer.

One kernel per update and one per backward, on a (n_params,) parameter buffer (float32, float64,
float16 or bfloat16) with a float32 sum of squares (float64 for float64 parameters); maths in the
state dtype. ``step`` is a 0-d tensor on the params' device, the number of updates taken before
this one, read by the kernel (t = step + 1; the decayed learning rate is computed on the device in
float64 and rounded once, as torch.optim does on the host). With d = grad + wd * params:

    clr = lr / (1 + (t - 1) lr_decay),   s' = s + d^2,   p' = p - clr d / (sqrt(s') + eps)

Memory traffic per parameter at float32: forward 20 B (read p, g, s; write p', s'); fused
backward 28 B (read dp', ds', g, s; write dp, dg, ds), +4 B with weight decay. The eager
per-tensor differentiable update moves 48 B (addcmul, sqrt, add, addcdiv) plus one launch per op
per tensor.

The backward saves step, grad and state_sum (params only with weight decay); s' and the root are
recomputed in the backward kernel. When the backward itself is differentiated the Function
switches to the reference twin's autograd VJP.

Backends (:mod:`sophon_fast._backend`): ``flat_adagrad_step`` and ``flat_adagrad_step.backward``
(``params`` None in the backward when weight_decay is 0).
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import flat_adagrad as _reference
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
    safe_root,
)

__all__ = ["FlatAdagradStepFunction", "flat_adagrad_step", "flat_adagrad_step_"]

OP_NAME = "flat_adagrad_step"
BACKWARD_OP = OP_NAME + ".backward"

tl = _triton.tl

# ---------------------------------------------------------------------------------------- kernels
#
# Float hyper-parameters are declared ``tl.float64`` and rounded once to the compute dtype by
# hp_scalar (see ._flat_common): compiled Triton would pass an undeclared Python float as float32.


@_triton.jit
def _adagrad_learning_rate(step_ptr, lr, lr_decay, ctype: tl.constexpr):
    # lr / (1 + step * lr_decay) in float64, rounded once (as torch.optim on the host).
    step = tl.load(step_ptr).to(tl.float64)
    lr64, decay64 = hp_scalar(lr, tl.float64), hp_scalar(lr_decay, tl.float64)
    return (lr64 / (1.0 + step * decay64)).to(ctype)


@_triton.jit
def _adagrad_forward_kernel(
    params_ptr, grad_ptr, sum_ptr, step_ptr, out_params_ptr, out_sum_ptr, n_elements,
    lr: tl.float64, lr_decay: tl.float64, weight_decay: tl.float64, eps: tl.float64,
    COMPUTE_F64: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    clr = _adagrad_learning_rate(step_ptr, lr, lr_decay, ctype)
    eps, weight_decay = hp_scalar(eps, ctype), hp_scalar(weight_decay, ctype)
    p = tl.load(params_ptr + offsets, mask=mask).to(ctype)
    d = tl.load(grad_ptr + offsets, mask=mask).to(ctype) + weight_decay * p
    s = tl.load(sum_ptr + offsets, mask=mask).to(ctype) + d * d
    root, positive, divisor = safe_root(s, COMPUTE_F64)
    new_p = p - clr * d / (root + eps)
    tl.store(out_params_ptr + offsets, new_p.to(out_params_ptr.dtype.element_ty), mask=mask)
    tl.store(out_sum_ptr + offsets, s, mask=mask)


@_triton.jit
def _adagrad_backward_kernel(
    grad_new_params_ptr, grad_new_sum_ptr, params_ptr, grad_ptr, sum_ptr, step_ptr,
    grad_params_ptr, grad_grad_ptr, grad_sum_ptr, n_elements, lr: tl.float64,
    lr_decay: tl.float64, weight_decay: tl.float64, eps: tl.float64,
    NEEDS_PARAMS: tl.constexpr, COMPUTE_F64: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    clr = _adagrad_learning_rate(step_ptr, lr, lr_decay, ctype)
    eps, weight_decay = hp_scalar(eps, ctype), hp_scalar(weight_decay, ctype)
    a = tl.load(grad_new_params_ptr + offsets, mask=mask).to(ctype)
    c_s = tl.load(grad_new_sum_ptr + offsets, mask=mask).to(ctype)
    d = tl.load(grad_ptr + offsets, mask=mask).to(ctype)
    if NEEDS_PARAMS:
        d = d + weight_decay * tl.load(params_ptr + offsets, mask=mask).to(ctype)
    s = tl.load(sum_ptr + offsets, mask=mask).to(ctype) + d * d
    root, positive, divisor = safe_root(s, COMPUTE_F64)
    denom = root + eps
    g_s = c_s + tl.where(positive, a * clr * d / (denom * denom) * 0.5 / divisor, 0.0)
    g_d = -clr * a / denom + 2.0 * d * g_s
    g_p = a + weight_decay * g_d
    tl.store(grad_params_ptr + offsets, g_p.to(grad_params_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_grad_ptr + offsets, g_d.to(grad_grad_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_sum_ptr + offsets, g_s, mask=mask)


# -------------------------------------------------------------------------------------- launchers


def _triton_adagrad_forward(
    params, grad, state_sum, step, lr, lr_decay, weight_decay, eps, out=None
):
    out = empty_outputs(params, state_sum) if out is None else out
    n = params.numel()
    if n:
        launch(
            _adagrad_forward_kernel, n,
            (params, grad, state_sum, step, out[0], out[1], n, lr, lr_decay, weight_decay, eps),
            COMPUTE_F64=is_f64(params),
        )  # fmt: skip
    return tuple(out)


def _triton_adagrad_backward(
    grad_new_params, grad_new_sum, params, grad, state_sum, step, lr, lr_decay, weight_decay, eps
):
    grad_params, grad_grad = torch.empty_like(grad), torch.empty_like(grad)
    grad_sum = torch.empty_like(state_sum)
    needs_params = params is not None
    n = grad.numel()
    if n:
        launch(
            _adagrad_backward_kernel, n,
            (grad_new_params, grad_new_sum, params if needs_params else grad, grad, state_sum,
             step, grad_params, grad_grad, grad_sum, n, lr, lr_decay, weight_decay, eps),
            NEEDS_PARAMS=needs_params, COMPUTE_F64=is_f64(grad),
        )  # fmt: skip
    return grad_params, grad_grad, grad_sum


def _reference_backward(grad_new_params, grad_new_sum, params, grad, state_sum, step, *hp):
    """The reference twin's VJP in the backward kernels' signature (params None: not needed)."""
    return _reference.flat_adagrad_step_backward(
        grad_new_params, grad_new_sum, torch.zeros_like(grad) if params is None else params,
        grad, state_sum, step, *hp,
    )  # fmt: skip


_backend.register_op(
    OP_NAME,
    reference=_reference.flat_adagrad_step,
    cpu="ext:flat_adagrad_step_forward",
    cuda="ext:flat_adagrad_step_forward",
    triton=_triton_adagrad_forward,
)
_backend.register_op(
    BACKWARD_OP,
    reference=_reference_backward,
    cpu="ext:flat_adagrad_step_backward",
    cuda="ext:flat_adagrad_step_backward",
    triton=_triton_adagrad_backward,
)


# ------------------------------------------------------------------------------ autograd Function


class FlatAdagradStepFunction(torch.autograd.Function):
    """(params', state_sum') of Adagrad; backward = one fused kernel.

    Saves step, grad and state_sum; params only with weight decay.
    """

    @staticmethod
    def forward(ctx, params, grad, state_sum, step, hp, backend):
        ctx.needs_params = hp[2] != 0.0
        ctx.save_for_backward(params if ctx.needs_params else None, grad, state_sum, step)
        ctx.hp, ctx.backend = hp, backend
        forward = _backend.implementation(OP_NAME, backend)
        return tuple(forward(params, grad, state_sum, step, *hp))

    @staticmethod
    def backward(ctx, grad_new_params, grad_new_sum):
        params, grad, state_sum, step = ctx.saved_tensors
        if torch.is_grad_enabled():
            p = params if ctx.needs_params else torch.zeros_like(grad)
            grads = differentiable_vjp(
                lambda p, g, s: _reference.flat_adagrad_step(p, g, s, step, *ctx.hp),
                (p, grad, state_sum),
                (grad_new_params, grad_new_sum),
            )
            return (*grads, None, None, None)
        grads = _backend.implementation(BACKWARD_OP, ctx.backend)(
            grad_new_params.contiguous(), grad_new_sum.contiguous(),
            params if ctx.needs_params else None, grad, state_sum, step, *ctx.hp,
        )  # fmt: skip
        return (*grads, None, None, None)


# ------------------------------------------------------------------------------- public functions


def flat_adagrad_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    state_sum: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One out-of-place Adagrad step on a flat buffer, fused and differentiable.

    torch.optim.Adagrad semantics: d = grad + weight_decay * params, ``state_sum' = state_sum +
    d^2``, ``params' = params - clr * d / (sqrt(state_sum') + eps)`` with ``clr = lr / (1 + step *
    lr_decay)``. Gradients flow to params, grad and state_sum through one fused backward kernel
    (first order). torch's ``initial_accumulator_value`` is the caller's starting ``state_sum``.

    Args:
        params: (n_params,) contiguous float32, float64, float16 or bfloat16 buffer.
        grad: (n_params,) same dtype, size and device as ``params``.
        state_sum: (n_params,) float32 state (float64 for float64 params).
        step: 0-d floating tensor on ``params.device``, the number of steps taken before this
            one (read by the kernel: no host copy; the caller increments it).
        lr: learning rate. lr_decay: >= 0. weight_decay: L2 >= 0. eps: >= 0. Defaults 0, 0,
            1e-10.
        out: optional (params_out, state_sum_out) to write into (may be the inputs: in place).
            Not differentiable: refused while an input requires grad under grad mode.

    Returns:
        (new_params (n_params,) in params.dtype, new_state_sum (n_params,) state dtype).

    Raises:
        TypeError / ValueError / BackendUnavailableError: as :func:`flat_momentum_step`.
    """
    check_flat_buffer(params, "params")
    check_like(params, "params", grad, "grad")
    check_state(params, state_sum, "state_sum")
    check_step(params, step)
    hp = (
        check_real(lr, "lr"),
        check_real(lr_decay, "lr_decay", minimum=0.0),
        check_real(weight_decay, "weight_decay", minimum=0.0),
        check_real(eps, "eps", minimum=0.0),
    )
    backend = _backend.resolve_backend(OP_NAME, params.device)
    inputs = (params, grad, state_sum)
    if out is not None:
        check_out(params, (state_sum,), out, inputs, ("params", "state_sum"))
        forward = _backend.implementation(OP_NAME, backend)
        return tuple(forward(*inputs, step, *hp, out=tuple(out)))
    if backend == "reference":
        return _reference.flat_adagrad_step(*inputs, step, *hp)
    return FlatAdagradStepFunction.apply(*inputs, step, hp, backend)


@torch.no_grad()
def flat_adagrad_step_(
    params: torch.Tensor,
    grad: torch.Tensor,
    state_sum: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
) -> torch.Tensor:
    """In-place, non-differentiable :func:`flat_adagrad_step`; then ``step += 1`` on its device.

    A ``step`` on another device than ``params`` is moved there in place, once.

    Returns:
        ``params`` (updated; state_sum updated too).
    """
    adopt_step(params, step)
    flat_adagrad_step(params, grad, state_sum, step, lr, lr_decay, weight_decay, eps,
                      out=(params, state_sum))  # fmt: skip
    step.add_(1)
    return params
