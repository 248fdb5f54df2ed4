"""Pure-PyTorch suppression and training losses (oracle, baseline and fallback for fused kernels).

Notation: ``logits`` z is (batch, classes), ``labels`` y is (batch,) int64, p = softmax(z),
C = classes, lse = logsumexp over the class axis. Every loss is a mean over the batch and is
differentiable to any order (the inner adaptation loss sits under ``create_graph`` in order 2).

============  =====================================================  ==============================
name          per-sample value                                       what it is
============  =====================================================  ==============================
``ice``       z_y + lse_j(-z_j)  = -log softmax(-z)_y                the official code's "inverse
                                                                     cross-entropy":
                                                                     ``CrossEntropyLoss()(1 - z, y)``
``ice_paper`` -log(1 - p_y)      = lse_j(z_j) - lse_{j != y}(z_j)    the textbook inverse CE
``klu``       KL(u || p) = sum_c u_c (log u_c - log p_c), u_c = 1/C  KL from the uniform distribution
``ce``        -log p_y           = lse_j(z_j) - z_y                  ordinary cross-entropy
============  =====================================================  ==============================

``ice`` is >= 0 and reaches 0 only when the true class has the *lowest* logit by a margin, so it
drives accuracy after fine-tuning below chance. ``ice_paper`` only pushes p_y towards 0. Both
are written as differences of logsumexps, so they stay finite at any finite logit gap (the naive
``-log(1 - softmax(z)_y)`` is ``inf`` in float32 from a gap of about 17, in float64 from 37).

``klu`` uses log_softmax (the official code's ``log(softmax)`` underflows to -inf) and u = 1/C
(the official code hard-codes 0.1, uniform only for C = 10).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["cross_entropy", "inverse_cross_entropy", "inverse_cross_entropy_paper", "kl_uniform"]


def _check(logits: torch.Tensor, labels: torch.Tensor | None, loss: str) -> None:
    if logits.dim() != 2:
        raise ValueError(
            f"{loss}: logits must be (batch, classes); got shape {tuple(logits.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError(f"{loss}: empty batch; the batch mean is undefined")
    if labels is not None and labels.shape != logits.shape[:1]:
        raise ValueError(
            f"{loss}: labels must be (batch,) = ({logits.shape[0]},); got shape {tuple(labels.shape)}"
        )


def inverse_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The official code's inverse cross-entropy ``ice``: mean_b [z_y + lse(-z)].

    Equal to ``F.cross_entropy(1 - logits, labels)`` (softmax is shift invariant), with gradient
    ``(onehot(y) - softmax(-z)) / batch``.

    Args:
        logits: (batch, classes).
        labels: (batch,) int64 in [0, classes).

    Returns:
        () loss.
    """
    _check(logits, labels, "ice")
    true_logit = logits.gather(1, labels[:, None]).squeeze(1)
    return (true_logit + torch.logsumexp(-logits, dim=1)).mean()


def inverse_cross_entropy_paper(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The textbook inverse cross-entropy ``ice_paper``: mean_b [-log(1 - p_y)].

    Computed as lse(z) - lse_{j != y}(z) (the true logit masked to -inf), which is finite for
    every finite logit gap: at a gap of 100 it is about 100, where the naive form is ``inf``.
    With a single class p_y = 1 for every input and the loss is +inf everywhere, so
    ``classes == 1`` raises ``ValueError``.

    Args:
        logits: (batch, classes), classes >= 2.
        labels: (batch,) int64 in [0, classes).

    Returns:
        () loss.
    """
    _check(logits, labels, "ice_paper")
    if logits.shape[1] < 2:
        raise ValueError(
            "ice_paper: -log(1 - p_y) is +inf for every input when there is 1 class; "
            "expected at least 2 classes"
        )
    true_class = F.one_hot(labels, logits.shape[1]).bool()
    others = logits.masked_fill(true_class, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(others, dim=1)).mean()


def kl_uniform(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """KL from the uniform distribution ``klu``: mean_b KL(u || softmax(z_b)), u_c = 1/C.

    KL(u || p) = -log C - (1/C) sum_c log_softmax(z)_c; gradient ``(p - u) / batch``.

    Args:
        logits: (batch, classes).
        labels: ignored (accepted so every loss has one signature). Default None.

    Returns:
        () loss.
    """
    _check(logits, None, "klu")
    classes = logits.shape[1]
    log_p = torch.log_softmax(logits, dim=1)
    return (-math.log(classes) - log_p.mean(dim=1)).mean()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Ordinary cross-entropy ``ce``: mean_b [lse(z) - z_y] (adaptation and NTR loss).

    Args:
        logits: (batch, classes).
        labels: (batch,) int64 in [0, classes).

    Returns:
        () loss.
    """
    _check(logits, labels, "ce")
    return F.cross_entropy(logits, labels)
