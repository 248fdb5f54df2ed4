"""flat_adam: fused Adam / AdamW updates (torch.optim semantics) on a flat parameter buffer, and
the meta update of SOPHON (global L2-norm clip + Adam) as one in-place op.

One kernel per update and one per backward, on a (n_params,) parameter buffer (float32, float64,
float16 or bfloat16) with float32 moments (float64 for float64 parameters); maths in the state
dtype. ``step`` is a 0-d tensor on the params' device, the number of updates taken before this
one, read by the kernel (t = step + 1; the bias corrections are computed on the device in float64
and rounded once, as torch.optim does on the host). With d = grad + wd * params:

    adam       m' = b1 m + (1-b1) d,  v' = b2 v + (1-b2) d^2
               p' = p - lr / (1 - b1^t) * m' / (sqrt(v') / sqrt(1 - b2^t) + eps)
    adamw      d = grad, and p decayed first: p <- p (1 - lr wd)
    clip_adam  grad scaled by min(1, max_norm / (||grad||_2 + 1e-6)) first (clip_grad_norm_)

Memory traffic per parameter at float32: forward 28 B (read p, g, m, v; write p', m', v'); fused
backward 40 B (read dp', dm', dv', g, m, v; write dp, dg, dm, dv), +4 B when L2 weight decay needs
p. The eager per-tensor differentiable update moves 84 B (8 ops) plus one launch per op per
tensor.

The backward saves grad, exp_avg, exp_avg_sq (the inputs; m', v' and the denominators are
recomputed) and params only when L2 weight decay puts params into d: saving the inputs rather
than the outputs keeps nothing alive that the caller's graph does not already hold. When the
backward itself is differentiated the Function switches to the reference twin's autograd VJP.

:func:`flat_clip_adam_step_` runs in two passes (sum of squares into a fixed number of partials,
then the update, which reduces them itself) with no host synchronisation.

Backends (:mod:`sophon_fast._backend`): ``flat_adam_step`` / ``flat_adamw_step`` (one forward
entry point, ``decoupled`` selects), ``flat_adam_step.backward`` and ``flat_clip_adam_step_``.
"""

from __future__ import annotations

import math

import torch

from .. import _backend
from ..reference import flat_adam as _reference
from ..reference.flat_common import state_dtype
from . import _triton
from ._checks import check_flat_buffer, check_like, check_real
from ._flat_common import (
    adopt_step,
    check_fraction,
    check_out,
    check_state,
    check_step,
    differentiable_vjp,
    empty_outputs,
    geometry,
    hp_scalar,
    is_f64,
    launch,
    safe_root,
)

__all__ = [
    "FlatAdamStepFunction",
    "flat_adam_step",
    "flat_adam_step_",
    "flat_adamw_step",
    "flat_clip_adam_step_",
]

OP_NAMES = ("flat_adam_step", "flat_adamw_step")
BACKWARD_OP = "flat_adam_step.backward"
CLIP_OP = "flat_clip_adam_step_"

# Partial sums of the clip norm: a fixed number of programs so the update kernel can reduce them
# itself (1024 floats per program, L2-resident) instead of the host reading the norm.
NORM_PARTIALS = 1024

tl = _triton.tl

# ---------------------------------------------------------------------------------------- kernels


@_triton.jit
def _adam_corrections(step_ptr, lr, log_beta1, log_beta2, ctype: tl.constexpr):
    # (lr / (1 - b1^t), sqrt(1 - b2^t)) in float64, rounded once (as torch.optim on the host).
    t = tl.load(step_ptr).to(tl.float64) + 1.0
    lr64 = hp_scalar(lr, tl.float64)
    step_size = (lr64 / (1.0 - tl.exp(t * hp_scalar(log_beta1, tl.float64)))).to(ctype)
    sqrt_bc2 = tl.sqrt(1.0 - tl.exp(t * hp_scalar(log_beta2, tl.float64))).to(ctype)
    return step_size, sqrt_bc2


