"""``evaluate()``: put a protected model, the unprotected model and a fresh one through one attack grid.

Arms: ``protected`` (the model given), ``normal`` (the unprotected pre-trained model, when
given), ``scratch`` (the same architecture freshly initialised, one draw per seed). Every arm
runs every grid recipe at every seed with the same budget; a *cell* is one (arm, recipe, seed).
Per-cell seeds are derived from (recipe, seed) only, so all arms see the same data subset, head
draw and batch order. Cells run in-process (``workers=1``) or in spawned worker processes with
one thread each; with a ``report_dir`` each finished cell is written atomically to
``report_dir/cells/<id>.json`` and a rerun reuses every cell whose recipe, seed, budget, model
weights and data are unchanged, so an interrupted evaluation resumes where it stopped. Data are
compared by a hash of their bytes per data set
(:func:`sophon_fast.data.fingerprint.data_fingerprint`); cells computed on different data raise
an error naming the data set instead of being reused or silently replaced (cells written before
per-data-set fingerprints are run again).

The search adversary adds recipes drawn from the search space (scope x optimizer x
log-uniform lr x schedule): with the random sampler they are drawn up front and run on every
arm like grid recipes (first seed only); with Optuna (when importable) each arm gets its own
sequential TPE study maximising its best restricted accuracy, run in the main process.

:func:`evaluate` is the public entry: it sends a noise-prediction model to
:func:`sophon_fast.attacks.generation.evaluate_generation` and a classifier to
:func:`evaluate_classification`, which runs in named steps: validate the arguments and plan the
arms, recipes and data (:func:`_plan`), write one spec per cell (:func:`_cell_specs`), run the
cells with resume (:mod:`sophon_fast.attacks._cells`; :func:`_run_all` spreads them over a
process group and adds the Optuna searches of :mod:`sophon_fast.attacks._search`), and aggregate
them into a :class:`Report`. The cell machinery lives in :mod:`sophon_fast.attacks._cells` so that
this module and the generation module share it without importing each other (this module imports
the generation module, never the reverse).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.specs import load_spec
from ..distributed import current as distributed_context
from ..training import accuracy, as_tensors
from . import generation
from ._cells import (
    cell_spec,
    combined,
    data_fingerprints,
    fresh_copy,
    load_done,
    model_fingerprint,
    run_cells,
    shaped_like,
)
from ._search import optuna_search, search_plan
from .attack import _NORMS, Attack, blocks_of
from .generation import GenerationReport, is_noise_model
from .grid import GridConfig, load_grid
from .report import Report, build_report

__all__ = ["evaluate", "evaluate_classification"]

TRAINABILITY_ATTACK = Attack(scope="reinit_head_full", optimizer="adam", lr=1e-3, epochs=0)

# tests/reliability/test_corrupt_files.py reads stored cells through this name
_load_done = load_done


def evaluate(
    model: nn.Module,
    restricted,
    *,
    original=None,
    normal: nn.Module | None = None,
    attacks: str | dict | GridConfig | Sequence[Attack] | None = None,
    seeds: Sequence[int] | None = None,
    epochs: int | None = None,
    device=None,
    workers: int = 1,
    report_dir: str | Path | None = None,
    benign=None,
    search_trials: int | None = None,
    scratch: bool = True,
    progress: bool = False,
) -> Report | GenerationReport:
    """Fine-tune the protected model, the unprotected model and a fresh one with the same attack grid.

    A noise-prediction model (``forward(x, t)``, e.g. a DDPM UNet) is evaluated in generation
    mode by :func:`sophon_fast.attacks.generation.evaluate_generation` (denoising MSE curves,
    sample grids, a domain judge; ``workers``, ``benign`` and ``search_trials`` do not apply);
    any other model by :func:`evaluate_classification`, with every argument passed on.

    Args:
        model: the protected classifier (not modified). Its head is found by
            :func:`sophon_fast.models.find_head`; a ``model_spec`` lets the scratch arm rebuild
            the zoo initialisation, otherwise the scratch arm re-runs ``reset_parameters``.
        restricted: ``(train, test)`` restricted-domain data, each an ``(images, labels)`` pair,
            an ImageDataset or a TensorDataset.
        original: original-domain test data for intactness (accuracy before/after every
            attack); None skips it. Default None.
        normal: the unprotected pre-trained model (the ``normal`` arm); None omits the arm, and
            epochs-to-target then uses the scratch arm's final accuracy. Default None.
        attacks: the grid: None (the default grid, ``grid.DEFAULT_GRID``), ``"quick"`` (the quick
            grid, ``grid.QUICK_GRID``), ``"default"``, a TOML path, a grid dict, a
            :class:`GridConfig`, or a list of :class:`Attack` (run as given, no search).
            Default None.
        seeds: fine-tuning seeds; None takes the grid's. Default None (grid: (0, 1, 2)).
        epochs: budget of every cell; None takes the grid's. Default None.
        device: where cells run; None uses the model's device. Default None.
        workers: worker processes (spawned, one thread each); 1 runs in this process. Default 1.
            Under a torch.distributed process group of more than one rank (every rank calling
            evaluate() with the same arguments) cell ``i`` runs on rank ``i % world_size``, each
            rank with its own ``workers``; every rank returns the same report, rank 0 writes the
            report files, each rank its own cells.
        report_dir: where report.json, report.md, curves.png, worst_case.png and cells/ go;
            None keeps everything in memory (no resume). Default None.
        benign: ``(train, test)`` of a third, benign domain for the trainability check
            (resized to the restricted images' shape); None takes the grid's ``benign`` spec,
            ``False`` skips it. Default None.
        search_trials: overrides the grid's search-adversary trial count. Default None.
        scratch: include the scratch arm. Default True.
        progress: print one line per finished cell. Default False.

    Returns:
        The :class:`Report` (also written to ``report_dir`` when given): per arm every cell
        (recipe, seed, curve, AUC, epochs to target, ratio to scratch, intactness), per-recipe
        mean ± 95 % CI over seeds, the worst case over grid and seeds, trainability, and a
        summary (``protected_minus_scratch_worst`` and each arm's scratch ratio). For a
        noise-prediction model, the :class:`~sophon_fast.attacks.generation.GenerationReport`.

    Raises:
        ValueError: a malformed grid (unknown key, bad value), a recipe that does not fit the
            model (``bn_only`` without normalisation layers, ``last_k`` beyond the model's
            blocks), empty data, or ``workers < 1``.
        TypeError: data in an unsupported form.
    """
    _check_workers(workers)
    if is_noise_model(model):  # a DDPM eps-model forward(x, t): generation mode, in-process
        # looked up on the module at call time, so the entry can be replaced (tests do)
        return generation.evaluate_generation(
            model,
            restricted,
            original=original,
            normal=normal,
            attacks=attacks,
            seeds=seeds,
            epochs=epochs,
            device=device,
            report_dir=report_dir,
            scratch=scratch,
            progress=progress,
        )
    return evaluate_classification(
        model,
        restricted,
        original=original,
        normal=normal,
        attacks=attacks,
        seeds=seeds,
        epochs=epochs,
        device=device,
        workers=workers,
        report_dir=report_dir,
        benign=benign,
        search_trials=search_trials,
        scratch=scratch,
        progress=progress,
    )


def evaluate_classification(
    model: nn.Module,
    restricted,
    *,
    original=None,
    normal: nn.Module | None = None,
    attacks: str | dict | GridConfig | Sequence[Attack] | None = None,
    seeds: Sequence[int] | None = None,
    epochs: int | None = None,
    device=None,
    workers: int = 1,
    report_dir: str | Path | None = None,
    benign=None,
    search_trials: int | None = None,
    scratch: bool = True,
    progress: bool = False,
) -> Report:
    """:func:`evaluate` for a classifier: the same arguments, the same :class:`Report`.

    Callable on its own (it does not look at the model's forward signature): validate and plan
    (:func:`_plan`), one spec per cell (:func:`_cell_specs`), run the cells with resume
    (:func:`_run_all`), measure the arms before any attack, and aggregate into the report.
    """
    _check_workers(workers)
    plan = _plan(
        model,
        restricted,
        original=original,
        normal=normal,
        attacks=attacks,
        seeds=seeds,
        epochs=epochs,
        device=device,
        benign=benign,
        search_trials=search_trials,
        scratch=scratch,
    )
    specs = _cell_specs(plan)
    report_dir = Path(report_dir) if report_dir is not None else None
    cells_dir = report_dir / "cells" if report_dir is not None else None
    started = time.perf_counter()
    dist = distributed_context()  # a process group of > 1 ranks spreads the cells over them
    cells = _run_all(plan, specs, dist, workers, cells_dir, progress)
    report = build_report(
        cells,
        arms=plan.arms,
        seeds=plan.seeds,
        baseline=_baseline(plan),
        config=_config(plan, workers),
        target=plan.grid.target,
    )
    report.data["seconds"] = time.perf_counter() - started
    if report_dir is not None and (dist is None or dist.rank == 0):
        report.write(report_dir)
    return report


# ---------------------------------------------------------------- planning


@dataclasses.dataclass
class _Plan:
    """What a classification evaluation decided before its first cell runs."""

    grid: GridConfig
    seeds: tuple[int, ...]
    budget: int  # epochs of every grid and search cell
    trials: int  # search-adversary trials
    sampler: str  # "random" or "optuna" ("auto" resolved)
    device: torch.device
    train: Any
    test: Any
    original: Any
    benign: tuple[Any, Any] | None
    models: dict[str, nn.Module]  # protected, normal, scratch@<seed>: CPU copies
    arms: list[str]
    data: dict[str, Any]  # train, test, original and (shaped) benign_train / benign_test
    fingerprints: dict[str, Any]  # model key -> hash, "data" -> data set -> hash
    trainability_parts: dict[str, str]  # benign data set -> hash
    recipes: list[Attack]
    search_recipes: list[Attack]  # drawn up front by the random sampler

    @staticmethod
    def model_key(arm: str, seed: int) -> str:
        return f"scratch@{seed}" if arm == "scratch" else arm

    @property
    def trainability_attack(self) -> Attack:
        return dataclasses.replace(TRAINABILITY_ATTACK, epochs=self.grid.benign_epochs)


def _check_workers(workers) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"evaluate: workers must be an int >= 1, got {workers!r}")


def _plan(
    model,
    restricted,
    *,
    original,
    normal,
    attacks,
    seeds,
    epochs,
    device,
    benign,
    search_trials,
    scratch,
) -> _Plan:
    """Validate every argument and fix the arms, models, data, fingerprints and recipes, in an
    order that fails on bad arguments before loading or copying anything heavy."""
    train, test = _restricted_pair(restricted)
    grid = _resolve_grid(attacks)
    seeds, budget, trials = _budget(grid, seeds, epochs, search_trials)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    benign = _benign_domain(benign, grid)
    models, arms = _arm_models(model, normal, seeds, scratch)
    data = {"train": train, "test": test, "original": original}
    if benign is not None:
        data["benign_train"] = shaped_like(benign[0], train)
        data["benign_test"] = shaped_like(benign[1], train)
    fingerprints = {key: model_fingerprint(m) for key, m in models.items()}
    fingerprints["data"] = data_fingerprints(
        restricted_train=train, restricted_test=test, original=original
    )
    trainability_parts = data_fingerprints(
        benign_train=data.get("benign_train"), benign_test=data.get("benign_test")
    )
    recipes = [dataclasses.replace(a, epochs=budget) for a in grid.attacks]
    _check_recipes(recipes, model)
    sampler, search_recipes = search_plan(grid, recipes, trials, budget)
    return _Plan(
        grid=grid,
        seeds=seeds,
        budget=budget,
        trials=trials,
        sampler=sampler,
        device=device,
        train=train,
        test=test,
        original=original,
        benign=benign,
        models=models,
        arms=arms,
        data=data,
        fingerprints=fingerprints,
        trainability_parts=trainability_parts,
        recipes=recipes,
        search_recipes=search_recipes,
    )


def _restricted_pair(restricted) -> tuple[Any, Any]:
    if not isinstance(restricted, (tuple, list)) or len(restricted) != 2:
        raise TypeError("evaluate: restricted must be a (train, test) pair of datasets")
    train, test = restricted
    for name, data in (("restricted train", train), ("restricted test", test)):
        if len(as_tensors(data)[1]) == 0:
            raise ValueError(f"evaluate: the {name} data is empty")
    return train, test


def _budget(grid: GridConfig, seeds, epochs, search_trials) -> tuple[tuple[int, ...], int, int]:
    """(seeds, epochs per cell, search trials): the arguments, or the grid's where None."""
    seeds = tuple(grid.seeds if seeds is None else seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"evaluate: seeds must be a non-empty list of ints >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"evaluate: repeated seeds in {list(seeds)}")
    budget = grid.epochs if epochs is None else epochs
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"evaluate: epochs must be an int >= 1, got {budget!r}")
    trials = grid.search["trials"] if search_trials is None else search_trials
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise ValueError(f"evaluate: search_trials must be an int >= 0, got {trials!r}")
    return seeds, budget, trials


def _benign_domain(benign, grid: GridConfig):
    """The trainability domain: given, the grid's spec (loaded here), or None (False skips)."""
    if benign is None and grid.benign:
        benign = load_spec(grid.benign, what="grid benign")
        if benign[1] is None:
            raise ValueError(f"evaluate: benign domain {grid.benign!r} has no test split")
    return benign or None


def _arm_models(
    model: nn.Module, normal: nn.Module | None, seeds: tuple[int, ...], scratch: bool
) -> tuple[dict[str, nn.Module], list[str]]:
    """CPU copies of every arm's starting model (one scratch draw per seed), and the arm names."""
    models = {"protected": copy.deepcopy(model).cpu()}
    if normal is not None:
        models["normal"] = copy.deepcopy(normal).cpu()
    if scratch:
        for seed in seeds:
            models[f"scratch@{seed}"] = fresh_copy(model, seed)
    arms = (
        ["protected"]
        + (["normal"] if normal is not None else [])
        + (["scratch"] if scratch else [])
    )
    return models, arms


def _cell_specs(plan: _Plan) -> list[dict]:
    """Per arm: every grid recipe at every seed, the search recipes at the first seed, then the
    trainability cells (fingerprinted by the benign data instead of the restricted data)."""
    specs = []
    fingerprints, key = plan.fingerprints, plan.model_key
    for arm in plan.arms:
        for seed in plan.seeds:
            for attack in plan.recipes:
                specs.append(cell_spec(arm, "grid", attack, seed, key(arm, seed), fingerprints))
        first = plan.seeds[0]
        for attack in plan.search_recipes:
            specs.append(cell_spec(arm, "search", attack, first, key(arm, first), fingerprints))
        if plan.benign is not None:
            trainability = plan.trainability_attack
            for seed in plan.seeds:
                spec = cell_spec(
                    arm, "trainability", trainability, seed, key(arm, seed), fingerprints
                )
                spec["fingerprint"] = (
                    fingerprints[key(arm, seed)] + ":" + combined(plan.trainability_parts)
                )
                spec["data_fingerprints"] = plan.trainability_parts
                specs.append(spec)
    return specs


# ---------------------------------------------------------------- running


def _run_all(plan: _Plan, specs, dist, workers, cells_dir, progress) -> list[dict]:
    """Every cell of ``specs`` (spread over the ranks of ``dist`` when given), then the Optuna
    searches, one per arm, when that sampler has trials."""
    payload = {
        "models": plan.models,
        "data": {k: (as_tensors(v) if v is not None else None) for k, v in plan.data.items()},
        "device": str(plan.device),
        "flush_denormal": plan.device.type == "cpu",
    }
    if dist is None:
        cells = run_cells(specs, payload, workers, cells_dir, progress)
    else:
        cells = dist.spread(
            specs,
            lambda mine: run_cells(mine, payload, workers, cells_dir, progress),
            "evaluate() cells",
            key=lambda cell: cell["id"],
        )
    if plan.trials and plan.sampler == "optuna":

        def search(arm: str) -> list[dict]:
            first = plan.seeds[0]
            return optuna_search(
                arm,
                plan.model_key(arm, first),
                payload,
                plan.grid,
                plan.budget,
                first,
                plan.fingerprints,
                cells_dir,
                progress,
            )

        if dist is None:
            for arm in plan.arms:
                cells += search(arm)
        else:
            for part in dist.spread(plan.arms, lambda mine: [search(a) for a in mine], "searches"):
                cells += part
    return cells


# ---------------------------------------------------------------- aggregation


def _baseline(plan: _Plan) -> dict[str, dict[str, float | None]]:
    """Every starting model's restricted and original accuracy before any attack."""
    baseline = {}
    for key, m in plan.models.items():
        baseline[key] = {
            "restricted_accuracy": accuracy(m, plan.test, device=plan.device),
            "original_accuracy": accuracy(m, plan.original, device=plan.device)
            if plan.original is not None
            else None,
        }
    return baseline


def _config(plan: _Plan, workers: int) -> dict[str, Any]:
    """The report's ``config``: grid, seeds, budget, search, trainability, data sizes and
    fingerprints, and where it ran."""
    benign, data, original = plan.benign, plan.data, plan.original
    return {
        "grid": plan.grid.to_dict(),
        "seeds": list(plan.seeds),
        "epochs": plan.budget,
        "search": {
            "trials": plan.trials,
            "sampler": plan.sampler,
            "seed": plan.grid.search["seed"],
        },
        "trainability": None
        if benign is None
        else {
            "attack": plan.trainability_attack.to_dict(),
            "domain": plan.grid.benign if plan.grid.benign else "given",
        },
        "data": {
            "restricted_train": len(as_tensors(plan.train)[1]),
            "restricted_test": len(as_tensors(plan.test)[1]),
            "original_test": None if original is None else len(as_tensors(original)[1]),
            "benign": None
            if benign is None
            else [len(data["benign_train"][1]), len(data["benign_test"][1])],
            "fingerprints": {
                **plan.fingerprints["data"],
                **(plan.trainability_parts if benign is not None else {}),
            },
        },
        "workers": workers,
        "device": str(plan.device),
        "torch": torch.__version__,
    }


def _resolve_grid(attacks) -> GridConfig:
    if attacks is None or attacks == "default":
        return load_grid(None)
    if attacks == "quick":
        return load_grid(None, quick=True)
    if isinstance(attacks, GridConfig):
        return attacks
    if isinstance(attacks, (str, Path, dict)):
        return load_grid(str(attacks) if isinstance(attacks, Path) else attacks)
    if isinstance(attacks, Sequence) and attacks and all(isinstance(a, Attack) for a in attacks):
        first = {k: v for k, v in attacks[0].to_dict().items() if k != "epochs"}
        grid = GridConfig({"epochs": max(a.epochs for a in attacks) or 20, "sweep": [first]})
        grid.attacks = list(attacks)
        return grid
    raise TypeError(
        "evaluate: attacks must be None, 'quick', 'default', a TOML path, a grid dict, a GridConfig "
        f"or a non-empty list of Attack; got {type(attacks).__name__}"
    )


def _check_recipes(recipes: list[Attack], model: nn.Module) -> None:
    """Fail before any work when a recipe does not fit the model's architecture."""
    n_blocks = len(blocks_of(model))
    has_norm = any(
        isinstance(m, _NORMS) and any(True for _ in m.parameters(False)) for m in model.modules()
    )
    for attack in recipes:
        if attack.scope == "bn_only" and not has_norm:
            raise ValueError(
                f"attack {attack.label}: scope bn_only needs normalisation layers with affine "
                f"parameters; {type(model).__name__} has none"
            )
        uses_k = attack.scope == "last_k" or attack.probe == "reinit_last_k"
        if uses_k and attack.last_k > n_blocks:
            raise ValueError(
                f"attack {attack.label}: last_k={attack.last_k} but {type(model).__name__} has only "
                f"{n_blocks} blocks"
            )
