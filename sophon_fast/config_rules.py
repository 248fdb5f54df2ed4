"""The rule kinds :class:`sophon_fast.config.ProtectConfig` declares its fields with.

A rule is a callable ``(config, field name, value) -> the value to store``: it raises
``TypeError`` for a value of the wrong type and ``ValueError`` for one out of range, with a
message that names ``ProtectConfig.<field>`` and says what was expected, and returns the value
checked and normalised (a number as a float). It may read the fields checked before it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["BoolRule", "ChoiceRule", "FloatRule", "IntRule", "Rule", "check_choice"]

#: (config, field name, value) -> the value to store.
Rule = Callable[[Any, str, Any], Any]

# Counts beyond this are typos (a step or sample count of 2**40 never finishes); the bound keeps
# them from reaching torch, whose int64 arguments overflow at 2**63.
INT_MAX = 2**62


def check_choice(name: str, value: Any, options: Sequence[str]) -> None:
    if value not in options:
        raise ValueError(f"ProtectConfig.{name}: expected one of {list(options)}, got {value!r}")


@dataclass(frozen=True)
class IntRule:
    """An int (not a bool) in [minimum, maximum]; None too when ``allow_none``."""

    minimum: int
    maximum: int = INT_MAX
    allow_none: bool = False

    def __call__(self, config: Any, name: str, value: Any) -> int | None:
        if value is None and self.allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(
                f"ProtectConfig.{name}: expected an int, got {value!r} ({type(value).__name__})"
            )
        if not self.minimum <= value <= self.maximum:
            top = "2**62" if self.maximum == INT_MAX else self.maximum
            raise ValueError(
                f"ProtectConfig.{name}: expected an int in [{self.minimum}, {top}], got {value}"
            )
        return value


@dataclass(frozen=True)
class FloatRule:
    """A finite number, > 0 (``positive``) or >= 0, stored as a float; None too when allowed."""

    positive: bool = True
    allow_none: bool = False

    def __call__(self, config: Any, name: str, value: Any) -> float | None:
        if value is None and self.allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"ProtectConfig.{name}: expected a number, got {value!r} ({type(value).__name__})"
            )
        value = float(value)
        if not math.isfinite(value) or (value <= 0 if self.positive else value < 0):
            kind = "> 0" if self.positive else ">= 0"
            raise ValueError(f"ProtectConfig.{name}: expected a finite number {kind}, got {value}")
        return value


@dataclass(frozen=True)
class ChoiceRule:
    """One of ``options`` (``ValueError`` otherwise)."""

    options: tuple[Any, ...]

    def __call__(self, config: Any, name: str, value: Any) -> Any:
        check_choice(name, value, self.options)
        return value


@dataclass(frozen=True)
class BoolRule:
    """True or False (not 1 or "yes": ``TypeError``); None too when ``allow_none``."""

    allow_none: bool = False

    def __call__(self, config: Any, name: str, value: Any) -> Any:
        if isinstance(value, bool) or (value is None and self.allow_none):
            return value
        expected = "True, False or None" if self.allow_none else "a bool"
        raise TypeError(f"ProtectConfig.{name}: expected {expected}, got {value!r}")
