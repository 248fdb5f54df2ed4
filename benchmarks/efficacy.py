"""Efficacy benchmark: does protection hold against the quick attack grid, case by case?

    python benchmarks/run.py efficacy [--quick] [--json PATH] [--config NAME_OR_FILE]
                                      [--cases a,b] [--seeds 0,1] [--cache-dir DIR]
                                      [--outer-steps N] [--epochs E] [--workers N]
                                      [--device D] [--results-dir DIR] [--no-csv] [--verbose]

For every case and seed ``s``: pre-train the demo's small CNN on the case's original domain
(seed ``s``), protect it against the restricted domain with the named configuration, then run
:func:`sophon_fast.evaluate` with the quick grid (``attacks="quick"``, ``seeds=[s]``) on the
protected, normal (the pre-trained model) and scratch arms. Data are the built-in offline domains
of :mod:`sophon_fast.data.builtin` (digits upsampled to 28x28, fixed per-class test splits).

Cases (``--cases``):

``digits_full``       MNIST-5k -> scikit-learn digits; the attacker has the full digits training
                      split.
``digits_10shot``     the same protected model (same pair, the defender protected with the full
                      digits training split); every arm fine-tunes on 10 digits training images
                      per class, drawn with seed ``s`` (one subset for all three arms).
``mnist_0to4_5to9``   MNIST-5k digits 0-4 -> MNIST-5k digits 5-9 relabelled 0-4 (5 classes).
``digits_to_mnist``   scikit-learn digits -> MNIST-5k.

The protection keeps the configuration's own seed: the benchmark seed changes the pre-trained
model (initialisation and batch order), hence the protected one, the scratch initialisation and
the attacks' seeds.

Metrics per case and seed (the JSON keeps each seed and the mean over seeds):

* original-domain test accuracy of the normal and the protected model, and the drop in points;
* per epoch budget (1, 2, 3 and the grid's final epoch): the best protected recipe minus the best
  scratch recipe, where best is the maximum over the grid's recipes and the search adversary's
  trials of the restricted test accuracy at that epoch (``curve[e]`` of the report's cells);
* the same for the area under the curve up to that epoch (the report's definition: mean accuracy
  over epochs ``0..e``, trapezoidal);
* the linear-probe gap: final accuracy of the grid's ``linear_probe`` recipe on the protected arm
  minus on the scratch arm, and minus on the normal arm;
* wall seconds of pre-training, protection and evaluation.

The bar (per case, on the mean over seeds): original drop <= 2 points, and the best protected
recipe at most 1 point above the best scratch recipe at every epoch budget.

Caching (``--cache-dir``, default ``benchmarks/.cache/efficacy``, git-ignored): pre-trained models
per (original domain, seed, pre-training settings), protected models per (domain pair, config
dict, seed, pre-trained model), so ``digits_full`` and ``digits_10shot`` share one protected model;
cached stages report the seconds they took when they ran. Evaluation cells live in one report
folder per (case, seed), shared by every configuration: a cell is reused only while its recipe,
model weights and data are unchanged (:mod:`sophon_fast.attacks._cells`), so the normal and
scratch arms run once per case, seed and epoch budget, and a rerun of an interrupted benchmark
resumes. The JSON counts the reused cells; an evaluation whose cells all come from the cache
reports the seconds of the run that computed them all, when there was one.

Quick mode (``--quick``) caps the protection budget at ``QUICK_OUTER_STEPS`` (300, the robust
preset's own; ``--outer-steps`` sets it explicitly; the budget used is recorded) and
evaluates with the settings of ``QUICK_EVALUATION``: the quick grid's recipes, search adversary
and trainability check, at 4 epochs per cell instead of 6 (``--epochs`` overrides). A cell's cost
grows with the attacker's training set (MNIST-5k's 4,000 images make ``digits_to_mnist`` about
half of all evaluation time); scaled from cells measured on 2 CPU cores, the 8 evaluations alone
take about 33 minutes of an idle machine at 6 epochs and about 22 at 4; the 6 protections of a
300-step, K = 20 configuration add about 30 more (the README's efficacy section gives the
measured wall time). Outputs: a
printed table,
``benchmarks/results/efficacy-<config>-<quick|full>-latest.json`` (and ``--json PATH``), rows
appended to ``benchmarks/results/efficacy.csv``; ``python benchmarks/table.py --efficacy`` renders
the JSON as Markdown.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: the tomli backport, a dependency there
    import tomli as tomllib

import _harness
import table
import torch

import sophon_fast
from sophon_fast._json import strict_json
from sophon_fast.attacks.grid import load_grid
from sophon_fast.attacks.report import Report
from sophon_fast.config import ProtectConfig
from sophon_fast.data.builtin import load_builtin
from sophon_fast.data.dataset import ImageDataset
from sophon_fast.models.classifiers import SmallCNN
from sophon_fast.result import ProtectResult
from sophon_fast.training import accuracy, train_classifier

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / ".cache" / "efficacy"
FORMAT = "sophon_fast.EfficacyBench/1"
PRETRAIN = {"epochs": 5, "lr": 1e-3, "batch_size": 128}  # the demo's pre-training
BUDGETS = (1, 2, 3)  # epoch budgets reported besides the grid's final epoch
BAR = {"max_original_drop": 2.0, "max_best_gap": 1.0}  # points
SEEDS = (0, 1)
# Quick mode's protection budget and evaluation settings, chosen to fit 4 cases x 2 seeds in
# 40 minutes on 2 CPU cores (stage timings in the module's report; see the README).
# The quick run protects with the configuration's own budget up to this cap (the robust preset's
# own 300 steps; the official run's 1000 steps of K = 50 would alone take hours on 2 cores).
QUICK_OUTER_STEPS = 300
QUICK_EVALUATION = {"workers": 2, "benign": True, "epochs": 4}
FULL_EVALUATION = {"workers": 2, "benign": True, "epochs": None}  # None: the grid's (6)
CSV_FIELDS = [
    "suite",
    "device",
    "torch",
    "triton",
    "git_sha",
    "date",
    "threads",
    "config",
    "quick",
    "outer_steps",
    "epochs",
    "case",
    "seed",
    "original_normal",
    "original_protected",
    "original_drop",
    *[f"best_gap_e{b}" for b in BUDGETS],
    "best_gap_final",
    *[f"auc_gap_e{b}" for b in BUDGETS],
    "auc_gap_final",
    "linear_probe_gap_scratch",
    "linear_probe_gap_normal",
    "pretrain_s",
    "protect_s",
    "evaluate_s",
    "pretrain_cached",
    "protect_cached",
    "evaluate_cells_reused",
    "passed",
]


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: a domain pair, the class count and the attacker's training data."""

    name: str
    original: str  # built-in domain of pre-training and NTR
    restricted: str  # built-in domain the protection targets
    num_classes: int
    description: str
    shots: int | None = None  # attacker images per class (None: the full training split)

    @property
    def pair(self) -> tuple[str, str]:
        return (self.original, self.restricted)


