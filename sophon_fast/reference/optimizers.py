"""The inner-optimizer registry: one entry per simulated fine-tuning optimizer (the adversaries).

An entry (:class:`InnerOptimizer`) holds everything about one optimizer that does not depend on
how its kernels are built:

- ``name`` and ``defaults`` (every hyper-parameter it accepts, with torch.optim's default where
  torch has one; momentum 0.9 for the momentum adversaries, the fine-tuning attack's value);
- ``state_names``: its (n_params,) state buffers besides the 0-d ``step`` count;
- ``call`` / ``call_``: how a flat kernel pair is called on ``(params, grad, state, hp)``
  (``hp`` holds ``lr`` and the hyper-parameters): out of place, returning
  ``(new_params, new_state)``, and in place (params and every state tensor overwritten);
- ``reference``: its pure-torch kernel pair (:mod:`sophon_fast.reference.flat_optim`), so
  :meth:`InnerOptimizer.step` is the optimizer's one pure formula: differentiable to any order,
  free of host synchronisation (the step count is a 0-d tensor, first-step cases are
  ``torch.where`` selections) and batchable by ``torch.func.vmap`` (``hp["lr"]`` may be a tensor).

Readers: the fast engine (:mod:`sophon_fast.engine.optimizers` calls each entry with its fused
kernel pair from :mod:`sophon_fast.ops.flat_optim`), the vmap path and the reference engine
(:meth:`InnerOptimizer.step` with the pure-torch pair), the configuration
(:func:`resolve_adversary`) and the tests. Nothing outside this module switches on an
optimizer's name.

The maths (torch.optim; t = step count after the increment, d = grad + wd * params):

=============  ==============================================================================
``sgd``        p' = p - lr * d
``momentum``   b' = d if t == 1 else mu * b + (1 - dampening) * d;   p' = p - lr * b'
``nesterov``   b' as momentum (dampening 0);                          p' = p - lr * (d + mu * b')
``adam``       m' = b1 m + (1-b1) d,  v' = b2 v + (1-b2) d^2,
               p' = p - lr / (1 - b1^t) * m' / (sqrt(v') / sqrt(1 - b2^t) + eps)
``adamw``      as adam with d = grad, and p decayed first: p <- p * (1 - lr * wd)
``rmsprop``    v' = a v + (1-a) d^2,  p' = p - lr * d / (sqrt(v') + eps)
``adagrad``    s' = s + d^2,  p' = p - lr / (1 + (t-1) lr_decay) * d / (sqrt(s') + eps);
               s starts at initial_accumulator_value
``adadelta``   v' = rho v + (1-rho) d^2,  delta = sqrt(u + eps) / sqrt(v' + eps) * d,
               u' = rho u + (1-rho) delta^2,  p' = p - lr * delta
=============  ==============================================================================

State lives in float32 (float64 for float64 parameters); maths runs in that dtype and the new
parameters are cast back to the parameter dtype. Square roots are zero-safe
(:func:`sophon_fast.reference.flat_common.safe_sqrt`).

Adding an optimizer (Adagrad, say) takes:

1. its pure-torch kernels, ``reference/flat_adagrad.py``: ``flat_adagrad_step`` (out of place,
   ``out=`` optional) and ``flat_adagrad_step_`` (in place), the signatures of the fused ops;
2. one :func:`register` call below: name, defaults, state names, ``call`` / ``call_`` adapters
   and ``Kernels(flat_adagrad_step, flat_adagrad_step_)``; a hyper-parameter with a new range
   gets one line in ``_RANGES`` (``resolve_adversary`` validates by it);
3. its fused kernels, ``ops/flat_adagrad.py`` (+ csrc), re-exported by ``ops/flat_optim.py``, and
   one line ``"adagrad": Kernels(...)`` in :data:`sophon_fast.engine.optimizers.FUSED_KERNELS`
   (an optimizer without one runs its reference kernels in the fast engine too).

State that torch.optim does not start at zero stays in the adapters: :meth:`InnerOptimizer.init`
knows no hyper-parameters, so Adagrad's ``initial_accumulator_value`` joins the zero ``sum`` on
the first step (a mask on the 0-d step, see :func:`_adagrad_sum`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .flat_adadelta import flat_adadelta_step, flat_adadelta_step_
from .flat_adagrad import flat_adagrad_step, flat_adagrad_step_
from .flat_adam import flat_adam_step, flat_adam_step_, flat_adamw_step
from .flat_common import state_dtype
from .flat_momentum import flat_momentum_step, flat_momentum_step_
from .flat_rmsprop import flat_rmsprop_step, flat_rmsprop_step_
from .flat_sgd_step import flat_sgd_step

__all__ = [
    "INNER_OPTIMIZER_REGISTRY",
    "OPTIMIZER_DEFAULTS",
    "Adversary",
    "InnerOptimizer",
    "Kernels",
    "get_optimizer",
    "init_state",
    "register",
    "resolve_adversary",
]

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Kernels:
    """An optimizer's two flat kernels, with the signatures of :mod:`sophon_fast.ops.flat_optim`:
    ``step`` out of place (differentiable, returns the new tensors) and ``step_`` in place."""

    step: Callable[..., Any]
    step_: Callable[..., Any]


@dataclass(frozen=True)
class InnerOptimizer:
    """One registry entry (see the module docstring for the fields)."""

    name: str
    defaults: Mapping[str, Any]
    state_names: tuple[str, ...]
    call: Callable[..., tuple[torch.Tensor, State]]
    call_: Callable[..., None]
    reference: Kernels

    def init(self, params: torch.Tensor) -> State:
        """Fresh state over (n_params,) ``params``: a 0-d step and zero (n_params,) buffers."""
        dtype = state_dtype(params.dtype)
        state = {"step": torch.zeros((), dtype=dtype, device=params.device)}
        for name in self.state_names:
            state[name] = torch.zeros(params.shape, dtype=dtype, device=params.device)
        return state

    def step(
        self, params: torch.Tensor, grad: torch.Tensor, state: State, hp: Mapping[str, Any],
        kernels: Kernels | None = None,
    ) -> tuple[torch.Tensor, State]:  # fmt: skip
        """Out-of-place update -> (new_params, new_state), through ``kernels`` (default: the
        pure-torch pair)."""
        return self.call((kernels or self.reference).step, params, grad, state, hp)

    def step_(
        self, params: torch.Tensor, grad: torch.Tensor, state: State, hp: Mapping[str, Any],
        kernels: Kernels | None = None,
    ) -> None:  # fmt: skip
        """:meth:`step` in place: ``params`` and every ``state`` tensor get the new values."""
        self.call_((kernels or self.reference).step_, params, grad, state, hp)


#: name -> entry, in registration order.
INNER_OPTIMIZER_REGISTRY: dict[str, InnerOptimizer] = {}

#: name -> {hyper-parameter: default} of every registered optimizer (a view of the registry).
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {}


def register(entry: InnerOptimizer) -> InnerOptimizer:
    """Add (or replace) ``entry`` under its name; returns it."""
    INNER_OPTIMIZER_REGISTRY[entry.name] = entry
    OPTIMIZER_DEFAULTS[entry.name] = dict(entry.defaults)
    return entry


def get_optimizer(name: str) -> InnerOptimizer:
    """The registry entry of ``name``.

    Raises:
        ValueError: ``name`` is not registered.
    """
    try:
        return INNER_OPTIMIZER_REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown inner optimizer {name!r}; expected one of {sorted(INNER_OPTIMIZER_REGISTRY)}"
        ) from None


def init_state(name: str, params: torch.Tensor) -> State:
    """Fresh state for optimizer ``name`` over ``params``: (n_params,) buffers plus a 0-d step."""
    return get_optimizer(name).init(params)


# ------------------------------------------------------------------------- how kernels are called


def _sgd_call(kernel, params, grad, state, hp):
    return kernel(params, grad, hp["lr"], hp["weight_decay"]), {"step": state["step"] + 1}


def _sgd_call_(kernel_, params, grad, state, hp):
    kernel_(params, grad, hp["lr"], hp["weight_decay"], out=params)
    state["step"].add_(1)


def _momentum_call(kernel, params, grad, state, hp, *, nesterov):
    new, buf = kernel(
        params, grad, state["momentum_buffer"], state["step"], hp["lr"], hp["momentum"],
        0.0 if nesterov else hp["dampening"], hp["weight_decay"], nesterov,
    )  # fmt: skip
    return new, {"step": state["step"] + 1, "momentum_buffer": buf}


def _momentum_call_(kernel_, params, grad, state, hp, *, nesterov):
    kernel_(
        params, grad, state["momentum_buffer"], state["step"], hp["lr"], hp["momentum"],
        0.0 if nesterov else hp["dampening"], hp["weight_decay"], nesterov,
    )  # fmt: skip


def _adam_call(kernel, params, grad, state, hp):
    new, exp_avg, exp_avg_sq = kernel(
        params, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], hp["lr"],
        hp["betas"], hp["eps"], hp["weight_decay"],
    )  # fmt: skip
    return new, {"step": state["step"] + 1, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def _adam_call_(kernel_, params, grad, state, hp, *, decoupled):
    kernel_(
        params, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], hp["lr"],
        hp["betas"], hp["eps"], hp["weight_decay"], decoupled=decoupled,
    )  # fmt: skip


def _rmsprop_call(kernel, params, grad, state, hp):
    new, square_avg = kernel(
        params, grad, state["square_avg"], hp["lr"], hp["alpha"], hp["eps"], hp["weight_decay"]
    )
    return new, {"step": state["step"] + 1, "square_avg": square_avg}


def _rmsprop_call_(kernel_, params, grad, state, hp):
    kernel_(params, grad, state["square_avg"], hp["lr"], hp["alpha"], hp["eps"], hp["weight_decay"])
    state["step"].add_(1)


def _adagrad_sum(state, hp):
    """What the first step adds to the zero ``sum`` of :meth:`InnerOptimizer.init`, or None.

    torch.optim.Adagrad starts the sum at ``initial_accumulator_value``; init knows no
    hyper-parameters, so the value joins the sum while the step count is 0: value * (step == 0),
    a mask on the 0-d step (no host read, vmap-able, capturable). None when the value is 0.
    """
    initial = hp["initial_accumulator_value"]
    if not initial:
        return None
    first = (state["step"] == 0).to(state["sum"].dtype)
    return initial * first


def _adagrad_call(kernel, params, grad, state, hp):
    start = _adagrad_sum(state, hp)
    state_sum = state["sum"] if start is None else state["sum"] + start
    new, new_sum = kernel(
        params, grad, state_sum, state["step"], hp["lr"], hp["lr_decay"], hp["weight_decay"],
        hp["eps"],
    )  # fmt: skip
    return new, {"step": state["step"] + 1, "sum": new_sum}


def _adagrad_call_(kernel_, params, grad, state, hp):
    start = _adagrad_sum(state, hp)
    if start is not None:
        state["sum"].add_(start)
    kernel_(
        params, grad, state["sum"], state["step"], hp["lr"], hp["lr_decay"], hp["weight_decay"],
        hp["eps"],
    )  # fmt: skip


def _adadelta_call(kernel, params, grad, state, hp):
    new, square_avg, acc_delta = kernel(
        params, grad, state["square_avg"], state["acc_delta"], hp["lr"], hp["rho"], hp["eps"],
        hp["weight_decay"],
    )  # fmt: skip
    return new, {"step": state["step"] + 1, "square_avg": square_avg, "acc_delta": acc_delta}


def _adadelta_call_(kernel_, params, grad, state, hp):
    kernel_(
        params, grad, state["square_avg"], state["acc_delta"], hp["lr"], hp["rho"], hp["eps"],
        hp["weight_decay"],
    )  # fmt: skip
    state["step"].add_(1)


# ------------------------------------------------------------------------------------ the entries

register(InnerOptimizer(
    name="sgd",
    defaults={"weight_decay": 0.0},
    state_names=(),
    call=_sgd_call,
    call_=_sgd_call_,
    reference=Kernels(flat_sgd_step, flat_sgd_step),
))  # fmt: skip
for _name, _nesterov, _defaults in (
    ("momentum", False, {"momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0}),
    ("nesterov", True, {"momentum": 0.9, "weight_decay": 0.0}),
):
    register(InnerOptimizer(
        name=_name,
        defaults=_defaults,
        state_names=("momentum_buffer",),
        call=functools.partial(_momentum_call, nesterov=_nesterov),
        call_=functools.partial(_momentum_call_, nesterov=_nesterov),
        reference=Kernels(flat_momentum_step, flat_momentum_step_),
    ))  # fmt: skip
register(InnerOptimizer(
    name="adam",
    defaults={"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    state_names=("exp_avg", "exp_avg_sq"),
    call=_adam_call,
    call_=functools.partial(_adam_call_, decoupled=False),
    reference=Kernels(flat_adam_step, flat_adam_step_),
))  # fmt: skip
register(InnerOptimizer(
    name="adamw",
    defaults={"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
    state_names=("exp_avg", "exp_avg_sq"),
    call=_adam_call,
    call_=functools.partial(_adam_call_, decoupled=True),
    reference=Kernels(flat_adamw_step, flat_adam_step_),
))  # fmt: skip
register(InnerOptimizer(
    name="rmsprop",
    defaults={"alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0},
    state_names=("square_avg",),
    call=_rmsprop_call,
    call_=_rmsprop_call_,
    reference=Kernels(flat_rmsprop_step, flat_rmsprop_step_),
))  # fmt: skip
register(InnerOptimizer(
    name="adagrad",
    defaults={"lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0,
              "eps": 1e-10},
    state_names=("sum",),
    call=_adagrad_call,
    call_=_adagrad_call_,
    reference=Kernels(flat_adagrad_step, flat_adagrad_step_),
))  # fmt: skip
register(InnerOptimizer(
    name="adadelta",
    defaults={"rho": 0.9, "eps": 1e-6, "weight_decay": 0.0},
    state_names=("square_avg", "acc_delta"),
    call=_adadelta_call,
    call_=_adadelta_call_,
    reference=Kernels(flat_adadelta_step, flat_adadelta_step_),
))  # fmt: skip
del _name, _nesterov, _defaults


# -------------------------------------------------------------------------------------- adversary


@dataclass(frozen=True)
class Adversary:
    """One simulated fine-tuning optimizer: ``name`` (a key of OPTIMIZER_DEFAULTS), learning rate
    ``lr`` and the full hyper-parameter dict ``hp`` (defaults filled in)."""

    name: str
    lr: float
    hp: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON form: ``{"name", "lr", "hp"}`` with tuples as lists."""
        return {
            "name": self.name,
            "lr": self.lr,
            "hp": {k: list(v) if isinstance(v, tuple) else v for k, v in self.hp.items()},
        }

    @property
    def step_hp(self) -> dict[str, Any]:
        """Hyper-parameters as the step functions take them: ``hp`` plus ``lr``."""
        return {**self.hp, "lr": self.lr}

    @property
    def optimizer(self) -> InnerOptimizer:
        """The registry entry of ``name``."""
        return get_optimizer(self.name)

    def describe(self) -> str:
        """Short label for history records, e.g. ``"adam(lr=0.0001)"``."""
        return f"{self.name}(lr={self.lr:g})"


