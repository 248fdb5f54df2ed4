"""Pure-PyTorch twins of :mod:`sophon_fast.ops.flat_optim` (oracle, baseline and fallback).

Stateful flat optimizer updates on a (n_params,) parameter buffer with float32 state (float64 for
float64 parameters). ``step`` is the 0-d count of updates taken *before* this one (a tensor, so
nothing reads it on the host); t = step + 1. With d = grad + weight_decay * params:

    momentum   b' = d if step == 0 else mu * b + (1 - dampening) * d
               p' = p - lr * (d + mu * b' if nesterov else b')
    adam       m' = b1 m + (1-b1) d,   v' = b2 v + (1-b2) d^2
               p' = p - lr / (1 - b1^t) * m' / (sqrt(v') / sqrt(1 - b2^t) + eps)
    adamw      as adam with d = grad and p decayed first: p <- p * (1 - lr * weight_decay)
    rmsprop    v' = a v + (1-a) d^2,  g' = a g + (1-a) d (centered only)
               p' = p - lr * d / (sqrt(v' - g'^2 if centered else v') + eps)

The formulas, and the order of the operations, are those of the engine's pure-torch inner
optimizers (:mod:`sophon_fast.engine.optimizers`) and of ``torch.optim``. Square roots are
zero-safe (derivative 0 at 0, not inf). Maths in the state dtype; new parameters are cast back to
the parameter dtype. Differentiable to any order by autograd; the ``*_backward`` twins are the
vector-Jacobian products the fused backward kernels compute.
"""

from __future__ import annotations

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 parameters, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x) for x >= 0 with derivative 0 (not inf) at 0; 0 for x <= 0."""
    positive = x > 0
    return torch.where(
        positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x)
    )


def _write(out, value):
    return value if out is None else out.copy_(value)


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
    """Momentum SGD step -> (new_params (n,) params.dtype, new_momentum_buffer (n,) state dtype)."""
    dtype = state_dtype(params.dtype)
    p, d = params.to(dtype), grad.to(dtype)
    if weight_decay:
        d = d + weight_decay * p
    dampening = 0.0 if nesterov else dampening
    buf = torch.where(
        step.to(device=params.device) == 0, d, momentum * momentum_buffer + (1.0 - dampening) * d
    )
    direction = d + momentum * buf if nesterov else buf
    new = (p - lr * direction).to(params.dtype)
    if out is None:
        return new, buf
    return out[0].copy_(new), out[1].copy_(buf)


def adam_bias_corrections(step, lr, betas, dtype, device):
    """(lr / (1 - b1^t), sqrt(1 - b2^t)) as 0-d ``dtype`` tensors, t = step + 1.

    Computed in float64 and rounded once, as torch.optim.Adam does on the host: in float32,
    1 - 0.999^t would otherwise lose 1e-5 of its value to the rounding of 0.999^t.
    """
    t = step.to(device=device, dtype=torch.float64) + 1
    bias_correction1 = 1.0 - torch.pow(betas[0], t)
    bias_correction2 = 1.0 - torch.pow(betas[1], t)
    return (lr / bias_correction1).to(dtype), bias_correction2.sqrt().to(dtype)


def _adam(params, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay, decoupled):
    dtype = state_dtype(params.dtype)
    p, d = params.to(dtype), grad.to(dtype)
    beta1, beta2 = betas
    if decoupled:
        p = p * (1.0 - lr * weight_decay)
    elif weight_decay:
        d = d + weight_decay * p
    new_exp_avg = beta1 * exp_avg + (1.0 - beta1) * d
    new_exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * d * d
    step_size, sqrt_bias_correction2 = adam_bias_corrections(step, lr, betas, dtype, params.device)
    denom = safe_sqrt(new_exp_avg_sq) / sqrt_bias_correction2 + eps
    new = p - step_size * new_exp_avg / denom
    return new.to(params.dtype), new_exp_avg, new_exp_avg_sq


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
    """Adam step (L2 decay in the gradient) -> (new_params, new_exp_avg, new_exp_avg_sq)."""
    result = _adam(params, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay, False)
    return result if out is None else tuple(o.copy_(r) for o, r in zip(out, result))


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
    """AdamW step (decoupled decay) -> (new_params, new_exp_avg, new_exp_avg_sq)."""
    result = _adam(params, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay, True)
    return result if out is None else tuple(o.copy_(r) for o, r in zip(out, result))


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
    """RMSprop step -> (new_params, new_square_avg[, new_grad_avg]); centered iff grad_avg given."""
    dtype = state_dtype(params.dtype)
    p, d = params.to(dtype), grad.to(dtype)
    if weight_decay:
        d = d + weight_decay * p
    new_square_avg = alpha * square_avg + (1.0 - alpha) * d * d
    if grad_avg is not None:
        new_grad_avg = alpha * grad_avg + (1.0 - alpha) * d
        avg = safe_sqrt(new_square_avg - new_grad_avg * new_grad_avg)
        result = (None, new_square_avg, new_grad_avg)
    else:
        avg = safe_sqrt(new_square_avg)
        result = (None, new_square_avg)
    new = (p - lr * d / (avg + eps)).to(params.dtype)
    result = (new, *result[1:])
    return result if out is None else tuple(o.copy_(r) for o, r in zip(out, result))


def _vjp(forward, inputs, grad_outputs):
    """Vector-Jacobian products of ``forward`` at ``inputs`` (zeros where an input is unused)."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(True) for x in inputs]
        outputs = forward(*leaves)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
        grads = torch.autograd.grad(
            [o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True
        )
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads))


