"""Flat functional inner optimizers: the simulated fine-tuning adversaries of the fast engine.

Every optimizer is one function ``step(params, grad, state, hp) -> (new_params, new_state)`` (``hp``
holds ``lr`` and the optimizer's hyper-parameters) on a
flat (n_params,) buffer. Updates are out of place (an order-2 graph may have saved ``params``;
first-order simulations use :func:`inner_step_`, the same values written in place),
differentiable to any order by autograd, and free of host synchronisation: the step count is a
0-d device tensor and first-step special cases are ``torch.where`` selections, not Python
branches. State tensors live in float32 (float64 for float64 parameters); maths runs in that
dtype and the new parameters are cast back to the parameter dtype.

The maths follows ``torch.optim`` (t = step count after the increment, d = grad + wd * params):

=============  ==============================================================================
``sgd``        p' = p - lr * d                      (the fused :func:`sophon_fast.ops.flat_sgd_step`)
``momentum``   b' = d if t == 1 else mu * b + (1 - dampening) * d;   p' = p - lr * b'
``nesterov``   b' as momentum (dampening 0);                          p' = p - lr * (d + mu * b')
``adam``       m' = b1 m + (1-b1) d,  v' = b2 v + (1-b2) d^2,
               p' = p - lr / (1 - b1^t) * m' / (sqrt(v' / (1 - b2^t)) + eps)
``adamw``      as adam with d = grad, and p decayed first: p <- p * (1 - lr * wd)
``rmsprop``    v' = a v + (1-a) d^2,  p' = p - lr * d / (sqrt(v') + eps)
=============  ==============================================================================

The square roots use a zero-safe form whose derivative at v = 0 is 0 instead of inf (a gradient
entry that is exactly 0, e.g. behind a dead ReLU, would otherwise turn the order-2 meta-gradient
into NaN through inf * 0). Values are unchanged.

Every update runs as one fused kernel from :mod:`sophon_fast.ops.flat_optim` (forward and
first-order backward), chosen per device by the backend dispatch; the ``reference`` backend runs
:mod:`sophon_fast.reference.flat_optim`, whose maths is the pure-torch form kept below
(``_momentum``, ``_adam``, ``_rmsprop``) for the record and as the import-free fallback.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Adversary",
    "INNER_OPTIMIZERS",
    "OPTIMIZER_DEFAULTS",
    "init_state",
    "inner_step",
    "inner_step_",
    "resolve_adversary",
    "safe_sqrt",
    "state_dtype",
]

#: Hyper-parameters each inner optimizer accepts, with their defaults (torch.optim's where
#: torch has one; momentum 0.9 for the momentum adversaries, the fine-tuning attack's value).
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"weight_decay": 0.0},
    "momentum": {"momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0},
    "nesterov": {"momentum": 0.9, "weight_decay": 0.0},
    "adam": {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
    "rmsprop": {"alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0},
}


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


def resolve_adversary(spec: Any) -> Adversary:
    """Normalise an adversary spec into an :class:`Adversary`, validating every field.

    Accepted forms: ``("adam", 1e-4)``, ``("adam", 1e-4, {"betas": (0.9, 0.99)})``,
    ``{"name": "adam", "lr": 1e-4, "hp": {...}}`` (``"hp"`` optional; extra keys are read as
    hyper-parameters too) or an :class:`Adversary`.

    Raises:
        TypeError / ValueError: unknown optimizer, unknown hyper-parameter, or a value out of range.
    """
    if isinstance(spec, Adversary):
        name, lr, hp = spec.name, spec.lr, dict(spec.hp)
    elif isinstance(spec, Mapping):
        spec = dict(spec)
        if "name" not in spec or "lr" not in spec:
            raise ValueError(f"adversary {spec!r}: a dict needs 'name' and 'lr' keys")
        name, lr = spec.pop("name"), spec.pop("lr")
        hp = dict(spec.pop("hp", {}) or {})
        hp.update(spec)
    elif isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
        name, lr = spec[0], spec[1]
        hp = dict(spec[2]) if len(spec) == 3 else {}
    else:
        raise TypeError(
            f"adversary {spec!r}: expected (name, lr), (name, lr, hyper_parameters), "
            "a dict with 'name' and 'lr', or an Adversary"
        )
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
        if key == "betas":
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise ValueError(f"{what}: expected a pair (beta1, beta2), got {value!r}")
            full[key] = tuple(_number(b, what, low=0.0, high=1.0) for b in value)
            if max(full[key]) >= 1.0:
                raise ValueError(f"{what}: each beta must be < 1, got {value!r}")
        elif key == "eps":
            full[key] = _number(value, what, low=0.0, low_open=True)
        elif key in ("momentum", "alpha"):
            full[key] = _number(value, what, low=0.0, high=1.0)
        elif key == "dampening":
            full[key] = _number(value, what, low=0.0, high=1.0)
        else:
            full[key] = _number(value, what, low=0.0)
    return Adversary(name=name, lr=lr, hp=full)


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Optimizer state / maths dtype: float64 for float64 parameters, float32 otherwise."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x) for x >= 0 whose derivative at x = 0 is 0 (not inf), so inf * 0 never makes NaN."""
    positive = x > 0
    return torch.where(
        positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x)
    )


