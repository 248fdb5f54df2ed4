"""Checkpoints of a protection run: one safetensors file is the commit, a JSON copy for reading.

A checkpoint directory holds

- ``checkpoint.safetensors``: the engine state (weights, BatchNorm statistics, both Adam states),
  the sampler permutations and positions, the seeded generator's state and torch's global RNG
  states (as uint8 tensors), and in its header metadata the run's JSON (config, history, step,
  flags, data fingerprints) under ``meta``. This one file is the checkpoint: it is written to a
  temporary file in the same directory, flushed and fsynced, then renamed over the old one
  (``os.replace``) and the directory fsynced, so a kill at any instant leaves either the previous
  complete checkpoint or the new complete one, never a torn one or a mixed pair;
- ``checkpoint.json``: a copy of the same JSON, for people and scripts, written after the commit.
  A kill between the two leaves the previous step's copy; the header records a hash of the copy
  it replaces (``previous_json_sha256``), so loading tells that stale copy (ignored) from a copy
  edited by hand (refused as inconsistent).

Stale ``.checkpoint.*.tmp`` files of a killed writer are removed by the next write.
Checkpoints of the earlier format (the JSON only in ``checkpoint.json``, the header holding just
``step``) still load when both files name the same step. Nothing is unpickled: safetensors holds
raw tensors and JSON holds plain data.

Files are written by :mod:`sophon_fast._files` (temporary file, fsync, rename, folder fsync);
this module adds the write points the crash tests stop at. :func:`data_fingerprint` (defined in
:mod:`sophon_fast.data.fingerprint`, importable here as before) hashes the bytes of a data set,
stored in checkpoints so a resume on changed data is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from sophon_fast._files import atomic_write
from sophon_fast._files import atomic_write_text as _atomic_write_text
from sophon_fast.data.fingerprint import data_fingerprint
from sophon_fast.reference.optimizer_state import load_optimizer_tensors, optimizer_tensors

__all__ = [
    "CHECKPOINT_JSON",
    "CHECKPOINT_TENSORS",
    "atomic_write_text",
    "atomic_save_tensors",
    "checkpoint_step",
    "data_fingerprint",
    "ensure_writable_dir",
    "load_checkpoint",
    "load_optimizer_tensors",
    "nonfinite_tensors",
    "optimizer_tensors",
    "prepare_checkpoint_dir",
    "save_checkpoint",
]

CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"
FORMAT = "sophon_fast.checkpoint/2"

#: Test seam: ``hook(point, path)`` is called at every write point of a checkpoint (see
#: :func:`save_checkpoint`); the crash tests make it kill the process there. None in normal use.
write_point_hook = None


def _reach(point: str, path: Path) -> None:
    if write_point_hook is not None:
        write_point_hook(point, path)


def _stage_hook(point: str | None):
    """``reach`` for :func:`~sophon_fast._files.atomic_write`: stage ``s`` of the write named
    ``point`` reaches write point ``{point}_{s}``; None (no write points) without a name."""
    if not point:
        return None
    return lambda stage, tmp: _reach(f"{point}_{stage}", tmp)


def atomic_write_text(path: str | os.PathLike, text: str, *, point: str | None = None) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic_write_text(path, text, reach=_stage_hook(point))


def atomic_save_tensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    *,
    point: str | None = None,
) -> None:
    """Save ``tensors`` (moved to the CPU, contiguous, unshared) as safetensors, atomically."""
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    # Imported here: the kernel layer (import sophon_fast, the ops) must not need safetensors.
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(plain, tmp, metadata=metadata), _stage_hook(point))


def _clean_stale_temporaries(directory: Path) -> None:
    """Remove the temporary files a killed checkpoint writer left (one writer per directory)."""
    for name in (CHECKPOINT_TENSORS, CHECKPOINT_JSON):
        for stale in directory.glob(f".{name}.*.tmp"):
            try:
                stale.unlink()
            except FileNotFoundError:
                pass


def save_checkpoint(
    directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Write a checkpoint: one atomic replace of ``checkpoint.safetensors`` (tensors and the JSON
    ``meta`` in its header) is the commit; ``checkpoint.json`` is refreshed after it.

    Write points (``write_point_hook``), in order: ``begin``, ``tensors_written`` (temporary
    file complete, not yet fsynced), ``tensors_synced``, ``committed`` (renamed), ``json_written``,
    ``json_synced``, ``done``. A kill before ``committed`` leaves the previous checkpoint; from
    ``committed`` on, the new one.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _clean_stale_temporaries(directory)
    _reach("begin", directory)
    text = json.dumps(meta, indent=1, sort_keys=True)
    json_path = directory / CHECKPOINT_JSON
    try:
        previous = hashlib.sha256(json_path.read_bytes()).hexdigest()
    except FileNotFoundError:
        previous = ""
    metadata = {
        "format": FORMAT,
        "step": str(meta["step"]),
        "meta": text,
        "previous_json_sha256": previous,
    }
    atomic_save_tensors(directory / CHECKPOINT_TENSORS, tensors, metadata, point="tensors")
    _reach("committed", directory)
    atomic_write_text(json_path, text, point="json")
    _reach("done", directory)


def _header(tensor_path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(tensor_path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:  # truncated, empty, a folder: name the file
        raise ValueError(
            f"{tensor_path}: not a readable safetensors checkpoint ({error})"
        ) from None


def _read_meta(directory: Path) -> tuple[Path, dict[str, Any]]:
    tensor_path, json_path = directory / CHECKPOINT_TENSORS, directory / CHECKPOINT_JSON
    if not tensor_path.exists():
        raise FileNotFoundError(
            f"no checkpoint in {directory} (expected {CHECKPOINT_TENSORS}"
            f"{'' if json_path.exists() else ' and ' + CHECKPOINT_JSON})"
        )
    header = _header(tensor_path)
    if "meta" in header:  # this format: the header is the checkpoint, the JSON a copy
        meta = json.loads(header["meta"])
        if json_path.exists():
            raw = json_path.read_bytes()
            if raw != header["meta"].encode("utf-8") and hashlib.sha256(
                raw
            ).hexdigest() != header.get("previous_json_sha256"):
                raise ValueError(
                    f"checkpoint in {directory} is inconsistent: {CHECKPOINT_JSON} is neither the "
                    f"copy of step {header.get('step')}'s checkpoint nor the one it replaced (edited "
                    f"by hand?); delete {CHECKPOINT_JSON} to resume from {CHECKPOINT_TENSORS}"
                )
        return tensor_path, meta
    # the earlier format: JSON only in checkpoint.json, the two files must name the same step
    if not json_path.exists():
        raise FileNotFoundError(
            f"no checkpoint in {directory} (expected {CHECKPOINT_TENSORS} and {CHECKPOINT_JSON})"
        )
    meta = json.loads(json_path.read_text(encoding="utf-8"))
    if header.get("step") != str(meta.get("step")):
        raise ValueError(
            f"checkpoint in {directory} is inconsistent: tensors are from step {header.get('step')}, "
            f"JSON from step {meta.get('step')}"
        )
    return tensor_path, meta


def checkpoint_step(directory: str | os.PathLike) -> int | None:
    """The step of the checkpoint in ``directory``, None when there is none (reads only headers)."""
    directory = Path(directory)
    if not (directory / CHECKPOINT_TENSORS).exists() and not (directory / CHECKPOINT_JSON).exists():
        return None
    try:
        return int(_read_meta(directory)[1]["step"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return -1  # something is there, just not a readable checkpoint


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint` (or by the earlier two-file format).

    Raises:
        FileNotFoundError: no checkpoint in ``directory``.
        ValueError: the JSON copy was edited, or (earlier format) the two files belong to
            different steps.
    """
    tensor_path, meta = _read_meta(Path(directory))
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(tensor_path)), meta
    except (SafetensorError, OSError) as error:  # a header intact over a cut-off body
        raise ValueError(
            f"{tensor_path}: not a readable safetensors checkpoint ({error})"
        ) from None