def _number(
    value: Any, what: str, *, low: float, high: float = math.inf, low_open: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what}: expected a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    ok_low = value > low if low_open else value >= low
    if not (ok_low and value <= high and math.isfinite(value)):
        bracket = "(" if low_open else "["
        raise ValueError(f"{what}: expected a finite value in {bracket}{low}, {high}], got {value}")
    return value


def _betas(value: Any, what: str) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{what}: expected a pair (beta1, beta2), got {value!r}")
    betas = tuple(_number(b, what, low=0.0, high=1.0) for b in value)
    if max(betas) >= 1.0:
        raise ValueError(f"{what}: each beta must be < 1, got {value!r}")
    return betas


def _fraction(value: Any, what: str) -> float:
    value = _number(value, what, low=0.0, high=1.0)
    if value >= 1.0:
        raise ValueError(f"{what}: expected a value in [0, 1), got {value}")
    return value


# Hyper-parameter -> validator (value, label) -> normalised value; any other key: a finite number
# >= 0 (weight_decay).
_RANGES: dict[str, Callable[[Any, str], Any]] = {
    "betas": _betas,
    "eps": lambda value, what: _number(value, what, low=0.0, low_open=True),
    "momentum": lambda value, what: _number(value, what, low=0.0, high=1.0),
    "alpha": lambda value, what: _number(value, what, low=0.0, high=1.0),
    "dampening": lambda value, what: _number(value, what, low=0.0, high=1.0),
    "rho": _fraction,
    "lr_decay": lambda value, what: _number(value, what, low=0.0),
    "initial_accumulator_value": lambda value, what: _number(value, what, low=0.0),
}


