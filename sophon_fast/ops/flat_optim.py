"""flat_optim: fused stateful optimizer updates on a flat parameter buffer, one module each.

    ops/flat_momentum.py    flat_momentum_step(_)                   momentum SGD, heavy ball / Nesterov
    ops/flat_adam.py        flat_adam_step(_), flat_adamw_step,      Adam, AdamW, clip + Adam
                            flat_clip_adam_step_
    ops/flat_rmsprop.py     flat_rmsprop_step(_)                    RMSprop, plain / centered
    ops/flat_adagrad.py     flat_adagrad_step(_)                    Adagrad
    ops/flat_adadelta.py    flat_adadelta_step(_)                   Adadelta
    ops/flat_accumulate.py  flat_accumulate_                        acc += w * g
    ops/_flat_common.py     launch geometry, Triton helpers, input checks
    ops/flat_sgd_step.py    flat_sgd_step                           SGD (its own op)

Each is one kernel per update and one per backward on a (n_params,) parameter buffer (float32,
float64, float16 or bfloat16) with float32 state (float64 for float64 parameters); maths in the
state dtype. ``step`` is a 0-d tensor on the params' device holding the number of updates taken
before this one, read by the kernel (t = step + 1), so nothing synchronises with the host. Each
module's docstring has its maths, memory traffic and what its backward saves; the pure-torch
twins are :mod:`sophon_fast.reference.flat_optim`.

A second-order meta-gradient passes through an inner update once (docs/DESIGN.md, section 1),
so the fused backward kernels are first-order. When the backward itself is differentiated
(create_graph=True, e.g. gradgradcheck or a third-order objective) the Functions switch to the
reference twin's autograd VJP on the same saved tensors: correct to any order, at eager speed.
(Parameters that were not saved enter that path as zeros: the VJPs do not depend on them.)

The in-place non-differentiable variants (``*_``) serve first-order simulation and outer steps
(step += 1 on the device). This module re-exports every public op, :func:`geometry` and
:func:`state_dtype` under the names the package, the tests and the benchmarks import.
"""

from __future__ import annotations

from ..reference.flat_common import state_dtype
from ._flat_common import GPU_BLOCK, GPU_WARPS, INTERPRETER_BLOCK, geometry
from .flat_accumulate import flat_accumulate_
from .flat_adadelta import FlatAdadeltaStepFunction, flat_adadelta_step, flat_adadelta_step_
from .flat_adagrad import FlatAdagradStepFunction, flat_adagrad_step, flat_adagrad_step_
from .flat_adam import (
    NORM_PARTIALS,
    FlatAdamStepFunction,
    flat_adam_step,
    flat_adam_step_,
    flat_adamw_step,
    flat_clip_adam_step_,
)
from .flat_momentum import FlatMomentumStepFunction, flat_momentum_step, flat_momentum_step_
from .flat_rmsprop import FlatRmspropStepFunction, flat_rmsprop_step, flat_rmsprop_step_

__all__ = [
    "GPU_BLOCK",
    "GPU_WARPS",
    "INTERPRETER_BLOCK",
    "NORM_PARTIALS",
    "FlatAdadeltaStepFunction",
    "FlatAdagradStepFunction",
    "FlatAdamStepFunction",
    "FlatMomentumStepFunction",
    "FlatRmspropStepFunction",
    "flat_accumulate_",
    "flat_adadelta_step",
    "flat_adadelta_step_",
    "flat_adagrad_step",
    "flat_adagrad_step_",
    "flat_adam_step",
    "flat_adam_step_",
    "flat_adamw_step",
    "flat_clip_adam_step_",
    "flat_momentum_step",
    "flat_momentum_step_",
    "flat_rmsprop_step",
    "flat_rmsprop_step_",
    "geometry",
    "state_dtype",
]
