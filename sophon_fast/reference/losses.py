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

Generation (noise prediction, ``prediction`` and ``target`` are (batch, channels, height, width)):
``mse_ascent`` = -mean((prediction - target)^2) (the official code minimises minus the denoising
error) and ``dos`` = mean(prediction^2) (denial of service: drive the predicted noise to zero).

These functions are the pure-PyTorch twins of :mod:`sophon_fast.ops.losses` (same signatures);
:func:`loss_gradient` and :func:`loss_hvp` are the closed forms the fused backward kernels
compute, kept here as their oracle.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "classification_loss_forward",
    "cross_entropy",
    "dos",
    "inverse_cross_entropy",
    "inverse_cross_entropy_paper",
    "kl_uniform",
    "loss_gradient",
    "loss_hvp",
    "mean_square_loss_forward",
    "mse_ascent",
]


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


def _check_prediction(prediction: torch.Tensor, target: torch.Tensor | None, loss: str) -> None:
    if prediction.dim() != 4:
        raise ValueError(
            f"{loss}: prediction must be (batch, channels, height, width); "
            f"got shape {tuple(prediction.shape)}"
        )
    if prediction.numel() == 0:
        raise ValueError(f"{loss}: empty prediction; the mean is undefined")
    if target is not None and target.shape != prediction.shape:
        raise ValueError(
            f"{loss}: target must have the prediction's shape {tuple(prediction.shape)}; "
            f"got {tuple(target.shape)}"
        )


def mse_ascent(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gradient-ascent denoising loss ``mse_ascent``: -mean((prediction - target)^2).

    Args:
        prediction: (batch, channels, height, width) predicted noise.
        target: (batch, channels, height, width) true noise.

    Returns:
        () loss (minimising it maximises the denoising error).
    """
    _check_prediction(prediction, target, "mse_ascent")
    return -F.mse_loss(prediction, target)


def dos(prediction: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Denial-of-service loss ``dos``: mean(prediction^2), the MSE against zero noise.

    Args:
        prediction: (batch, channels, height, width) predicted noise.
        target: ignored (accepted so both generation losses share one signature). Default None.

    Returns:
        () loss.
    """
    _check_prediction(prediction, None, "dos")
    return prediction.square().mean()


_KINDS = ("ce", "ice", "ice_paper", "klu")


def _distributions(logits: torch.Tensor, labels: torch.Tensor, kind: str):
    """(first, second) softmax-like rows whose difference is the per-row gradient (see below)."""
    classes = logits.shape[1]
    onehot = F.one_hot(labels, classes).to(logits.dtype)
    if kind == "ce":
        return torch.softmax(logits, 1), onehot
    if kind == "ice":
        return onehot, torch.softmax(-logits, 1)
    if kind == "ice_paper":
        others = logits.masked_fill(onehot.bool(), float("-inf"))
        return torch.softmax(logits, 1), torch.softmax(others, 1)
    if kind == "klu":
        return torch.softmax(logits, 1), torch.full_like(logits, 1.0 / classes)
    raise ValueError(f"unknown classification loss kind {kind!r}; expected one of {_KINDS}")


def loss_gradient(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """d loss / d logits of the batch-mean loss ``kind``: (batch, classes).

    ce: (p - onehot) / B; ice: (onehot - softmax(-z)) / B; ice_paper: (p - r) / B with r the
    softmax over the classes j != y; klu: (p - 1/C) / B.
    """
    first, second = _distributions(logits, labels, kind)
    return (first - second) / logits.shape[0]


def loss_hvp(
    logits: torch.Tensor, labels: torch.Tensor, kind: str, vector: torch.Tensor
) -> torch.Tensor:
    """Hessian of the batch-mean loss ``kind`` times ``vector``, both (batch, classes).

    Each row's Hessian is a sum of softmax Jacobians J(s) = diag(s) - s s^T, so
    J(s) v = s * (v - <s, v>): ce and klu J(p); ice J(softmax(-z)); ice_paper J(p) - J(r).
    """

    def jac(s):
        return s * (vector - (s * vector).sum(1, keepdim=True))

    batch = logits.shape[0]
    if kind in ("ce", "klu"):
        return jac(torch.softmax(logits, 1)) / batch
    if kind == "ice":
        return jac(torch.softmax(-logits, 1)) / batch
    p, r = _distributions(logits, labels, "ice_paper")
    return (jac(p) - jac(r)) / batch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def classification_loss_forward(
    logits: torch.Tensor, labels: torch.Tensor, kind_code: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (), gradient (batch, classes)) of loss ``_KINDS[kind_code]``, as the fused kernels
    return them: computed in float32 (float64 for float64 logits), returned in logits' dtype."""
    kind = _KINDS[kind_code]
    z = logits.to(_compute_dtype(logits.dtype))
    loss = {
        "ce": cross_entropy,
        "ice": inverse_cross_entropy,
        "ice_paper": inverse_cross_entropy_paper,
        "klu": kl_uniform,
    }[kind](z, labels)
    return loss.to(logits.dtype), loss_gradient(z, labels, kind).to(logits.dtype)


def mean_square_loss_forward(
    prediction: torch.Tensor, target: torch.Tensor | None, sign: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sign * mean(d^2) (), its gradient 2 sign d / N), d = prediction - target (prediction
    without a target), as the fused kernels return them (float32 maths, float64 for float64)."""
    d = prediction.to(_compute_dtype(prediction.dtype))
    if target is not None:
        d = d - target.to(d.dtype)
    loss = sign * d.square().mean()
    return loss.to(prediction.dtype), (d * (2.0 * sign / d.numel())).to(prediction.dtype)
