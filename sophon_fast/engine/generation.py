"""Generation mode at the engine level: SOPHON for a DDPM noise-prediction model, on both engines.

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
on original batches, the fast engine's speed options, torch.distributed, checkpoints and resume)
is the classification machinery of :mod:`sophon_fast.engine.inner`,
:mod:`sophon_fast.reference.sophon`, :mod:`sophon_fast.engine.outer` and
:mod:`sophon_fast.distributed`, reused unchanged through two seams:

- :class:`NoisePredictor` wraps the eps-model as a one-input module: its input packs ``x_t`` and
  ``t`` as ``(batch, channels + 1, H, W)``, the last channel holding ``t`` (exact as a float up to
  2^24), so the engines' ``forward(x)``, ``x.index_select`` and ``loss(output, target)`` work as
  they are, with the noise as the target;
- the noise and timesteps are drawn from the run's seeded generator right before each
  simulation / NTR step (:meth:`GenerationMixin.noised`), in a fixed order (per batch: ``t``,
  then ``eps``), so both engines see the same inputs and a resumed run continues bit-identically.
  Under torch.distributed every rank draws the noise of every simulation (it runs only its own:
  :meth:`GenerationMixin.skip_simulation`) and of the whole NTR batch before sharding it
  (:meth:`GenerationMixin.ntr_inputs`), so the ranks' generators stay in step.

What the run records (:class:`GenerationRun`; history): ``suppression_loss``; ``restricted_mse``
(the mean denoising MSE of the evaluation halves after each simulated fine-tuning step, whatever
the suppression loss); ``ntr_loss``; ``original_mse`` (eval-mode denoising MSE on the original
evaluation images, with noise and timesteps drawn once from ``seed + 1`` and reused every time, so
the numbers are comparable step to step); ``guard``. There is no intactness guard (it reads a
classification accuracy), but the non-finite checks of :mod:`sophon_fast.engine.outer` run as in
classification: a NaN or infinite loss, meta-gradient or weight rolls back to the previous step's
state and stops (``stopped_by="nonfinite"``; ``guard_action="continue"`` goes on). The data
preparation and the protect() / simulate() entries are the denoising task of
:mod:`sophon_fast.tasks`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from sophon_fast.config import (
    GENERATION_LOSSES,
    OFFICIAL_TIMESTEP,
    resolve_timesteps,
    validate_generation_config,
)
from sophon_fast.data.tensors import as_images
from sophon_fast.engine.inner import FastEngine, simulate_flat
from sophon_fast.engine.outer import ProtectionRun
from sophon_fast.noise_schedule import NoiseSchedule
from sophon_fast.ops.losses import dos, mse_ascent
from sophon_fast.reference.sophon import ReferenceEngine, simulate_reference

__all__ = [  # GENERATION_LOSSES, OFFICIAL_TIMESTEP and the two config functions: from config
    "GENERATION_LOSSES",
    "OFFICIAL_TIMESTEP",
    "GenerationFastEngine",
    "GenerationReferenceEngine",
    "GenerationRun",
    "NoiseDraws",
    "NoisePredictor",
    "as_images",
    "check_model_fits",
    "denoising_error_sum",
    "noise_mse",
    "resolve_timesteps",
    "suppression_loss_fn",
    "validate_generation_config",
]

# --------------------------------------------------------------------------- model and losses


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
    if name == "mse_ascent":
        return mse_ascent
    if name == "dos":
        return lambda prediction, target: dos(prediction)
    raise ValueError(f"unknown generation loss {name!r}; expected one of {list(GENERATION_LOSSES)}")


class NoiseDraws:
    """Noise and timestep draws and the packed model input of one noise schedule.

    Args:
        alpha_bars: (T,) cumulative products of the schedule (float64 preferred).
        timesteps: the indices to draw ``t`` from (uniformly).
    """

    def __init__(self, alpha_bars: torch.Tensor, timesteps: Sequence[int]) -> None:
        self.alpha_bars = alpha_bars.detach().to(torch.float64).cpu()
        self.timesteps = torch.as_tensor(list(timesteps), dtype=torch.int64)

    @classmethod
    def from_config(cls, config) -> NoiseDraws:
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


# --------------------------------------------------------------------------- engines


class GenerationMixin:
    """What both generation engines add: noise drawing and the denoising-error sums.

    ``simulate`` / ``ntr_step`` take clean images (the loop's batches, labels ignored) and draw
    the noise; ``simulate_noised`` / ``ntr_step_on`` take inputs already packed with their noise
    (simulate() and the data-parallel NTR shard).
    """

    draws: NoiseDraws
    generator: torch.Generator | None = None

    def noised(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed input, noise target) for clean images ``x0``, drawn from the run generator."""
        if self.generator is None:
            raise RuntimeError("generation engine: no generator attached (GenerationRun sets it)")
        t, noise = self.draws.draw(x0, self.generator)
        return self.draws.pack(x0, t, noise), noise

    def noised_batches(self, batches):
        return [self.noised(x0) for x0, _ in batches]

    def skip_simulation(self, batches) -> None:
        """Draw and drop the noise of a simulation another rank runs (torch.distributed), so the
        generator advances exactly as in the process that runs it."""
        for x0, _ in batches:
            self.draws.draw(x0, self.generator)

    def ntr_inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed input, noise target) of a whole NTR batch of clean images ``x``."""
        return self.noised(x)

    def simulate(self, batches, adapt_masks, eval_masks, head_values, adversary):
        return self.simulate_noised(
            self.noised_batches(batches), adapt_masks, eval_masks, adversary
        )

    def simulate_many(self, batches, adapt_masks, eval_masks, head_values, adversaries):
        """One simulation per adversary, each with its own noise draw (no vmap path)."""
        return [
            self.simulate(batches, adapt_masks, eval_masks, head_values, adversary)
            for adversary in adversaries
        ]

    def ntr_step(self, x: torch.Tensor, y: torch.Tensor, reduce=None) -> torch.Tensor:
        return self.ntr_step_on(*self.ntr_inputs(x, y), reduce=reduce)


class GenerationFastEngine(GenerationMixin, FastEngine):
    """:class:`~sophon_fast.engine.inner.FastEngine` over a :class:`NoisePredictor`; its speed
    options apply as in classification (``channels_last`` on the packed input, the fused module
    copies), except CUDA graphs and vmap over adversaries (one noise draw per simulation)."""

    def __init__(self, model: NoisePredictor, *, draws: NoiseDraws, **kwargs) -> None:
        super().__init__(model, **kwargs)
        if self.resolved["cuda_graphs"] != "off":
            raise ValueError("generation mode runs without CUDA graphs (cuda_graphs='off')")
        self.draws = draws

    def simulate_noised(self, noised, adapt_masks, eval_masks, adversary):
        """One simulation on (packed input, noise) pairs -> (loss, mean MSE, flat meta-grad)."""
        return FastEngine.simulate(self, noised, adapt_masks, eval_masks, None, adversary)

    def _simulate_eager(self, batches, adapt_index, eval_index, head_values, adversary):
        result = simulate_flat(
            self.fmodel,
            self.flat,
            batches,
            adapt_index,
            eval_index,
            suppression_loss=self.suppression_loss,
            adapt_loss=self.adapt_loss,
            adversary=adversary,
            order=self.order,
            truncate=self.truncate,
            head_values=None,
            keep_stats=not self.restore_bn,
            channels_last=self.resolved["channels_last"],
            metric=denoising_error_sum,
            step_weighting=self.step_weighting,
        )
        return result.loss, result.accuracy, result.meta_grad

    def ntr_step_on(self, inputs, targets, reduce=None) -> torch.Tensor:
        return FastEngine.ntr_step(self, inputs, targets, reduce=reduce)

    @torch.no_grad()
    def error_sum(self, packed: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """() eval-mode sum of per-sample denoising MSEs."""
        prediction = self.fmodel(
            self.flat.params.detach(), self.flat.stats, self.flat.counters, packed, train=False
        )
        return denoising_error_sum(prediction, noise)


class GenerationReferenceEngine(GenerationMixin, ReferenceEngine):
    """:class:`~sophon_fast.reference.sophon.ReferenceEngine` over a :class:`NoisePredictor`."""

    def __init__(self, model: NoisePredictor, *, draws: NoiseDraws, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.draws = draws

    def simulate_noised(self, noised, adapt_masks, eval_masks, adversary):
        """One simulation on (packed input, noise) pairs -> (loss, mean MSE, name -> grad)."""
        return simulate_reference(
            self.model,
            noised,
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
            step_weighting=self.step_weighting,
        )

    def ntr_step_on(self, inputs, targets, reduce=None) -> torch.Tensor:
        return ReferenceEngine.ntr_step(self, inputs, targets, reduce=reduce)

    @torch.no_grad()
    def error_sum(self, packed: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        total = denoising_error_sum(self.model(packed), noise)
        self.model.train()
        return total


class GenerationRun(ProtectionRun):
    """:class:`~sophon_fast.engine.outer.ProtectionRun` for generation: noise from the run's
    generator, the original-domain denoising MSE (lower is better) as its metric, no guard."""

    metric: ClassVar[str] = "mse"
    higher_is_better: ClassVar[bool] = False
    restricted_scale: ClassVar[float] = 1.0  # the engines' mean MSE as it is

    def __post_init__(self) -> None:
        super().__post_init__()
        self.engine.generator = self.generator
        self._eval_inputs = None

    def evaluate_original(self) -> float:
        return self.original_mse()

    def original_mse(self) -> float:
        """Eval-mode denoising MSE on the original evaluation images (fixed noise and t: drawn
        once from ``seed + 1``, a generator of their own)."""
        if self._eval_inputs is None:
            x0 = self.original_eval[0]
            fixed = torch.Generator().manual_seed(self.config.seed + 1)
            t, noise = self.engine.draws.draw(x0, fixed)
            self._eval_inputs = (self.engine.draws.pack(x0, t, noise), noise)
        packed, noise = self._eval_inputs
        size = self.config.eval_batch_size
        total = sum(
            self.engine.error_sum(packed[i : i + size], noise[i : i + size])
            for i in range(0, packed.shape[0], size)
        )
        return float(total) / packed.shape[0]

    def guard_threshold(self) -> float | None:
        return None


# --------------------------------------------------------------------------- data


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
