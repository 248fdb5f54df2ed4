"""flat_rmsprop_step against eager per-tensor RMSprop and torch._foreach.

The cases and their baselines: _flat_optim.py (forward and backward rows; the in-place rows are
momentum's and Adam's). Bytes per parameter at float32 (fused | eager ops, each op reading its
operands and writing one result): forward 20 | 56 (5 ops: ceiling 2.8x); backward with
weight_decay 0: 28.
"""

from __future__ import annotations

import _flat_optim
import _harness
import torch

from sophon_fast.ops import flat_optim as ops

LR = _flat_optim.LR
EPS, ALPHA = 1e-8, 0.99


def _eager(params, grads, states):
    (square_avgs,) = states
    new_v = [torch.addcmul(v * ALPHA, g, g, value=1 - ALPHA) for v, g in zip(square_avgs, grads)]
    new_p = [
        torch.addcdiv(p, g, v.sqrt().add(EPS), value=-LR) for p, g, v in zip(params, grads, new_v)
    ]
    return new_p, new_v


def _foreach(params, grads, states):
    v = torch._foreach_addcmul(torch._foreach_mul(states[0], ALPHA), grads, grads, value=1 - ALPHA)
    denom = torch._foreach_add(torch._foreach_sqrt(v), EPS)
    return torch._foreach_addcdiv(params, grads, denom, value=-LR), v


def _fused(params, grad, states, step, out=None):
    return ops.flat_rmsprop_step(params, grad, states[0], LR, ALPHA, EPS, out=out)


UPDATE = _flat_optim.Update(
    name="rmsprop",
    n_states=1,
    eager=_eager,
    foreach=_foreach,
    fused=_fused,
    fwd_bytes=20,
    bwd_bytes=28,
    fwd_ceiling="20 vs eager 56 B/param: <= 2.8x when memory-bound",
    bwd_ceiling="28 B/param vs autograd through 5 eager ops (~130 B)",
)


def run(device: torch.device, quick: bool, env: dict, copy_gbps: float) -> list[_harness.Record]:
    records = []
    repeats = _flat_optim.repeats(quick)
    for case, shapes in _flat_optim.cases():
        args = (case, shapes, device, repeats, env, copy_gbps)
        records += _flat_optim.forward_records(UPDATE, *args)
        records += _flat_optim.backward_records(UPDATE, *args)
    return records
