"""The fine-tuning attack suite: configurable attacks, baselines on the same grid, worst-case reports.

- :func:`evaluate` / :class:`Report`: protected, normal and scratch arms through one grid.
- :class:`Attack` / :func:`run_attack`: one recipe (scope, optimizer, lr, schedule, probe).
- :func:`load_grid`, ``QUICK_GRID``, ``DEFAULT_GRID``: the grids (documented in
  :mod:`sophon_fast.attacks.grid`).
- :func:`add_lora` / :func:`merge_lora`: LoRA on Linear and Conv2d layers.
- :class:`FineTuneAttack` / :func:`finetune`: the single official-style attack the demo runs.
"""

from .attack import (
    OPTIMIZERS,
    PROBES,
    SCHEDULES,
    SCOPES,
    Attack,
    apply_scope,
    blocks_of,
    run_attack,
)
from .evaluate import evaluate
from .finetune import FineTuneAttack, finetune
from .grid import DEFAULT_GRID, LR_GRIDS, QUICK_GRID, GridConfig, load_grid
from .lora import add_lora, merge_lora
from .report import Report

__all__ = [
    "DEFAULT_GRID",
    "LR_GRIDS",
    "OPTIMIZERS",
    "PROBES",
    "QUICK_GRID",
    "SCHEDULES",
    "SCOPES",
    "Attack",
    "FineTuneAttack",
    "GridConfig",
    "Report",
    "add_lora",
    "apply_scope",
    "blocks_of",
    "evaluate",
    "finetune",
    "load_grid",
    "merge_lora",
    "run_attack",
]
