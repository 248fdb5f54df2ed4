"""How much of a task a linear probe can read from features: a differentiable held-out R^2.

A protected classifier whose restricted-domain features still carry the restricted task is
recovered by the cheapest attack there is: re-draw the head and train only it (a linear probe).
The representation term of a protection run (``ProtectConfig.representation_weight``) minimises
what a linear probe fitted on half of a restricted batch predicts on the other half:

    F_a, F_e   features of the two halves (rows), centred by F_a's mean and scaled so that the
               mean squared row norm of F_a is 1 (the measure ignores the features' scale)
    Y_a, Y_e   one-hot labels, centred by Y_a's mean
    alpha      = (F_a F_a^T + ridge * n_a * I)^-1 Y_a          (kernel ridge regression: n_a x n_a,
                                                                 cheap when features are wide)
    R^2        = 1 - ||Y_e - F_e F_a^T alpha||^2 / ||Y_e||^2

R^2 is 1 when a linear map of the features predicts the held-out labels exactly and <= 0 when it
predicts nothing better than the mean; the gradient flows through the features (and the solve),
not through a trained probe, so there is no inner loop. Held-out, because with more feature
dimensions than samples a fit on the same samples is perfect whatever the features are.
"""

from __future__ import annotations

import torch

__all__ = ["heldout_probe_r2"]


def heldout_probe_r2(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, ridge: float = 1e-2
) -> torch.Tensor:
    """Held-out linear-probe R^2 (module docstring) of ``features`` for ``labels``.

    Args:
        features: (n, d) features; the first ``n // 2`` rows fit the probe, the rest evaluate.
        labels: (n,) int64 class indices in [0, num_classes).
        num_classes: width of the one-hot targets.
        ridge: ridge strength relative to the (unit) mean squared feature norm.

    Returns:
        () R^2 in the features' dtype, differentiable with respect to ``features``.

    Raises:
        ValueError: fewer than 4 samples, or features that are not (n, d) with n == len(labels).
    """
    if features.dim() != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"heldout_probe_r2: expected (n, d) features and (n,) labels, got "
            f"{tuple(features.shape)} and {tuple(labels.shape)}"
        )
    n = features.shape[0]
    if n < 4:
        raise ValueError(f"heldout_probe_r2: needs at least 4 samples (2 per half), got {n}")
    half = n // 2
    targets = torch.nn.functional.one_hot(labels, num_classes).to(features.dtype)
    fit_f, eval_f = features[:half], features[half:]
    fit_y, eval_y = targets[:half], targets[half:]
    centre = fit_f.mean(0, keepdim=True)
    fit_f, eval_f = fit_f - centre, eval_f - centre
    scale = fit_f.pow(2).sum(1).mean().clamp_min(torch.finfo(features.dtype).tiny).rsqrt()
    fit_f, eval_f = fit_f * scale, eval_f * scale
    y_mean = fit_y.mean(0, keepdim=True)
    fit_y, eval_y = fit_y - y_mean, eval_y - y_mean
    gram = fit_f @ fit_f.T
    gram = gram + ridge * half * torch.eye(half, dtype=gram.dtype, device=gram.device)
    alpha = torch.linalg.solve(gram, fit_y)
    predicted = (eval_f @ fit_f.T) @ alpha
    residual = (eval_y - predicted).pow(2).sum()
    return 1.0 - residual / eval_y.pow(2).sum().clamp_min(torch.finfo(features.dtype).tiny)
