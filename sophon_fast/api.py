"""Public API: :func:`protect`, :class:`ProtectConfig`, :class:`ProtectResult`, :func:`simulate`.

protect() and simulate() validate their arguments and pick the Task of ``config.mode``
(:mod:`sophon_fast.tasks`: classification or denoising); the protection run itself is
:func:`sophon_fast.driver.run_protection`, the result types are in :mod:`sophon_fast.result`.

SOPHON (arXiv 2404.12699) makes a pre-trained classifier hard to fine-tune on a *restricted*
domain while keeping it accurate on its *original* domain. Each outer step minimises a
suppression loss measured after simulated fine-tuning on restricted batches (meta-gradient,
clipped, Adam with lr alpha * base_lr), then takes normal-training steps on original batches (CE,
Adam with lr beta * base_lr), guarded by an original-accuracy rollback. The maths lives in
:mod:`sophon_fast.engine.inner`, the loop in :mod:`sophon_fast.engine.outer`.

Defaults reproduce the official classification run (``inverse_loss.py``): ICE loss, 50 inner SGD
steps at 1e-4 on batches of 150 split 130 adapt / 20 evaluate at random, alpha 3, beta 5,
first-order meta-gradient clipped to 0.5, head re-drawn in every simulation, BatchNorm
statistics restored after every simulation, rollback-and-stop at 80 % original accuracy, seed 99.

FIXES (official-code bugs this library does not reproduce):

1. Short simulations: when the restricted iterator wrapped, the official code dropped the freshly
   fetched batch and ran that simulation with K-1 steps. Here every simulation has exactly
   ``inner_steps`` full batches (an epoch's incomplete tail is skipped, then a new permutation).
2. KL-to-uniform hard-coded u = 0.1 (uniform only for 10 classes) and took ``log(softmax)``,
   which underflows to -inf. Here u = 1/C and ``log_softmax``.
3. ``nl_loop = 0`` raised NameError (the guard read an accuracy only NTR defined). Here
   ``ntr_steps=0`` is valid; the guard reads the evaluation, which is independent of NTR.
4. The final ``load_bn`` restored the statistics saved before the last simulation, discarding the
   last NTR steps' BatchNorm updates. Here nothing is restored after the loop: the returned
   model carries the statistics of its last NTR step.
5. ``save_bn`` skipped ``num_batches_tracked``, so simulations advanced it (it matters for
   BatchNorm with ``momentum=None``). Here it is saved and restored with the running stats.
6. Head re-initialisation for VGG compared instead of assigning and looked for a missing
   ``.fc``. Here the head is found by name (:func:`sophon_fast.models.find_head`).

Kept on purpose (documented quirks): the ICE loss is the code's ``CE(1 - z, y)``
(``ice_paper`` is the textbook -log(1 - p_y)); the re-drawn head still receives meta-gradient
through the clone's identity edge (:mod:`sophon_fast.engine.inner`); the default guard stops
training at its first rollback.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sophon_fast.config import _DTYPES, _RESUME_MAY_DIFFER, ProtectConfig, _choice  # noqa: F401
from sophon_fast.driver import run_protection
from sophon_fast.engine.optimizers import Adversary, resolve_adversary  # noqa: F401
from sophon_fast.losses import SUPPRESSION_LOSSES, get_loss  # noqa: F401
from sophon_fast.result import ProtectResult, SimulationResult
from sophon_fast.tasks import ClassificationTask, task_for

__all__ = ["ProtectConfig", "ProtectResult", "SimulationResult", "protect", "simulate"]


def _revalidated(config: ProtectConfig | None) -> ProtectConfig:
    """A freshly validated copy of ``config`` (None = the defaults).

    ProtectConfig validates on construction only; a field assigned afterwards (``inner_steps =
    0`` ran as an unprotected "success") is checked here again, when the run starts.
    """
    if config is None:
        return ProtectConfig()
    if not isinstance(config, ProtectConfig):
        raise TypeError(f"config: expected a ProtectConfig or None, got {type(config).__name__}")
    with warnings.catch_warnings():
        # the construction-time warnings (eval_every off) were shown when the config was built
        warnings.simplefilter("ignore")
        return dataclasses.replace(config)


def _make_engine(config: ProtectConfig, model: nn.Module):
    """The classification engine protect() builds over ``model`` (benchmarks build runs with it)."""
    return ClassificationTask().make_engine(config, model)


def protect(
    model: nn.Module,
    original,
    restricted,
    config: ProtectConfig | None = None,
    *,
    original_eval=None,
    device: str | torch.device | None = None,
    progress: bool = True,
    callbacks: Sequence[Callable[[dict[str, Any]], Any]] = (),
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> ProtectResult:
    """Make ``model`` hard to fine-tune on ``restricted`` while keeping it good on ``original``.

    The caller's model is not modified: a copy is converted to ``config.dtype``, moved to
    ``device`` and protected. All data is validated before any training, then moved to the
    device once.

    Under an initialised ``torch.distributed`` process group of more than one rank (torchrun, or
    ``sophon-fast protect --nproc N``) every rank calls protect() with the same arguments: the
    ``config.simulations`` draws of each meta step are spread over the ranks and averaged with
    one all_reduce, NTR batches are sharded, rank 0 alone writes checkpoints and shows progress,
    and every rank returns the same result (:mod:`sophon_fast.distributed`).

    With ``config.mode="generation"`` the model is a DDPM noise predictor ``forward(x, t)`` and
    the data are images (N, C, H, W) in its range (pairs are accepted, labels ignored); see
    :mod:`sophon_fast.engine.generation` for the losses and what the history records (the
    denoising MSE as ``restricted_mse`` / ``original_mse``, ``initial_original_mse``).

    Args:
        model: a pre-trained classifier whose head (``config.head``, ``model.head_name`` or the
            last ``nn.Linear``) has one output per original class.
        original: original-domain training data for NTR: an ``(images, labels)`` tensor pair,
            a Dataset (``ImageDataset``, ``TensorDataset``, any map-style dataset of ``(x, y)``)
            or a DataLoader. images (N, C, H, W) or (N, features), labels (N,) int64.
        restricted: restricted-domain data, same forms; its labels must fit the head.
        config: :class:`ProtectConfig`; None = the official defaults. Default None.
        original_eval: held-out original-domain data for the accuracy the history records and
            the guard reads (the official code uses the test set); same forms. None = evaluate on
            ``original`` itself (optimistic). At most ``config.eval_size`` samples are used.
        device: where to run; None = the model's device. Default None.
        progress: show a tqdm progress bar. Default True.
        callbacks: functions called with each step's history record; one returning True stops
            training after that step. Default ().
        checkpoint_dir: write checkpoints here (every ``config.checkpoint_every`` steps and at
            the end). Default None.
        resume: continue from the checkpoint in ``checkpoint_dir`` (same config apart from
            ``outer_steps`` / ``checkpoint_every``, same data: byte fingerprints are compared);
            runs until ``config.outer_steps`` in total. On the CPU the result is bit-identical
            to an uninterrupted run, also after a kill at any instant of a checkpoint write
            (:mod:`sophon_fast.engine.checkpoint`). Default False.
        overwrite: discard a checkpoint already in ``checkpoint_dir`` and start over; without it
            (and without ``resume``) an existing checkpoint raises ``FileExistsError``.
            ``checkpoint_dir`` is created and checked writable before the first step.
            Default False.

    Returns:
        :class:`ProtectResult` with the protected copy, its per-step history and the config.

    Raises:
        TypeError: a config or data of the wrong type.
        ValueError: invalid data (shape, non-finite values, labels outside the head's classes,
            class-count mismatch, empty data, fewer samples than ``batch_size``), frozen
            parameters, a checkpoint
            that does not match, or ``resume`` without ``checkpoint_dir``.
        FileNotFoundError: ``resume=True`` but no checkpoint in ``checkpoint_dir``.
        FileExistsError: a checkpoint in ``checkpoint_dir`` without ``resume`` or ``overwrite``.
        PermissionError: ``checkpoint_dir`` cannot be created or written.
        sophon_fast.distributed.DistributedError: under a process group, another rank died,
            hung past the timeout or runs a different config or data.
    """
    config = _revalidated(config)
    return run_protection(
        task_for(config),
        model,
        original,
        restricted,
        config,
        original_eval=original_eval,
        device=device,
        progress=progress,
        callbacks=callbacks,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        overwrite=overwrite,
    )


def simulate(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    adapt_masks: Sequence[torch.Tensor],
    eval_masks: Sequence[torch.Tensor],
    config: ProtectConfig | None = None,
    *,
    adversary: Any = None,
    head_values: dict[str, torch.Tensor] | None = None,
    engine: str | None = None,
) -> SimulationResult:
    """Run ONE fine-tuning simulation + evaluation and return its loss and meta-gradient.

    The low-level call under :func:`protect`, for both engines: K = ``len(batches)`` inner steps,
    step k adapting on ``batches[k]`` rows where ``adapt_masks[k]`` is True and evaluating on
    rows where ``eval_masks[k]`` is True (the masks may overlap; each must select at least one
    row). The maths, orders and truncation are in :mod:`sophon_fast.engine.inner`. Uses
    ``config.loss``, ``order``, ``truncate`` and, on the fast engine, ``engine_options``: the
    engine is built exactly as protect() builds it (:meth:`sophon_fast.tasks.Task.make_engine`),
    with the statistics restored after the simulation. Batches must already be on the model's
    device and dtype. The model is left untouched: weights, BatchNorm statistics
    (bit-identical) and its train/eval flag.

    Args:
        model: the classifier (its parameters are theta).
        batches: K pairs x (batch_k, ...), y (batch_k,) int64.
        adapt_masks / eval_masks: K (batch_k,) bool tensors.
        config: supplies loss, order and truncate (and the default adversary). Default None =
            ``ProtectConfig()``.
        adversary: the inner optimizer, as in ``ProtectConfig.adversaries`` (one entry);
            None = ``config.adversaries[0]``.
        head_values: parameter name -> value written into the simulation's starting point
            (e.g. ``{"fc.weight": w, "fc.bias": b}`` from
            :func:`sophon_fast.models.xavier_head_values`); None = no re-initialisation.
        engine: "fast" or "reference"; None = ``config.engine``.

    With ``config.mode="generation"``, ``model`` is a noise predictor ``forward(x, t)``, each
    batch is a triple ``(x0 (B, C, H, W), noise (B, C, H, W), t (B,) int64)`` and ``accuracy``
    is the mean denoising MSE of the evaluation samples after each step.

    Returns:
        :class:`SimulationResult`.

    Raises:
        ValueError: mismatched lengths or shapes, empty masks, unknown head parameter names.
    """
    config = _revalidated(config)
    adversary = config.adversaries[0] if adversary is None else resolve_adversary(adversary)
    engine = config.engine if engine is None else engine
    _choice("engine", engine, ("fast", "reference"))
    return task_for(config).simulate(
        model,
        batches,
        adapt_masks,
        eval_masks,
        config,
        adversary=adversary,
        head_values=head_values,
        engine=engine,
    )
