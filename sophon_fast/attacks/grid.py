"""Attack grids: the default grid, the quick grid, TOML/dict grids and the search space.

A grid is a list of *sweeps*; each sweep is a table whose values are single values or lists,
expanded as a Cartesian product into :class:`~sophon_fast.attacks.attack.Attack` recipes (the
grid is the union, duplicates dropped, order kept). ``lr = "family"`` (also when ``lr`` is
omitted) takes the optimizer's learning-rate grid from ``LR_GRIDS``. Any :class:`Attack` field
may be swept; ``epochs`` is the grid's, not the sweep's. Unknown keys and bad values are
rejected with the key named. In TOML::

    [grid]
    epochs = 20            # budget of every cell (evaluate(epochs=...) overrides it)
    seeds = [0, 1, 2]      # evaluate(seeds=...) overrides it
    target = 0.9           # epochs-to-target threshold: share of the normal arm's final accuracy
    benign = "builtin:lfw_face_or_not"   # trainability domain ("none" to skip)
    benign_epochs = 5

    [[grid.sweep]]
    scope = ["full", "reinit_head_full"]
    optimizer = ["momentum", "adam"]
    lr = "family"
    schedule = "constant"

    [grid.search]          # the search adversary; trials = 0 turns it off
    trials = 20
    sampler = "auto"       # "random", "optuna" or "auto" (Optuna when importable)

The quick grid (``QUICK_GRID``, ``--quick``): 2 seeds, 6 epochs, batch 128, 11 recipes aimed at
the published hard cases — head re-initialisation + full fine-tuning (H1: momentum 1e-2 and
Adam 1e-3), adaptive optimizers (H2: Adam, Adadelta 1.0, Adagrad 1e-2), schedule changes and
LoRA (H7: Nesterov warm-up + cosine, AdamW cosine, LoRA r=8 with Adam), the official-style strong
attack (full, momentum 1e-2), and cheap probes (BN recalibration + linear probe, last-2-block
re-initialisation + full) — plus a 4-trial random-search adversary, and a 3-epoch trainability
check. It fits ~10 minutes on 2 CPU cores for the demo's 50 k-parameter CNN and three arms;
it is a smoke-level screen, not a certificate (H2 recovery shows after 40-50 epochs).

The default grid (``DEFAULT_GRID``): 3 seeds, 40 epochs; every scope with momentum and Adam at
their family grids; all eight optimizers at their family grids on full and head-re-initialised
fine-tuning; the three schedules; batch 32 and 512; data fractions 0.1 and 0.01; LoRA ranks 4
and 32; the three probes; 20 search trials.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: the tomli backport, a dependency there
    import tomli as tomllib

from .attack import OPTIMIZERS, SCHEDULES, SCOPES, Attack

__all__ = [
    "DEFAULT_GRID",
    "LR_GRIDS",
    "LR_RANGES",
    "QUICK_GRID",
    "GridConfig",
    "load_grid",
    "sample_attack",
]

LR_GRIDS: dict[str, tuple[float, ...]] = {
    "sgd": (1e-4, 1e-3, 1e-2, 1e-1),
    "momentum": (1e-4, 1e-3, 1e-2, 1e-1),
    "nesterov": (1e-4, 1e-3, 1e-2, 1e-1),
    "adam": (1e-5, 1e-4, 1e-3),
    "adamw": (1e-5, 1e-4, 1e-3),
    "rmsprop": (1e-5, 1e-4, 1e-3),
    "adagrad": (1e-3, 1e-2, 1e-1),
    "adadelta": (0.1, 1.0),
}
# log-uniform ranges of the search adversary, a decade either side of the grids' ends at most
LR_RANGES: dict[str, tuple[float, float]] = {
    "sgd": (1e-4, 2e-1),
    "momentum": (1e-4, 2e-1),
    "nesterov": (1e-4, 2e-1),
    "adam": (1e-5, 3e-3),
    "adamw": (1e-5, 3e-3),
    "rmsprop": (1e-5, 3e-3),
    "adagrad": (1e-3, 3e-1),
    "adadelta": (0.05, 2.0),
}
SEARCH_SCOPES = ("full", "reinit_head_full", "last_k", "lora")
_GRID_KEYS = ("epochs", "seeds", "target", "benign", "benign_epochs", "sweep", "search")
_SEARCH_KEYS = ("trials", "sampler", "seed")
SAMPLERS = ("random", "optuna", "auto")

QUICK_GRID: dict[str, Any] = {
    "epochs": 6,
    "seeds": [0, 1],
    "target": 0.9,
    "benign": "builtin:lfw_face_or_not",
    "benign_epochs": 3,
    "sweep": [
        {"scope": "full", "optimizer": "momentum", "lr": 1e-2},
        {"scope": "reinit_head_full", "optimizer": "momentum", "lr": 1e-2},
        {"scope": "reinit_head_full", "optimizer": "adam", "lr": 1e-3},
        {"scope": "full", "optimizer": "adam", "lr": 1e-3},
        {"scope": "full", "optimizer": "adadelta", "lr": 1.0},
        {"scope": "full", "optimizer": "adagrad", "lr": 1e-2},
        {"scope": "full", "optimizer": "nesterov", "lr": 1e-2, "schedule": "warmup_cosine"},
        {"scope": "full", "optimizer": "adamw", "lr": 1e-3, "schedule": "cosine"},
        {"scope": "lora", "optimizer": "adam", "lr": 1e-3, "lora_rank": 8},
        {"scope": "linear_probe", "optimizer": "adam", "lr": 1e-3, "probe": "bn_recal"},
        {"scope": "full", "optimizer": "momentum", "lr": 1e-2, "probe": "reinit_last_k"},
    ],
    "search": {"trials": 4, "sampler": "random", "seed": 0},
}

DEFAULT_GRID: dict[str, Any] = {
    "epochs": 40,
    "seeds": [0, 1, 2],
    "target": 0.9,
    "benign": "builtin:lfw_face_or_not",
    "benign_epochs": 10,
    "sweep": [
        {"scope": list(SCOPES), "optimizer": ["momentum", "adam"], "lr": "family"},
        {"scope": ["full", "reinit_head_full"], "optimizer": list(OPTIMIZERS), "lr": "family"},
        {
            "scope": ["full", "reinit_head_full"],
            "optimizer": ["nesterov", "adamw"],
            "lr": "family",
            "schedule": list(SCHEDULES),
        },
        {
            "scope": "full",
            "optimizer": ["momentum", "adam"],
            "lr": "family",
            "batch_size": [32, 512],
        },
        {
            "scope": "full",
            "optimizer": ["momentum", "adam"],
            "lr": "family",
            "data_fraction": [0.1, 0.01],
            "batch_size": 32,
        },
        {"scope": "lora", "optimizer": "adam", "lr": "family", "lora_rank": [4, 32]},
        {
            "scope": "full",
            "optimizer": ["momentum", "adam"],
            "lr": "family",
            "probe": ["bn_recal", "reinit_last_k", "noise"],
        },
    ],
    "search": {"trials": 20, "sampler": "auto", "seed": 0},
}


class GridConfig:
    """A validated grid: ``attacks`` (list of Attack), ``epochs``, ``seeds``, ``target``,
    ``benign``, ``benign_epochs``, ``search`` (``trials``, ``sampler``, ``seed``)."""

    def __init__(self, raw: dict[str, Any], *, what: str = "grid") -> None:
        if not isinstance(raw, dict):
            raise TypeError(f"{what}: expected a table/dict, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(_GRID_KEYS))
        if unknown:
            raise ValueError(f"{what}: unknown key(s) {unknown}; valid keys: {list(_GRID_KEYS)}")
        self.raw = copy.deepcopy(raw)
        self.epochs = _positive_int(raw.get("epochs", 20), f"{what}.epochs", minimum=1)
        seeds = raw.get("seeds", [0, 1, 2])
        if not isinstance(seeds, (list, tuple)) or not seeds:
            raise ValueError(f"{what}.seeds: expected a non-empty list of ints, got {seeds!r}")
        self.seeds = tuple(_positive_int(s, f"{what}.seeds", minimum=0) for s in seeds)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"{what}.seeds: repeated seeds in {list(self.seeds)}")
        target = raw.get("target", 0.9)
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
            raise ValueError(f"{what}.target: expected a number in (0, 1], got {target!r}")
        self.target = float(target)
        self.benign = raw.get("benign", None)
        if self.benign in ("none", ""):
            self.benign = None
        self.benign_epochs = _positive_int(
            raw.get("benign_epochs", 5), f"{what}.benign_epochs", minimum=1
        )
        sweeps = raw.get("sweep", [])
        if isinstance(sweeps, dict):
            sweeps = [sweeps]
        if not isinstance(sweeps, list):
            raise ValueError(
                f"{what}.sweep: expected a list of tables, got {type(sweeps).__name__}"
            )
        self.attacks: list[Attack] = []
        seen = set()
        for i, sweep in enumerate(sweeps):
            for attack in expand_sweep(sweep, what=f"{what}.sweep[{i}]"):
                if attack.key not in seen:
                    seen.add(attack.key)
                    self.attacks.append(attack)
        search = dict(raw.get("search", {}) or {})
        unknown = sorted(set(search) - set(_SEARCH_KEYS))
        if unknown:
            raise ValueError(
                f"{what}.search: unknown key(s) {unknown}; valid keys: {list(_SEARCH_KEYS)}"
            )
        search.setdefault("trials", 0)
        search.setdefault("sampler", "auto")
        search.setdefault("seed", 0)
        _positive_int(search["trials"], f"{what}.search.trials", minimum=0)
        _positive_int(search["seed"], f"{what}.search.seed", minimum=0)
        if search["sampler"] not in SAMPLERS:
            raise ValueError(
                f"{what}.search.sampler: expected one of {SAMPLERS}, got {search['sampler']!r}"
            )
        self.search = search
        if not self.attacks and not search["trials"]:
            raise ValueError(f"{what}: no attacks (empty sweeps and no search trials)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "seeds": list(self.seeds),
            "target": self.target,
            "benign": self.benign,
            "benign_epochs": self.benign_epochs,
            "attacks": [a.to_dict() for a in self.attacks],
            "search": dict(self.search),
        }


def _positive_int(value: Any, what: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what}: expected an int >= {minimum}, got {value!r}")
    return value


def expand_sweep(sweep: dict[str, Any], *, what: str = "sweep") -> list[Attack]:
    """The Cartesian product of one sweep's values as Attack recipes (``lr = "family"`` allowed)."""
    if not isinstance(sweep, dict) or not sweep:
        raise ValueError(f"{what}: expected a non-empty table, got {sweep!r}")
    axes = {k: (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in sweep.items()}
    for key, values in axes.items():
        if not values:
            raise ValueError(f"{what}.{key}: empty list")
    lr_values = axes.pop("lr", ["family"])
    optimizers = axes.pop("optimizer", [Attack.optimizer])
    keys = list(axes)
    attacks = []
    for optimizer in optimizers:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"{what}.optimizer: {optimizer!r} is not one of {OPTIMIZERS}")
        lrs = []
        for lr in lr_values:
            if lr == "family":
                lrs.extend(LR_GRIDS[optimizer])
            else:
                lrs.append(lr)
        for lr in lrs:
            for combo in itertools.product(*(axes[k] for k in keys)):
                fields = dict(zip(keys, combo), optimizer=optimizer, lr=lr)
                fields.setdefault("epochs", 0)  # the grid's budget is applied per cell
                try:
                    attacks.append(Attack.from_dict(fields))
                except (TypeError, ValueError) as error:
                    raise ValueError(f"{what}: {error}") from None
    return attacks


