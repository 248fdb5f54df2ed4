"""Denoising diffusion (DDPM, Ho et al. 2020): noise schedules, the noise-prediction loss, DDPM and DDIM
samplers, and a plain training loop for pre-training a denoiser such as
:class:`sophon_fast.models.SmallUNet`.

The maths. A schedule of variances ``beta[0..T-1]`` defines ``alpha[t] = 1 - beta[t]`` and
``alpha_bar[t] = alpha[0] * ... * alpha[t]``. The forward (noising) process jumps straight to step ``t``::

    x_t = sqrt(alpha_bar[t]) * x_0 + sqrt(1 - alpha_bar[t]) * eps,        eps ~ N(0, I)

and a model ``eps_theta(x_t, t)`` is trained to predict ``eps`` with the mean squared error
(:func:`denoising_loss`). Samples come from running the learned reverse process from pure noise
(:func:`ddpm_sample`, ancestral, T model calls) or its deterministic/accelerated variant
(:func:`ddim_sample`, Song et al. 2021, any number of steps).

Timestep convention. ``t`` is a **0-based index into the schedule arrays**, ``t in [0, T)``: ``x_t`` is
the image after ``t + 1`` noising steps, so ``t = 0`` is the least noisy level (noise std
``sqrt(beta[0]) = 0.01`` for the default linear schedule) and ``t = T - 1`` the noisiest. In the 1-based
notation of the DDPM paper, our ``t`` is the paper's ``t + 1``. The official SOPHON code draws
``t = randint(1, 2)``, i.e. ``t = 1``, and uses it directly as the index into its 0-based
``alpha_bar`` array: its noise std is about 0.015, which is ``sqrt(1 - alpha_bar[1]) = 0.0148`` for the
linear 1e-4..0.02 schedule over 1000 steps (index 0 would give 0.0100). So the official ``t = 1`` is
**this module's ``t = 1``** (:data:`OFFICIAL_TIMESTEP`), the second-least noisy level.

Schedule arrays are float64 on the CPU (copied to a device once, on first use there). The maps and the
loss return tensors in the dtype and on the device of their image input; the samplers sample on the
model's device and in its parameter dtype unless told otherwise. :class:`NoiseSchedule` is defined in
:mod:`sophon_fast.noise_schedule` and importable from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._progress import progress as _progress
from .noise_schedule import NoiseSchedule

__all__ = [
    "OFFICIAL_TIMESTEP",
    "resolve_timesteps",
    "NoiseSchedule",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "denoising_loss",
    "from_model_range",
    "to_model_range",
    "train_denoiser",
]

# The timestep the official SOPHON generation code trains, protects and tests at (its
# ``t = randint(1, 2)``), in this module's 0-based convention (see the module docstring).
OFFICIAL_TIMESTEP = 1


# ---------------------------------------------------------------------- randomness and model helpers


def _draw_randn(
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise on ``device``, drawn on the generator's own device when one is given."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(
        device
    )


def _draw_timesteps(
    batch: int, timesteps: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Uniform integer timesteps in ``[0, timesteps)`` on ``device``."""
    if generator is None:
        return torch.randint(0, timesteps, (batch,), device=device)
    return torch.randint(0, timesteps, (batch,), generator=generator, device=generator.device).to(
        device
    )