def flat_momentum_step_backward(
    grad_new_params, grad_new_buffer, params, grad, momentum_buffer, step, lr, momentum=0.9,
    dampening=0.0, weight_decay=0.0, nesterov=False,
):  # fmt: skip
    """(d_params, d_grad, d_momentum_buffer) of :func:`flat_momentum_step`."""
    return _vjp(
        lambda p, g, b: flat_momentum_step(
            p, g, b, step, lr, momentum, dampening, weight_decay, nesterov
        ),
        (params, grad, momentum_buffer),
        (grad_new_params, grad_new_buffer),
    )


def flat_adam_step_backward(
    grad_new_params, grad_new_exp_avg, grad_new_exp_avg_sq, params, grad, exp_avg, exp_avg_sq,
    step, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False,
):  # fmt: skip
    """(d_params, d_grad, d_exp_avg, d_exp_avg_sq) of :func:`flat_adam_step` (adamw: decoupled)."""
    return _vjp(
        lambda p, g, m, v: _adam(p, g, m, v, step, lr, betas, eps, weight_decay, decoupled),
        (params, grad, exp_avg, exp_avg_sq),
        (grad_new_params, grad_new_exp_avg, grad_new_exp_avg_sq),
    )


def flat_rmsprop_step_backward(
    grad_outputs, params, grad, square_avg, lr, alpha=0.99, eps=1e-8, weight_decay=0.0,
    grad_avg=None,
):  # fmt: skip
    """(d_params, d_grad, d_square_avg[, d_grad_avg]) of :func:`flat_rmsprop_step`."""
    inputs = (params, grad, square_avg) + (() if grad_avg is None else (grad_avg,))

    def forward(p, g, v, *rest):
        return flat_rmsprop_step(
            p, g, v, lr, alpha, eps, weight_decay, grad_avg=rest[0] if rest else None
        )

    return _vjp(forward, inputs, grad_outputs)


@torch.no_grad()
def flat_momentum_step_(params, grad, momentum_buffer, step, lr, momentum=0.9, dampening=0.0,
                        weight_decay=0.0, nesterov=False):  # fmt: skip
    """In-place momentum step: updates params and momentum_buffer, step += 1. Returns params."""
    flat_momentum_step(
        params, grad, momentum_buffer, step, lr, momentum, dampening, weight_decay, nesterov,
        out=(params, momentum_buffer),
    )  # fmt: skip
    step.add_(1)
    return params


@torch.no_grad()
def flat_adam_step_(params, grad, exp_avg, exp_avg_sq, step, lr, betas=(0.9, 0.999), eps=1e-8,
                    weight_decay=0.0, decoupled=False):  # fmt: skip
    """In-place Adam/AdamW step: updates params, exp_avg, exp_avg_sq, step += 1. Returns params."""
    result = _adam(params, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay, decoupled)
    for o, r in zip((params, exp_avg, exp_avg_sq), result):
        o.copy_(r)
    step.add_(1)
    return params


@torch.no_grad()
def flat_rmsprop_step_(params, grad, square_avg, lr, alpha=0.99, eps=1e-8, weight_decay=0.0, *,
                       grad_avg=None):  # fmt: skip
    """In-place RMSprop step: updates params, square_avg (and grad_avg). Returns params."""
    targets = (params, square_avg) + (() if grad_avg is None else (grad_avg,))
    flat_rmsprop_step(
        params, grad, square_avg, lr, alpha, eps, weight_decay, grad_avg=grad_avg, out=targets
    )
    return params


def clip_coefficient(total_norm: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """min(1, max_norm / (total_norm + 1e-6)) as torch.nn.utils.clip_grad_norm_; 1 without clip."""
    if max_norm is None:
        return torch.ones_like(total_norm)
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


@torch.no_grad()
def flat_clip_adam_step_(params, grad, exp_avg, exp_avg_sq, step, lr, betas=(0.9, 0.999),
                         eps=1e-8, weight_decay=0.0, max_norm=None):  # fmt: skip
    """Clip grad to global L2 norm ``max_norm`` then an in-place Adam step (step += 1).

    Returns:
        0-d total L2 norm of ``grad`` before clipping (state dtype), as clip_grad_norm_ returns.
    """
    dtype = state_dtype(params.dtype)
    total_norm = torch.linalg.vector_norm(grad.to(dtype))
    clipped = grad.to(dtype) * clip_coefficient(total_norm, max_norm)
    result = _adam(params, clipped, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay, False)
    for o, r in zip((params, exp_avg, exp_avg_sq), result):
        o.copy_(r)
    step.add_(1)
    return total_norm


@torch.no_grad()
def flat_accumulate_(acc: torch.Tensor, grad: torch.Tensor, weight: float) -> torch.Tensor:
    """acc += weight * grad; acc (n,) in the state dtype of grad (n,). Returns acc."""
    return acc.add_(grad.to(acc.dtype), alpha=weight)