def _spec_fields(spec: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(name, lr, hyper-parameters) of one of the accepted adversary spec forms."""
    if isinstance(spec, Adversary):
        return spec.name, spec.lr, dict(spec.hp)
    if isinstance(spec, Mapping):
        spec = dict(spec)
        if "name" not in spec or "lr" not in spec:
            raise ValueError(f"adversary {spec!r}: a dict needs 'name' and 'lr' keys")
        name, lr = spec.pop("name"), spec.pop("lr")
        hp = dict(spec.pop("hp", {}) or {})
        hp.update(spec)
        return name, lr, hp
    if isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
        return spec[0], spec[1], dict(spec[2]) if len(spec) == 3 else {}
    raise TypeError(
        f"adversary {spec!r}: expected (name, lr), (name, lr, hyper_parameters), "
        "a dict with 'name' and 'lr', or an Adversary"
    )


def resolve_adversary(spec: Any) -> Adversary:
    """Normalise an adversary spec into an :class:`Adversary`, validating every field.

    Accepted forms: ``("adam", 1e-4)``, ``("adam", 1e-4, {"betas": (0.9, 0.99)})``,
    ``{"name": "adam", "lr": 1e-4, "hp": {...}}`` (``"hp"`` optional; extra keys are read as
    hyper-parameters too) or an :class:`Adversary`.

    Raises:
        TypeError / ValueError: unknown optimizer, unknown hyper-parameter, or a value out of range.
    """
    name, lr, hp = _spec_fields(spec)
    if name not in OPTIMIZER_DEFAULTS:
        raise ValueError(
            f"adversary {name!r}: unknown optimizer; expected one of {sorted(OPTIMIZER_DEFAULTS)}"
        )
    lr = _number(lr, f"adversary {name!r} lr", low=0.0, low_open=True)
    defaults = OPTIMIZER_DEFAULTS[name]
    unknown = sorted(set(hp) - set(defaults))
    if unknown:
        raise ValueError(
            f"adversary {name!r}: unknown hyper-parameters {unknown}; expected some of {sorted(defaults)}"
        )
    full = {**defaults, **hp}
    for key, value in full.items():
        what = f"adversary {name!r} {key}"
        check = _RANGES.get(key)
        full[key] = check(value, what) if check else _number(value, what, low=0.0)
    return Adversary(name=name, lr=lr, hp=full)
