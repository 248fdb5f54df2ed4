"""Fine-tuning attacks on a noise-prediction (DDPM) model: generation mode of ``evaluate()``.

Arms, as for classification: ``protected`` (the model given), ``normal`` (the unprotected
pre-trained model) and ``scratch`` (the same architecture freshly initialised). Every arm runs
every recipe at every seed: the attacker trains the ordinary DDPM objective (noise-prediction
MSE at timesteps drawn uniformly from all T) on the restricted training images, with full
fine-tuning or LoRA adapters on every ``nn.Linear`` / ``nn.Conv2d`` (recipes are
:class:`~sophon_fast.attacks.attack.Attack`; scopes ``full`` and ``lora``, the classification
grid's optimizers and learning rates).

Per epoch (epoch 0 = before fine-tuning) each cell records:

- ``restricted_mse``: denoising MSE on the held-out restricted images, every image at
  ``repeats`` timesteps drawn uniformly from all T with fixed noise (the same draw for every arm
  and epoch, so curves are comparable);
- ``original_mse``: the same on held-out original-domain images (intactness under attack).

At the ``sample_epochs`` it draws DDIM samples (fixed seed) and scores them with the
**domain judge**: a small CNN trained here to tell original-domain images from restricted-domain
images (not an Inception network: none can be downloaded, and it measures only "which domain do
these samples look like", not image quality). ``restricted_fraction`` is the share of samples the
judge assigns to the restricted domain; the judge's own held-out accuracy is reported with it.
PNG grids of the samples are written per arm and epoch (a dependency-free PNG writer,
:mod:`sophon_fast.attacks.png`).

:func:`evaluate_generation` runs in named steps: the recipes (:func:`_generation_recipes`), the
fixed noise draws and the judge (:func:`_prepare`), one cell per (recipe, seed, arm)
(:func:`_run_cell`, sampling through :func:`_sample_and_score`), and the per-arm summary
(:func:`_summary`). It is what :func:`sophon_fast.attacks.evaluate.evaluate` calls for a
noise-prediction model, and callable on its own with the same keyword arguments.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._files import atomic_write_text
from .._json import strict_json
from ..data.tensors import as_images
from ..diffusion import NoiseSchedule, ddim_sample, from_model_range
from ._cells import fresh_copy
from .attack import Attack
from .lora import add_lora, merge_lora
from .png import image_grid, write_png

__all__ = [
    "GenerationReport",
    "DomainJudge",
    "evaluate_generation",
    "finetune_denoiser",
    "image_grid",
    "is_noise_model",
    "write_png",
]

QUICK_RECIPES = (
    Attack(scope="full", optimizer="adam", lr=1e-4, batch_size=16, epochs=20),
    Attack(scope="full", optimizer="adam", lr=1e-3, batch_size=16, epochs=20),
    Attack(scope="full", optimizer="momentum", lr=1e-2, batch_size=16, epochs=20),
    Attack(scope="lora", optimizer="adam", lr=1e-3, batch_size=16, epochs=20, lora_rank=8),
)
_SCOPES = ("full", "lora")


def is_noise_model(model: nn.Module) -> bool:
    """True for an eps-model ``forward(x, t)`` (two required inputs), e.g. SmallUNet."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    required = [
        p
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(required) == 2


# --------------------------------------------------------------------------- metrics


