"""Loss registry the engines call: one name -> one ``loss(logits, labels) -> scalar`` function.

Suppression (fine-tuning evaluation) losses: ``ice`` (the official code's inverse cross-entropy,
z_y + logsumexp(-z)), ``ice_paper`` (-log(1 - p_y)), ``klu`` (KL(uniform || softmax)); the
adaptation and normal-training loss is ``ce``. The formulas and their stability are documented in
:mod:`sophon_fast.reference.losses`; the fused ops of :mod:`sophon_fast.ops.losses` (its twins)
are registered here.

Every registered function must be differentiable to any order when it is used as the inner
adaptation loss in order-2 simulations (it sits under ``create_graph``); a fused kernel that
computes its gradient in the forward pass is once-differentiable and may only replace the
suppression loss. :func:`register_loss` is the seam fused kernels plug into.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sophon_fast.ops import losses as _fused

__all__ = ["LossFn", "SUPPRESSION_LOSSES", "get_loss", "loss_names", "register_loss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Losses that may be minimised on restricted data to suppress fine-tuning.
SUPPRESSION_LOSSES = ("ice", "ice_paper", "klu")

# The fused ops (sophon_fast.ops.losses): one pass for value and gradient, backend chosen per call
# by sophon_fast._backend (``reference`` runs the pure-torch twins). All four are twice
# differentiable, so ``ce`` may be the inner adaptation loss under create_graph (order 2).
_LOSSES: dict[str, LossFn] = {
    "ice": _fused.inverse_cross_entropy,
    "ice_paper": _fused.inverse_cross_entropy_paper,
    "klu": _fused.kl_uniform,
    "ce": _fused.cross_entropy,
}


def loss_names() -> tuple[str, ...]:
    """Names of every registered loss."""
    return tuple(_LOSSES)


def get_loss(name: str) -> LossFn:
    """The loss registered under ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(_LOSSES)}") from None


def register_loss(name: str, fn: LossFn) -> None:
    """Register (or replace) the implementation of loss ``name``: ``fn(logits, labels) -> ()``."""
    if not callable(fn):
        raise TypeError(
            f"register_loss({name!r}, ...): expected a callable, got {type(fn).__name__}"
        )
    _LOSSES[name] = fn
