"""What the pure-torch flat optimizer twins share: the state dtype, the zero-safe square root and
the autograd vector-Jacobian product their ``*_backward`` forms are.

These are the package's only definitions of :func:`state_dtype` and :func:`safe_sqrt`: the fused
ops (:mod:`sophon_fast.ops.flat_optim`), the inner-optimizer registry
(:mod:`sophon_fast.reference.optimizers`) and the engines import them from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["safe_sqrt", "state_dtype", "vjp"]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Optimizer state / maths dtype: float64 for float64 parameters, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x) for x >= 0 whose derivative at x = 0 is 0 (not inf); 0 for x <= 0.

    A gradient entry that is exactly 0 (behind a dead ReLU) leaves a second moment at 0; the plain
    root's inf derivative there would turn an order-2 meta-gradient into NaN through inf * 0.
    Values are those of ``torch.sqrt``.
    """
    positive = x > 0
    return torch.where(
        positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x)
    )


def vjp(
    forward: Callable[..., Sequence[torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor | None],
) -> tuple[torch.Tensor, ...]:
    """Vector-Jacobian products of ``forward`` at ``inputs`` (zeros where an input is unused)."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(True) for x in inputs]
        outputs = forward(*leaves)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
        grads = torch.autograd.grad(
            [o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True
        )
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads))
