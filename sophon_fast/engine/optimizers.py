"""The fast engine's view of the inner-optimizer registry: every adversary through fused kernels.

The registry (:mod:`sophon_fast.reference.optimizers`) holds each optimizer's name, defaults,
state, pure formula and how its kernels are called; this module binds each entry to its fused
kernel pair from :mod:`sophon_fast.ops` (:data:`FUSED_KERNELS`, one line per optimizer) and
gives the engines two calls:

- :func:`inner_step`: ``(params, grad, state) -> (new_params, new_state)``, out of place (an
  order-2 graph may have saved ``params``), differentiable to any order by autograd (the fused
  Functions' backward kernels, and the reference VJP when the backward is itself
  differentiated), free of host synchronisation;
- :func:`inner_step_`: the same values written into ``params`` and the state in place, for
  first-order simulations.

Each fused op picks its backend per device (``reference`` runs the optimizer's pure-torch twin,
the same formula the vmap path and the reference engine use). An optimizer without an entry in
:data:`FUSED_KERNELS` runs its reference kernels here too.

``Adversary``, ``resolve_adversary``, ``OPTIMIZER_DEFAULTS``, ``init_state``, ``state_dtype`` and
``safe_sqrt`` are re-exported from the layers below (their homes are
:mod:`sophon_fast.reference.optimizers` and :mod:`sophon_fast.reference.flat_common`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sophon_fast.ops.flat_adadelta import flat_adadelta_step, flat_adadelta_step_
from sophon_fast.ops.flat_adagrad import flat_adagrad_step, flat_adagrad_step_
from sophon_fast.ops.flat_adam import flat_adam_step, flat_adam_step_, flat_adamw_step
from sophon_fast.ops.flat_momentum import flat_momentum_step, flat_momentum_step_
from sophon_fast.ops.flat_rmsprop import flat_rmsprop_step, flat_rmsprop_step_
from sophon_fast.ops.flat_sgd_step import flat_sgd_step
from sophon_fast.reference.flat_common import safe_sqrt, state_dtype
from sophon_fast.reference.optimizers import (
    INNER_OPTIMIZER_REGISTRY,
    OPTIMIZER_DEFAULTS,
    Adversary,
    InnerOptimizer,
    Kernels,
    get_optimizer,
    init_state,
    resolve_adversary,
)

__all__ = [
    "FUSED_KERNELS",
    "INNER_OPTIMIZERS",
    "OPTIMIZER_DEFAULTS",
    "Adversary",
    "init_state",
    "inner_step",
    "inner_step_",
    "resolve_adversary",
    "safe_sqrt",
    "state_dtype",
]

#: name -> the fused kernel pair (out of place, in place) the fast engine runs for it.
FUSED_KERNELS: dict[str, Kernels] = {
    "sgd": Kernels(flat_sgd_step, flat_sgd_step),
    "momentum": Kernels(flat_momentum_step, flat_momentum_step_),
    "nesterov": Kernels(flat_momentum_step, flat_momentum_step_),
    "adam": Kernels(flat_adam_step, flat_adam_step_),
    "adamw": Kernels(flat_adamw_step, flat_adam_step_),
    "rmsprop": Kernels(flat_rmsprop_step, flat_rmsprop_step_),
    "adagrad": Kernels(flat_adagrad_step, flat_adagrad_step_),
    "adadelta": Kernels(flat_adadelta_step, flat_adadelta_step_),
}

StepFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _kernels(entry: InnerOptimizer) -> Kernels:
    return FUSED_KERNELS.get(entry.name, entry.reference)


def _fused_step(entry: InnerOptimizer) -> StepFn:
    def step(params, grad, state, hp):
        return entry.step(params, grad.contiguous(), state, hp, _kernels(entry))

    step.__name__ = f"{entry.name}_step"
    step.__doc__ = f"One out-of-place {entry.name} update through its fused kernel. (n,) -> (n,)."
    return step


#: name -> ``step(params, grad, state, hp) -> (new_params, new_state)``; ``hp`` includes ``lr``.
INNER_OPTIMIZERS: dict[str, StepFn] = {
    name: _fused_step(entry) for name, entry in INNER_OPTIMIZER_REGISTRY.items()
}


def inner_step(
    adversary: Adversary, params: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One out-of-place update of ``adversary`` on (n_params,) ``params`` with (n_params,) ``grad``."""
    entry = get_optimizer(adversary.name)
    return entry.step(params, grad.contiguous(), state, adversary.step_hp, _kernels(entry))


@torch.no_grad()
def inner_step_(
    adversary: Adversary, params: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor]
) -> None:
    """:func:`inner_step` in place: ``params`` and every ``state`` tensor are overwritten with the
    update's result (same values), with no new buffer and no autograd record.

    For first-order simulations, where nothing needs the old values: the in-place fused kernels
    (``flat_*_step_``, ``flat_sgd_step(out=params)``) write a 45 MB ResNet-18 buffer where the
    fresh form would map a new one (the kernel zeroes its pages on first touch on the CPU) and
    keep a second one alive through the step. Non-contiguous ``params`` (which the fused kernels
    refuse) take the out-of-place update and a copy.
    """
    entry = get_optimizer(adversary.name)
    if not params.is_contiguous():
        new, new_state = inner_step(adversary, params, grad, state)
        params.copy_(new)
        for key, value in new_state.items():
            state[key].copy_(value)
        return
    entry.step_(params, grad.contiguous(), state, adversary.step_hp, _kernels(entry))
