"""flat_adadelta_step against eager per-tensor Adadelta and torch._foreach.

The cases and their baselines: _flat_optim.py (forward and backward rows; the in-place rows are
momentum's and Adam's). Bytes per parameter at float32 (fused | eager ops, each op reading its
operands and writing one result): forward 28 | 116 (11 ops: ceiling 4.1x); backward with
weight_decay 0: 40.
"""

from __future__ import annotations

import _flat_optim
import _harness
import torch

from sophon_fast.ops import flat_optim as ops

LR, RHO, EPS = 1.0, 0.9, 1e-6


def _eager(params, grads, states):
    square_avgs, acc_deltas = states
    new_v = [torch.addcmul(v * RHO, g, g, value=1 - RHO) for v, g in zip(square_avgs, grads)]
    deltas = [
        u.add(EPS).sqrt() / v.add(EPS).sqrt() * g for u, v, g in zip(acc_deltas, new_v, grads)
    ]
    new_u = [torch.addcmul(u * RHO, d, d, value=1 - RHO) for u, d in zip(acc_deltas, deltas)]
    new_p = [p.add(d, alpha=-LR) for p, d in zip(params, deltas)]
    return new_p, new_v, new_u


def _foreach(params, grads, states):
    square_avgs, acc_deltas = states
    v = torch._foreach_addcmul(torch._foreach_mul(square_avgs, RHO), grads, grads, value=1 - RHO)
    std = torch._foreach_sqrt(torch._foreach_add(v, EPS))
    deltas = torch._foreach_mul(
        torch._foreach_div(torch._foreach_sqrt(torch._foreach_add(acc_deltas, EPS)), std), grads
    )
    u = torch._foreach_addcmul(torch._foreach_mul(acc_deltas, RHO), deltas, deltas, value=1 - RHO)
    return torch._foreach_add(params, deltas, alpha=-LR), v, u


def _fused(params, grad, states, step, out=None):
    return ops.flat_adadelta_step(params, grad, *states, LR, RHO, EPS, out=out)


UPDATE = _flat_optim.Update(
    name="adadelta",
    n_states=2,
    eager=_eager,
    foreach=_foreach,
    fused=_fused,
    fwd_bytes=28,
    bwd_bytes=40,
    fwd_ceiling="28 vs eager 116 B/param: <= 4.1x when memory-bound",
    bwd_ceiling="40 B/param vs autograd through 11 eager ops",
)


def run(device: torch.device, quick: bool, env: dict, copy_gbps: float) -> list[_harness.Record]:
    records = []
    repeats = _flat_optim.repeats(quick)
    for case, shapes in _flat_optim.cases():
        args = (case, shapes, device, repeats, env, copy_gbps)
        records += _flat_optim.forward_records(UPDATE, *args)
        records += _flat_optim.backward_records(UPDATE, *args)
    return records