CASES = {
    case.name: case
    for case in (
        Case(
            "digits_full",
            "mnist5k",
            "sklearn_digits",
            10,
            "MNIST-5k -> scikit-learn digits, attacker with the full digits training split",
        ),
        Case(
            "digits_10shot",
            "mnist5k",
            "sklearn_digits",
            10,
            "MNIST-5k -> scikit-learn digits, attacker with 10 digits training images per class",
            shots=10,
        ),
        Case(
            "mnist_0to4_5to9",
            "mnist5k_0to4",
            "mnist5k_5to9",
            5,
            "MNIST-5k digits 0-4 -> digits 5-9 relabelled 0-4 (5 classes)",
        ),
        Case(
            "digits_to_mnist",
            "sklearn_digits",
            "mnist5k",
            10,
            "scikit-learn digits (28x28) -> MNIST-5k",
        ),
    )
}


# ---------------------------------------------------------------- configuration


def resolve_config(spec: str) -> tuple[str, ProtectConfig]:
    """(name, config) from a preset name or a JSON / TOML file of ProtectConfig fields.

    A file holds the fields at its top level or in a ``[protect]`` table (the protect command's
    TOML, whose other tables are then ignored). A name goes through ``ProtectConfig.preset``;
    ``"official"`` is ``ProtectConfig()`` where that classmethod is missing.
    """
    path = Path(spec)
    if path.suffix.lower() in (".json", ".toml") or path.is_file():
        return path.stem, _config_from_file(path)
    preset = getattr(ProtectConfig, "preset", None)
    if preset is not None:
        try:
            return spec, preset(spec)
        except (KeyError, ValueError) as error:
            raise SystemExit(f"efficacy: --config {spec!r}: {error}") from None
    if spec == "official":
        return spec, ProtectConfig()
    raise SystemExit(
        f"efficacy: --config {spec!r} is neither a JSON/TOML file nor a known preset "
        "(expected 'official' or a path)"
    )