def ensure_writable_dir(directory: Path) -> None:
    """Create ``directory`` and prove a file can be written in it (OSError when not), so an
    unwritable place fails before a run starts instead of after it."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=directory)
    os.close(fd)
    os.unlink(probe)


def prepare_checkpoint_dir(
    directory: str | os.PathLike, *, resume: bool, overwrite: bool, delete: bool = True
) -> None:
    """Before the first step: create ``directory``, check that a file can be written there, and
    refuse to start over an existing checkpoint unless ``overwrite`` (which deletes it now when
    ``delete``: rank 0 alone under a process group).

    Raises:
        FileExistsError: a checkpoint is there and neither ``resume`` nor ``overwrite`` is set.
        PermissionError / OSError: the directory cannot be created or written.
    """
    directory = Path(directory)
    try:
        ensure_writable_dir(directory)
    except OSError as error:
        raise PermissionError(
            f"checkpoint directory {directory} cannot be created or written ({error}); "
            "choose a writable location before the run starts"
        ) from None
    if resume:
        return
    step = checkpoint_step(directory)
    if step is None:
        return
    if not overwrite:
        held = f"step {step}" if step >= 0 else "an unreadable checkpoint"
        raise FileExistsError(
            f"{directory} already holds a checkpoint ({held}); pass resume=True (--resume) to "
            "continue it, or overwrite=True (--overwrite) to discard it and start over"
        )
    if not delete:
        return
    for name in (CHECKPOINT_TENSORS, CHECKPOINT_JSON):
        try:
            (directory / name).unlink()
        except FileNotFoundError:
            pass
    _clean_stale_temporaries(directory)


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return sorted(
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    )