class _NoiseDraw:
    """Fixed noise, timesteps and noisy inputs for a set of clean images (comparable curves)."""

    def __init__(self, images, alpha_bars, repeats: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        x0 = images.repeat(repeats, 1, 1, 1)
        self.t = torch.randint(0, alpha_bars.shape[0], (x0.shape[0],), generator=g)
        self.noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        ab = alpha_bars[self.t].to(x0.dtype).view(-1, 1, 1, 1)
        self.x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * self.noise

    @torch.no_grad()
    def mse(self, model: nn.Module, batch_size: int = 256) -> float:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        total = 0.0
        for i in range(0, self.t.shape[0], batch_size):
            x = self.x_t[i : i + batch_size].to(device)
            prediction = model(x, self.t[i : i + batch_size].to(device))
            target = self.noise[i : i + batch_size].to(device)
            total += float((prediction - target).square().flatten(1).mean(1).sum())
        model.train(was_training)
        return total / self.t.shape[0]


class DomainJudge(nn.Module):
    """Tiny CNN telling original-domain (0) from restricted-domain (1) images in [0, 1].

    Trained by :meth:`fit` on both domains' training images with balanced classes; its held-out
    accuracy (``accuracy``) says how far its verdict on samples can be trusted.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(32 * 16, 2),
        )
        self.accuracy: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @classmethod
    def fit(
        cls, original_train, restricted_train, original_test, restricted_test, *, steps=300, seed=0
    ):
        torch.manual_seed(seed)
        judge = cls(original_train.shape[1])
        g = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(judge.parameters(), lr=2e-3)
        for _ in range(steps):
            a = original_train[torch.randint(len(original_train), (32,), generator=g)]
            b = restricted_train[torch.randint(len(restricted_train), (32,), generator=g)]
            x = torch.cat([a, b])
            y = torch.cat([torch.zeros(32), torch.ones(32)]).long()
            loss = F.cross_entropy(judge(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        judge.eval()
        with torch.no_grad():
            correct_o = (judge(original_test).argmax(1) == 0).float().mean()
            correct_r = (judge(restricted_test).argmax(1) == 1).float().mean()
        judge.accuracy = float(100 * (correct_o + correct_r) / 2)  # balanced accuracy
        return judge

    @torch.no_grad()
    def restricted_fraction(self, images01: torch.Tensor) -> float:
        return float((self(images01.float().cpu()).argmax(1) == 1).float().mean())


# --------------------------------------------------------------------------- attack


def finetune_denoiser(
    model: nn.Module,
    images: torch.Tensor,
    attack: Attack,
    alpha_bars: torch.Tensor,
    *,
    seed: int,
    on_epoch=None,
) -> nn.Module:
    """Fine-tune ``model`` in place with the ordinary DDPM loss on ``images`` (model range).

    ``on_epoch(epoch, model)`` is called before training (epoch 0) and after every epoch.
    LoRA adapters are merged back at the end, so the returned model has the original layout.
    """
    if attack.scope not in _SCOPES:
        raise ValueError(f"generation attacks take scope in {_SCOPES}, got {attack.scope!r}")
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    if attack.scope == "lora":
        model.requires_grad_(False)
        params = add_lora(model, attack.lora_rank, generator=g)
    else:
        params = list(model.parameters())
    optimizer = attack.make_optimizer(params)
    n = images.shape[0]
    if attack.data_fraction < 1:
        images = images[torch.randperm(n, generator=g)[: max(1, int(attack.data_fraction * n))]]
        n = images.shape[0]
    steps_per_epoch = math.ceil(n / attack.batch_size)
    total, step = attack.epochs * steps_per_epoch, 0
    steps_t = alpha_bars.shape[0]
    model.train()
    if on_epoch is not None:
        on_epoch(0, model)
    for epoch in range(1, attack.epochs + 1):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, attack.batch_size):
            x0 = images[order[i : i + attack.batch_size]]
            t = torch.randint(0, steps_t, (x0.shape[0],), generator=g)
            noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
            ab = alpha_bars[t].to(x0.dtype).view(-1, 1, 1, 1)
            x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
            loss = F.mse_loss(model(x_t.to(device), t.to(device)), noise.to(device))
            for group in optimizer.param_groups:
                group["lr"] = attack.lr * attack.lr_factor(step, total)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if on_epoch is not None:
            on_epoch(epoch, model)
    if attack.scope == "lora":
        merge_lora(model)
        model.requires_grad_(True)
    return model


class GenerationReport:
    """What :func:`evaluate_generation` returns: ``data`` (JSON-able) and :meth:`markdown`."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def markdown(self) -> str:
        s = self.data["summary"]
        lines = [
            "| arm | restricted MSE before | after (mean over attacks) | after (best attack) | "
            "original MSE after | samples judged restricted |",
            "|---|---|---|---|---|---|",
        ]
        for arm, row in s.items():
            frac = row.get("restricted_fraction_final")
            lines.append(
                f"| {arm} | {row['restricted_mse_initial']:.4f} | {row['restricted_mse_final']:.4f} | "
                f"{row['restricted_mse_best_attack']:.4f} | "
                + (
                    "-"
                    if row.get("original_mse_final") is None
                    else f"{row['original_mse_final']:.4f}"
                )
                + " | "
                + ("-" if frac is None else f"{100 * frac:.0f} %")
                + " |"
            )
        judge = self.data.get("judge_accuracy")
        if judge is not None:
            lines.append(
                f"\nDomain judge (small CNN trained here on the two domains, not an Inception "
                f"score): held-out balanced accuracy {judge:.1f} %."
            )
        return "\n".join(lines)

    def write(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "report.json", strict_json(self.data, indent=1))
        atomic_write_text(directory / "report.md", self.markdown() + "\n")


def _images(data, name: str) -> torch.Tensor:
    """Images in the model's range; an ImageDataset (documented [0, 1], what ``load_spec`` and
    the CLI give) is mapped to [-1, 1] (:func:`sophon_fast.data.tensors.as_images`)."""
    return as_images(data, name).float()


def evaluate_generation(
    model: nn.Module,
    restricted,
    *,
    original=None,
    normal: nn.Module | None = None,
    attacks: str | Sequence[Attack] | None = None,
    seeds: Sequence[int] | None = None,
    epochs: int | None = None,
    device=None,
    report_dir: str | Path | None = None,
    scratch: bool = True,
    progress: bool = False,
    noise_schedule: str = "linear",
    diffusion_steps: int = 1000,
    repeats: int = 4,
    sample_epochs: Sequence[int] | None = None,
    samples: int = 32,
    sample_steps: int = 50,
    original_train=None,
) -> GenerationReport:
    """Fine-tune the protected, normal and scratch noise-prediction models on the restricted domain.

    Args:
        model: the protected eps-model ``forward(x, t)`` (not modified).
        restricted: ``(train, test)`` restricted images in the model's range ([-1, 1] for
            :mod:`sophon_fast.diffusion`): tensors (N, C, H, W) or pairs / datasets (labels
            ignored); an :class:`~sophon_fast.data.ImageDataset` ([0, 1]) is mapped to [-1, 1].
        original: held-out original-domain images (same forms), for ``original_mse``; None
            skips it and the domain judge. Default None.
        normal: the unprotected pre-trained model; None omits the arm. Default None.
        attacks: None or ``"quick"`` (``QUICK_RECIPES``: Adam 1e-4 and 1e-3, momentum 1e-2 full
            fine-tuning and LoRA r=8 Adam 1e-3, batch 16, 20 epochs), or a list of
            :class:`Attack` with scope ``full`` or ``lora``. Default None.
        seeds: fine-tuning seeds. Default (0,).
        epochs: overrides every recipe's epochs. Default None.
        device: where to fine-tune; None = the model's device.
        report_dir: writes report.json, report.md and samples/<arm>_<recipe>_epoch<E>.png.
        scratch: include the scratch arm. Default True.
        progress: print one line per finished cell. Default False.
        noise_schedule / diffusion_steps: the schedule the models use. Defaults linear / 1000.
        repeats: timesteps drawn per held-out image for the MSEs. Default 4.
        sample_epochs: epochs at which to sample, score and save grids; None = first and
            last. Default None.
        samples: images per grid. Default 32.
        sample_steps: sampler steps per sample (DDIM with eta = 1, i.e. DDPM-like ancestral
            steps, and x0 clipped to [-1, 1]: short-trained models give far cleaner samples so
            than with deterministic DDIM). Default 50.
        original_train: original-domain training images for the domain judge; None uses
            ``original`` for training and testing the judge (optimistic). Default None.

    Returns:
        :class:`GenerationReport`: ``data["cells"]`` (arm, recipe, seed, per-epoch curves,
        sample fractions), ``data["summary"][arm]`` (restricted MSE before / after averaged over
        cells / after the best attack for the attacker (lowest), original MSE after, last
        sample fraction) and ``data["judge_accuracy"]``.

    Raises:
        ValueError: bad images, a recipe with another scope.
    """
    started = time.perf_counter()
    setup = _prepare(
        model,
        restricted,
        original=original,
        original_train=original_train,
        attacks=attacks,
        epochs=epochs,
        seeds=seeds,
        device=device,
        noise_schedule=noise_schedule,
        diffusion_steps=diffusion_steps,
        repeats=repeats,
    )
    sampling = _Sampling(sample_epochs, samples, sample_steps, report_dir)
    arms = {"protected": model}
    if normal is not None:
        arms["normal"] = normal
    cells = []
    for recipe in setup.recipes:
        for seed in setup.seeds:
            candidates = dict(arms)
            if scratch:
                candidates["scratch"] = fresh_copy(model, seed)
            for arm, start in candidates.items():
                cell = _run_cell(setup, sampling, arm, start, recipe, seed)
                cells.append(cell)
                if progress:
                    print(
                        f"[generation] {arm:<9} {recipe.label:<32} seed {seed}: restricted MSE "
                        f"{cell['restricted_mse'][0]:.4f} -> {cell['restricted_mse'][-1]:.4f}",
                        flush=True,
                    )
    judge = setup.judge
    report = GenerationReport(
        {
            "mode": "generation",
            "cells": cells,
            "summary": _summary(cells),
            "judge_accuracy": None if judge is None else judge.accuracy,
            "judge": "DomainJudge: a 2-class CNN trained here on original vs restricted images",
            "recipes": [r.to_dict() for r in setup.recipes],
            "seeds": setup.seeds,
            "seconds": time.perf_counter() - started,
        }
    )
    if report_dir is not None:
        report.write(report_dir)
    return report


@dataclasses.dataclass
class _Setup:
    """What every cell of a generation evaluation shares: images (model range), recipes, seeds,
    the schedule, the fixed noise draws of the two MSE curves, and the domain judge."""

    train: torch.Tensor
    test: torch.Tensor
    recipes: list[Attack]
    seeds: list[int]
    device: torch.device
    schedule: NoiseSchedule
    restricted_draw: _NoiseDraw
    original_draw: _NoiseDraw | None
    judge: DomainJudge | None


@dataclasses.dataclass
class _Sampling:
    """When and how the cells sample: epochs (None = first and last), images per grid, sampler
    steps, and where the PNG grids go (None: not written)."""

    epochs: Sequence[int] | None
    samples: int
    steps: int
    report_dir: str | Path | None


def _prepare(
    model,
    restricted,
    *,
    original,
    original_train,
    attacks,
    epochs,
    seeds,
    device,
    noise_schedule,
    diffusion_steps,
    repeats,
) -> _Setup:
    """Check the images and recipes, then draw the fixed noise and train the judge (in this
    order: the judge seeds torch's global generator)."""
    train, test = restricted
    train, test = _images(train, "restricted train"), _images(test, "restricted test")
    original_test = None if original is None else _images(original, "original")
    recipes = _generation_recipes(attacks, epochs)
    seeds = list(seeds) if seeds is not None else [0]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    schedule = NoiseSchedule(kind=noise_schedule, timesteps=diffusion_steps)
    restricted_draw = _NoiseDraw(test, schedule.alpha_bars, repeats, seed=12345)
    original_draw = (
        None if original_test is None else _NoiseDraw(original_test, schedule.alpha_bars, 1, 54321)
    )
    judge = None
    if original_test is not None:
        judge_train = (
            original_test if original_train is None else _images(original_train, "original train")
        )
        judge = DomainJudge.fit(
            from_model_range(judge_train).clamp(0, 1),
            from_model_range(train).clamp(0, 1),
            from_model_range(original_test).clamp(0, 1),
            from_model_range(test).clamp(0, 1),
        )
    return _Setup(
        train=train,
        test=test,
        recipes=recipes,
        seeds=seeds,
        device=device,
        schedule=schedule,
        restricted_draw=restricted_draw,
        original_draw=original_draw,
        judge=judge,
    )


def _generation_recipes(attacks, epochs: int | None) -> list[Attack]:
    """The recipes to run: the quick set or the list given, ``epochs`` applied, scopes checked."""
    if attacks is None or attacks == "quick":
        recipes = list(QUICK_RECIPES)
    elif isinstance(attacks, (str, dict)) or not isinstance(attacks, Sequence):
        raise ValueError(
            "evaluate (generation mode): attacks must be None, 'quick' or a list of Attack recipes "
            f"with scope 'full' or 'lora'; got {type(attacks).__name__}"
        )
    else:
        recipes = [a if isinstance(a, Attack) else Attack.from_dict(a) for a in attacks]
    if epochs is not None:
        recipes = [Attack.from_dict({**a.to_dict(), "epochs": epochs}) for a in recipes]
    for recipe in recipes:
        if recipe.scope not in _SCOPES:
            raise ValueError(f"generation attacks take scope in {_SCOPES}, got {recipe.scope!r}")
    return recipes


def _run_cell(
    setup: _Setup, sampling: _Sampling, arm: str, start: nn.Module, recipe: Attack, seed: int
) -> dict[str, Any]:
    """Fine-tune a float32 copy of ``start`` with ``recipe``, recording both MSE curves every
    epoch and sampling at the sample epochs."""
    epochs = sampling.epochs
    wanted = sorted(set(epochs if epochs is not None else (0, recipe.epochs)))
    work = copy.deepcopy(start).to(device=setup.device, dtype=torch.float32)
    curve = {"restricted_mse": [], "original_mse": []}
    sampled: dict[str, float] = {}

    def on_epoch(epoch: int, m: nn.Module) -> None:
        curve["restricted_mse"].append(setup.restricted_draw.mse(m))
        if setup.original_draw is not None:
            curve["original_mse"].append(setup.original_draw.mse(m))
        if epoch in wanted:
            fraction = _sample_and_score(setup, sampling, m, f"{arm}_{recipe.key}", seed, epoch)
            if fraction is not None:
                sampled[str(epoch)] = fraction

    alpha_bars = setup.schedule.alpha_bars
    finetune_denoiser(
        work, setup.train.to(setup.device), recipe, alpha_bars, seed=seed, on_epoch=on_epoch
    )
    return {
        "arm": arm,
        "recipe": recipe.to_dict(),
        "label": recipe.label,
        "key": recipe.key,
        "seed": seed,
        "restricted_mse": curve["restricted_mse"],
        "original_mse": curve["original_mse"] or None,
        "restricted_fraction": sampled or None,
    }


def _sample_and_score(
    setup: _Setup, sampling: _Sampling, m: nn.Module, name: str, seed: int, epoch: int
) -> float | None:
    """DDIM samples of ``m`` (fixed seed), their PNG grid when a report folder is given, and the
    share the judge assigns to the restricted domain (None without a judge)."""
    was = m.training
    m.eval()
    g = torch.Generator().manual_seed(777 + seed)
    with torch.no_grad():
        x = ddim_sample(
            m, setup.schedule, (sampling.samples, *setup.train.shape[1:]), generator=g,
            device=setup.device, steps=sampling.steps, eta=1.0, clip_denoised=True,
        )  # fmt: skip
    m.train(was)
    images01 = from_model_range(x.float().cpu()).clamp(0, 1)
    fraction = None if setup.judge is None else setup.judge.restricted_fraction(images01)
    if sampling.report_dir is not None:
        path = Path(sampling.report_dir) / "samples" / f"{name}_seed{seed}_epoch{epoch}.png"
        write_png(path, image_grid(images01))
    return fraction


def _summary(cells: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per arm: restricted MSE before, after (mean over cells) and after the best attack (lowest),
    original MSE after, and the mean sample fraction of each cell's last sample epoch."""
    summary = {}
    for arm in [a for a in ("protected", "normal", "scratch") if any(c["arm"] == a for c in cells)]:
        mine = [c for c in cells if c["arm"] == arm]
        finals = [c["restricted_mse"][-1] for c in mine]
        last_fraction = [
            c["restricted_fraction"][max(c["restricted_fraction"], key=int)]
            for c in mine
            if c["restricted_fraction"]
        ]
        summary[arm] = {
            "restricted_mse_initial": float(np.mean([c["restricted_mse"][0] for c in mine])),
            "restricted_mse_final": float(np.mean(finals)),
            "restricted_mse_best_attack": float(min(finals)),
            "original_mse_final": None
            if not mine[0]["original_mse"]
            else float(np.mean([c["original_mse"][-1] for c in mine])),
            "restricted_fraction_final": None
            if not last_fraction
            else float(np.mean(last_fraction)),
        }
    return summary
