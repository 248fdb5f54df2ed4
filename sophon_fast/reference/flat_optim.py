"""Pure-PyTorch twins of :mod:`sophon_fast.ops.flat_optim` (oracle, baseline and fallback).

One module per optimizer, re-exported here (the fused ops and the tests read them by this name):

    reference/flat_momentum.py    flat_momentum_step(_), flat_momentum_step_backward
    reference/flat_adam.py        flat_adam_step(_), flat_adamw_step, flat_clip_adam_step_,
                                  flat_adam_step_backward, adam_bias_corrections
    reference/flat_rmsprop.py     flat_rmsprop_step(_), flat_rmsprop_step_backward
    reference/flat_adagrad.py     flat_adagrad_step(_), flat_adagrad_step_backward,
                                  adagrad_learning_rate
    reference/flat_adadelta.py    flat_adadelta_step(_), flat_adadelta_step_backward
    reference/flat_accumulate.py  flat_accumulate_
    reference/flat_common.py      state_dtype, safe_sqrt (the package's only definitions)

Stateful flat optimizer updates on a (n_params,) parameter buffer with float32 state (float64 for
float64 parameters); each module's docstring has its maths. The formulas, and the order of the
operations, are those of ``torch.optim``; they are also the inner optimizers' pure-torch steps
(:mod:`sophon_fast.reference.optimizers`), which the vmap path and the reference engine run.
"""

from __future__ import annotations

from .flat_accumulate import flat_accumulate_
from .flat_adadelta import flat_adadelta_step, flat_adadelta_step_, flat_adadelta_step_backward
from .flat_adagrad import (
    adagrad_learning_rate,
    flat_adagrad_step,
    flat_adagrad_step_,
    flat_adagrad_step_backward,
)
from .flat_adam import (
    adam_bias_corrections,
    adam_update,
    clip_coefficient,
    flat_adam_step,
    flat_adam_step_,
    flat_adam_step_backward,
    flat_adamw_step,
    flat_clip_adam_step_,
)
from .flat_common import safe_sqrt, state_dtype
from .flat_momentum import flat_momentum_step, flat_momentum_step_, flat_momentum_step_backward
from .flat_rmsprop import flat_rmsprop_step, flat_rmsprop_step_, flat_rmsprop_step_backward

__all__ = [
    "adagrad_learning_rate",
    "adam_bias_corrections",
    "adam_update",
    "clip_coefficient",
    "flat_accumulate_",
    "flat_adadelta_step",
    "flat_adadelta_step_",
    "flat_adadelta_step_backward",
    "flat_adagrad_step",
    "flat_adagrad_step_",
    "flat_adagrad_step_backward",
    "flat_adam_step",
    "flat_adam_step_",
    "flat_adam_step_backward",
    "flat_adamw_step",
    "flat_clip_adam_step_",
    "flat_momentum_step",
    "flat_momentum_step_",
    "flat_momentum_step_backward",
    "flat_rmsprop_step",
    "flat_rmsprop_step_",
    "flat_rmsprop_step_backward",
    "safe_sqrt",
    "state_dtype",
]