def _config_from_file(path: Path) -> ProtectConfig:
    if not path.is_file():
        raise SystemExit(f"efficacy: config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as error:
        raise SystemExit(
            f"efficacy: {path} is not valid {path.suffix[1:].upper()}: {error}"
        ) from None
    if isinstance(raw, dict) and isinstance(raw.get("protect"), dict):
        raw = raw["protect"]
    if not isinstance(raw, dict):
        raise SystemExit(f"efficacy: {path} should hold a table of ProtectConfig fields")
    try:
        return ProtectConfig.from_dict(raw)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"efficacy: {path}: {error}") from None


def cache_key(material: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over ``material`` as sorted JSON."""
    text = json.dumps(material, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pretrain_key(domain: str, num_classes: int, seed: int, device: str) -> str:
    return cache_key(
        {
            "model": "small_cnn",
            "domain": domain,
            "num_classes": num_classes,
            "seed": seed,
            "pretrain": PRETRAIN,
            "device": device,
        }
    )


def protect_key(case: Case, config: ProtectConfig, seed: int, pretrained: str) -> str:
    """The protected model's key: domain pair, full config dict, seed and pre-trained model."""
    return cache_key(
        {
            "pair": list(case.pair),
            "config": config.to_dict(),
            "seed": seed,
            "pretrained": pretrained,
        }
    )


# ---------------------------------------------------------------- aggregation


def auc(curve: list[float]) -> float:
    """Mean accuracy over epochs ``0..E``, trapezoidal (the report's ``auc``)."""
    if len(curve) < 2:
        return curve[0]
    return sum((a + b) / 2 for a, b in zip(curve[:-1], curve[1:])) / (len(curve) - 1)


def budget_names(epochs: int) -> list[str]:
    return [str(b) for b in BUDGETS if b <= epochs] + ["final"]


def _epoch(budget: str, length: int) -> int:
    return length - 1 if budget == "final" else int(budget)


def attack_cells(report: dict[str, Any], arm: str) -> list[dict[str, Any]]:
    """The arm's grid and search cells (trainability cells are on another domain)."""
    return [c for c in report["arms"][arm]["cells"] if c["kind"] in ("grid", "search")]


def best_per_budget(cells: list[dict[str, Any]], budgets: list[str]) -> dict[str, dict]:
    """``{"accuracy": {budget: best curve[e]}, "auc": {budget: best AUC of curve[:e+1]}}``."""
    out: dict[str, dict[str, float]] = {"accuracy": {}, "auc": {}}
    for budget in budgets:
        epochs = [_epoch(budget, len(c["curve"])) for c in cells]
        out["accuracy"][budget] = max(c["curve"][e] for c, e in zip(cells, epochs))
        out["auc"][budget] = max(auc(c["curve"][: e + 1]) for c, e in zip(cells, epochs))
    return out


def linear_probe_final(cells: list[dict[str, Any]]) -> float | None:
    """Final accuracy of the grid's linear-probe recipe (the best one when there are several)."""
    finals = [
        c["curve"][-1]
        for c in cells
        if c["kind"] == "grid" and c["attack"]["scope"] == "linear_probe"
    ]
    return max(finals) if finals else None


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def case_metrics(report: dict[str, Any], original: dict[str, float]) -> dict[str, Any]:
    """One (case, seed)'s metrics from a Report's data and the original-domain accuracies."""
    arms = [a for a in ("protected", "normal", "scratch") if a in report["arms"]]
    cells = {arm: attack_cells(report, arm) for arm in arms}
    epochs = min(len(c["curve"]) for arm in arms for c in cells[arm]) - 1
    budgets = budget_names(epochs)
    best = {arm: best_per_budget(cells[arm], budgets) for arm in arms}
    probe = {arm: linear_probe_final(cells[arm]) for arm in arms}
    return {
        "original_accuracy": dict(original),
        "original_drop": original["normal"] - original["protected"],
        "best": {arm: best[arm]["accuracy"] for arm in arms},
        "best_gap": {
            b: best["protected"]["accuracy"][b] - best["scratch"]["accuracy"][b] for b in budgets
        },
        "auc": {arm: best[arm]["auc"] for arm in arms},
        "auc_gap": {b: best["protected"]["auc"][b] - best["scratch"]["auc"][b] for b in budgets},
        "linear_probe": probe,
        "linear_probe_gap_scratch": _minus(probe["protected"], probe.get("scratch")),
        "linear_probe_gap_normal": _minus(probe["protected"], probe.get("normal")),
    }


def mean_tree(values: list[Any]) -> Any:
    """The element-wise mean of equally shaped nested dicts of numbers (None where any is None;
    booleans and strings kept when all seeds agree, else None)."""
    first = values[0]
    if isinstance(first, dict):
        return {k: mean_tree([v[k] for v in values]) for k in first}
    if isinstance(first, bool) or isinstance(first, str):
        return first if all(v == first for v in values) else None
    if any(v is None for v in values):
        return None
    return sum(values) / len(values)


def verdict(mean: dict[str, Any]) -> dict[str, Any]:
    """The bar on the mean over seeds: original drop <= 2 points and protected best <= scratch
    best + 1 point at every epoch budget."""
    drop_ok = mean["original_drop"] <= BAR["max_original_drop"]
    gaps_ok = {b: gap <= BAR["max_best_gap"] for b, gap in mean["best_gap"].items()}
    return {"passed": drop_ok and all(gaps_ok.values()), "original_drop": drop_ok, **gaps_ok}


# ---------------------------------------------------------------- stages


class Log:
    """One progress line per stage, with the elapsed time of the whole run."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.0f}s] {message}", flush=True)


def _domain(name: str, split: str) -> ImageDataset:
    return load_builtin(name, split)


def pretrained_model(
    case: Case, seed: int, device: torch.device, cache: Path, log: Log
) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    """The normal arm: the small CNN pre-trained on the case's original domain (cached)."""
    key = pretrain_key(case.original, case.num_classes, seed, device.type)
    folder = cache / "pretrained" / f"{case.original}-s{seed}-{key}"
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=case.num_classes, in_channels=1, image_size=28)
    if (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu"))
        log(f"{case.name} s{seed}: pre-trained {case.original} from the cache ({folder.name})")
        return model.to(device), key, {"seconds": meta["seconds"], "cached": True}
    tick = time.perf_counter()
    train_classifier(model, _domain(case.original, "train"), seed=seed, device=device, **PRETRAIN)
    seconds = time.perf_counter() - tick
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.pt.tmp"
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, folder / "model.pt")
    meta = {"domain": case.original, "seed": seed, "pretrain": PRETRAIN, "seconds": seconds}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    log(f"{case.name} s{seed}: pre-trained {case.original} in {seconds:.0f}s")
    return model, key, {"seconds": seconds, "cached": False}


