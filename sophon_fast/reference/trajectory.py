"""How the suppression loss weighs the K steps of a simulated fine-tuning trajectory.

The official procedure averages the per-step suppression losses l_1..l_K by evaluation-sample
count: L = sum_k n_k l_k / N. A fine-tuning attacker, though, keeps going after the simulated
horizon, so what matters most is where the trajectory *ends up*; TAR weights its adversarial loss
towards late inner steps for that reason. The weightings here (``ProtectConfig.step_weighting``):

==============  =====================================================================
``uniform``     w_k = 1 (the official average)
``late``        w_k = k / K (a linear ramp: the last step counts K times the first)
``exponential`` w_k = exp(rate * (k - K)) (TAR's exp(lambda (i - K + 1)), 1-based here;
                rate 0 is uniform, larger rates concentrate on the last steps)
==============  =====================================================================

and the normalised weights are n_k w_k / sum_j n_j w_j, so a step with more evaluation samples
still counts more, and the weights sum to 1 (the loss stays on the scale of one step's loss).

Every engine (fast, vmap, CUDA graphs, the reference engine, generation) reads its weights from
:func:`trajectory_weights`, so they agree to the last bit of the weights. ``uniform`` returns
exactly ``n_k / N``, the value the engines computed before the weighting existed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["STEP_WEIGHTINGS", "check_step_weighting", "trajectory_weights"]

STEP_WEIGHTINGS = ("uniform", "late", "exponential")


def check_step_weighting(weighting: str, rate: float) -> None:
    """Raise ``ValueError`` for an unknown weighting or a rate that is negative or not finite."""
    if weighting not in STEP_WEIGHTINGS:
        raise ValueError(
            f"step weighting: expected one of {list(STEP_WEIGHTINGS)}, got {weighting!r}"
        )
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate):
        raise ValueError(f"step weighting rate: expected a finite number >= 0, got {rate!r}")
    if rate < 0:
        raise ValueError(
            f"step weighting rate: expected a rate >= 0 (a negative rate would weight early "
            f"steps most), got {rate}"
        )


def trajectory_weights(
    eval_counts: Sequence[int], weighting: str = "uniform", rate: float = 0.0
) -> list[float]:
    """Normalised per-step weights of the suppression loss (module docstring).

    Args:
        eval_counts: n_1..n_K, the evaluation samples of each inner step (each >= 1).
        weighting: one of :data:`STEP_WEIGHTINGS`.
        rate: the ``exponential`` weighting's rate (ignored by the others).

    Returns:
        K floats summing to 1 (up to rounding).
    """
    check_step_weighting(weighting, rate)
    steps = len(eval_counts)
    if weighting == "uniform":
        total = sum(eval_counts)
        return [count / total for count in eval_counts]
    if weighting == "late":
        raw = [(k + 1) / steps for k in range(steps)]
    else:
        raw = [math.exp(rate * (k + 1 - steps)) for k in range(steps)]
    scaled = [count * w for count, w in zip(eval_counts, raw)]
    total = sum(scaled)
    return [value / total for value in scaled]