def init_state(name: str, params: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fresh state for optimizer ``name`` over ``params``: (n_params,) buffers plus a 0-d step."""
    dtype = state_dtype(params.dtype)
    step = torch.zeros((), dtype=dtype, device=params.device)
    if name == "sgd":
        return {"step": step}
    zeros = torch.zeros(params.shape, dtype=dtype, device=params.device)
    if name in ("momentum", "nesterov"):
        return {"step": step, "momentum_buffer": zeros}
    if name in ("adam", "adamw"):
        return {"step": step, "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
    if name == "rmsprop":
        return {"step": step, "square_avg": zeros}
    raise ValueError(
        f"unknown inner optimizer {name!r}; expected one of {sorted(OPTIMIZER_DEFAULTS)}"
    )


def _sgd_kernel():
    try:
        from sophon_fast.ops.flat_sgd_step import flat_sgd_step
    except ImportError:  # the fused op needs the backend layer; the twin has the same contract
        from sophon_fast.reference.flat_sgd_step import flat_sgd_step
    return flat_sgd_step


def sgd_step(params, grad, state, hp):
    """Plain SGD through the fused flat op. (n,) -> (n,)."""
    new = _sgd_kernel()(params, grad, hp["lr"], hp["weight_decay"])
    return new, {"step": state["step"] + 1}


def _momentum(params, grad, state, hp, nesterov):
    lr = hp["lr"]
    dtype = state_dtype(params.dtype)
    p, d = params.to(dtype), grad.to(dtype)
    mu = hp["momentum"]
    if hp["weight_decay"]:
        d = d + hp["weight_decay"] * p
    dampening = 0.0 if nesterov else hp["dampening"]
    buf = torch.where(state["step"] == 0, d, mu * state["momentum_buffer"] + (1.0 - dampening) * d)
    direction = d + mu * buf if nesterov else buf
    return (p - lr * direction).to(params.dtype), {
        "step": state["step"] + 1,
        "momentum_buffer": buf,
    }


def _flat_optim():
    try:
        from sophon_fast.ops import flat_optim
    except ImportError:  # the fused ops need the backend layer; fall back to the torch forms
        return None
    return flat_optim


def _fused_momentum(params, grad, state, hp, nesterov):
    fused = _flat_optim()
    if fused is None:
        return _momentum(params, grad, state, hp, nesterov)
    new, buf = fused.flat_momentum_step(
        params, grad.contiguous(), state["momentum_buffer"], state["step"], hp["lr"],
        hp["momentum"], 0.0 if nesterov else hp["dampening"], hp["weight_decay"], nesterov,
    )  # fmt: skip
    return new, {"step": state["step"] + 1, "momentum_buffer": buf}


def momentum_step(params, grad, state, hp):
    """Heavy-ball momentum SGD (torch.optim.SGD semantics), one fused kernel. (n,) -> (n,)."""
    return _fused_momentum(params, grad, state, hp, nesterov=False)


def nesterov_step(params, grad, state, hp):
    """Nesterov momentum SGD (torch.optim.SGD(nesterov=True) semantics). (n,) -> (n,)."""
    return _fused_momentum(params, grad, state, hp, nesterov=True)


def _adam(params, grad, state, hp, decoupled):
    lr = hp["lr"]
    dtype = state_dtype(params.dtype)
    p, d = params.to(dtype), grad.to(dtype)
    beta1, beta2 = hp["betas"]
    if decoupled:
        p = p * (1.0 - lr * hp["weight_decay"])
    elif hp["weight_decay"]:
        d = d + hp["weight_decay"] * p
    step = state["step"] + 1
    exp_avg = beta1 * state["exp_avg"] + (1.0 - beta1) * d
    exp_avg_sq = beta2 * state["exp_avg_sq"] + (1.0 - beta2) * d * d
    bias_correction1 = 1.0 - torch.pow(beta1, step)
    bias_correction2 = 1.0 - torch.pow(beta2, step)
    denom = safe_sqrt(exp_avg_sq) / bias_correction2.sqrt() + hp["eps"]
    new = p - (lr / bias_correction1) * exp_avg / denom
    return new.to(params.dtype), {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def _fused_adam(params, grad, state, hp, decoupled):
    fused = _flat_optim()
    if fused is None:
        return _adam(params, grad, state, hp, decoupled)
    step_fn = fused.flat_adamw_step if decoupled else fused.flat_adam_step
    new, exp_avg, exp_avg_sq = step_fn(
        params, grad.contiguous(), state["exp_avg"], state["exp_avg_sq"], state["step"],
        hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"],
    )  # fmt: skip
    return new, {"step": state["step"] + 1, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def adam_step(params, grad, state, hp):
    """Adam with L2 weight decay in the gradient (torch.optim.Adam semantics). (n,) -> (n,)."""
    return _fused_adam(params, grad, state, hp, decoupled=False)


def adamw_step(params, grad, state, hp):
    """AdamW, decoupled weight decay (torch.optim.AdamW semantics). (n,) -> (n,)."""
    return _fused_adam(params, grad, state, hp, decoupled=True)


def rmsprop_step(params, grad, state, hp):
    """RMSprop without momentum or centering (torch.optim.RMSprop semantics). (n,) -> (n,)."""
    fused = _flat_optim()
    if fused is None:
        return _rmsprop(params, grad, state, hp)
    new, square_avg = fused.flat_rmsprop_step(
        params, grad.contiguous(), state["square_avg"], hp["lr"], hp["alpha"], hp["eps"],
        hp["weight_decay"],
    )  # fmt: skip
    return new, {"step": state["step"] + 1, "square_avg": square_avg}


def _rmsprop(params, grad, state, hp):
    lr = hp["lr"]
    dtype = state_dtype(params.dtype)
    p, d = params.to(dtype), grad.to(dtype)
    if hp["weight_decay"]:
        d = d + hp["weight_decay"] * p
    alpha = hp["alpha"]
    square_avg = alpha * state["square_avg"] + (1.0 - alpha) * d * d
    new = p - lr * d / (safe_sqrt(square_avg) + hp["eps"])
    return new.to(params.dtype), {"step": state["step"] + 1, "square_avg": square_avg}


StepFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

#: name -> ``step(params, grad, state, hp) -> (new_params, new_state)``; ``hp`` includes ``lr``.
INNER_OPTIMIZERS: dict[str, StepFn] = {
    "sgd": sgd_step,
    "momentum": momentum_step,
    "nesterov": nesterov_step,
    "adam": adam_step,
    "adamw": adamw_step,
    "rmsprop": rmsprop_step,
}


def inner_step(
    adversary: Adversary, params: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One out-of-place update of ``adversary`` on (n_params,) ``params`` with (n_params,) ``grad``."""
    return INNER_OPTIMIZERS[adversary.name](params, grad, state, adversary.step_hp)


@torch.no_grad()
def inner_step_(
    adversary: Adversary, params: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor]
) -> None:
    """:func:`inner_step` in place: ``params`` and every ``state`` tensor are overwritten with the
    update's result (same values), with no new buffer and no autograd record.

    For first-order simulations, where nothing needs the old values: the in-place fused kernels
    (``flat_*_step_``, ``flat_sgd_step(out=params)``) write a 45 MB ResNet-18 buffer where the
    fresh form would map a new one (the kernel zeroes its pages on first touch on the CPU) and
    keep a second one alive through the step.
    """
    fused = _flat_optim()
    if fused is None or not params.is_contiguous():
        new, new_state = inner_step(adversary, params, grad, state)
        params.copy_(new)
        for key, value in new_state.items():
            state[key].copy_(value)
        return
    hp, name, grad = adversary.step_hp, adversary.name, grad.contiguous()
    if name == "sgd":
        _sgd_kernel()(params, grad, hp["lr"], hp["weight_decay"], out=params)
        state["step"].add_(1)
    elif name in ("momentum", "nesterov"):
        nesterov = name == "nesterov"
        fused.flat_momentum_step_(
            params, grad, state["momentum_buffer"], state["step"], hp["lr"], hp["momentum"],
            0.0 if nesterov else hp["dampening"], hp["weight_decay"], nesterov,
        )  # fmt: skip
    elif name in ("adam", "adamw"):
        fused.flat_adam_step_(
            params, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], hp["lr"],
            hp["betas"], hp["eps"], hp["weight_decay"], decoupled=name == "adamw",
        )  # fmt: skip
    elif name == "rmsprop":
        fused.flat_rmsprop_step_(
            params, grad, state["square_avg"], hp["lr"], hp["alpha"], hp["eps"], hp["weight_decay"]
        )
        state["step"].add_(1)
    else:
        raise ValueError(
            f"unknown inner optimizer {name!r}; expected one of {sorted(OPTIMIZER_DEFAULTS)}"
        )
