"""ProtectConfig: every knob of a protection run, validated on construction.

Defaults reproduce the official classification run; see :mod:`sophon_fast.api` for the algorithm
and the official-code bugs this library fixes.

Each field's check is declared once, in :data:`_RULES`: a rule kind of
:mod:`sophon_fast.config_rules` (a bounded int, a finite number, a choice, a bool) or a function
here for the few that need more; ``__post_init__`` applies them in one loop and then runs the
checks that tie several fields together. The generation-mode fields, their checks
and :func:`resolve_timesteps` live here too, so that the config imports nothing from the engine.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from sophon_fast.config_rules import BoolRule, ChoiceRule, FloatRule, IntRule, Rule
from sophon_fast.config_rules import check_choice as _choice
from sophon_fast.diffusion import OFFICIAL_TIMESTEP, resolve_timesteps
from sophon_fast.engine_options import resolve_options
from sophon_fast.losses import SUPPRESSION_LOSSES
from sophon_fast.noise_schedule import NoiseSchedule
from sophon_fast.presets import PRESETS
from sophon_fast.reference.adversary_distribution import (
    AdversaryDistribution,
    is_distribution_spec,
)
from sophon_fast.reference.optimizers import Adversary, resolve_adversary
from sophon_fast.reference.trajectory import STEP_WEIGHTINGS, check_step_weighting

__all__ = [
    "GENERATION_LOSSES",
    "OFFICIAL_TIMESTEP",
    "ProtectConfig",
    "resolve_timesteps",
    "validate_generation_config",
]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_LR_MAX = 1e30  # well inside float32 (3.4e38), so lr * gradient products stay finite too
_RESUME_MAY_DIFFER = ("outer_steps", "checkpoint_every")
_GENERATION_FIELDS = ("mode", "timesteps", "noise_schedule", "diffusion_steps")
#: Suppression losses of generation mode (fused ops of :mod:`sophon_fast.ops.losses`).
GENERATION_LOSSES = ("mse_ascent", "dos")
_SCHEDULES = NoiseSchedule.KINDS


@dataclass(frozen=True)
class _InGeneration:
    """``rule`` in generation mode; classification ignores the field (and leaves it out of
    :meth:`ProtectConfig.to_dict`)."""

    rule: Rule

    def __call__(self, config: Any, name: str, value: Any) -> Any:
        return self.rule(config, name, value) if config.mode == "generation" else value


# --------------------------------------------------------------------------- field rules


def _loss(config: Any, name: str, value: Any) -> str:
    if config.mode == "generation":
        if value not in GENERATION_LOSSES:
            raise ValueError(
                f"ProtectConfig.loss: mode='generation' takes one of {list(GENERATION_LOSSES)}, got "
                f"{value!r} ({value!r} is a classification loss; pass loss='mse_ascent' or 'dos')"
            )
    elif value not in SUPPRESSION_LOSSES:
        extra = (
            " ('ce' is the adaptation/NTR loss: minimising it on restricted data helps fine-tuning)"
            if value == "ce"
            else ""
        )
        raise ValueError(
            f"ProtectConfig.loss: expected one of {list(SUPPRESSION_LOSSES)}, got {value!r}{extra}"
        )
    return value


def _below_lr_max(name: str, lr: float) -> None:
    # The optimizers hold their learning rates as float32 scalars on the device: a product
    # above float32's 3.4e38 overflowed inside Adam after the set-up had run.
    if not lr <= _LR_MAX:
        raise ValueError(
            f"ProtectConfig.{name}: expected a learning rate <= {_LR_MAX:g}, got {lr:g}"
        )


def _learning_rate(config: Any, name: str, value: Any) -> float:
    value = FloatRule()(config, name, value)
    _below_lr_max(name, value)
    return value


def _order(config: Any, name: str, value: Any) -> int:
    if value not in (1, 2) or isinstance(value, bool):
        raise ValueError(f"ProtectConfig.order: expected 1 or 2, got {value!r}")
    return value


def _adversaries(
    config: Any, name: str, value: Any
) -> tuple[Adversary, ...] | AdversaryDistribution:
    if is_distribution_spec(value):
        distribution = AdversaryDistribution.from_spec(value)
        for family in distribution.families:
            if not family.lr[1] <= _LR_MAX:
                raise ValueError(
                    f"ProtectConfig.adversaries: {family.name} lr range ends at {family.lr[1]:g}, "
                    f"above {_LR_MAX:g}; expected a usable learning rate"
                )
        return distribution
    specs = value if value is not None else (("sgd", config.inner_lr),)
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
    adversaries = tuple(resolve_adversary(spec) for spec in specs)
    for adversary in adversaries:
        if not adversary.lr <= _LR_MAX:
            raise ValueError(
                f"ProtectConfig.adversaries: {adversary.name} lr {adversary.lr:g} is above "
                f"{_LR_MAX:g}; expected a usable learning rate"
            )
    return adversaries


def _adversary_sampling(config: Any, name: str, value: Any) -> str:
    value = ChoiceRule(("one", "all"))(config, name, value)
    if value == "all" and isinstance(config.adversaries, AdversaryDistribution):
        raise ValueError(
            "ProtectConfig.adversary_sampling: 'all' simulates every listed adversary, but "
            "adversaries is a distribution (one draw per simulation); use 'one' and "
            "simulations > 1 to average several draws"
        )
    return value


def _step_weighting(config: Any, name: str, value: Any) -> str:
    _choice(name, value, STEP_WEIGHTINGS)
    return value


def _step_weighting_rate(config: Any, name: str, value: Any) -> float:
    try:
        check_step_weighting(config.step_weighting, value)
    except ValueError as error:
        raise ValueError(f"ProtectConfig.step_weighting_rate: {error}") from None
    return float(value)


def _engine_options(config: Any, name: str, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if config.engine != "fast":
        raise ValueError("ProtectConfig.engine_options: only the fast engine takes options")
    return dataclasses.asdict(resolve_options(value, order=config.order))


def _dtype(config: Any, name: str, value: Any) -> str:
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    _choice(name, value, tuple(_DTYPES))
    return value


def _head(config: Any, name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"ProtectConfig.head: expected a dotted module name or None, got {value!r}")
    return value


def _diffusion_steps(config: Any, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"ProtectConfig.diffusion_steps: expected an int >= 2, got {value!r}")
    return value


def _timesteps(config: Any, name: str, value: Any) -> Any:
    if config.mode != "generation":
        if value is not None:
            raise ValueError(
                "ProtectConfig.timesteps: a generation-mode option; set mode='generation' or leave it None"
            )
        return value
    resolve_timesteps(value, config.diffusion_steps)
    return list(value) if isinstance(value, tuple) else value  # JSON round trip for resume


#: Every field's rule, in the order they are checked: a rule may read the fields above it, and
#: mode, which several of them read, is also checked before them all (``__post_init__``).
_RULES: dict[str, Rule] = {
    "loss": _loss,  # its options depend on mode, checked first
    "inner_steps": IntRule(1),
    "inner_lr": _learning_rate,
    "batch_size": IntRule(1),
    "adapt_size": IntRule(1),
    "alpha": FloatRule(),
    "beta": FloatRule(),
    "base_lr": FloatRule(),
    "suppression_steps": IntRule(1),
    "ntr_steps": IntRule(0),
    "outer_steps": IntRule(1),
    "max_grad_norm": FloatRule(allow_none=True),
    "reinit_head": BoolRule(allow_none=True),
    "restore_bn": BoolRule(),
    "order": _order,
    "truncate": IntRule(0, allow_none=True),
    "adversaries": _adversaries,  # the default adversary takes inner_lr
    "adversary_sampling": _adversary_sampling,  # reads adversaries
    "step_weighting": _step_weighting,
    "step_weighting_rate": _step_weighting_rate,  # reads step_weighting
    "simulations": IntRule(1),
    "representation_weight": FloatRule(positive=False),
    "representation_samples": IntRule(4),
    "guard_threshold": FloatRule(positive=False, allow_none=True),
    "guard_mode": ChoiceRule(("absolute", "relative")),
    "guard_action": ChoiceRule(("stop", "continue")),
    "eval_every": IntRule(0, allow_none=True),
    "eval_size": IntRule(1, allow_none=True),
    "eval_batch_size": IntRule(1),
    # torch.Generator.manual_seed takes a uint64 (2**70 overflowed at the first step) and
    # generation draws its fixed noise from seed + 1: 2**62 leaves room for both
    "seed": IntRule(0),
    "engine": ChoiceRule(("fast", "reference")),
    "engine_options": _engine_options,  # fast engine only, validated for the order
    "dtype": _dtype,
    "checkpoint_every": IntRule(1, allow_none=True),
    "head": _head,
    # generation mode and the fields only it reads
    "mode": ChoiceRule(("classification", "generation")),
    "noise_schedule": _InGeneration(ChoiceRule(_SCHEDULES)),
    "diffusion_steps": _InGeneration(_diffusion_steps),
    "timesteps": _timesteps,  # a generation-mode option, in [0, diffusion_steps)
}


def _check(config: Any, name: str) -> None:
    setattr(config, name, _RULES[name](config, name, getattr(config, name)))


def _refuse_in_generation(config: Any) -> None:
    """What a noise-prediction model has not: a classification head, an accuracy guard, and the
    fast engine options generation cannot use (CUDA graphs, vmap over adversaries: every
    simulation draws its own noise). Checked before those fields' own rules, so these messages
    name the mode."""
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
    if config.representation_weight:
        raise ValueError(
            "ProtectConfig.representation_weight: the representation term probes a classifier "
            "head's input features; mode='generation' takes representation_weight=0"
        )
    adversaries = config.adversaries
    if is_distribution_spec(adversaries):
        reinit = (
            adversaries.reinit_head
            if isinstance(adversaries, AdversaryDistribution)
            else adversaries.get("reinit_head")
        )
        if reinit not in (None, 0, 0.0, False):
            raise ValueError(
                "ProtectConfig.adversaries: a noise-prediction model has no classification head; "
                "mode='generation' takes a distribution with reinit_head None or 0"
            )
    options = config.engine_options
    if options is not None:
        get = options.get if isinstance(options, dict) else lambda k, d=None: getattr(options, k, d)
        if get("cuda_graphs", "off") not in ("off", None):
            raise ValueError(
                f"ProtectConfig.engine_options: cuda_graphs={get('cuda_graphs')!r} is not available "
                "in mode='generation' (every simulation draws fresh noise and runs eagerly); leave "
                "cuda_graphs='off'"
            )
        if get("vmap_adversaries") is True:
            raise ValueError(
                "ProtectConfig.engine_options: vmap_adversaries=True is not available in "
                "mode='generation' (each adversary's simulation draws its own noise, so they run "
                "one at a time); leave it None or False"
            )


def validate_generation_config(config) -> None:
    """Generation-mode checks of a :class:`ProtectConfig` (construction runs the same ones).

    Raises:
        ValueError / TypeError: a classification loss, ``reinit_head=True``, a ``head`` name, an
            intactness guard, or a bad ``timesteps`` / ``noise_schedule`` / ``diffusion_steps``.
    """
    _check(config, "loss")
    _refuse_in_generation(config)
    for name in ("noise_schedule", "diffusion_steps", "timesteps"):
        _check(config, name)


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
            or dicts; names sgd, momentum, nesterov, adam, adamw, rmsprop, adagrad, adadelta
            (hyper-parameters and defaults in :mod:`sophon_fast.reference.optimizers`). Or a
            distribution over the attacker: ``{"families": {name: {"lr": (low, high), ...}},
            "reinit_head": p, "batch_size": (...), "inner_steps": (...)}`` (an
            :class:`~sophon_fast.reference.adversary_distribution.AdversaryDistribution`): one
            draw per simulation (optimizer, log-uniform learning rate, hyper-parameters, head
            re-drawn or kept, batch size, horizon), recorded in the history's ``draws``.
            None = ``(("sgd", inner_lr),)``.
        adversary_sampling: ``"one"`` (draw one per simulation from the seeded generator) or
            ``"all"`` (simulate every adversary on the same batches and average). Default "one".
        step_weighting: how the suppression loss weighs the K inner steps: ``"uniform"``
            (official), ``"late"`` (w_k = k / K) or ``"exponential"`` (w_k = exp(rate (k - K)));
            :mod:`sophon_fast.reference.trajectory`. Default "uniform".
        step_weighting_rate: the exponential weighting's rate (TAR's 0.0625). Default 0.0625.
        representation_weight: weight of the representation term: each meta step adds this
            times the gradient of the held-out linear-probe R^2 of the head's input features on
            ``representation_samples`` restricted samples
            (:mod:`sophon_fast.reference.probe`), so a linear probe reads less of the restricted
            task from the features. 0 = off (official). Default 0.
        representation_samples: restricted samples per representation term (half fit the
            probe, half evaluate it). Default 256.
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
    step_weighting: str = "uniform"
    step_weighting_rate: float = 0.0625
    simulations: int = 1
    representation_weight: float = 0.0
    representation_samples: int = 256
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
    # Generation mode and the fields only it reads (classification ignores noise_schedule and
    # diffusion_steps, refuses timesteps, and to_dict leaves all four out of its dicts).
    mode: str = "classification"
    timesteps: Any = None
    noise_schedule: str = "linear"
    diffusion_steps: int = 1000

    def __post_init__(self) -> None:
        _check(self, "mode")  # first: the mode-aware rules read it
        if self.mode == "generation":
            _refuse_in_generation(self)
        for name in _RULES:
            _check(self, name)
        # the checks that tie fields together
        if self.adapt_size >= self.batch_size:
            raise ValueError(
                f"ProtectConfig.adapt_size: expected 1 <= adapt_size < batch_size={self.batch_size} "
                f"(the rest of each batch evaluates), got {self.adapt_size}"
            )
        for name, lr in (
            ("alpha * base_lr", self.alpha * self.base_lr),
            ("beta * base_lr", self.beta * self.base_lr),
        ):
            _below_lr_max(name, lr)
        if self.truncate is not None and self.order == 1:
            raise ValueError(
                "ProtectConfig.truncate: only meaningful with order=2 (order 1 differentiates no inner step)"
            )
        threshold = self.guard_threshold
        if threshold is not None and self.guard_mode == "absolute" and threshold > 100.0:
            raise ValueError(
                f"ProtectConfig.guard_threshold: absolute mode takes a percentage in [0, 100], got {threshold}"
            )
        if threshold is not None and self.guard_mode == "relative" and not 0.0 < threshold <= 1.0:
            raise ValueError(
                f"ProtectConfig.guard_threshold: relative mode takes a fraction of the starting accuracy in (0, 1], "
                f"got {threshold}"
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
        if isinstance(self.adversaries, AdversaryDistribution):
            out["adversaries"] = self.adversaries.to_json()
        else:
            out["adversaries"] = [a.to_json() for a in self.adversaries]
        for name, default in (
            ("step_weighting", "uniform"),
            ("step_weighting_rate", 0.0625),
            ("representation_weight", 0.0),
            ("representation_samples", 256),
        ):
            if out[name] == default:  # the default: older checkpoints and dicts stay comparable
                del out[name]
        if self.engine_options is None:  # the default: older checkpoints and dicts stay comparable
            del out["engine_options"]
        if self.simulations == 1:  # the default: older checkpoints and dicts stay comparable
            del out["simulations"]
        if self.mode == "classification":  # classification dicts stay as they were
            for name in _GENERATION_FIELDS:
                del out[name]
        return out

    @property
    def adversary_distribution(self) -> AdversaryDistribution | None:
        """The attacker distribution, or None when ``adversaries`` is a list."""
        return self.adversaries if isinstance(self.adversaries, AdversaryDistribution) else None

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ProtectConfig:
        """A named configuration (:data:`sophon_fast.presets.PRESETS`, documented there with
        its measured cost and margins), with ``overrides`` replacing fields.

        ``"official"`` is ``ProtectConfig()`` (the official run); ``"robust"`` simulates a
        distribution of attackers (the efficacy benchmark's choice).

        Raises:
            ValueError: an unknown preset name, or an override the config refuses.
        """
        if name not in PRESETS:
            raise ValueError(
                f"ProtectConfig.preset: unknown preset {name!r}; expected one of {sorted(PRESETS)}"
            )
        return cls(**{**PRESETS[name], **overrides})

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