@_triton.jit
def _adam_forward_kernel(
    params_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, step_ptr, partials_ptr,
    out_params_ptr, out_exp_avg_ptr, out_exp_avg_sq_ptr, n_elements,
    lr: tl.float64, beta1: tl.float64, beta2: tl.float64, log_beta1: tl.float64,
    log_beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64, max_norm: tl.float64,
    DECOUPLED: tl.constexpr, CLIP: tl.constexpr, N_PARTIALS: tl.constexpr,
    COMPUTE_F64: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    step_size, sqrt_bc2 = _adam_corrections(step_ptr, lr, log_beta1, log_beta2, ctype)
    lr, beta1, beta2 = hp_scalar(lr, ctype), hp_scalar(beta1, ctype), hp_scalar(beta2, ctype)
    eps, weight_decay = hp_scalar(eps, ctype), hp_scalar(weight_decay, ctype)
    p = tl.load(params_ptr + offsets, mask=mask).to(ctype)
    g = tl.load(grad_ptr + offsets, mask=mask).to(ctype)
    if CLIP:
        partials = tl.load(partials_ptr + tl.arange(0, N_PARTIALS))
        total_norm, _, _ = safe_root(tl.sum(partials, axis=0), COMPUTE_F64)
        g = g * tl.minimum(hp_scalar(max_norm, ctype) / (total_norm + 1e-6), 1.0)
    if DECOUPLED:
        p = p * (1.0 - lr * weight_decay)
        d = g
    else:
        d = g + weight_decay * p
    m = beta1 * tl.load(exp_avg_ptr + offsets, mask=mask).to(ctype) + (1.0 - beta1) * d
    v = beta2 * tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(ctype) + (1.0 - beta2) * d * d
    root, positive, divisor = safe_root(v, COMPUTE_F64)
    denom = root / sqrt_bc2 + eps
    new_p = p - step_size * m / denom
    tl.store(out_params_ptr + offsets, new_p.to(out_params_ptr.dtype.element_ty), mask=mask)
    tl.store(out_exp_avg_ptr + offsets, m, mask=mask)
    tl.store(out_exp_avg_sq_ptr + offsets, v, mask=mask)


@_triton.jit
def _adam_backward_kernel(
    grad_new_params_ptr, grad_new_exp_avg_ptr, grad_new_exp_avg_sq_ptr, params_ptr, grad_ptr,
    exp_avg_ptr, exp_avg_sq_ptr, step_ptr, grad_params_ptr, grad_grad_ptr, grad_exp_avg_ptr,
    grad_exp_avg_sq_ptr, n_elements, lr: tl.float64, beta1: tl.float64, beta2: tl.float64,
    log_beta1: tl.float64, log_beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64,
    DECOUPLED: tl.constexpr, NEEDS_PARAMS: tl.constexpr, COMPUTE_F64: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    step_size, sqrt_bc2 = _adam_corrections(step_ptr, lr, log_beta1, log_beta2, ctype)
    lr, beta1, beta2 = hp_scalar(lr, ctype), hp_scalar(beta1, ctype), hp_scalar(beta2, ctype)
    eps, weight_decay = hp_scalar(eps, ctype), hp_scalar(weight_decay, ctype)
    a = tl.load(grad_new_params_ptr + offsets, mask=mask).to(ctype)
    c_m = tl.load(grad_new_exp_avg_ptr + offsets, mask=mask).to(ctype)
    c_v = tl.load(grad_new_exp_avg_sq_ptr + offsets, mask=mask).to(ctype)
    d = tl.load(grad_ptr + offsets, mask=mask).to(ctype)
    if NEEDS_PARAMS:
        d = d + weight_decay * tl.load(params_ptr + offsets, mask=mask).to(ctype)
    m = beta1 * tl.load(exp_avg_ptr + offsets, mask=mask).to(ctype) + (1.0 - beta1) * d
    v = beta2 * tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(ctype) + (1.0 - beta2) * d * d
    root, positive, divisor = safe_root(v, COMPUTE_F64)
    denom = root / sqrt_bc2 + eps
    g_m = c_m - a * step_size / denom
    # d root / d v = 1 / (2 root) for v > 0 and 0 at v = 0 (the zero-safe square root).
    through_root = a * step_size * m / (denom * denom) / sqrt_bc2 * 0.5 / divisor
    g_v = c_v + tl.where(positive, through_root, 0.0)
    g_d = (1.0 - beta1) * g_m + (1.0 - beta2) * 2.0 * d * g_v
    if DECOUPLED:
        g_p = a * (1.0 - lr * weight_decay)
    else:
        g_p = a + weight_decay * g_d
    tl.store(grad_params_ptr + offsets, g_p.to(grad_params_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_grad_ptr + offsets, g_d.to(grad_grad_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_exp_avg_ptr + offsets, beta1 * g_m, mask=mask)
    tl.store(grad_exp_avg_sq_ptr + offsets, beta2 * g_v, mask=mask)


@_triton.jit
def _sum_of_squares_kernel(
    x_ptr, partials_ptr, n_elements, COMPUTE_F64: tl.constexpr, BLOCK_SIZE: tl.constexpr
):
    # Program i sums blocks i, i + N, i + 2N, ...: a fixed grid of N partials for any size.
    # A while loop: range() with tensor bounds fails under triton 3.6's interpreter ("only
    # 0-dimensional arrays can be converted to Python scalars"). 64-bit offsets past 2^31.
    pid = tl.program_id(0).to(tl.int64)
    stride = tl.num_programs(0).to(tl.int64) * BLOCK_SIZE
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    acc = tl.zeros((BLOCK_SIZE,), dtype=ctype)
    start = pid * BLOCK_SIZE
    while start < n_elements:
        offsets = start + tl.arange(0, BLOCK_SIZE)
        x = tl.load(x_ptr + offsets, mask=offsets < n_elements, other=0.0).to(ctype)
        acc += x * x
        start += stride
    tl.store(partials_ptr + pid, tl.sum(acc, axis=0))


# -------------------------------------------------------------------------------------- launchers


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0.0 else -math.inf


def _triton_adam_forward(
    params, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, decoupled,
    out=None, max_norm=None,
):  # fmt: skip
    out = empty_outputs(params, exp_avg, exp_avg_sq) if out is None else out
    n = params.numel()
    partials = None
    if max_norm is not None:
        partials = torch.empty(NORM_PARTIALS, dtype=state_dtype(params.dtype), device=params.device)
        block, warps = geometry()
        with _triton.launch_device(grad):
            _sum_of_squares_kernel[(NORM_PARTIALS,)](
                grad, partials, n, COMPUTE_F64=is_f64(params), BLOCK_SIZE=block, num_warps=warps
            )
    if n:
        launch(
            _adam_forward_kernel, n,
            (params, grad, exp_avg, exp_avg_sq, step,
             partials if partials is not None else exp_avg, out[0], out[1], out[2], n,
             lr, beta1, beta2, _log(beta1), _log(beta2), eps, weight_decay,
             0.0 if max_norm is None else max_norm),
            DECOUPLED=decoupled, CLIP=max_norm is not None, N_PARTIALS=NORM_PARTIALS,
            COMPUTE_F64=is_f64(params),
        )  # fmt: skip
    return out, partials


def _triton_adam_backward(
    grad_new_params, grad_new_exp_avg, grad_new_exp_avg_sq, params, grad, exp_avg, exp_avg_sq,
    step, lr, beta1, beta2, eps, weight_decay, decoupled,
):  # fmt: skip
    grad_params, grad_grad = torch.empty_like(grad), torch.empty_like(grad)
    grad_exp_avg, grad_exp_avg_sq = torch.empty_like(exp_avg), torch.empty_like(exp_avg_sq)
    n = grad.numel()
    needs_params = params is not None
    if n:
        launch(
            _adam_backward_kernel, n,
            (grad_new_params, grad_new_exp_avg, grad_new_exp_avg_sq,
             params if needs_params else grad, grad, exp_avg, exp_avg_sq, step, grad_params,
             grad_grad, grad_exp_avg, grad_exp_avg_sq, n, lr, beta1, beta2, _log(beta1),
             _log(beta2), eps, weight_decay),
            DECOUPLED=decoupled, NEEDS_PARAMS=needs_params, COMPUTE_F64=is_f64(grad),
        )  # fmt: skip
    return grad_params, grad_grad, grad_exp_avg, grad_exp_avg_sq


def _triton_clip_adam_step_(
    params, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, max_norm
):
    _, partials = _triton_adam_forward(
        params, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, False,
        out=(params, exp_avg, exp_avg_sq), max_norm=max_norm,
    )  # fmt: skip
    step.add_(1)
    if partials is None:
        return torch.linalg.vector_norm(grad.to(state_dtype(grad.dtype)))
    return partials.sum().sqrt()


def _reference_forward(params, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps,
                       weight_decay, decoupled, out=None):  # fmt: skip
    """The reference twin in the forward kernels' signature."""
    twin = _reference.flat_adamw_step if decoupled else _reference.flat_adam_step
    args = (params, grad, exp_avg, exp_avg_sq, step, lr, (beta1, beta2), eps, weight_decay)
    return twin(*args, out=out)


def _triton_forward(*args, out=None):
    return _triton_adam_forward(*args, out=out)[0]


def _reference_backward(grad_new_params, grad_new_exp_avg, grad_new_exp_avg_sq, params, grad,
                        exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay,
                        decoupled):  # fmt: skip
    """The reference twin's VJP in the backward kernels' signature (params None: not needed)."""
    return _reference.flat_adam_step_backward(
        grad_new_params, grad_new_exp_avg, grad_new_exp_avg_sq,
        torch.zeros_like(grad) if params is None else params, grad, exp_avg, exp_avg_sq, step,
        lr, (beta1, beta2), eps, weight_decay, decoupled,
    )  # fmt: skip


def _reference_clip(params, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay,
                    max_norm):  # fmt: skip
    return _reference.flat_clip_adam_step_(
        params, grad, exp_avg, exp_avg_sq, step, lr, (beta1, beta2), eps, weight_decay, max_norm
    )


for _op in OP_NAMES:
    _backend.register_op(
        _op,
        reference=_reference_forward,
        cpu="ext:flat_adam_step_forward",
        cuda="ext:flat_adam_step_forward",
        triton=_triton_forward,
    )
_backend.register_op(
    BACKWARD_OP,
    reference=_reference_backward,
    cpu="ext:flat_adam_step_backward",
    cuda="ext:flat_adam_step_backward",
    triton=_triton_adam_backward,
)
_backend.register_op(
    CLIP_OP,
    reference=_reference_clip,
    cpu="ext:flat_clip_adam_step_",
    cuda="ext:flat_clip_adam_step_",
    triton=_triton_clip_adam_step_,
)


# ------------------------------------------------------------------------------ autograd Function


class FlatAdamStepFunction(torch.autograd.Function):
    """(params', exp_avg', exp_avg_sq') of Adam/AdamW; backward = one fused kernel.

    Saves grad, exp_avg, exp_avg_sq and step; params only for L2 weight decay (it enters d).
    """

    @staticmethod
    def forward(ctx, params, grad, exp_avg, exp_avg_sq, step, hp, backend):
        lr, beta1, beta2, eps, weight_decay, decoupled = hp
        needs_params = weight_decay != 0.0 and not decoupled
        ctx.needs_params = needs_params
        ctx.save_for_backward(params if needs_params else None, grad, exp_avg, exp_avg_sq, step)
        ctx.hp, ctx.backend = hp, backend
        forward = _backend.implementation(OP_NAMES[decoupled], backend)
        return tuple(forward(params, grad, exp_avg, exp_avg_sq, step, *hp))

    @staticmethod
    def backward(ctx, grad_new_params, grad_new_exp_avg, grad_new_exp_avg_sq):
        params, grad, exp_avg, exp_avg_sq, step = ctx.saved_tensors
        if torch.is_grad_enabled():
            lr, beta1, beta2, eps, weight_decay, decoupled = ctx.hp
            grads = differentiable_vjp(
                lambda p, g, m, v: _reference.adam_update(
                    p, g, m, v, step, lr, (beta1, beta2), eps, weight_decay, decoupled
                ),
                (params if ctx.needs_params else torch.zeros_like(grad), grad, exp_avg, exp_avg_sq),
                (grad_new_params, grad_new_exp_avg, grad_new_exp_avg_sq),
            )
            return (*grads, None, None, None)
        grads = _backend.implementation(BACKWARD_OP, ctx.backend)(
            grad_new_params.contiguous(), grad_new_exp_avg.contiguous(),
            grad_new_exp_avg_sq.contiguous(), params if ctx.needs_params else None, grad,
            exp_avg, exp_avg_sq, step, *ctx.hp,
        )  # fmt: skip
        return (*grads, None, None, None)


# ------------------------------------------------------------------------------- public functions


def _adam_public(params, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay,
                 decoupled, out, op):  # fmt: skip
    check_flat_buffer(params, "params")
    check_like(params, "params", grad, "grad")
    check_state(params, exp_avg, "exp_avg")
    check_state(params, exp_avg_sq, "exp_avg_sq")
    check_step(params, step)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    hp = (
        check_real(lr, "lr"),
        check_fraction(betas[0], "betas[0]"),
        check_fraction(betas[1], "betas[1]"),
        check_real(eps, "eps", minimum=0.0),
        check_real(weight_decay, "weight_decay", minimum=0.0),
        decoupled,
    )
    backend = _backend.resolve_backend(op, params.device)
    inputs = (params, grad, exp_avg, exp_avg_sq)
    reference = _reference.flat_adamw_step if decoupled else _reference.flat_adam_step
    ref_args = (*inputs, step, hp[0], hp[1:3], hp[3], hp[4])
    if out is not None:
        check_out(params, (exp_avg, exp_avg_sq), out, inputs, ("params", "exp_avg", "exp_avg_sq"))
        forward = _backend.implementation(op, backend)
        return tuple(forward(*inputs, step, *hp, out=tuple(out)))
    if backend == "reference":
        return reference(*ref_args)
    return FlatAdamStepFunction.apply(*inputs, step, hp, backend)


def flat_adam_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One out-of-place Adam step on a flat buffer, fused and differentiable.

    torch.optim.Adam semantics (L2 weight decay added to the gradient, bias correction with
    t = step + 1 computed on the device). Gradients flow to params, grad, exp_avg and exp_avg_sq
    through one fused backward kernel (first order).

    Args:
        params: (n_params,) contiguous float32, float64, float16 or bfloat16 buffer.
        grad: (n_params,) same dtype, size and device as ``params``.
        exp_avg, exp_avg_sq: (n_params,) float32 moments (float64 for float64 params).
        step: 0-d floating tensor on ``params.device``, steps taken before this one (the
            caller increments it).
        lr: learning rate. betas: (beta1, beta2), each in [0, 1). eps: > 0 added to the
            bias-corrected root. weight_decay: L2 coefficient >= 0. Defaults (0.9, 0.999), 1e-8, 0.
        out: optional (params_out, exp_avg_out, exp_avg_sq_out), possibly the inputs (in place).
            Not differentiable.

    Returns:
        (new_params in params.dtype, new_exp_avg, new_exp_avg_sq), each (n_params,).

    Raises:
        TypeError / ValueError / BackendUnavailableError: as :func:`flat_momentum_step`.
    """
    return _adam_public(params, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay,
                        False, out, "flat_adam_step")  # fmt: skip


def flat_adamw_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    *,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One out-of-place AdamW step (decoupled decay: p <- p * (1 - lr * weight_decay) first).

    Same arguments, returns and errors as :func:`flat_adam_step`; weight_decay defaults to 1e-2
    as in torch.optim.AdamW.
    """
    return _adam_public(params, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay,
                        True, out, "flat_adamw_step")  # fmt: skip


@torch.no_grad()
def flat_adam_step_(
    params: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> torch.Tensor:
    """In-place, non-differentiable Adam (AdamW when ``decoupled``); then ``step += 1``.

    A ``step`` on another device than ``params`` is moved there in place, once.

    Returns:
        ``params`` (updated; exp_avg and exp_avg_sq updated too).
    """
    out = (params, exp_avg, exp_avg_sq)
    fn = flat_adamw_step if decoupled else flat_adam_step
    adopt_step(params, step)
    fn(params, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay, out=out)
    step.add_(1)
    return params


@torch.no_grad()
def flat_clip_adam_step_(
    params: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    max_norm: float | None = None,
) -> torch.Tensor:
    """Clip ``grad`` to global L2 norm ``max_norm``, then one in-place Adam step; ``step += 1``.

    The meta update of SOPHON in two passes (sum of squares, then update), with no host
    synchronisation: the clip coefficient min(1, max_norm / (norm + 1e-6)) (that of
    torch.nn.utils.clip_grad_norm_) is computed on the device, so the step can be captured in a
    CUDA graph. ``grad`` itself is not modified.

    Args:
        params: (n_params,) parameters, updated in place (float32/float64/float16/bfloat16).
        grad: (n_params,) gradient, same dtype as ``params``.
        exp_avg, exp_avg_sq: (n_params,) state-dtype moments, updated in place.
        step: 0-d floating tensor, incremented in place; moved to ``params.device`` in place
            the first time it is elsewhere (torch.optim.Adam keeps it on the CPU).
        lr, betas, eps, weight_decay: as :func:`flat_adam_step`.
        max_norm: clip threshold > 0, or None for no clipping.

    Returns:
        0-d total L2 norm of ``grad`` before clipping, in the state dtype (a device tensor).

    Raises:
        TypeError / ValueError / BackendUnavailableError: as :func:`flat_momentum_step`.
    """
    check_flat_buffer(params, "params")
    check_like(params, "params", grad, "grad")
    check_state(params, exp_avg, "exp_avg")
    check_state(params, exp_avg_sq, "exp_avg_sq")
    adopt_step(params, step)
    check_step(params, step)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    lr = check_real(lr, "lr")
    beta1, beta2 = check_fraction(betas[0], "betas[0]"), check_fraction(betas[1], "betas[1]")
    eps = check_real(eps, "eps", minimum=0.0)
    weight_decay = check_real(weight_decay, "weight_decay", minimum=0.0)
    if max_norm is not None:
        max_norm = check_real(max_norm, "max_norm", minimum=0.0)
    clip_adam = _backend.resolve(CLIP_OP, params.device)
    return clip_adam(
        params, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, max_norm
    )
