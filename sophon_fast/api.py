"""Public API: :func:`protect`, :class:`ProtectConfig`, :class:`ProtectResult`, :func:`simulate`.

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

import copy
import dataclasses
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sophon_fast.config import _DTYPES, _RESUME_MAY_DIFFER, ProtectConfig, _choice  # noqa: F401
from sophon_fast.engine.optimizers import Adversary, resolve_adversary  # noqa: F401
from sophon_fast.losses import SUPPRESSION_LOSSES, get_loss  # noqa: F401
from sophon_fast.result import ProtectResult, SimulationResult

__all__ = ["ProtectConfig", "ProtectResult", "SimulationResult", "protect", "simulate"]


def _check_mask_counts(batches, adapt_masks, eval_masks) -> None:
    if not (len(batches) == len(adapt_masks) == len(eval_masks)) or len(batches) == 0:
        raise ValueError(
            f"simulate: expected as many adapt and eval masks as batches (>= 1); got {len(batches)} batches, "
            f"{len(adapt_masks)} adapt masks, {len(eval_masks)} eval masks"
        )


def _run_simulation(engine: str, module: nn.Module, batches, adapt_masks, eval_masks, **kwargs):
    """One simulation of ``module`` on ``engine`` ("fast" or "reference"); ``kwargs`` go to the
    engine's simulate function. Returns (loss, accuracy, parameter name -> meta-gradient)."""
    if engine == "reference":
        from sophon_fast.reference.sophon import simulate_reference

        return simulate_reference(module, batches, adapt_masks, eval_masks, **kwargs)
    from sophon_fast.engine.flat import FlatParams
    from sophon_fast.engine.functional import FunctionalModel
    from sophon_fast.engine.inner import simulate_flat
    from sophon_fast.engine.sampling import masks_to_indices

    flat = FlatParams.from_module(module)
    device = flat.params.device
    result = simulate_flat(
        FunctionalModel(module, flat.layout),
        flat,
        batches,
        [masks_to_indices(m, device) for m in adapt_masks],
        [masks_to_indices(m, device) for m in eval_masks],
        **kwargs,
    )
    return result.loss, result.accuracy, flat.named_params(result.meta_grad.to(flat.params.dtype))


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