def load_grid(source: str | dict | None = None, *, quick: bool = False) -> GridConfig:
    """A :class:`GridConfig` from a TOML path, a dict, or the default/quick grid.

    Args:
        source: path of a TOML file with a ``[grid]`` table, a grid dict, or None.
        quick: with ``source=None``, the quick grid instead of the default.

    Raises:
        ValueError: the grid is malformed (the message names the key).
        FileNotFoundError: the TOML file does not exist.
    """
    if source is None:
        return GridConfig(
            QUICK_GRID if quick else DEFAULT_GRID, what="quick grid" if quick else "default grid"
        )
    if isinstance(source, dict):
        return GridConfig(source)
    path = Path(source)
    if path.is_dir():
        raise IsADirectoryError(f"grid config {path} is a folder; expected a TOML file")
    if not path.is_file():
        raise FileNotFoundError(f"grid config {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from None
    if "grid" not in raw:
        raise ValueError(f"{path}: needs a [grid] table")
    return GridConfig(raw["grid"], what=f"{path} [grid]")


def sample_attack(rng: random.Random, *, batch_size: int = 128) -> Attack:
    """One random recipe from the search space (scope x optimizer x log-uniform lr x schedule)."""
    optimizer = rng.choice(OPTIMIZERS)
    low, high = LR_RANGES[optimizer]
    lr = float(f"{math.exp(rng.uniform(math.log(low), math.log(high))):.3g}")
    return Attack(
        scope=rng.choice(SEARCH_SCOPES),
        optimizer=optimizer,
        lr=lr,
        schedule=rng.choice(SCHEDULES),
        batch_size=batch_size,
        epochs=0,
    )
