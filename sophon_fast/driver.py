"""One protection driver for every Task: :func:`run_protection`.

protect() validates its arguments and picks the Task from ``config.mode``
(:mod:`sophon_fast.tasks`); everything a protection run does the same way whatever the model is
happens here, once: the model check, the task's data preparation, the working copy on the device
in ``config.dtype``, the run over the task's engine (the fast engine with ``config.engine_options``),
torch.distributed (:mod:`sophon_fast.distributed`: every rank calls protect() with the same
arguments), the checkpoint folder, resume and the checkpoint writer, flush-to-zero of denormals
on the CPU, the export of the protected copy and the :class:`~sophon_fast.result.ProtectResult`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sophon_fast.config import _RESUME_MAY_DIFFER, ProtectConfig
from sophon_fast.distributed import current as distributed_context
from sophon_fast.engine.checkpoint import (
    data_fingerprint,
    load_checkpoint,
    nonfinite_tensors,
    prepare_checkpoint_dir,
)
from sophon_fast.result import ProtectResult
from sophon_fast.tasks import Task

__all__ = ["check_model", "prepare_checkpoints", "run_protection"]


def check_model(model, device, *, resume: bool, checkpoint_dir) -> torch.device:
    """Reject a model protect() cannot train; the run's device (``device``, or the model's)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    first_param = next(model.parameters(), None)
    if first_param is None:
        raise ValueError(f"model: {type(model).__name__} has no parameters")
    on_meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if on_meta:
        raise ValueError(
            f"model: {on_meta[:3]}{' ...' if len(on_meta) > 3 else ''} are on the meta device and "
            "hold no values; materialise the model first (model.to_empty(device=...) and "
            "load_state_dict)"
        )
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"model: parameters {frozen} do not require grad; SOPHON updates every weight "
            "(call .requires_grad_(True) on the model first)"
        )
    return torch.device(device) if device is not None else first_param.device


def prepare_checkpoints(
    run, config: ProtectConfig, checkpoint_dir, *, resume, overwrite, main_rank, data
) -> Callable[[], None] | None:
    """Before the first step: create and probe ``checkpoint_dir``, refuse to start over an
    existing checkpoint without ``overwrite``, fingerprint the data (name -> (inputs, labels or
    None)), resume; returns the checkpoint writer for the loop (None: no directory)."""
    if checkpoint_dir is None:
        return None
    # every rank checks (they share the directory), rank 0 alone deletes on overwrite
    prepare_checkpoint_dir(checkpoint_dir, resume=resume, overwrite=overwrite, delete=main_rank)
    run.data_fingerprints = {name: data_fingerprint(*pair) for name, pair in data.items()}
    if resume:
        _resume(run, config, checkpoint_dir)
    config_dict = config.to_dict()

    def checkpoint() -> None:
        if main_rank:
            run.write_checkpoint(checkpoint_dir, config_dict)

    return checkpoint


def _resume(run, config: ProtectConfig, checkpoint_dir) -> None:
    """Load the last complete checkpoint into ``run`` after checking that its config and data
    match and that it holds only finite values."""
    tensors, meta = load_checkpoint(checkpoint_dir)
    saved, current = dict(meta["config"]), config.to_dict()
    differ = sorted(
        k
        for k in current
        if k not in _RESUME_MAY_DIFFER and saved.get(k) != json.loads(json.dumps(current[k]))
    )
    if differ:
        raise ValueError(f"resume: the config differs from the checkpoint's in {differ}")
    saved_data = meta.get("data")
    if saved_data is None:
        warnings.warn(
            f"resume: the checkpoint in {checkpoint_dir} predates data fingerprints; the data "
            "cannot be checked against it",
            stacklevel=5,
        )
    else:
        for name, fingerprint in (run.data_fingerprints or {}).items():
            if name in saved_data and saved_data[name] != fingerprint:
                raise ValueError(
                    f"resume: the {name} data differs from the data the checkpoint in "
                    f"{checkpoint_dir} was written with (fingerprint {fingerprint}, checkpoint "
                    f"{saved_data[name]}): resume with the same data, or start over with "
                    "overwrite=True (--overwrite) or another checkpoint directory"
                )
    weights = {k: v for k, v in tensors.items() if k.startswith(("engine.model.", "good.model."))}
    others = {
        k: v for k, v in tensors.items() if k.startswith(("engine.", "good.")) and k not in weights
    }
    bad = nonfinite_tensors(weights)
    if meta.get("stopped_by") != "nonfinite":  # a run stopped there never steps again
        bad += nonfinite_tensors(others)
    if bad:
        raise ValueError(
            f"resume: the checkpoint in {checkpoint_dir} (step {meta.get('step')}) holds NaN or "
            f"infinite values in {bad[:4]}{' ...' if len(bad) > 4 else ''}; it cannot be "
            "continued: start over with overwrite=True (--overwrite)"
        )
    run.load_state(tensors, meta)


@contextlib.contextmanager
def _flush_denormal(device: torch.device, config: ProtectConfig) -> Iterator[None]:
    """Flush denormals to zero on the CPU (engine option ``flush_denormal``, default on): long
    CPU runs slow down 2.6x on denormals without it."""
    flush = device.type == "cpu" and (config.engine_options or {}).get("flush_denormal", True)
    if flush:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flush:
            torch.set_flush_denormal(False)  # PyTorch's default; the previous state is unknown


def run_protection(
    task: Task,
    model: nn.Module,
    original,
    restricted,
    config: ProtectConfig,
    *,
    original_eval=None,
    device: str | torch.device | None = None,
    progress: bool = True,
    callbacks: Sequence[Callable[[dict[str, Any]], Any]] = (),
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> ProtectResult:
    """Protect a copy of ``model`` as ``task`` says (arguments as :func:`sophon_fast.protect`,
    with ``config`` already validated). The caller's model is not modified."""
    device = check_model(model, device, resume=resume, checkpoint_dir=checkpoint_dir)
    data = task.prepare(model, original, restricted, original_eval, config)
    dtype = config.torch_dtype
    work = task.wrap(copy.deepcopy(model).to(device=device, dtype=dtype))
    work.train()
    task.check_forward(work, data, device, dtype)

    def to_device(pair):
        x, y = pair
        labels = torch.zeros(x.shape[0], dtype=torch.int64) if y is None else y
        return x.to(device=device, dtype=dtype), labels.to(device=device, dtype=torch.int64)

    run = task.run_class(
        engine=task.make_engine(config, work),
        config=config,
        restricted=to_device(data.restricted),
        original=to_device(data.original),
        original_eval=to_device(data.original_eval),
        head=task.head(work, config),
        probe=task.probe(config),
        dist=distributed_context(),  # None without a process group of > 1 ranks
    )
    main_rank = run.dist is None or run.dist.rank == 0  # writes checkpoints, shows progress
    checkpoint = prepare_checkpoints(
        run,
        config,
        checkpoint_dir,
        resume=resume,
        overwrite=overwrite,
        main_rank=main_rank,
        data=data.named(),
    )
    with _flush_denormal(device, config):
        run.start()
        run.run(
            config.outer_steps,
            progress=progress and main_rank,
            callbacks=callbacks,
            checkpoint=checkpoint,
            checkpoint_every=config.checkpoint_every,
        )
    protected = task.unwrap(run.engine.export())
    protected.train(model.training)
    return ProtectResult(
        model=protected,
        history=run.history,
        config=config,
        stopped_by=run.stopped_by,
        events=list(run.events),
        **task.result_fields(run),
    )