def protected_model(
    case: Case,
    normal: torch.nn.Module,
    pretrained: str,
    config: ProtectConfig,
    seed: int,
    device: torch.device,
    cache: Path,
    log: Log,
    verbose: bool,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The protected arm, cached per (pair, config dict, seed, pre-trained model); a protection
    interrupted midway resumes from its checkpoint (bit-identical on the CPU)."""
    key = protect_key(case, config, seed, pretrained)
    folder = cache / "protected" / f"{case.original}-to-{case.restricted}-s{seed}-{key}"
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        result = ProtectResult.load(folder / "result")
        log(f"{case.name} s{seed}: protected model from the cache ({folder.name})")
        return result.model.to(device), {**meta, "key": key, "cached": True}
    checkpoints = folder / "checkpoint"
    resume = (checkpoints / "checkpoint.safetensors").is_file()
    log(
        f"{case.name} s{seed}: protecting {case.original} -> {case.restricted}, "
        f"{config.outer_steps} outer steps{' (resuming)' if resume else ''}"
    )
    run_config = config
    if config.checkpoint_every is None:  # resume-exempt: the result does not depend on it
        run_config = dataclasses.replace(config, checkpoint_every=max(1, config.outer_steps // 10))
    tick = time.perf_counter()
    result = sophon_fast.protect(
        normal,
        _domain(case.original, "train"),
        _domain(case.restricted, "train"),
        run_config,
        original_eval=_domain(case.original, "test"),
        device=device,
        progress=verbose,
        checkpoint_dir=checkpoints,
        resume=resume,
        overwrite=not resume,
    )
    seconds = time.perf_counter() - tick
    result.save(folder / "result")
    meta = {
        "pair": list(case.pair),
        "seed": seed,
        "seconds": seconds,
        "outer_steps_run": len(result.history),
        "stopped_by": result.stopped_by,
    }
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    log(f"{case.name} s{seed}: protected in {seconds:.0f}s ({len(result.history)} outer steps)")
    return result.model.to(device), {**meta, "key": key, "cached": False}


def attacker_train(case: Case, seed: int) -> ImageDataset:
    """The restricted training data every arm fine-tunes on: the full split, or ``shots``
    images per class drawn with ``seed`` (the same subset for every arm)."""
    train = _domain(case.restricted, "train")
    if case.shots is None:
        return train
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for label in range(train.num_classes):
        index = torch.nonzero(train.labels == label).flatten()
        if len(index) < case.shots:
            raise ValueError(
                f"{case.name}: class {label} has {len(index)} training images, fewer than "
                f"{case.shots} shots"
            )
        picked.append(index[torch.randperm(len(index), generator=generator)[: case.shots]])
    return train.subset(torch.sort(torch.cat(picked)).values)


def evaluate_arms(
    case: Case,
    seed: int,
    models: dict[str, torch.nn.Module],
    train: ImageDataset,
    evaluation: dict[str, Any],
    keys: dict[str, str],
    device: torch.device,
    cache: Path,
    verbose: bool,
) -> tuple[Report, dict[str, Any]]:
    """``evaluate()`` on the three arms with the quick grid and ``seeds=[seed]``; its report and
    wall seconds, with how many cells came from the cache.

    The original domain is not passed: the cells' before/after intactness passes cost ~13 % of
    a digits cell and no metric here reads them (the arms' original accuracy is measured once).
    """
    folder = cache / "evaluations" / f"{case.name}-s{seed}"
    settings = {k: evaluation[k] for k in ("workers", "benign", "epochs")}
    timing = (
        folder
        / "timings"
        / (cache_key({**keys, "case": case.name, "seed": seed, "evaluation": settings}) + ".json")
    )
    started_at = time.time()
    tick = time.perf_counter()
    report = sophon_fast.evaluate(
        models["protected"],
        (train, _domain(case.restricted, "test")),
        normal=models["normal"],
        attacks="quick",
        seeds=[seed],
        epochs=evaluation["epochs"],
        device=device,
        workers=evaluation["workers"],
        report_dir=folder,
        benign=None if evaluation["benign"] else False,
        progress=verbose,
    )
    seconds = time.perf_counter() - tick
    cells = [c for arm in report.arms.values() for c in arm["cells"]]
    computed = sum(
        (folder / "cells" / f"{c['id']}.json").stat().st_mtime >= started_at for c in cells
    )
    info = {
        "seconds": seconds,
        "cached": False,
        "cells": len(cells),
        "cells_reused": len(cells) - computed,
        "cell_seconds": sum(c["seconds"] for c in cells),
    }
    if computed == 0 and timing.is_file():
        info.update(seconds=json.loads(timing.read_text())["seconds"], cached=True)
    elif computed == len(cells):
        timing.parent.mkdir(parents=True, exist_ok=True)
        timing.write_text(json.dumps({"seconds": seconds, "cells": len(cells)}) + "\n")
    return report, info


def run_case_seed(
    case: Case,
    seed: int,
    config: ProtectConfig,
    evaluation: dict[str, Any],
    device: torch.device,
    cache: Path,
    log: Log,
    verbose: bool,
) -> dict[str, Any]:
    """Pre-train, protect and evaluate one (case, seed); its metrics, seconds and protect info."""
    normal, key, pretrain = pretrained_model(case, seed, device, cache, log)
    protected, protect = protected_model(
        case, normal, key, config, seed, device, cache, log, verbose
    )
    original_test = _domain(case.original, "test")
    original = {
        "normal": accuracy(normal, original_test, device=device),
        "protected": accuracy(protected, original_test, device=device),
    }
    train = attacker_train(case, seed)
    log(f"{case.name} s{seed}: evaluating three arms ({len(train)} attacker images)")
    report, evaluated = evaluate_arms(
        case,
        seed,
        {"protected": protected, "normal": normal},
        train,
        evaluation,
        {"pretrained": key, "protected": protect["key"], "device": device.type},
        device,
        cache,
        verbose,
    )
    metrics = case_metrics(report.data, original)
    reused = f", {evaluated['cells_reused']} of {evaluated['cells']} cells reused"
    log(
        f"{case.name} s{seed}: evaluated in {evaluated['seconds']:.0f}s"
        f"{reused if evaluated['cells_reused'] else ''}; original drop "
        f"{metrics['original_drop']:.1f}, best gap final {metrics['best_gap']['final']:+.1f}"
    )
    metrics["seconds"] = {
        "pretrain": pretrain["seconds"],
        "protect": protect["seconds"],
        "evaluate": evaluated["seconds"],
    }
    metrics["cached"] = {
        "pretrain": pretrain["cached"],
        "protect": protect["cached"],
        "evaluate": evaluated["cached"],
    }
    metrics["evaluation"] = {k: evaluated[k] for k in ("cells", "cells_reused", "cell_seconds")}
    metrics["protect"] = {
        "outer_steps_run": protect["outer_steps_run"],
        "stopped_by": protect["stopped_by"],
    }
    metrics["attacker_images"] = len(train)
    return metrics


# ---------------------------------------------------------------- outputs


def summarise(case: Case, per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    mean = mean_tree(list(per_seed.values()))
    return {
        "description": case.description,
        "original": case.original,
        "restricted": case.restricted,
        "num_classes": case.num_classes,
        "shots": case.shots,
        "seeds": per_seed,
        "mean": mean,
        "bar": verdict(mean),
    }


def csv_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (case, seed) and one per case mean, with the run's environment."""
    env = result["environment"]
    rows = []
    for name, case in result["cases"].items():
        entries = [(s, m, None) for s, m in case["seeds"].items()]
        entries.append(("mean", case["mean"], case["bar"]["passed"]))
        for seed, m, passed in entries:
            row = {
                "suite": "efficacy",
                **{k: env[k] for k in ("device", "torch", "triton", "git_sha", "date", "threads")},
                "config": result["config_name"],
                "quick": result["quick"],
                "outer_steps": result["config"]["outer_steps"],
                "epochs": result["evaluation"]["epochs"],
                "case": name,
                "seed": seed,
                "original_normal": m["original_accuracy"]["normal"],
                "original_protected": m["original_accuracy"]["protected"],
                "original_drop": m["original_drop"],
                "linear_probe_gap_scratch": m["linear_probe_gap_scratch"],
                "linear_probe_gap_normal": m["linear_probe_gap_normal"],
                "pretrain_s": m["seconds"]["pretrain"],
                "protect_s": m["seconds"]["protect"],
                "evaluate_s": m["seconds"]["evaluate"],
                "pretrain_cached": m["cached"]["pretrain"],
                "protect_cached": m["cached"]["protect"],
                "evaluate_cells_reused": m["evaluation"]["cells_reused"],
                "passed": "" if passed is None else passed,
            }
            for b in [*map(str, BUDGETS), "final"]:
                column = f"e{b}" if b != "final" else "final"
                row[f"best_gap_{column}"] = m["best_gap"].get(b)
                row[f"auc_gap_{column}"] = m["auc_gap"].get(b)
            rows.append(row)
    return rows


def append_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Append rows to ``path`` (header written once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def _write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(strict_json(result, indent=1) + "\n")


def _parse_list(text: str, what: str, convert=str) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise SystemExit(f"efficacy: {what} is empty")
    try:
        return [convert(item) for item in items]
    except ValueError:
        raise SystemExit(f"efficacy: {what} {text!r}: expected a comma-separated list") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py efficacy", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"at most {QUICK_OUTER_STEPS} outer steps and {QUICK_EVALUATION['epochs']}-epoch attack cells",
    )
    parser.add_argument("--json", type=Path, help="also write the result to this JSON file")
    parser.add_argument("--config", default="official", help="preset name or JSON/TOML file")
    parser.add_argument("--cases", default=",".join(CASES), help=f"subset of {list(CASES)}")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="e.g. 0,1")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE,
        help="pre-trained and protected models, evaluation cells (default benchmarks/.cache/efficacy)",
    )
    parser.add_argument(
        "--outer-steps",
        type=int,
        help=f"protection budget (default: the preset's, capped at {QUICK_OUTER_STEPS} with --quick)",
    )
    parser.add_argument("--workers", type=int, help="evaluate() workers (default 2)")
    parser.add_argument(
        "--epochs",
        type=int,
        help=f"epochs per attack cell (default: {QUICK_EVALUATION['epochs']} with --quick, "
        "else the quick grid's 6)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--results-dir", type=Path, default=_harness.RESULTS_DIR)
    parser.add_argument("--no-csv", action="store_true", help="do not append to efficacy.csv")
    parser.add_argument("--verbose", action="store_true", help="protect bars and one line per cell")
    args = parser.parse_args(argv)
    args.cases = _parse_list(args.cases, "--cases")
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; expected some of {list(CASES)}")
    args.seeds = _parse_list(args.seeds, "--seeds", int)
    if any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct ints >= 0, got {args.seeds}")
    for option in ("outer_steps", "workers", "epochs"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    log = Log()
    device = torch.device(args.device)
    torch.set_flush_denormal(True)  # long CPU runs slow down 2.6x on denormals otherwise
    name, config = resolve_config(args.config)
    preset_outer_steps = config.outer_steps
    if args.outer_steps is not None:
        config, steps_from = (
            dataclasses.replace(config, outer_steps=args.outer_steps),
            "--outer-steps",
        )
    elif args.quick and config.outer_steps > QUICK_OUTER_STEPS:
        config, steps_from = dataclasses.replace(config, outer_steps=QUICK_OUTER_STEPS), "quick"
    else:
        steps_from = "config"
    grid = load_grid(None, quick=True)
    evaluation = {
        "attacks": "quick",
        **(QUICK_EVALUATION if args.quick else FULL_EVALUATION),
        "search_trials": grid.search["trials"],
        "original_in_cells": False,
    }
    for option in ("workers", "epochs"):
        if getattr(args, option) is not None:
            evaluation[option] = getattr(args, option)
    evaluation["epochs"] = evaluation["epochs"] or grid.epochs
    env = _harness.environment(device)
    log(
        f"efficacy: config {name} ({config.outer_steps} outer steps, {steps_from}), "
        f"{'quick' if args.quick else 'full'}, cases {args.cases}, seeds {args.seeds} | "
        f"{env['device']} | torch {env['torch']} | commit {env['git_sha']}"
    )
    cases = {}
    for case_name in args.cases:
        case = CASES[case_name]
        per_seed = {
            str(seed): run_case_seed(
                case, seed, config, evaluation, device, args.cache_dir, log, args.verbose
            )
            for seed in args.seeds
        }
        cases[case_name] = summarise(case, per_seed)
    result = {
        "format": FORMAT,
        "config_name": name,
        "config": config.to_dict(),
        "outer_steps_from": steps_from,
        "config_outer_steps": preset_outer_steps,
        "quick": args.quick,
        "seeds": args.seeds,
        "pretrain": PRETRAIN,
        "evaluation": evaluation,
        "bar": BAR,
        "environment": env,
        "seconds": time.perf_counter() - log.started,
        "cases": cases,
    }
    print(table.render_efficacy(result))
    latest = args.results_dir / f"efficacy-{name}-{'quick' if args.quick else 'full'}-latest.json"
    for path in [latest] + ([args.json] if args.json else []):
        _write_json(result, path)
        print(f"wrote {path}")
    if not args.no_csv:
        rows = csv_rows(result)
        append_csv(rows, args.results_dir / "efficacy.csv")
        print(f"appended {len(rows)} rows to {args.results_dir / 'efficacy.csv'}")
    return 0