def _model_device_dtype(
    model: nn.Module, device: torch.device | str | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """``device``/``dtype`` if given, else those of the model's first parameter (or buffer), else CPU
    float32."""
    tensors = list(model.parameters()) or list(model.buffers())
    first = next((p for p in tensors if p.is_floating_point()), None)
    if device is None:
        device = first.device if first is not None else torch.device("cpu")
    if dtype is None:
        dtype = first.dtype if first is not None else torch.float32
    return torch.device(device), dtype


def _predict_noise(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``model(x, t)``, checked to return the shape of ``x``."""
    eps = model(x, t)
    if eps.shape != x.shape:
        raise ValueError(
            f"the denoiser must return predicted noise of the input's shape {tuple(x.shape)}; got "
            f"{tuple(eps.shape)}"
        )
    return eps


# ---------------------------------------------------------------------- loss


def denoising_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    *,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The DDPM training loss ``mean((model(x_t, t) - noise) ** 2)`` (Ho et al.'s "simple" loss).

    The mean runs over every element, which equals the official code's ``MSELoss`` (mean over
    (C, H, W) per image, then over the batch).

    Args:
        model: Noise predictor called as ``model(x_t, t)``.
        schedule: The noise schedule.
        x0: Clean images in the model's range ([-1, 1], see :func:`to_model_range`).
        t: 0-based integer timesteps, one per image; ``None`` draws them uniformly from [0, T).
            Pass ``torch.full((batch,), OFFICIAL_TIMESTEP)`` for the official SOPHON loss. Default None.
        noise: The noise mixed in; ``None`` draws standard normal noise. Default None.
        generator: Source of the random ``t`` and ``noise``. Default None (global RNG).

    Returns:
        The scalar loss, differentiable in the model's parameters.

    Raises:
        ValueError: Bad ``t`` or ``noise`` (see :meth:`NoiseSchedule.q_sample`), or a model output whose
            shape differs from ``x0``'s.

    Shapes:
        x0: (batch, C, H, W), t: (batch,), noise: (batch, C, H, W) -> ()
    """
    if x0.dim() < 1 or x0.shape[0] == 0:
        raise ValueError(f"x0 must be a non-empty batch of images; got shape {tuple(x0.shape)}")
    if t is None:
        t = _draw_timesteps(x0.shape[0], schedule.timesteps, generator, x0.device)
    elif isinstance(t, torch.Tensor):
        t = t.to(x0.device)
    if noise is None:
        noise = _draw_randn(x0.shape, generator, x0.device, x0.dtype)
    x_t = schedule.q_sample(x0, t, noise)
    return F.mse_loss(_predict_noise(model, x_t, t), noise)


# ---------------------------------------------------------------------- samplers


def _check_sample_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (batch, channels, ...) with positive sizes; got {shape}")
    return shape


def ddpm_sample(
    model: nn.Module,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    clip_denoised: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, algorithm 2): T model calls from pure noise.

    ``x_{T-1} ~ N(0, I)``; for ``t = T-1, ..., 0``: ``x0_hat = predict_x0(x_t, t, model(x_t, t))``, then
    ``x_{t-1} = mean + sqrt(beta_tilde[t]) z`` with ``z ~ N(0, I)`` for ``t > 0`` (no noise at
    ``t = 0``) and the posterior mean of ``q(x_{t-1} | x_t, x0_hat)``::

        mean = sqrt(alpha_bar[t-1]) beta[t] / (1 - alpha_bar[t]) * x0_hat
             + sqrt(alpha[t]) (1 - alpha_bar[t-1]) / (1 - alpha_bar[t]) * x_t

    which, without clipping, equals ``(x_t - beta[t] / sqrt(1 - alpha_bar[t]) eps) / sqrt(alpha[t])``
    (with clipping, ``x0_hat`` is clamped to [-1, 1] first).
    Runs under ``torch.no_grad`` in eval mode; the model's train/eval mode is restored afterwards.

    Args:
        model: Noise predictor called as ``model(x_t, t)``.
        schedule: The schedule the model was trained with.
        shape: Output shape, e.g. (16, 1, 28, 28).
        generator: Source of all noise (initial and per step). Default None (global RNG).
        device: Where to sample; ``None`` means the model's device. Default None.
        dtype: Sample dtype; ``None`` means the model's parameter dtype. Default None.
        clip_denoised: Clamp ``x0_hat`` to [-1, 1] at every step, as Ho et al.'s own sampler does.
            An under-trained model needs it: at ``t = T - 1`` the estimate divides the noise error by
            ``sqrt(alpha_bar)`` (0.006 for the default schedule), and an unclipped sample saturates.
            ``False`` is the textbook update (exact with an exact denoiser). Default True.
        progress: Show a progress bar (tqdm). Default False.

    Returns:
        Samples clamped to [-1, 1] (see :func:`from_model_range`).

    Raises:
        ValueError: A bad ``shape`` or a model output of the wrong shape.

    Shapes:
        -> shape
    """
    shape = _check_sample_shape(shape)
    device, dtype = _model_device_dtype(model, device, dtype)
    betas, alphas = schedule.betas, schedule.alphas
    alpha_bars, alpha_bars_prev = schedule.alpha_bars, schedule.alpha_bars_prev
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = _draw_randn(shape, generator, device, dtype)
            steps = range(schedule.timesteps - 1, -1, -1)
            for step in _progress(steps, desc="DDPM sampling", enabled=progress):
                t = torch.full((shape[0],), step, dtype=torch.long, device=device)
                eps = _predict_noise(model, x, t)
                ab, ab_prev = float(alpha_bars[step]), float(alpha_bars_prev[step])
                x0_hat = (x - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
                if clip_denoised:
                    x0_hat = x0_hat.clamp(-1.0, 1.0)
                coef_x0 = math.sqrt(ab_prev) * float(betas[step]) / (1.0 - ab)
                coef_xt = math.sqrt(float(alphas[step])) * (1.0 - ab_prev) / (1.0 - ab)
                x = coef_x0 * x0_hat + coef_xt * x
                if step > 0:
                    std = math.sqrt(float(schedule.posterior_variances[step]))
                    x = x + std * _draw_randn(shape, generator, device, dtype)
    finally:
        model.train(was_training)
    return x.clamp(-1.0, 1.0)


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """The DDIM sub-sequence: ``steps`` timesteps evenly spaced from ``T - 1`` down to 0 (rounded).

    Args:
        timesteps: T of the schedule.
        steps: Number of sampling steps, ``1 <= steps <= T``; ``steps = 1`` is ``[T - 1]``.

    Returns:
        Strictly decreasing timesteps, first ``T - 1``; last 0 when ``steps >= 2``.

    Raises:
        ValueError: ``steps`` outside [1, T].
    """
    if isinstance(steps, bool) or int(steps) != steps or not 1 <= steps <= timesteps:
        raise ValueError(
            f"steps must be an integer in [1, {timesteps}] (the schedule's T); got {steps!r}"
        )
    if steps == 1:
        return [timesteps - 1]
    return torch.linspace(timesteps - 1, 0, int(steps), dtype=torch.float64).round().long().tolist()


def ddim_sample(
    model: nn.Module,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    clip_denoised: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021) over ``steps`` of the schedule's timesteps (:func:`ddim_timesteps`).

    From ``x ~ N(0, I)`` at ``t = T - 1``, each step to the next timestep ``s`` (``alpha_bar[-1] = 1``
    after the last)::

        x0_hat = predict_x0(x_t, t, eps),   eps = model(x_t, t)
        sigma  = eta * sqrt((1 - alpha_bar[s]) / (1 - alpha_bar[t]) * (1 - alpha_bar[t] / alpha_bar[s]))
        x_s    = sqrt(alpha_bar[s]) x0_hat + sqrt(1 - alpha_bar[s] - sigma^2) eps + sigma z

    ``eta = 0`` is deterministic given the initial noise; ``eta = 1`` with ``steps = T`` is the DDPM
    sampler (same draws from the same generator). Noise ``z`` is drawn only where ``sigma > 0``. Runs
    under ``torch.no_grad`` in eval mode; the model's train/eval mode is restored afterwards.

    Args:
        model: Noise predictor called as ``model(x_t, t)``.
        schedule: The schedule the model was trained with.
        shape: Output shape, e.g. (16, 1, 28, 28).
        steps: Number of model calls, 1 <= steps <= T. Default 50.
        eta: Stochasticity, >= 0 (0 = deterministic DDIM, 1 = DDPM-like). Default 0.0.
        generator: Source of all noise. Default None (global RNG).
        device: Where to sample; ``None`` means the model's device. Default None.
        dtype: Sample dtype; ``None`` means the model's parameter dtype. Default None.
        clip_denoised: Clamp ``x0_hat`` to [-1, 1] at every step and re-derive ``eps`` from it (as
            diffusers' ``clip_sample``); see :func:`ddpm_sample`. ``False`` is Song et al.'s update.
            Default True.
        progress: Show a progress bar (tqdm). Default False.

    Returns:
        Samples clamped to [-1, 1].

    Raises:
        ValueError: A bad ``shape``, ``steps`` outside [1, T], a negative ``eta``, or a model output of
            the wrong shape.

    Shapes:
        -> shape
    """
    shape = _check_sample_shape(shape)
    if not eta >= 0.0:
        raise ValueError(f"eta must be >= 0; got {eta}")
    sequence = ddim_timesteps(schedule.timesteps, steps)
    device, dtype = _model_device_dtype(model, device, dtype)
    alpha_bars = schedule.alpha_bars
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = _draw_randn(shape, generator, device, dtype)
            nexts = sequence[1:] + [-1]
            for step, next_step in _progress(
                list(zip(sequence, nexts)), desc="DDIM sampling", enabled=progress
            ):
                t = torch.full((shape[0],), step, dtype=torch.long, device=device)
                eps = _predict_noise(model, x, t)
                ab = float(alpha_bars[step])
                ab_next = float(alpha_bars[next_step]) if next_step >= 0 else 1.0
                x0_hat = (x - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
                if clip_denoised:
                    x0_hat = x0_hat.clamp(-1.0, 1.0)
                    eps = (x - math.sqrt(ab) * x0_hat) / math.sqrt(1.0 - ab)
                variance = eta**2 * (1.0 - ab_next) / (1.0 - ab) * (1.0 - ab / ab_next)
                x = (
                    math.sqrt(ab_next) * x0_hat
                    + math.sqrt(max(1.0 - ab_next - variance, 0.0)) * eps
                )
                if variance > 0.0:
                    x = x + math.sqrt(variance) * _draw_randn(shape, generator, device, dtype)
    finally:
        model.train(was_training)
    return x.clamp(-1.0, 1.0)


# ---------------------------------------------------------------------- training and ranges


def to_model_range(images01: torch.Tensor) -> torch.Tensor:
    """Map images from [0, 1] (pixels, e.g. the built-in domains) to the model range [-1, 1]: ``2x - 1``."""
    return images01 * 2.0 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """Map model-range images back to [0, 1] pixels: ``(x + 1) / 2``, clamped to [0, 1]."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


def train_denoiser(
    model: nn.Module,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 2e-4,
    seed: int = 0,
    progress: bool = True,
    ema_decay: float | None = None,
) -> list[float]:
    """Pre-train a noise predictor with :func:`denoising_loss` (uniform timesteps) and Adam.

    Every epoch visits the images once in a fresh random order (the last batch may be smaller). The
    shuffling, timesteps and noise all come from one CPU generator seeded with ``seed``, so a run is
    reproducible on the CPU. Batches are moved to the model's device and dtype. The model is in train
    mode during training and its previous mode is restored afterwards.

    Args:
        model: Noise predictor called as ``model(x_t, t)``; trained in place.
        schedule: The noise schedule.
        images: Training images in [-1, 1] (:func:`to_model_range`).
        epochs: Passes over the images (0 trains nothing).
        batch_size: Images per Adam step. Default 64.
        lr: Adam learning rate. Default 2e-4.
        seed: Seed of the shuffling/timestep/noise generator. Default 0.
        progress: Show a progress bar over epochs (tqdm). Default True.
        ema_decay: Keep an exponential moving average of the parameters, with decay
            ``min(ema_decay, (1 + n) / (10 + n))`` after the n-th step, and load it into the model
            at the end (what DDPM samples from; a short run's raw weights give noisier samples).
            ``None`` leaves the trained weights. Default None.

    Returns:
        The mean loss of each epoch (weighted by batch size), one float per epoch, measured on
        the raw (not averaged) weights during training.

    Raises:
        ValueError: ``images`` not a non-empty floating (N, C, H, W) tensor in [-1, 1], ``epochs < 0``,
            ``batch_size < 1``, ``lr <= 0`` or ``ema_decay`` outside [0, 1).

    Shapes:
        images: (N, C, H, W)
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a non-empty (N, C, H, W) tensor; got {got}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1]; got dtype {images.dtype}")
    low, high = float(images.min()), float(images.max())
    if low < -1.0 - 1e-6 or high > 1.0 + 1e-6:
        raise ValueError(
            f"images must lie in [-1, 1] (map [0, 1] pixels with to_model_range); got values from "
            f"{low:.4g} to {high:.4g}"
        )
    if isinstance(epochs, bool) or int(epochs) != epochs or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0; got {epochs!r}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) or None; got {ema_decay}")
    device, dtype = _model_device_dtype(model, None, None)
    generator = torch.Generator().manual_seed(int(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    averages = [p.detach().clone() for p in params] if ema_decay is not None else None
    n = images.shape[0]
    losses: list[float] = []
    updates = 0
    was_training = model.training
    model.train()
    try:
        for _ in _progress(range(int(epochs)), desc="denoiser pre-training", enabled=progress):
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for start in range(0, n, int(batch_size)):
                index = order[start : start + int(batch_size)]
                x0 = images[index].to(device=device, dtype=dtype)
                t = torch.randint(0, schedule.timesteps, (len(index),), generator=generator).to(
                    device
                )
                noise = torch.randn(x0.shape, generator=generator, dtype=dtype).to(device)
                loss = denoising_loss(model, schedule, x0, t=t, noise=noise)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                updates += 1
                if averages is not None:
                    decay = min(ema_decay, (1 + updates) / (10 + updates))
                    with torch.no_grad():
                        for average, p in zip(averages, params):
                            average.lerp_(p.detach(), 1.0 - decay)
                total += float(loss.detach()) * len(index)
            losses.append(total / n)
        if averages is not None:
            with torch.no_grad():
                for average, p in zip(averages, params):
                    p.copy_(average)
    finally:
        model.train(was_training)
    return losses


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
