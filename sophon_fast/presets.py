"""Named protection configurations: ``ProtectConfig.preset(name, **overrides)``.

Each preset is a dict of :class:`~sophon_fast.config.ProtectConfig` fields (this module imports
nothing, so the config can read it).

``official``
    ``ProtectConfig()``: the official SOPHON classification run (ICE loss, plain SGD at 1e-4,
    K = 50, 1000 outer steps).
``robust``
    A distribution of attackers simulated inside the loop (see the entry's comment for what the
    efficacy benchmark measured with it).
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

PRESETS: dict[str, dict[str, Any]] = {
    "official": {},
    "robust": {
        "loss": "klu",
        "inner_steps": 20,
        "outer_steps": 300,
        "eval_every": 10,
        "adversaries": {
            "families": {
                "sgd": {"lr": (1e-3, 1e-1)},
                "momentum": {"lr": (1e-3, 3e-2)},
                "adam": {"lr": (1e-4, 3e-3)},
                "adagrad": {"lr": (1e-3, 1e-1)},
                "adadelta": {"lr": (0.1, 1.0)},
            },
            "reinit_head": 0.5,
        },
        "step_weighting": "late",
    },
}
