"""Generation mode: SOPHON for a DDPM noise-prediction model, on both engines.

The protected model is an eps-model ``f(x_t, t) -> eps_hat`` (e.g.
:class:`sophon_fast.models.unet.SmallUNet`). With ``alpha_bar`` the schedule's cumulative product
(:class:`sophon_fast.diffusion.NoiseSchedule`, 0-based timestep indices) and one step drawing
timesteps ``t`` from the configured set and noise ``eps ~ N(0, I)``:

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
    adapt / NTR loss   = mean((f(x_t, t) - eps)^2)          ordinary noise-prediction MSE
    mse_ascent         = -mean((f(x_t, t) - eps)^2)          gradient ascent on the denoising error
    dos                = mean(f(x_t, t)^2)                   denial of service: predict zero noise

Everything else (K inner steps of a simulated adversary on restricted batches, the adapt /
evaluate split, the first- or second-order meta-gradient, clip + meta Adam, NTR with its own Adam
on original batches, checkpoints and resume) is the classification machinery of
:mod:`sophon_fast.engine.inner`, :mod:`sophon_fast.reference.sophon` and
:mod:`sophon_fast.engine.outer`, reused unchanged through two seams:

- :class:`NoisePredictor` wraps the eps-model as a one-input module: its input packs ``x_t`` and
  ``t`` as ``(batch, channels + 1, H, W)``, the last channel holding ``t`` (exact as a float up to
  2^24), so the engines' ``forward(x)``, ``x.index_select`` and ``loss(output, target)`` work as
  they are, with the noise as the target;
- the noise and timesteps are drawn from the run's seeded generator right before each
  simulation / NTR step (:meth:`GenerationMixin.noised`), in a fixed order (per batch: ``t``,
  then ``eps``), so both engines see the same inputs and a resumed run continues bit-identically.

What the run records (history): ``suppression_loss``; ``restricted_mse`` (the mean denoising MSE
of the evaluation halves after each simulated fine-tuning step, whatever the suppression loss);
``ntr_loss``; ``original_accuracy`` None; ``original_mse`` (eval-mode denoising MSE on the original evaluation images, with
noise and timesteps drawn once from ``seed + 1`` and reused every time, so the numbers are
comparable step to step). There is no intactness guard (it reads a classification accuracy),
but the non-finite checks of :mod:`sophon_fast.engine.outer` run as in classification: a NaN or
infinite loss, meta-gradient or weight rolls back to the previous step's state and stops
(``stopped_by="nonfinite"``; ``guard_action="continue"`` goes on). Checkpoints, the data
fingerprints a resume compares and ``overwrite`` are shared with classification
(:func:`sophon_fast.api._prepare_checkpoints`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sophon_fast.engine.inner import FastEngine, simulate_flat
from sophon_fast.engine.outer import ProtectionRun
from sophon_fast.reference.sophon import ReferenceEngine, simulate_reference

__all__ = [
    "GENERATION_LOSSES",
    "DenoisingTask",
    "GenerationFastEngine",
    "GenerationReferenceEngine",
    "GenerationRun",
    "NoisePredictor",
    "denoising_error_sum",
    "noise_mse",
    "protect_generation",
    "resolve_timesteps",
    "simulate_generation",
    "validate_generation_config",
]

#: Suppression losses of generation mode (fused ops of :mod:`sophon_fast.ops.losses`).
GENERATION_LOSSES = ("mse_ascent", "dos")
#: The official code's fixed timestep (``randint(1, 2)``, a 0-based index: noise std 0.0148 on
#: the linear 1e-4..0.02 schedule over 1000 steps).
OFFICIAL_TIMESTEP = 1
_SCHEDULES = ("linear", "cosine")


# --------------------------------------------------------------------------- config


def resolve_timesteps(spec: Any, diffusion_steps: int) -> list[int]:
    """The timesteps a generation run draws from, as sorted 0-based schedule indices.

    Args:
        spec: None (the official ``t = 1``), an int, ``"a:b"`` (a to b inclusive), ``"all"``
            (0 .. diffusion_steps - 1) or a non-empty list of ints.
        diffusion_steps: T, the schedule's number of steps.

    Returns:
        Sorted distinct indices in [0, T).

    Raises:
        TypeError / ValueError: anything else, or an index outside [0, T).
    """
    where = "ProtectConfig.timesteps"
    if spec is None:
        values = [OFFICIAL_TIMESTEP]
    elif isinstance(spec, bool):
        raise TypeError(f"{where}: expected an int, 'a:b', 'all' or a list of ints, got {spec!r}")
    elif isinstance(spec, int):
        values = [spec]
    elif isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            values = list(range(diffusion_steps))
        elif ":" in text:
            first, _, last = text.partition(":")
            try:
                a, b = int(first), int(last)
            except ValueError:
                raise ValueError(
                    f"{where}: a range is 'a:b' with integers a <= b (inclusive), got {spec!r}"
                ) from None
            if a > b:
                raise ValueError(f"{where}: range {spec!r} is empty (expected a <= b)")
            values = list(range(a, b + 1))
        else:
            raise ValueError(f"{where}: expected an int, 'a:b', 'all' or a list, got {spec!r}")
    elif isinstance(spec, (list, tuple)):
        if not spec or not all(isinstance(v, int) and not isinstance(v, bool) for v in spec):
            raise ValueError(f"{where}: expected a non-empty list of ints, got {spec!r}")
        values = sorted(set(spec))
    else:
        raise TypeError(
            f"{where}: expected an int, 'a:b', 'all' or a list of ints, got {type(spec).__name__}"
        )
    bad = [v for v in values if not 0 <= v < diffusion_steps]
    if bad:
        raise ValueError(
            f"{where}: timesteps are 0-based schedule indices in [0, {diffusion_steps - 1}] "
            f"(diffusion_steps={diffusion_steps}); got {bad[:5]}"
        )
    return values


def validate_generation_config(config) -> None:
    """Generation-mode checks of a :class:`~sophon_fast.api.ProtectConfig` (called on construction).

    Raises:
        ValueError / TypeError: a classification loss, ``reinit_head=True``, a ``head`` name, an
            intactness guard, or a bad ``timesteps`` / ``noise_schedule`` / ``diffusion_steps``.
    """
    if config.loss not in GENERATION_LOSSES:
        raise ValueError(
            f"ProtectConfig.loss: mode='generation' takes one of {list(GENERATION_LOSSES)}, got "
            f"{config.loss!r} ({config.loss!r} is a classification loss; pass loss='mse_ascent' or 'dos')"
        )
    if config.reinit_head:
        raise ValueError(
            "ProtectConfig.reinit_head: a noise-prediction model has no classification head to "
            "re-draw; mode='generation' takes reinit_head=None or False"
        )
    if config.head is not None:
        raise ValueError(
            f"ProtectConfig.head: mode='generation' has no classifier head, got head={config.head!r}"
        )
    if config.guard_threshold not in (None, 80.0) or config.guard_mode != "absolute":
        raise ValueError(
            "ProtectConfig.guard_threshold / guard_mode: the intactness guard reads a classification "
            "accuracy; mode='generation' records the original-domain MSE and has no guard "
            "(leave guard_threshold at its default or None)"
        )
    if getattr(config, "engine_options", None) is not None:
        raise ValueError(
            "ProtectConfig.engine_options: the fast engine's speed options are not wired into "
            "mode='generation' yet; leave engine_options=None"
        )
    if config.noise_schedule not in _SCHEDULES:
        raise ValueError(
            f"ProtectConfig.noise_schedule: expected one of {list(_SCHEDULES)}, got {config.noise_schedule!r}"
        )
    steps = config.diffusion_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"ProtectConfig.diffusion_steps: expected an int >= 2, got {steps!r}")
    resolve_timesteps(config.timesteps, steps)
    if isinstance(config.timesteps, tuple):
        config.timesteps = list(config.timesteps)  # JSON round trip for resume comparisons


# --------------------------------------------------------------------------- the task


class NoisePredictor(nn.Module):
    """One-input view of an eps-model: ``forward(packed) = model(packed[:, :-1], t)`` with
    ``t = packed[:, -1, 0, 0]`` (see the module docstring). Parameters live under ``model.``.

    Shapes: packed (batch, channels + 1, H, W) -> (batch, channels, H, W).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        t = packed[:, -1, 0, 0].round().to(torch.int64)
        return self.model(packed[:, :-1], t)


