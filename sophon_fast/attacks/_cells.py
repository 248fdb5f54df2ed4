"""Cells of an attack evaluation: fresh models, fingerprints, cell specs, resume, the cell runner.

A *cell* is one (arm, recipe, seed) fine-tuning run. This module is what the classification
evaluation (:mod:`sophon_fast.attacks.evaluate`) and the generation evaluation
(:mod:`sophon_fast.attacks.generation`) share, so that neither imports the other except through
the public dispatcher: the scratch arm's fresh model (:func:`fresh_copy`), and for
classification the cell specs, the per-cell JSON files a rerun resumes from, and the runner that
executes cells in this process or in spawned workers.

Per-cell seeds are derived from (recipe, seed) only (:func:`cell_seed`), so all arms see the same
data subset, head draw and batch order. A stored cell is reused only when its recipe, seed, budget,
model weights and data are unchanged; a cell computed on different data raises an error naming
the data set instead of being reused or silently replaced (:func:`load_done`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn

from .._files import atomic_write_text
from ..data.dataset import resize_images, set_channels
from ..data.fingerprint import data_fingerprint
from ..models.classifiers import build_model
from ..training import as_tensors
from .attack import Attack, run_attack

__all__ = [
    "cell_spec",
    "combined",
    "data_fingerprints",
    "fresh_copy",
    "init_worker",
    "load_done",
    "model_fingerprint",
    "run_cell",
    "run_cells",
    "shaped_like",
    "store",
]


def model_fingerprint(model: nn.Module) -> str:
    """16 hex digits of SHA-256 over the names and bytes of ``model``'s state dict."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()[:16]


def data_fingerprints(**datasets) -> dict[str, str]:
    """name -> hash of the bytes of that data set's images and labels ("none" when absent)."""
    return {
        name: "none" if data is None else data_fingerprint(*as_tensors(data))
        for name, data in datasets.items()
    }


def combined(parts: dict[str, str]) -> str:
    """One 16-digit hash of a name -> fingerprint mapping (order-independent)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cell_seed(attack: Attack, seed: int) -> int:
    return int(hashlib.sha256(f"{attack.key}:{seed}".encode()).hexdigest()[:8], 16)


def fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture freshly initialised from ``seed`` (zoo models rebuild from their spec)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        spec = getattr(model, "model_spec", None)
        if spec:
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


def shaped_like(data, reference):
    """``data`` resized and re-channelled to the image shape of ``reference``."""
    images, labels = as_tensors(data)
    target = as_tensors(reference)[0].shape[1:]
    if images.dim() == 4 and len(target) == 3:
        images = resize_images(set_channels(images, target[0]), tuple(target[1:]))
    return images, labels


# ---------------------------------------------------------------- worker side

_WORKER: dict[str, Any] = {}


def init_worker(payload: dict[str, Any], threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    if payload.get("flush_denormal"):
        torch.set_flush_denormal(True)  # CPU runs slow down 2.6x on denormals otherwise
    _WORKER.clear()
    _WORKER.update(payload)


def run_cell(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
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


def cell_spec(arm: str, kind: str, attack: Attack, seed: int, model_key: str, fingerprints) -> dict:
    """The JSON-able description of one cell; ``fingerprint`` decides whether a stored cell is
    still valid (model weights + data)."""
    ident = f"{arm}-{kind}-{attack.key}-s{seed}"
    return {
        "id": ident,
        "arm": arm,
        "kind": kind,
        "attack": attack.to_dict(),
        "label": attack.label,
        "seed": seed,
        "cell_seed": cell_seed(attack, seed),
        "model_key": model_key,
        "fingerprint": fingerprints[model_key] + ":" + combined(fingerprints["data"]),
        "data_fingerprints": fingerprints["data"],
    }


def load_done(cells_dir: Path | None, spec: dict) -> dict | None:
    """The stored result of ``spec`` when it is still valid, else None (run the cell).

    Raises:
        ValueError: the stored cell ran the same recipe on different data.
    """
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


def store(cells_dir: Path | None, spec: dict, result: dict) -> dict:
    """The cell record of a finished run, written atomically to ``cells_dir`` when given."""
    cell = {k: v for k, v in spec.items() if k != "model_key"}
    cell.update({k: v for k, v in result.items() if k != "model"})
    if cells_dir is not None:
        atomic_write_text(cells_dir / f"{spec['id']}.json", json.dumps(cell, indent=1))
    return cell


def run_cells(specs, payload, workers, cells_dir, progress) -> list[dict]:
    """Every cell of ``specs``: stored ones reused, the rest run in this process (``workers`` 1)
    or in a pool of spawned workers with one thread each, each stored as it finishes."""
    cells, todo = [], []
    for spec in specs:
        done = load_done(cells_dir, spec)
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
        init_worker(payload, None)
        try:
            for i, spec in enumerate(todo):
                spec, result = run_cell(spec)
                cells.append(store(cells_dir, spec, result))
                note(i, spec, result)
        finally:
            _WORKER.clear()
            _WORKER.update(saved)
        return cells
    context = mp.get_context("spawn")
    # longest cells first keeps both workers busy to the end
    todo.sort(key=lambda s: -(s["attack"]["epochs"] or 1))
    with context.Pool(workers, initializer=init_worker, initargs=(payload, 1)) as pool:
        for i, (spec, result) in enumerate(pool.imap_unordered(run_cell, todo)):
            cells.append(store(cells_dir, spec, result))
            note(i, spec, result)
    return cells
