"""ProtectConfig: every knob of a protection run, validated on construction.

Defaults reproduce the official classification run; see :mod:`sophon_fast.api` for the algorithm
and the official-code bugs this library fixes.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sophon_fast.engine.optimizers import Adversary, resolve_adversary
from sophon_fast.losses import SUPPRESSION_LOSSES

__all__ = ["ProtectConfig"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_LR_MAX = 1e30  # well inside float32 (3.4e38), so lr * gradient products stay finite too
_RESUME_MAY_DIFFER = ("outer_steps", "checkpoint_every")
_GENERATION_FIELDS = ("mode", "timesteps", "noise_schedule", "diffusion_steps")


# Counts beyond this are typos (a step or sample count of 2**40 never finishes); the bound keeps
# them from reaching torch, whose int64 arguments overflow at 2**63.
_INT_MAX = 2**62


def _int(
    name: str, value: Any, *, minimum: int, allow_none: bool = False, maximum: int = _INT_MAX
) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"ProtectConfig.{name}: expected an int, got {value!r} ({type(value).__name__})"
        )
    if not minimum <= value <= maximum:
        top = "2**62" if maximum == _INT_MAX else maximum
        raise ValueError(
            f"ProtectConfig.{name}: expected an int in [{minimum}, {top}], got {value}"
        )


def _float(
    name: str, value: Any, *, positive: bool = True, allow_none: bool = False
) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"ProtectConfig.{name}: expected a number, got {value!r} ({type(value).__name__})"
        )
    value = float(value)
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        kind = "> 0" if positive else ">= 0"
        raise ValueError(f"ProtectConfig.{name}: expected a finite number {kind}, got {value}")
    return value


def _choice(name: str, value: Any, options: Sequence[str]) -> None:
    if value not in options:
        raise ValueError(f"ProtectConfig.{name}: expected one of {list(options)}, got {value!r}")


@dataclass
class ProtectConfig:
    """Every knob of a protection run, validated on construction (``TypeError``/``ValueError``).

    Attributes:
        loss: suppression loss: ``"ice"`` (official code, z_y + logsumexp(-z)), ``"ice_paper"``
            (-log(1 - p_y)) or ``"klu"`` (KL(uniform || softmax)). Default "ice".
        inner_steps: simulated fine-tuning steps K per simulation, one restricted batch each.
            Default 50.
        inner_lr: learning rate of the default adversary (plain SGD). Default 1e-4.
        batch_size: restricted batch size (and original NTR batch size). Default 150.
        adapt_size: samples of each restricted batch used for the adaptation step (chosen at
            random per batch); the other ``batch_size - adapt_size`` evaluate. Default 130.
        alpha / beta: meta Adam lr = alpha * base_lr, NTR Adam lr = beta * base_lr (two separate
            Adam states over the same weights). Defaults 3.0 / 5.0.
        base_lr: Default 1e-4.
        suppression_steps / ntr_steps: per outer step (0 NTR steps allowed). Defaults 1 / 1.
        outer_steps: Default 1000.
        max_grad_norm: L2 clip of the meta-gradient (not of NTR); None = no clipping. Default 0.5.
        reinit_head: re-draw the head (Xavier-uniform, zero bias) at the start of every
            simulation; None = True for ice / ice_paper, False for klu (official). Default None.
        restore_bn: restore BatchNorm statistics after every simulation. Default True.
        order: meta-gradient order: 1 (official, first order along the trajectory) or 2 (exact,
            through the inner updates). Default 1.
        truncate: order 2 only: differentiate through the last ``truncate`` inner steps; the
            earlier ones are first-order steps (see :mod:`sophon_fast.engine.inner`). None = all.
        adversaries: inner optimizers to simulate: ``(name, lr)``, ``(name, lr, {hyper-params})``
            or dicts; names sgd, momentum, nesterov, adam, adamw, rmsprop (hyper-parameters and
            defaults in :mod:`sophon_fast.engine.optimizers`). None = ``(("sgd", inner_lr),)``.
        adversary_sampling: ``"one"`` (draw one per simulation from the seeded generator) or
            ``"all"`` (simulate every adversary on the same batches and average). Default "one".
        simulations: independent simulations (batches, splits, head, adversary) drawn and
            averaged per meta step. Under a torch.distributed process group they are spread over
            the ranks (:mod:`sophon_fast.distributed`); a multiple of the world size keeps every
            rank busy. Default 1 (the official run).
        guard_threshold: intactness guard: roll back when original accuracy <= threshold.
            Percent in ``"absolute"`` mode, a fraction in (0, 1] of the starting accuracy in
            ``"relative"`` mode; None = no guard. Default 80.0.
        guard_mode: ``"absolute"`` or ``"relative"``. Default "absolute".
        guard_action: ``"stop"`` (official: restore the last evaluated-good state, i.e. the
            previous step's with ``eval_every=1``, and stop) or ``"continue"`` (restore and go
            on; Adam moments are kept). The same action follows a NaN or infinite loss,
            meta-gradient or weight (``stopped_by="nonfinite"``; in continue mode the Adam
            states are restored too): :mod:`sophon_fast.engine.outer`. Default "stop".
        eval_every: measure original accuracy every this many outer steps (after the NTR steps;
            official: every step). 0 or None = never, which disables the guard (warning).
            Default 1.
        eval_size: evaluate on at most the first ``eval_size`` evaluation samples; None = all.
        eval_batch_size: batch size of the evaluation forward passes. Default 500.
        seed: seed of the generator every random choice is drawn from. Default 99.
        engine: ``"fast"`` (flat parameters) or ``"reference"`` (eager, official-style).
        engine_options: fast engine only: speed options as a dict (``channels_last``,
            ``fused_batchnorm``, ``fused_bn_relu_pool``, ``fused_relu_pool``, ``cuda_graphs``,
            ``autocast``, ``vmap_adversaries``, ``flush_denormal``), each documented with its
            measured effect in :mod:`sophon_fast.engine.options`. None = the defaults, which never change the
            meta-gradient beyond rounding. Default None.
        dtype: ``"float32"`` or ``"float64"`` (the protected copy and data are converted).
        checkpoint_every: with a checkpoint directory, write one every this many outer steps
            (and always at the end); None = only at the end.
        head: dotted name of the classifier head ``nn.Linear``; None = the model's
            ``head_name``, else the last Linear (warning).
        mode: ``"classification"`` (default) or ``"generation"``: protect a DDPM noise-prediction
            model ``f(x_t, t)`` (:mod:`sophon_fast.engine.generation`). Generation takes
            ``loss="mse_ascent"`` (gradient ascent on the restricted denoising MSE after
            simulated fine-tuning) or ``"dos"`` (push the predicted noise to zero: denial of
            service), images instead of labelled data, no head re-initialisation and no guard;
            the FTS adapts and NTR trains with the ordinary noise-prediction MSE. The official
            generation runs used batch 100 split 90 / 10, alpha 0.1-1.0, beta 2-5.
        timesteps: generation only: the 0-based schedule indices every noise draw (FTS adapt
            and evaluation, NTR) picks uniformly from. None = ``1``, the official fixed
            timestep (noise std 0.015 on the linear schedule): it protects single-step denoising
            of nearly clean images only, so an attacker training all timesteps can still learn
            to generate the domain. ``"a:b"`` (inclusive) protects that noise band; ``"all"``
            protects every timestep, i.e. the whole sampling chain an attacker fine-tunes,
            at the price of a harder trade-off with the original domain. A list picks
            explicit timesteps.
        noise_schedule / diffusion_steps: generation only: the
            :class:`sophon_fast.diffusion.NoiseSchedule` the model was trained with. Defaults
            ``"linear"`` / 1000.
    """

    loss: str = "ice"
    inner_steps: int = 50
    inner_lr: float = 1e-4
    batch_size: int = 150
    adapt_size: int = 130
    alpha: float = 3.0
    beta: float = 5.0
    base_lr: float = 1e-4
    suppression_steps: int = 1
    ntr_steps: int = 1
    outer_steps: int = 1000
    max_grad_norm: float | None = 0.5
    reinit_head: bool | None = None
    restore_bn: bool = True
    order: int = 1
    truncate: int | None = None
    adversaries: Any = None
    adversary_sampling: str = "one"
    simulations: int = 1
    guard_threshold: float | None = 80.0
    guard_mode: str = "absolute"
    guard_action: str = "stop"
    eval_every: int | None = 1
    eval_size: int | None = None
    eval_batch_size: int = 500
    seed: int = 99
    engine: str = "fast"
    engine_options: Any = None
    dtype: Any = "float32"
    checkpoint_every: int | None = None
    head: str | None = None
    mode: str = "classification"
    timesteps: Any = None
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000

    def __post_init__(self) -> None:
        _choice("mode", self.mode, ("classification", "generation"))
        if self.mode == "generation":
            from sophon_fast.engine.generation import validate_generation_config

            validate_generation_config(self)
        elif self.timesteps is not None:
            raise ValueError(
                "ProtectConfig.timesteps: a generation-mode option; set mode='generation' or leave it None"
            )
        if self.mode == "classification" and self.loss not in SUPPRESSION_LOSSES:
            extra = (
                " ('ce' is the adaptation/NTR loss: minimising it on restricted data helps fine-tuning)"
                if self.loss == "ce"
                else ""
            )
            raise ValueError(
                f"ProtectConfig.loss: expected one of {list(SUPPRESSION_LOSSES)}, got {self.loss!r}{extra}"
            )
        for name in (
            "inner_steps",
            "batch_size",
            "suppression_steps",
            "outer_steps",
            "eval_batch_size",
        ):
            _int(name, getattr(self, name), minimum=1)
        _int("adapt_size", self.adapt_size, minimum=1)
        if self.adapt_size >= self.batch_size:
            raise ValueError(
                f"ProtectConfig.adapt_size: expected 1 <= adapt_size < batch_size={self.batch_size} "
                f"(the rest of each batch evaluates), got {self.adapt_size}"
            )
        _int("ntr_steps", self.ntr_steps, minimum=0)
        # torch.Generator.manual_seed takes a uint64 (2**70 overflowed at the first step) and
        # generation draws its fixed noise from seed + 1: 2**62 leaves room for both
        _int("seed", self.seed, minimum=0)
        for name in ("inner_lr", "alpha", "beta", "base_lr"):
            setattr(self, name, _float(name, getattr(self, name)))
        # The optimizers hold their learning rates as float32 scalars on the device: a product
        # above float32's 3.4e38 overflowed inside Adam after the set-up had run.
        for name, lr in (
            ("alpha * base_lr", self.alpha * self.base_lr),
            ("beta * base_lr", self.beta * self.base_lr),
            ("inner_lr", self.inner_lr),
        ):
            if not lr <= _LR_MAX:
                raise ValueError(
                    f"ProtectConfig.{name}: expected a learning rate <= {_LR_MAX:g}, got {lr:g}"
                )
        self.max_grad_norm = _float("max_grad_norm", self.max_grad_norm, allow_none=True)
        for name in ("reinit_head",):
            if self.reinit_head is not None and not isinstance(self.reinit_head, bool):
                raise TypeError(
                    f"ProtectConfig.{name}: expected True, False or None, got {self.reinit_head!r}"
                )
        if not isinstance(self.restore_bn, bool):
            raise TypeError(f"ProtectConfig.restore_bn: expected a bool, got {self.restore_bn!r}")
        if self.order not in (1, 2) or isinstance(self.order, bool):
            raise ValueError(f"ProtectConfig.order: expected 1 or 2, got {self.order!r}")
        _int("truncate", self.truncate, minimum=0, allow_none=True)
        if self.truncate is not None and self.order == 1:
            raise ValueError(
                "ProtectConfig.truncate: only meaningful with order=2 (order 1 differentiates no inner step)"
            )
        specs = self.adversaries if self.adversaries is not None else (("sgd", self.inner_lr),)
        if isinstance(specs, (str, dict, Adversary)) or (
            isinstance(specs, (tuple, list)) and specs and isinstance(specs[0], str)
        ):
            raise TypeError(
                f"ProtectConfig.adversaries: expected a sequence of adversaries, e.g. (('sgd', 1e-4),), got {specs!r}"
            )
        if not isinstance(specs, (tuple, list)) or len(specs) == 0:
            raise ValueError(
                f"ProtectConfig.adversaries: expected a non-empty sequence of adversaries, got {specs!r}"
            )
        self.adversaries = tuple(resolve_adversary(spec) for spec in specs)
        for adversary in self.adversaries:
            if not adversary.lr <= _LR_MAX:
                raise ValueError(
                    f"ProtectConfig.adversaries: {adversary.name} lr {adversary.lr:g} is above "
                    f"{_LR_MAX:g}; expected a usable learning rate"
                )
        _choice("adversary_sampling", self.adversary_sampling, ("one", "all"))
        _int("simulations", self.simulations, minimum=1)
        _choice("guard_mode", self.guard_mode, ("absolute", "relative"))
        _choice("guard_action", self.guard_action, ("stop", "continue"))
        if self.guard_threshold is not None:
            self.guard_threshold = _float("guard_threshold", self.guard_threshold, positive=False)
            if self.guard_mode == "absolute" and self.guard_threshold > 100.0:
                raise ValueError(
                    f"ProtectConfig.guard_threshold: absolute mode takes a percentage in [0, 100], got {self.guard_threshold}"
                )
            if self.guard_mode == "relative" and not 0.0 < self.guard_threshold <= 1.0:
                raise ValueError(
                    f"ProtectConfig.guard_threshold: relative mode takes a fraction of the starting accuracy in (0, 1], "
                    f"got {self.guard_threshold}"
                )
        _int("eval_every", self.eval_every, minimum=0, allow_none=True)
        _int("eval_size", self.eval_size, minimum=1, allow_none=True)
        _int("checkpoint_every", self.checkpoint_every, minimum=1, allow_none=True)
        _choice("engine", self.engine, ("fast", "reference"))
        if self.engine_options is not None:
            from sophon_fast.engine.options import resolve_options

            if self.engine != "fast":
                raise ValueError("ProtectConfig.engine_options: only the fast engine takes options")
            options = resolve_options(self.engine_options, order=self.order)
            self.engine_options = dataclasses.asdict(options)
        if isinstance(self.dtype, torch.dtype):
            self.dtype = str(self.dtype).removeprefix("torch.")
        _choice("dtype", self.dtype, tuple(_DTYPES))
        if self.head is not None and not isinstance(self.head, str):
            raise TypeError(
                f"ProtectConfig.head: expected a dotted module name or None, got {self.head!r}"
            )
        if not self.eval_every and self.guard_threshold is not None:
            warnings.warn(
                "ProtectConfig: eval_every is 0/None, so the intactness guard is off", stacklevel=3
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def reinit_head_resolved(self) -> bool:
        """Whether simulations re-draw the head (None resolves by loss, as the official code)."""
        return self.loss in ("ice", "ice_paper") if self.reinit_head is None else self.reinit_head

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (adversaries as dicts)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["adversaries"] = [a.to_json() for a in self.adversaries]
        if self.engine_options is None:  # the default: older checkpoints and dicts stay comparable
            del out["engine_options"]
        if self.simulations == 1:  # the default: older checkpoints and dicts stay comparable
            del out["simulations"]
        if self.mode == "classification":  # classification dicts stay as they were
            for name in _GENERATION_FIELDS:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProtectConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"ProtectConfig: unknown fields {unknown}; expected some of {sorted(names)}"
            )
        return cls(**data)