def noise_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Ordinary noise-prediction loss mean((prediction - target)^2) (adaptation and NTR); () ."""
    return F.mse_loss(prediction, target)


def denoising_error_sum(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of each sample's mean squared error: () (the engines divide by N)."""
    return (prediction - target).square().flatten(1).mean(1).sum()


def suppression_loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The fused generation loss ``name`` as ``loss(prediction, noise)``."""
    from sophon_fast.ops import losses

    if name == "mse_ascent":
        return losses.mse_ascent
    if name == "dos":
        return lambda prediction, target: losses.dos(prediction)
    raise ValueError(f"unknown generation loss {name!r}; expected one of {list(GENERATION_LOSSES)}")


class DenoisingTask:
    """Noise and timestep draws and the packed model input of one noise schedule.

    Args:
        alpha_bars: (T,) cumulative products of the schedule (float64 preferred).
        timesteps: the indices to draw ``t`` from (uniformly).
    """

    def __init__(self, alpha_bars: torch.Tensor, timesteps: Sequence[int]) -> None:
        self.alpha_bars = alpha_bars.detach().to(torch.float64).cpu()
        self.timesteps = torch.as_tensor(list(timesteps), dtype=torch.int64)

    @classmethod
    def from_config(cls, config) -> DenoisingTask:
        from sophon_fast.diffusion import NoiseSchedule

        schedule = NoiseSchedule(kind=config.noise_schedule, timesteps=config.diffusion_steps)
        return cls(schedule.alpha_bars, resolve_timesteps(config.timesteps, config.diffusion_steps))

    def draw(
        self, x0: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t (batch,) int64, noise like x0) drawn on the CPU from ``generator``: t first."""
        batch = x0.shape[0]
        choice = torch.randint(len(self.timesteps), (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return self.timesteps[choice].to(x0.device), noise.to(x0.device)

    def pack(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, packed with t: (batch, C + 1, H, W)."""
        alpha_bar = self.alpha_bars.to(x0.device)[t.to(x0.device)]
        shape = (-1, 1, 1, 1)
        x_t = (
            alpha_bar.sqrt().to(x0.dtype).view(shape) * x0
            + (1.0 - alpha_bar).sqrt().to(x0.dtype).view(shape) * noise
        )
        t_channel = t.to(x0.dtype).view(shape).expand(-1, 1, *x0.shape[2:])
        return torch.cat([x_t, t_channel], dim=1)


class GenerationMixin:
    """What both generation engines add: noise drawing and the denoising-error sums."""

    task: DenoisingTask
    generator: torch.Generator | None = None

    def noised(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed input, noise target) for clean images ``x0``, drawn from the run generator."""
        if self.generator is None:
            raise RuntimeError("generation engine: no generator attached (GenerationRun sets it)")
        t, noise = self.task.draw(x0, self.generator)
        return self.task.pack(x0, t, noise), noise

    def noised_batches(self, batches):
        out = []
        for x0, _ in batches:
            out.append(self.noised(x0))
        return out


class GenerationFastEngine(GenerationMixin, FastEngine):
    """:class:`~sophon_fast.engine.inner.FastEngine` over a :class:`NoisePredictor`."""

    def __init__(self, model: NoisePredictor, *, task: DenoisingTask, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.task = task

    def simulate(self, batches, adapt_masks, eval_masks, head_values, adversary):
        from sophon_fast.engine.sampling import masks_to_indices

        result = simulate_flat(
            self.fmodel,
            self.flat,
            self.noised_batches(batches),
            [masks_to_indices(m, self.device) for m in adapt_masks],
            [masks_to_indices(m, self.device) for m in eval_masks],
            suppression_loss=self.suppression_loss,
            adapt_loss=self.adapt_loss,
            adversary=adversary,
            order=self.order,
            truncate=self.truncate,
            head_values=None,
            metric=denoising_error_sum,
        )
        return result.loss, result.accuracy, result.meta_grad

    def simulate_many(self, batches, adapt_masks, eval_masks, head_values, adversaries):
        """One simulation per adversary, each with its own noise draw, as the reference engine
        (no vmap path: the noise is drawn per simulation)."""
        return [
            self.simulate(batches, adapt_masks, eval_masks, head_values, adversary)
            for adversary in adversaries
        ]

    def ntr_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return super().ntr_step(*self.noised(x))

    @torch.no_grad()
    def error_sum(self, packed: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """() eval-mode sum of per-sample denoising MSEs."""
        prediction = self.fmodel(
            self.flat.params.detach(), self.flat.stats, self.flat.counters, packed, train=False
        )
        return denoising_error_sum(prediction, noise)


class GenerationReferenceEngine(GenerationMixin, ReferenceEngine):
    """:class:`~sophon_fast.reference.sophon.ReferenceEngine` over a :class:`NoisePredictor`."""

    def __init__(self, model: NoisePredictor, *, task: DenoisingTask, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.task = task

    def simulate(self, batches, adapt_masks, eval_masks, head_values, adversary):
        return simulate_reference(
            self.model,
            self.noised_batches(batches),
            adapt_masks,
            eval_masks,
            suppression_loss=self.suppression_loss,
            adapt_loss=self.adapt_loss,
            adversary=adversary,
            order=self.order,
            truncate=self.truncate,
            head_values=None,
            restore_stats=self.restore_bn,
            metric=denoising_error_sum,
        )

    def ntr_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return super().ntr_step(*self.noised(x))

    @torch.no_grad()
    def error_sum(self, packed: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        total = denoising_error_sum(self.model(packed), noise)
        self.model.train()
        return total


class GenerationRun(ProtectionRun):
    """:class:`~sophon_fast.engine.outer.ProtectionRun` for generation: noise from the run's
    generator, original-domain MSE instead of accuracy, no guard, generation history keys."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.engine.generator = self.generator
        self._eval_inputs = None
        if self.original_eval is not None:
            x0 = self.original_eval[0]
            fixed = torch.Generator().manual_seed(self.config.seed + 1)
            t, noise = self.engine.task.draw(x0, fixed)
            self._eval_inputs = (self.engine.task.pack(x0, t, noise), noise)

    def original_mse(self) -> float:
        """Eval-mode denoising MSE on the original evaluation images (fixed noise and t)."""
        packed, noise = self._eval_inputs
        size = self.config.eval_batch_size
        total = sum(
            self.engine.error_sum(packed[i : i + size], noise[i : i + size])
            for i in range(0, packed.shape[0], size)
        )
        return float(total) / packed.shape[0]

    # ProtectionRun reads "accuracy" in start() and outer_step(); here it is the original MSE.
    original_accuracy = original_mse

    def guard_threshold(self) -> float | None:
        return None

    def outer_step(self) -> dict[str, Any]:
        record = super().outer_step()
        restricted = record.pop("restricted_accuracy")
        # ProtectionRun reports 100 x the engines' mean: undo it for the MSE.
        record["restricted_mse"] = None if restricted is None else restricted / 100.0
        record["original_mse"] = record["original_accuracy"]
        record["original_accuracy"] = (
            None  # no accuracy in generation mode (the loop reads the key)
        )
        record.pop("guard", None)
        return record


# --------------------------------------------------------------------------- data


def as_images(data, name: str) -> torch.Tensor:
    """Images (N, C, H, W) from a tensor, an ``(images, labels)`` pair, a Dataset/DataLoader of
    ``(x, y)`` or an object with ``.tensors`` (labels are ignored), taken as given (the model's
    range); an :class:`~sophon_fast.data.ImageDataset` (documented [0, 1], what the CLI's data
    specs load) is mapped to [-1, 1], the range of :mod:`sophon_fast.diffusion`."""
    from sophon_fast.data import ImageDataset

    if isinstance(data, ImageDataset):
        from sophon_fast.diffusion import to_model_range

        images = to_model_range(data.images)
    elif isinstance(data, torch.Tensor):
        images = data
    else:
        tensors = getattr(data, "tensors", None)
        if isinstance(tensors, (tuple, list)) and len(tensors) == 1:
            images = tensors[0]
        else:
            from sophon_fast.engine.sampling import as_tensors

            images = as_tensors(data, name)[0]
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected image tensors, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(
            f"{name}: expected images (N, channels, height, width), got shape {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"{name}: expected floating-point images (in the model's range, [-1, 1] for "
            f"sophon_fast.diffusion), got {images.dtype}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{name}: no images")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name}: images contain NaN or infinite values")
    return images


def check_model_fits(model: nn.Module, images: torch.Tensor, name: str) -> None:
    """Reject images the eps-model cannot take, with the reason (channels, size, downsampling)."""
    channels, height, width = images.shape[1:]
    expected_channels = getattr(model, "in_channels", None)
    if isinstance(expected_channels, int) and expected_channels != channels:
        raise ValueError(
            f"{name}: images have {channels} channel(s) but {type(model).__name__} was built for "
            f"in_channels={expected_channels}; convert the data (e.g. grey <-> RGB) or rebuild the model"
        )
    downsampling = getattr(model, "downsampling", None)
    if isinstance(downsampling, int) and (height % downsampling or width % downsampling):
        raise ValueError(
            f"{name}: image size {height}x{width} is not divisible by the model's downsampling "
            f"{downsampling}; resize the images to a multiple of {downsampling}"
        )
    size = getattr(model, "image_size", None)
    if isinstance(size, int) and (height, width) != (size, size):
        raise ValueError(
            f"{name}: images are {height}x{width} but {type(model).__name__} was built for "
            f"image_size={size}; resize the images or rebuild the model"
        )


# --------------------------------------------------------------------------- entry points


def _make_engine(config, model: NoisePredictor, task: DenoisingTask):
    kwargs = dict(
        meta_lr=config.alpha * config.base_lr,
        ntr_lr=config.beta * config.base_lr,
        suppression_loss=suppression_loss_fn(config.loss),
        adapt_loss=noise_mse,
        ntr_loss=noise_mse,
        order=config.order,
        truncate=config.truncate,
        restore_bn=config.restore_bn,
        task=task,
    )
    cls = GenerationFastEngine if config.engine == "fast" else GenerationReferenceEngine
    return cls(model, **kwargs)


def protect_generation(
    model: nn.Module,
    original,
    restricted,
    config,
    *,
    original_eval=None,
    device: str | torch.device | None = None,
    progress: bool = True,
    callbacks: Sequence[Callable[[dict[str, Any]], Any]] = (),
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
):
    """:func:`sophon_fast.protect` for ``config.mode == "generation"`` (same arguments; the data
    are images (N, C, H, W) in the model's range, or pairs whose labels are ignored)."""
    from sophon_fast.api import ProtectResult, _check_model, _prepare_checkpoints

    device = _check_model(model, device, resume=resume, checkpoint_dir=checkpoint_dir)
    original_x = as_images(original, "original")
    restricted_x = as_images(restricted, "restricted")
    eval_x = original_x if original_eval is None else as_images(original_eval, "original_eval")
    for label, images in (("original", original_x), ("restricted", restricted_x)):
        check_model_fits(model, images, label)
    if original_x.shape[1:] != restricted_x.shape[1:] or eval_x.shape[1:] != original_x.shape[1:]:
        raise ValueError(
            f"original / restricted / original_eval images differ in shape: {tuple(original_x.shape[1:])}, "
            f"{tuple(restricted_x.shape[1:])}, {tuple(eval_x.shape[1:])}; the model takes one image shape"
        )
    if config.eval_size is not None:
        eval_x = eval_x[: config.eval_size]
    if restricted_x.shape[0] < config.batch_size:
        raise ValueError(
            f"restricted: {restricted_x.shape[0]} images, fewer than batch_size={config.batch_size}"
        )
    if config.ntr_steps and original_x.shape[0] < config.batch_size:
        raise ValueError(
            f"original: {original_x.shape[0]} images, fewer than batch_size={config.batch_size}"
        )
    task = DenoisingTask.from_config(config)
    if task.alpha_bars.shape[0] != config.diffusion_steps:
        raise ValueError("noise schedule length differs from ProtectConfig.diffusion_steps")

    dtype = config.torch_dtype
    work = NoisePredictor(copy.deepcopy(model)).to(device=device, dtype=dtype)
    work.train()
    with torch.no_grad():  # one forward on two images: a model that cannot take them fails here
        probe = restricted_x[:2].to(device=device, dtype=dtype)
        t = task.timesteps[:1].expand(probe.shape[0]).to(device)
        try:
            out = work(task.pack(probe, t, torch.zeros_like(probe)))
        except (RuntimeError, ValueError) as error:
            raise ValueError(
                f"model: {type(model).__name__} cannot predict noise for images of shape "
                f"{tuple(probe.shape[1:])}: {error}"
            ) from None
        if out.shape != probe.shape:
            raise ValueError(
                f"model: a noise-prediction model must return its input's shape {tuple(probe.shape)}, "
                f"got {tuple(out.shape)}"
            )

    def to_device(images: torch.Tensor):
        images = images.to(device=device, dtype=dtype)
        return images, torch.zeros(images.shape[0], dtype=torch.int64, device=device)

    run = GenerationRun(
        engine=_make_engine(config, work, task),
        config=config,
        restricted=to_device(restricted_x),
        original=to_device(original_x),
        original_eval=to_device(eval_x) if config.eval_every else None,
        head=None,
    )
    checkpoint = _prepare_checkpoints(
        run,
        config,
        checkpoint_dir,
        resume=resume,
        overwrite=overwrite,
        main_rank=True,
        data={
            "original": (original_x, None),
            "restricted": (restricted_x, None),
            "original_eval": (eval_x, None),
        },
    )

    flush = device.type == "cpu"
    if flush:
        torch.set_flush_denormal(True)  # long CPU runs slow down 2.6x on denormals without it
    try:
        run.start()
        run.run(
            config.outer_steps,
            progress=progress,
            callbacks=callbacks,
            checkpoint=checkpoint,
            checkpoint_every=config.checkpoint_every,
        )
    finally:
        if flush:
            torch.set_flush_denormal(False)
    protected = run.engine.export().model
    protected.train(model.training)
    result = ProtectResult(
        model=protected,
        history=run.history,
        config=config,
        initial_original_accuracy=None,
        stopped_by=run.stopped_by,
    )
    result.events = list(run.events)
    result.initial_original_mse = run.initial_original_accuracy  # the MSE, see GenerationRun
    return result


def simulate_generation(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    adapt_masks: Sequence[torch.Tensor],
    eval_masks: Sequence[torch.Tensor],
    config,
    *,
    adversary,
    engine: str,
):
    """:func:`sophon_fast.simulate` for generation: ``batches`` are K triples ``(x0 (B, C, H, W),
    noise (B, C, H, W), t (B,) int64)``; ``accuracy`` of the result is the mean denoising MSE of the
    evaluation samples after each step. Returns (loss, mean MSE, name -> meta-gradient)."""
    from sophon_fast.api import _check_mask_counts, _choice, _run_simulation

    _choice("engine", engine, ("fast", "reference"))
    _check_mask_counts(batches, adapt_masks, eval_masks)
    task = DenoisingTask.from_config(config)
    prepared = []
    for k, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 3):
            raise ValueError(
                f"simulate: generation batch {k} must be a (x0, noise, t) triple, got "
                f"{type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}"
            )
        x0, noise, t = batch
        if x0.dim() != 4 or noise.shape != x0.shape or t.shape != (x0.shape[0],):
            raise ValueError(
                f"simulate: batch {k}: expected x0 (B, C, H, W), noise like x0 and t (B,); got "
                f"{tuple(x0.shape)}, {tuple(noise.shape)}, {tuple(t.shape)}"
            )
        check_model_fits(model, x0, f"simulate: batch {k}")
        for label, mask in (("adapt", adapt_masks[k]), ("eval", eval_masks[k])):
            if mask.dtype != torch.bool or mask.shape != t.shape:
                raise ValueError(f"simulate: batch {k}: expected a (B,) bool {label} mask")
            if not bool(mask.any()):
                raise ValueError(f"simulate: batch {k}: the {label} mask selects no sample")
        prepared.append((task.pack(x0, t.to(torch.int64), noise), noise))
    wrapper = NoisePredictor(model)
    was_training = model.training
    kwargs = dict(
        suppression_loss=suppression_loss_fn(config.loss),
        adapt_loss=noise_mse,
        adversary=adversary,
        order=config.order,
        truncate=config.truncate,
        head_values=None,
        metric=denoising_error_sum,
    )
    try:
        loss, mse, grads = _run_simulation(
            engine, wrapper, prepared, adapt_masks, eval_masks, **kwargs
        )
    finally:
        model.train(was_training)
    prefix = "model."
    return loss, mse, {name[len(prefix) :]: grad for name, grad in grads.items()}
