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
(:func:`sophon_fast.engine.checkpoint.data_fingerprint`); cells computed on different data raise
an error naming the data set instead of being reused or silently replaced (cells written before
per-data-set fingerprints are run again).

The search adversary adds recipes drawn from the search space (scope x optimizer x
log-uniform lr x schedule): with the random sampler they are drawn up front and run on every
arm like grid recipes (first seed only); with Optuna (when importable) each arm gets its own
sequential TPE study maximising its best restricted accuracy, run in the main process.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..distributed import current as distributed_context
from ..engine.checkpoint import atomic_write_text, data_fingerprint
from ..training import accuracy, as_tensors
from .attack import Attack, run_attack
from .grid import GridConfig, load_grid, sample_attack
from .report import Report, build_report

__all__ = ["evaluate"]

TRAINABILITY_ATTACK = Attack(scope="reinit_head_full", optimizer="adam", lr=1e-3, epochs=0)


def _fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()[:16]


def _data_fingerprints(**datasets) -> dict[str, str]:
    """name -> hash of the bytes of that data set's images and labels ("none" when absent)."""
    return {
        name: "none" if data is None else data_fingerprint(*as_tensors(data))
        for name, data in datasets.items()
    }


def _combined(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _cell_seed(attack: Attack, seed: int) -> int:
    return int(hashlib.sha256(f"{attack.key}:{seed}".encode()).hexdigest()[:8], 16)


def _fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture freshly initialised from ``seed`` (zoo models rebuild from their spec)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        spec = getattr(model, "model_spec", None)
        if spec:
            from ..models import build_model

            fresh = build_model(spec["name"], spec.get("kwargs"))
            fresh = fresh.to(dtype=next(model.parameters()).dtype)
        else:
            fresh = copy.deepcopy(model)
            for module in fresh.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                if hasattr(module, "reset_running_stats"):
                    module.reset_running_stats()
    finally:
        torch.random.set_rng_state(state)
    return fresh.cpu()


def _shaped_like(data, reference):
    """``data`` resized and re-channelled to the image shape of ``reference``."""
    from ..data import resize_images, set_channels

    images, labels = as_tensors(data)
    target = as_tensors(reference)[0].shape[1:]
    if images.dim() == 4 and len(target) == 3:
        images = resize_images(set_channels(images, target[0]), tuple(target[1:]))
    return images, labels


# ---------------------------------------------------------------- worker side

_WORKER: dict[str, Any] = {}


def _init_worker(payload: dict[str, Any], threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    if payload.get("flush_denormal"):
        torch.set_flush_denormal(True)  # CPU runs slow down 2.6x on denormals otherwise
    _WORKER.clear()
    _WORKER.update(payload)


def _run_cell(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    data = _WORKER["data"]
    model = _WORKER["models"][spec["model_key"]]
    attack = Attack.from_dict(spec["attack"])
    if spec["kind"] == "trainability":
        train, test, original = data["benign_train"], data["benign_test"], None
    else:
        train, test, original = data["train"], data["test"], data["original"]
    result = run_attack(
        model,
        train,
        test,
        attack,
        seed=spec["cell_seed"],
        original_test=original,
        device=_WORKER["device"],
    )
    return spec, result


# ---------------------------------------------------------------- main side


def _cell_spec(
    arm: str, kind: str, attack: Attack, seed: int, model_key: str, fingerprints
) -> dict:
    cell_seed = _cell_seed(attack, seed)
    ident = f"{arm}-{kind}-{attack.key}-s{seed}"
    return {
        "id": ident,
        "arm": arm,
        "kind": kind,
        "attack": attack.to_dict(),
        "label": attack.label,
        "seed": seed,
        "cell_seed": cell_seed,
        "model_key": model_key,
        "fingerprint": fingerprints[model_key] + ":" + _combined(fingerprints["data"]),
        "data_fingerprints": fingerprints["data"],
    }


def _load_done(cells_dir: Path | None, spec: dict) -> dict | None:
    if cells_dir is None:
        return None
    path = cells_dir / f"{spec['id']}.json"
    if not path.is_file():
        return None
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, torn, not UTF-8 or not JSON: run the cell again
        return None
    if not isinstance(done, dict):
        return None
    theirs = done.get("data_fingerprints")
    if isinstance(theirs, dict) and done.get("attack") == spec["attack"]:
        changed = sorted(
            name
            for name, value in spec["data_fingerprints"].items()
            if name in theirs and theirs[name] != value
        )
        if changed:
            raise ValueError(
                f"evaluate: {cells_dir} holds results computed on different {', '.join(changed)} "
                f"data (cell {spec['id']}: fingerprint {theirs[changed[0]]}, now "
                f"{spec['data_fingerprints'][changed[0]]}); evaluate the new data in another "
                f"report_dir (--out), or delete {cells_dir} to start over"
            )
    if done.get("fingerprint") != spec["fingerprint"] or done.get("attack") != spec["attack"]:
        return None
    return done


def _store(cells_dir: Path | None, spec: dict, result: dict) -> dict:
    cell = {k: v for k, v in spec.items() if k != "model_key"}
    cell.update({k: v for k, v in result.items() if k != "model"})
    if cells_dir is not None:
        atomic_write_text(cells_dir / f"{spec['id']}.json", json.dumps(cell, indent=1))
    return cell


def _run_cells(specs, payload, workers, cells_dir, progress) -> list[dict]:
    cells, todo = [], []
    for spec in specs:
        done = _load_done(cells_dir, spec)
        if done is not None:
            cells.append(done)
        else:
            todo.append(spec)
    if progress and cells:
        print(f"evaluate: resuming, {len(cells)} of {len(specs)} cells already done", flush=True)
    started = time.perf_counter()

    def note(i: int, spec: dict, result: dict) -> None:
        if progress:
            final = result["curve"][-1]
            print(
                f"[{i + 1}/{len(todo)} {time.perf_counter() - started:6.0f}s] {spec['arm']:<9} "
                f"{spec['kind']:<12} seed {spec['seed']} {spec['label']}: final {final:.1f} %",
                flush=True,
            )

    if workers <= 1 or len(todo) <= 1:
        saved = dict(_WORKER)
        _init_worker(payload, None)
        try:
            for i, spec in enumerate(todo):
                spec, result = _run_cell(spec)
                cells.append(_store(cells_dir, spec, result))
                note(i, spec, result)
        finally:
            _WORKER.clear()
            _WORKER.update(saved)
        return cells
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    # longest cells first keeps both workers busy to the end
    todo.sort(key=lambda s: -(s["attack"]["epochs"] or 1))
    with context.Pool(workers, initializer=_init_worker, initargs=(payload, 1)) as pool:
        for i, (spec, result) in enumerate(pool.imap_unordered(_run_cell, todo)):
            cells.append(_store(cells_dir, spec, result))
            note(i, spec, result)
    return cells


def _optuna_available() -> bool:
    try:
        import optuna  # noqa: F401
    except ImportError:
        return False
    return True


def _optuna_search(arm, model_key, payload, grid, budget, seed, fingerprints, cells_dir, progress):
    """Sequential TPE search for one arm, maximising the best restricted accuracy of a trial."""
    import optuna

    from .attack import OPTIMIZERS, SCHEDULES
    from .grid import LR_RANGES, SEARCH_SCOPES

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
        spec = _cell_spec(arm, "search", attack, seed, model_key, fingerprints)
        (cell,) = _run_cells([spec], payload, 1, cells_dir, progress)
        study.tell(trial, max(cell["curve"]))
        cells.append(cell)
    return cells


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
) -> Report:
    """Fine-tune the protected model, the unprotected model and a fresh one with the same attack grid.

    A noise-prediction model (``forward(x, t)``, e.g. a DDPM UNet) is evaluated in generation
    mode by :func:`sophon_fast.attacks.generation.evaluate_generation` (denoising MSE curves,
    sample grids, a domain judge; ``workers``, ``benign`` and ``search_trials`` do not apply).

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
        summary (``protected_minus_scratch_worst`` and each arm's scratch ratio).

    Raises:
        ValueError: a malformed grid (unknown key, bad value), a recipe that does not fit the
            model (``bn_only`` without normalisation layers, ``last_k`` beyond the model's
            blocks), empty data, or ``workers < 1``.
        TypeError: data in an unsupported form.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"evaluate: workers must be an int >= 1, got {workers!r}")
    from .generation import evaluate_generation, is_noise_model

    if is_noise_model(model):  # a DDPM eps-model forward(x, t): generation mode, in-process
        return evaluate_generation(
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
    if not isinstance(restricted, (tuple, list)) or len(restricted) != 2:
        raise TypeError("evaluate: restricted must be a (train, test) pair of datasets")
    train, test = restricted
    for name, data in (("restricted train", train), ("restricted test", test)):
        if len(as_tensors(data)[1]) == 0:
            raise ValueError(f"evaluate: the {name} data is empty")
    grid = _resolve_grid(attacks)
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
    device = torch.device(device) if device is not None else next(model.parameters()).device

    if benign is None and grid.benign:
        from ..data import load_spec

        benign = load_spec(grid.benign, what="grid benign")
        if benign[1] is None:
            raise ValueError(f"evaluate: benign domain {grid.benign!r} has no test split")
    benign = benign or None

    models = {"protected": copy.deepcopy(model).cpu()}
    if normal is not None:
        models["normal"] = copy.deepcopy(normal).cpu()
    if scratch:
        for seed in seeds:
            models[f"scratch@{seed}"] = _fresh_copy(model, seed)
    arms = (
        ["protected"]
        + (["normal"] if normal is not None else [])
        + (["scratch"] if scratch else [])
    )

    def model_key(arm: str, seed: int) -> str:
        return f"scratch@{seed}" if arm == "scratch" else arm

    data = {"train": train, "test": test, "original": original}
    if benign is not None:
        data["benign_train"] = _shaped_like(benign[0], train)
        data["benign_test"] = _shaped_like(benign[1], train)
    fingerprints = {key: _fingerprint(m) for key, m in models.items()}
    fingerprints["data"] = _data_fingerprints(
        restricted_train=train, restricted_test=test, original=original
    )
    trainability_parts = _data_fingerprints(
        benign_train=data.get("benign_train"), benign_test=data.get("benign_test")
    )

    recipes = [dataclasses.replace(a, epochs=budget) for a in grid.attacks]
    _check_recipes(recipes, model)
    sampler = grid.search["sampler"]
    if sampler == "auto":
        sampler = "optuna" if _optuna_available() else "random"
    if sampler == "optuna" and not _optuna_available():
        raise ValueError("evaluate: search sampler 'optuna' requested but optuna is not installed")
    search_recipes = []
    if trials and sampler == "random":
        rng = random.Random(grid.search["seed"])
        batch = recipes[0].batch_size if recipes else 128
        search_recipes = [
            dataclasses.replace(sample_attack(rng, batch_size=batch), epochs=budget)
            for _ in range(trials)
        ]

    specs = []
    for arm in arms:
        for seed in seeds:
            for attack in recipes:
                specs.append(
                    _cell_spec(arm, "grid", attack, seed, model_key(arm, seed), fingerprints)
                )
        for attack in search_recipes:
            specs.append(
                _cell_spec(arm, "search", attack, seeds[0], model_key(arm, seeds[0]), fingerprints)
            )
        if benign is not None:
            trainability = dataclasses.replace(TRAINABILITY_ATTACK, epochs=grid.benign_epochs)
            for seed in seeds:
                spec = _cell_spec(
                    arm, "trainability", trainability, seed, model_key(arm, seed), fingerprints
                )
                spec["fingerprint"] = (
                    fingerprints[model_key(arm, seed)] + ":" + _combined(trainability_parts)
                )
                spec["data_fingerprints"] = trainability_parts
                specs.append(spec)

    report_dir = Path(report_dir) if report_dir is not None else None
    cells_dir = report_dir / "cells" if report_dir is not None else None
    payload = {
        "models": models,
        "data": {k: (as_tensors(v) if v is not None else None) for k, v in data.items()},
        "device": str(device),
        "flush_denormal": device.type == "cpu",
    }
    started = time.perf_counter()
    dist = distributed_context()  # a process group of > 1 ranks spreads the cells over them
    if dist is None:
        cells = _run_cells(specs, payload, workers, cells_dir, progress)
    else:
        cells = dist.spread(
            specs,
            lambda mine: _run_cells(mine, payload, workers, cells_dir, progress),
            "evaluate() cells",
            key=lambda cell: cell["id"],
        )
    if trials and sampler == "optuna":

        def search(arm: str) -> list[dict]:
            return _optuna_search(
                arm,
                model_key(arm, seeds[0]),
                payload,
                grid,
                budget,
                seeds[0],
                fingerprints,
                cells_dir,
                progress,
            )

        if dist is None:
            for arm in arms:
                cells += search(arm)
        else:
            for part in dist.spread(arms, lambda mine: [search(a) for a in mine], "searches"):
                cells += part
    baseline = {}
    for key, m in models.items():
        baseline[key] = {
            "restricted_accuracy": accuracy(m, test, device=device),
            "original_accuracy": accuracy(m, original, device=device)
            if original is not None
            else None,
        }
    config = {
        "grid": grid.to_dict(),
        "seeds": list(seeds),
        "epochs": budget,
        "search": {"trials": trials, "sampler": sampler, "seed": grid.search["seed"]},
        "trainability": None
        if benign is None
        else {
            "attack": dataclasses.replace(TRAINABILITY_ATTACK, epochs=grid.benign_epochs).to_dict(),
            "domain": grid.benign if grid.benign else "given",
        },
        "data": {
            "restricted_train": len(as_tensors(train)[1]),
            "restricted_test": len(as_tensors(test)[1]),
            "original_test": None if original is None else len(as_tensors(original)[1]),
            "benign": None
            if benign is None
            else [len(data["benign_train"][1]), len(data["benign_test"][1])],
            "fingerprints": {
                **fingerprints["data"],
                **(trainability_parts if benign is not None else {}),
            },
        },
        "workers": workers,
        "device": str(device),
        "torch": torch.__version__,
    }
    report = build_report(
        cells, arms=arms, seeds=seeds, baseline=baseline, config=config, target=grid.target
    )
    report.data["seconds"] = time.perf_counter() - started
    if report_dir is not None and (dist is None or dist.rank == 0):
        report.write(report_dir)
    return report


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
    from .attack import _NORMS, blocks_of

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
