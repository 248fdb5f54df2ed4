"""A distribution over simulated fine-tuning attackers: one draw per simulation.

SOPHON's inner loop simulates one optimizer at one learning rate; an attacker picks their own,
and a model protected against plain SGD at 1e-4 is recovered by Adam, Adagrad or Adadelta.
Later work (TAR, ResAlign, MLAC) holds longer by sampling the attacker inside the simulation.
An :class:`AdversaryDistribution` (``ProtectConfig(adversaries=...)``) describes that attacker:

- ``families``: optimizer name -> its learning-rate range (log-uniform), hyper-parameter values
  or uniform ranges, and a relative weight (the family is drawn in proportion to it);
- ``reinit_head``: the probability that a simulation re-draws the classifier head (the attacker
  re-initialising it before fine-tuning); None = the run's ``reinit_head`` setting;
- ``batch_size``: the attacker's batch sizes (one drawn uniformly; the adapt / evaluate split
  keeps the run's proportion); None = the run's ``batch_size``;
- ``inner_steps``: the simulated horizons K (one drawn uniformly); None = the run's
  ``inner_steps``.

Spec form (a dict; tuples or lists)::

    {"families": {"sgd": {"lr": (1e-3, 1e-1)},
                  "momentum": {"lr": (1e-3, 1e-1), "momentum": (0.8, 0.95)},
                  "adam": {"lr": (1e-5, 1e-3), "weight": 2.0},
                  "adadelta": {"lr": (0.1, 1.0)}},
     "reinit_head": 0.5, "batch_size": (64, 150), "inner_steps": (10, 20)}

A family's ``lr`` is a number (fixed) or a ``(low, high)`` range drawn log-uniformly; another
scalar hyper-parameter is a number (fixed) or a ``(low, high)`` range drawn uniformly; ``betas``
is a fixed pair. Every value the ranges allow is checked by the optimizer registry's own
validation (:func:`sophon_fast.reference.optimizers.resolve_adversary`) at both ends.

**Draw order** (all from the run's one seeded generator, so a resumed run draws the same
attackers; :mod:`sophon_fast.engine.sampling` calls :meth:`AdversaryDistribution.draw` before a
simulation's batches): one uniform for the family (against the cumulative weights), one for the
learning rate, one per ranged hyper-parameter in sorted name order, one for the head (when
``reinit_head`` is a probability), one integer for the batch size and one for the horizon (each
only when there is more than one choice). Every uniform is a float64 ``torch.rand``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .optimizers import OPTIMIZER_DEFAULTS, Adversary, resolve_adversary

__all__ = ["AdversaryDistribution", "FamilyRange", "SimulationPlan", "is_distribution_spec"]

_MAX_INNER_STEPS = 10_000
_FAMILY_KEYS = ("lr", "weight")
_TOP_KEYS = ("families", "reinit_head", "batch_size", "inner_steps")


def _positive(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what}: expected a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what}: expected a finite number > 0, got {value}")
    return value


def _range(value: Any, what: str) -> tuple[float, float] | None:
    """``(low, high)`` of a 2-sequence of numbers, or None for anything else (a fixed value)."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            low, high = float(value[0]), float(value[1])
            if not (math.isfinite(low) and math.isfinite(high)) or low > high:
                raise ValueError(
                    f"{what}: a range is (low, high) with finite low <= high, got {value!r}"
                )
            return low, high
    return None


def _choices(value: Any, what: str, *, low: int, high: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(items, (tuple, list))
        or not items
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in items)
    ):
        raise ValueError(f"{what}: expected an int or a non-empty list of ints, got {value!r}")
    bad = [v for v in items if not low <= v <= high]
    if bad:
        raise ValueError(f"{what}: expected values in [{low}, {high}], got {bad}")
    return tuple(items)


@dataclass(frozen=True)
class FamilyRange:
    """One optimizer family: ``lr`` range (log-uniform; low == high is fixed), fixed
    hyper-parameters ``hp`` (defaults filled in), uniform ``ranges`` and the draw ``weight``."""

    name: str
    lr: tuple[float, float]
    hp: dict[str, Any] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    weight: float = 1.0

    @classmethod
    def from_spec(cls, name: Any, spec: Any) -> FamilyRange:
        what = f"adversary distribution family {name!r}"
        if name not in OPTIMIZER_DEFAULTS:
            raise ValueError(
                f"{what}: unknown optimizer; expected one of {sorted(OPTIMIZER_DEFAULTS)}"
            )
        if not isinstance(spec, Mapping) or "lr" not in spec:
            raise ValueError(
                f"{what}: expected a dict with at least 'lr' (a number or a (low, high) range), got {spec!r}"
            )
        spec = dict(spec)
        lr_value = spec.pop("lr")
        lr = _range(lr_value, f"{what} lr") or (lr_value, lr_value)
        weight = _positive(spec.pop("weight", 1.0), f"{what} weight")
        unknown = sorted(set(spec) - set(OPTIMIZER_DEFAULTS[name]))
        if unknown:
            raise ValueError(
                f"{what}: unknown keys {unknown}; expected 'lr', 'weight' and some of "
                f"{sorted(OPTIMIZER_DEFAULTS[name])}"
            )
        ranges = {}
        fixed = {}
        for key, value in spec.items():
            ranged = None if key == "betas" else _range(value, f"{what} {key}")
            if ranged is None:
                fixed[key] = value
            else:
                ranges[key] = ranged
        # both ends of every range through the registry's own checks
        low = resolve_adversary((name, lr[0], {**fixed, **{k: r[0] for k, r in ranges.items()}}))
        resolve_adversary((name, lr[1], {**fixed, **{k: r[1] for k, r in ranges.items()}}))
        hp = {k: v for k, v in low.hp.items() if k not in ranges}
        return cls(name=name, lr=(low.lr, float(lr[1])), hp=hp, ranges=ranges, weight=weight)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lr": list(self.lr), "weight": self.weight}
        out.update({k: list(v) if isinstance(v, tuple) else v for k, v in self.hp.items()})
        out.update({k: list(v) for k, v in self.ranges.items()})
        return out


