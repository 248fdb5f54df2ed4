"""Checkpoints of a protection run: safetensors for tensors, JSON for everything else.

A checkpoint directory holds two files, each written atomically (temporary file in the same
directory, flushed and fsynced, then ``os.replace``), so a crash leaves either the old or the new
file, never a torn one:

- ``checkpoint.safetensors``: the engine state (weights, BatchNorm statistics, both Adam states),
  the sampler permutations and positions, the seeded generator's state and torch's global RNG
  states (as uint8 tensors);
- ``checkpoint.json``: config, history, step counter and run flags.

Both carry the same ``step``; loading checks that they match. Nothing is unpickled: safetensors
holds raw tensors and JSON holds plain data.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_JSON",
    "CHECKPOINT_TENSORS",
    "atomic_write_text",
    "atomic_save_tensors",
    "load_checkpoint",
    "load_optimizer_tensors",
    "optimizer_tensors",
    "save_checkpoint",
]

CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    _atomic(Path(path), write)


def atomic_save_tensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Save ``tensors`` (moved to the CPU, contiguous, unshared) as safetensors, atomically."""
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    # Imported here: the kernel layer (import sophon_fast, the ops) must not need safetensors.
    from safetensors.torch import save_file

    _atomic(Path(path), lambda tmp: save_file(plain, tmp, metadata=metadata))


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """``{prefix}.{param_index}.{key}`` -> state tensor, for every parameter with state."""
    out = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        for key, value in optimizer.state.get(param, {}).items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            out[f"{prefix}.{index}.{key}"] = value
    return out


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str
) -> None:
    """Inverse of :func:`optimizer_tensors`; state tensors go to their parameter's device, except a
    non-capturable ``step`` that torch keeps on the CPU."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    on_device_step = bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))
    optimizer.state.clear()
    for name, value in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        index, key = name[len(prefix) + 1 :].split(".", 1)
        param = params[int(index)]
        if key == "step" and not on_device_step:
            value = value.clone()
        else:
            value = value.to(param.device).clone()
        optimizer.state.setdefault(param, {})[key] = value


def save_checkpoint(
    directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Write a checkpoint (tensors first, then the JSON that names the same ``meta['step']``)."""
    directory = Path(directory)
    step = str(meta["step"])
    atomic_save_tensors(directory / CHECKPOINT_TENSORS, tensors, metadata={"step": step})
    atomic_write_text(directory / CHECKPOINT_JSON, json.dumps(meta, indent=1, sort_keys=True))


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no checkpoint in ``directory``.
        ValueError: the two files belong to different steps.
    """
    directory = Path(directory)
    tensor_path, json_path = directory / CHECKPOINT_TENSORS, directory / CHECKPOINT_JSON
    if not (tensor_path.exists() and json_path.exists()):
        raise FileNotFoundError(
            f"no checkpoint in {directory} (expected {CHECKPOINT_TENSORS} and {CHECKPOINT_JSON})"
        )
    meta = json.loads(json_path.read_text(encoding="utf-8"))
    from safetensors import safe_open

    with safe_open(str(tensor_path), framework="pt") as handle:
        tensor_step = (handle.metadata() or {}).get("step")
    if tensor_step != str(meta.get("step")):
        raise ValueError(
            f"checkpoint in {directory} is inconsistent: tensors are from step {tensor_step}, "
            f"JSON from step {meta.get('step')}"
        )
    from safetensors.torch import load_file

    return load_file(str(tensor_path)), meta
