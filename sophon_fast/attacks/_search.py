"""The search adversary of the classification evaluation: recipes drawn from the search space.

The space is scope x optimizer x log-uniform lr x schedule (:data:`~sophon_fast.attacks.grid.
SEARCH_SCOPES`, :data:`~sophon_fast.attacks.grid.LR_RANGES`). The random sampler draws its trials
up front (:func:`search_plan`) and they run on every arm like grid recipes; Optuna, when
importable, runs one sequential TPE study per arm (:func:`optuna_search`), each trial a cell run
and stored like any other (:func:`sophon_fast.attacks._cells.run_cells`).
"""

from __future__ import annotations

import dataclasses
import random

from ._cells import cell_spec, run_cells
from .attack import OPTIMIZERS, SCHEDULES, Attack
from .grid import LR_RANGES, SEARCH_SCOPES, GridConfig, sample_attack

__all__ = ["optuna_available", "optuna_search", "search_plan"]


def search_plan(
    grid: GridConfig, recipes: list[Attack], trials: int, budget: int
) -> tuple[str, list[Attack]]:
    """(sampler, recipes the random sampler draws up front); Optuna draws while it runs."""
    sampler = grid.search["sampler"]
    if sampler == "auto":
        sampler = "optuna" if optuna_available() else "random"
    if sampler == "optuna" and not optuna_available():
        raise ValueError("evaluate: search sampler 'optuna' requested but optuna is not installed")
    search_recipes = []
    if trials and sampler == "random":
        rng = random.Random(grid.search["seed"])
        batch = recipes[0].batch_size if recipes else 128
        search_recipes = [
            dataclasses.replace(sample_attack(rng, batch_size=batch), epochs=budget)
            for _ in range(trials)
        ]
    return sampler, search_recipes


def optuna_available() -> bool:
    try:
        import optuna  # noqa: F401
    except ImportError:
        return False
    return True


def optuna_search(arm, model_key, payload, grid, budget, seed, fingerprints, cells_dir, progress):
    """Sequential TPE search for one arm, maximising the best restricted accuracy of a trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=grid.search["seed"])
    study = optuna.create_study(direction="maximize", sampler=sampler)
    cells = []
    for _ in range(grid.search["trials"]):
        trial = study.ask()
        optimizer = trial.suggest_categorical("optimizer", list(OPTIMIZERS))
        low, high = LR_RANGES[optimizer]
        attack = Attack(
            scope=trial.suggest_categorical("scope", list(SEARCH_SCOPES)),
            optimizer=optimizer,
            lr=float(f"{trial.suggest_float(f'lr_{optimizer}', low, high, log=True):.3g}"),
            schedule=trial.suggest_categorical("schedule", list(SCHEDULES)),
            epochs=budget,
        )
        spec = cell_spec(arm, "search", attack, seed, model_key, fingerprints)
        (cell,) = run_cells([spec], payload, 1, cells_dir, progress)
        study.tell(trial, max(cell["curve"]))
        cells.append(cell)
    return cells