@dataclass(frozen=True)
class SimulationPlan:
    """One draw: the adversary, whether the head is re-drawn, batch size, adapt size, horizon."""

    adversary: Adversary
    reinit_head: bool
    batch_size: int
    adapt_size: int
    inner_steps: int

    def to_json(self) -> dict[str, Any]:
        return {
            "adversary": self.adversary.to_json(),
            "reinit_head": self.reinit_head,
            "batch_size": self.batch_size,
            "adapt_size": self.adapt_size,
            "inner_steps": self.inner_steps,
        }


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def _pick(count: int, generator: torch.Generator) -> int:
    return int(torch.randint(count, (1,), generator=generator)) if count > 1 else 0


@dataclass(frozen=True)
class AdversaryDistribution:
    """The attacker a protection run simulates (module docstring)."""

    families: tuple[FamilyRange, ...]
    reinit_head: float | None = None
    batch_size: tuple[int, ...] | None = None
    inner_steps: tuple[int, ...] | None = None

    @classmethod
    def from_spec(cls, spec: Any) -> AdversaryDistribution:
        """Parse and validate the dict form (module docstring); an instance is returned as is.

        Raises:
            TypeError / ValueError: naming the key and what was expected.
        """
        if isinstance(spec, AdversaryDistribution):
            return spec
        if not is_distribution_spec(spec):
            raise TypeError(
                f"adversary distribution: expected a dict with 'families', got {spec!r}"
            )
        unknown = sorted(set(spec) - set(_TOP_KEYS))
        if unknown:
            raise ValueError(
                f"adversary distribution: unknown keys {unknown}; expected some of {list(_TOP_KEYS)}"
            )
        families = spec["families"]
        if not isinstance(families, Mapping) or not families:
            raise ValueError(
                f"adversary distribution 'families': expected a non-empty dict name -> {{'lr': ...}}, got {families!r}"
            )
        reinit = spec.get("reinit_head")
        if reinit is not None:
            if isinstance(reinit, bool):
                reinit = float(reinit)
            if not isinstance(reinit, (int, float)) or not 0.0 <= float(reinit) <= 1.0:
                raise ValueError(
                    f"adversary distribution 'reinit_head': expected a probability in [0, 1] or None, got {reinit!r}"
                )
            reinit = float(reinit)
        return cls(
            families=tuple(FamilyRange.from_spec(name, value) for name, value in families.items()),
            reinit_head=reinit,
            batch_size=_choices(spec.get("batch_size"), "adversary distribution 'batch_size'", low=2, high=2**31),
            inner_steps=_choices(
                spec.get("inner_steps"), "adversary distribution 'inner_steps'", low=1, high=_MAX_INNER_STEPS
            ),
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """The dict form, JSON-able (:meth:`from_spec` reads it back)."""
        out: dict[str, Any] = {"families": {f.name: f.to_json() for f in self.families}}
        out["reinit_head"] = self.reinit_head
        out["batch_size"] = None if self.batch_size is None else list(self.batch_size)
        out["inner_steps"] = None if self.inner_steps is None else list(self.inner_steps)
        return out

    def draw(
        self, generator: torch.Generator, *, batch_size: int, adapt_size: int, inner_steps: int,
        reinit_head: bool,
    ) -> SimulationPlan:  # fmt: skip
        """One attacker, in the documented draw order; the keyword arguments are the run's own
        settings, used where the distribution leaves a field None."""
        u = _uniform(generator)
        total = sum(f.weight for f in self.families)
        family, cumulative = self.families[-1], 0.0
        for candidate in self.families:
            cumulative += candidate.weight / total
            if u < cumulative:
                family = candidate
                break
        low, high = family.lr
        u = _uniform(generator)
        lr = low if low == high else math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
        hp = dict(family.hp)
        for key in sorted(family.ranges):
            a, b = family.ranges[key]
            hp[key] = a + _uniform(generator) * (b - a)
        reinit = reinit_head
        if self.reinit_head is not None:
            reinit = _uniform(generator) < self.reinit_head
        size = batch_size
        if self.batch_size is not None:
            size = self.batch_size[_pick(len(self.batch_size), generator)]
        adapt = adapt_size
        if size != batch_size:  # keep the run's adapt / evaluate proportion
            adapt = min(max(round(size * adapt_size / batch_size), 1), size - 1)
        steps = inner_steps
        if self.inner_steps is not None:
            steps = self.inner_steps[_pick(len(self.inner_steps), generator)]
        return SimulationPlan(
            adversary=Adversary(name=family.name, lr=min(max(lr, low), high), hp=hp),
            reinit_head=reinit, batch_size=size, adapt_size=adapt, inner_steps=steps,
        )  # fmt: skip


def is_distribution_spec(value: Any) -> bool:
    """Whether ``value`` is an :class:`AdversaryDistribution` or its dict form."""
    return isinstance(value, AdversaryDistribution) or (
        isinstance(value, Mapping) and "families" in value
    )