def _check_forward(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    """One eval-mode forward of two samples: the model must return (2, num_classes) logits.

    A forward with fewer logits than the head has outputs failed deep inside the loss, after the
    set-up; in eval mode and without gradients this leaves the model (and BatchNorm statistics)
    untouched.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2])
    except Exception as error:  # the user's forward: any failure, reported with the input shape
        raise ValueError(
            f"model: the forward pass fails on two samples of shape {tuple(x.shape[1:])}: "
            f"{type(error).__name__}: {error}"
        ) from error
    finally:
        model.train(was_training)
    expected = (min(2, x.shape[0]), num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"model: the forward pass returns {got} for {expected[0]} samples; expected "
            f"logits {expected} (one per class of the head)"
        )


def _check_model(model, device, *, resume: bool, checkpoint_dir) -> torch.device:
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


def _prepare_checkpoints(
    run, config: ProtectConfig, checkpoint_dir, *, resume, overwrite, main_rank, data
) -> Callable[[], None] | None:
    """Before the first step (both modes): create and probe ``checkpoint_dir``, refuse to start
    over an existing checkpoint without ``overwrite``, fingerprint the data (name -> (images,
    labels or None)), resume; returns the checkpoint writer for the loop (None: no directory)."""
    if checkpoint_dir is None:
        return None
    from sophon_fast.engine.checkpoint import data_fingerprint, prepare_checkpoint_dir

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
    from sophon_fast.engine.checkpoint import load_checkpoint, nonfinite_tensors

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
            stacklevel=3,
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


def _check_data(
    images, labels, *, name: str, num_classes: int, data_classes: int | None, allow_fewer: bool
) -> None:
    from sophon_fast.data import check_classification_data, check_num_classes

    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"{name}: expected tensors, got {type(images).__name__} and {type(labels).__name__}"
        )
    check_classification_data(images, labels, num_classes=num_classes, name=name)
    if data_classes is not None:
        check_num_classes(num_classes, data_classes, name, allow_fewer=allow_fewer)


def _make_engine(config: ProtectConfig, model: nn.Module):
    kwargs = dict(
        meta_lr=config.alpha * config.base_lr,
        ntr_lr=config.beta * config.base_lr,
        suppression_loss=get_loss(config.loss),
        adapt_loss=get_loss("ce"),
        ntr_loss=get_loss("ce"),
        order=config.order,
        truncate=config.truncate,
        restore_bn=config.restore_bn,
    )
    if config.engine == "fast":
        from sophon_fast.engine.inner import FastEngine

        return FastEngine(model, **kwargs, options=config.engine_options)
    from sophon_fast.reference.sophon import ReferenceEngine

    return ReferenceEngine(model, **kwargs)


def _data_classes(data) -> int | None:
    value = getattr(data, "num_classes", None)
    return value if isinstance(value, int) else None


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
    :mod:`sophon_fast.engine.generation` for the losses and what the history records.

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
    from sophon_fast.distributed import current as distributed_context
    from sophon_fast.engine.outer import ProtectionRun
    from sophon_fast.engine.sampling import as_tensors
    from sophon_fast.models import find_head

    config = _revalidated(config)
    if config.mode == "generation":
        from sophon_fast.engine.generation import protect_generation

        return protect_generation(
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
    device = _check_model(model, device, resume=resume, checkpoint_dir=checkpoint_dir)
    head_name, head_linear = find_head(model, config.head)  # warns once for an unnamed head
    num_classes = head_linear.out_features

    original_x, original_y = as_tensors(original, "original")
    restricted_x, restricted_y = as_tensors(restricted, "restricted")
    _check_data(
        original_x,
        original_y,
        name="original",
        num_classes=num_classes,
        data_classes=_data_classes(original),
        allow_fewer=False,
    )
    _check_data(
        restricted_x,
        restricted_y,
        name="restricted",
        num_classes=num_classes,
        data_classes=_data_classes(restricted),
        allow_fewer=True,
    )
    if original_eval is not None:
        eval_x, eval_y = as_tensors(original_eval, "original_eval")
        _check_data(
            eval_x,
            eval_y,
            name="original_eval",
            num_classes=num_classes,
            data_classes=_data_classes(original_eval),
            allow_fewer=True,
        )
    else:
        eval_x, eval_y = original_x, original_y
    if config.eval_size is not None:
        eval_x, eval_y = eval_x[: config.eval_size], eval_y[: config.eval_size]
    if restricted_y.shape[0] < config.batch_size:
        raise ValueError(
            f"restricted: {restricted_y.shape[0]} samples, fewer than batch_size={config.batch_size}"
        )
    if config.ntr_steps and original_y.shape[0] < config.batch_size:
        raise ValueError(
            f"original: {original_y.shape[0]} samples, fewer than batch_size={config.batch_size}"
        )
    if original_x.shape[1:] != restricted_x.shape[1:] or eval_x.shape[1:] != original_x.shape[1:]:
        raise ValueError(
            f"original / restricted / original_eval samples differ in shape: {tuple(original_x.shape[1:])}, "
            f"{tuple(restricted_x.shape[1:])}, {tuple(eval_x.shape[1:])}; the model takes one input shape"
        )

    dtype = config.torch_dtype
    work = copy.deepcopy(model).to(device=device, dtype=dtype)
    work.train()
    _check_forward(work, original_x[:2].to(device=device, dtype=dtype), num_classes)

    def to_device(x, y):
        return x.to(device=device, dtype=dtype), y.to(device=device, dtype=torch.int64)

    head = find_head(work, head_name) if config.reinit_head_resolved else None
    run = ProtectionRun(
        engine=_make_engine(config, work),
        config=config,
        restricted=to_device(restricted_x, restricted_y),
        original=to_device(original_x, original_y),
        original_eval=to_device(eval_x, eval_y),
        head=head,
        dist=distributed_context(),  # None without a process group of > 1 ranks
    )
    main_rank = run.dist is None or run.dist.rank == 0  # writes checkpoints, shows progress
    checkpoint = _prepare_checkpoints(
        run,
        config,
        checkpoint_dir,
        resume=resume,
        overwrite=overwrite,
        main_rank=main_rank,
        data={
            "original": (original_x, original_y),
            "restricted": (restricted_x, restricted_y),
            "original_eval": (eval_x, eval_y),
        },
    )

    flush = device.type == "cpu" and (config.engine_options or {}).get("flush_denormal", True)
    if flush:
        torch.set_flush_denormal(True)  # long CPU runs slow down 2.6x on denormals without it
    try:
        run.start()
        run.run(
            config.outer_steps,
            progress=progress and main_rank,
            callbacks=callbacks,
            checkpoint=checkpoint,
            checkpoint_every=config.checkpoint_every,
        )
    finally:
        if flush:
            torch.set_flush_denormal(
                False
            )  # PyTorch's default; the previous state is not queryable
    protected = run.engine.export()
    protected.train(model.training)
    result = ProtectResult(
        model=protected,
        history=run.history,
        config=config,
        initial_original_accuracy=run.initial_original_accuracy,
        stopped_by=run.stopped_by,
    )
    result.events = list(run.events)
    return result


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
    ``config.loss``, ``order``, ``truncate``; batches must already be on the model's device and
    dtype. The model is left untouched: weights, BatchNorm statistics (bit-identical) and its
    train/eval flag.

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
    if config.mode == "generation":
        from sophon_fast.engine.generation import simulate_generation

        loss, mse, grads = simulate_generation(
            model, batches, adapt_masks, eval_masks, config, adversary=adversary, engine=engine
        )
        return SimulationResult(loss=loss, accuracy=mse, meta_grad=grads)
    _check_mask_counts(batches, adapt_masks, eval_masks)
    for k, ((x, y), adapt, evaluate) in enumerate(zip(batches, adapt_masks, eval_masks)):
        for label, mask in (("adapt", adapt), ("eval", evaluate)):
            if mask.dtype != torch.bool or mask.shape != y.shape or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"simulate: batch {k}: expected x (B, ...), y (B,) and a (B,) bool {label} mask; got x "
                    f"{tuple(x.shape)}, y {tuple(y.shape)}, mask {tuple(mask.shape)} {mask.dtype}"
                )
            if not bool(mask.any()):
                raise ValueError(f"simulate: batch {k}: the {label} mask selects no sample")
    names = dict(model.named_parameters())
    for name, value in (head_values or {}).items():
        if name not in names or names[name].shape != value.shape:
            raise ValueError(
                f"simulate: head_values[{name!r}] does not match a parameter of the model"
            )
    was_training = model.training
    loss_fn, ce = get_loss(config.loss), get_loss("ce")
    try:
        loss, accuracy, grads = _run_simulation(
            engine, model, batches, adapt_masks, eval_masks,
            suppression_loss=loss_fn, adapt_loss=ce, adversary=adversary, order=config.order,
            truncate=config.truncate, head_values=head_values,
        )  # fmt: skip
    finally:
        model.train(was_training)
    return SimulationResult(loss=loss, accuracy=accuracy, meta_grad=grads)
