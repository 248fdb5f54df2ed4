"""Named protection configurations: ``ProtectConfig.preset(name, **overrides)``.

Each preset is a dict of :class:`~sophon_fast.config.ProtectConfig` fields (this module imports
nothing, so the config can read it).

``official``
    ``ProtectConfig()``: the official SOPHON classification run (ICE loss, plain SGD at 1e-4,
    K = 50, 1000 outer steps).
``robust``
    A distribution of attackers simulated inside the loop (the entry's comment says how it was
    chosen). Cost: 300 outer steps of K = 20, 216 s for the small CNN on 2 CPU cores when idle
    (350-580 s with other jobs on the cores). Margins (the README's efficacy table,
    ``python benchmarks/run.py efficacy --quick --config robust``): it passes
    scikit-learn digits -> MNIST-5k, stays within 2.1 points of scratch's best recipe on
    MNIST-5k -> digits and MNIST 0-4 -> 5-9, and fails the 10-images-per-class attacker
    (+9 points at the final epoch), original accuracy down <= 0.9 points.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

PRESETS: dict[str, dict[str, Any]] = {
    "official": {},
    # Chosen by the efficacy benchmark (benchmarks/efficacy.py; margins in the README's efficacy
    # table). Screened on MNIST-5k -> digits, seed 0, five strong recipes x 4 epochs: a wide
    # distribution (sgd 1e-3..1e-1, momentum 1e-3..3e-2, adam 1e-4..3e-3, adagrad, adadelta
    # 0.1..1; 150 steps) left the best recipe 10.1 / 2.4 / 2.2 / 0.4 points above scratch's at
    # epochs 1-4; this narrower, attack-sized one with Adam drawn twice as often and 300 steps:
    # 1.8 / 1.8 / 1.6 / 0.7, original accuracy 97.1 -> 95.9 %; adding representation_weight 0.5
    # cut the linear probe's epoch-1 accuracy (81.1 -> 77.8 %) but raised the head-re-drawn Adam
    # attack's (79.3 -> 87.2 %): 7.9 / 3.1 / 2.0 / 0.7, so the term stays off.
    "robust": {
        "loss": "klu",
        "inner_steps": 20,
        "outer_steps": 300,
        "eval_every": 10,
        "adversaries": {
            "families": {
                "sgd": {"lr": (1e-2, 1e-1)},
                "momentum": {"lr": (3e-3, 3e-2)},
                "adam": {"lr": (3e-4, 3e-3), "weight": 2.0},
                "adagrad": {"lr": (3e-3, 3e-2)},
                "adadelta": {"lr": (0.3, 1.0)},
            },
            "reinit_head": 0.5,
        },
        "step_weighting": "late",
    },
}
