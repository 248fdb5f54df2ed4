"""flat_adagrad_step against eager per-tensor Adagrad and torch._foreach.

The cases and their baselines: _flat_optim.py (forward and backward rows; the in-place rows are
momentum's and Adam's). Bytes per parameter at float32 (fused | eager ops, each op reading its
operands and writing one result): forward 20 | 48 (4 ops: ceiling 2.4x); backward with
weight_decay 0: 28.
"""

from __future__ import annotations

import _flat_optim
import _harness
import torch

from sophon_fast.ops import flat_optim as ops

LR = _flat_optim.LR
EPS, LR_DECAY = 1e-10, 0.0


def _eager(params, grads, states):
    (sums,) = states
    new_s = [torch.addcmul(s, g, g) for s, g in zip(sums, grads)]
    new_p = [
        torch.addcdiv(p, g, s.sqrt().add(EPS), value=-LR) for p, g, s in zip(params, grads, new_s)
    ]
    return new_p, new_s


def _foreach(params, grads, states):
    s = torch._foreach_addcmul(states[0], grads, grads)
    denom = torch._foreach_add(torch._foreach_sqrt(s), EPS)
    return torch._foreach_addcdiv(params, grads, denom, value=-LR), s


def _fused(params, grad, states, step, out=None):
    return ops.flat_adagrad_step(params, grad, states[0], step, LR, LR_DECAY, 0.0, EPS, out=out)


UPDATE = _flat_optim.Update(
    name="adagrad",
    n_states=1,
    eager=_eager,
    foreach=_foreach,
    fused=_fused,
    fwd_bytes=20,
    bwd_bytes=28,
    fwd_ceiling="20 vs eager 48 B/param: <= 2.4x when memory-bound",
    bwd_ceiling="28 B/param vs autograd through 4 eager ops",
)


def run(device: torch.device, quick: bool, env: dict, copy_gbps: float) -> list[_harness.Record]:
    records = []
    repeats = _flat_optim.repeats(quick)
    for case, shapes in _flat_optim.cases():
        args = (case, shapes, device, repeats, env, copy_gbps)
        records += _flat_optim.forward_records(UPDATE, *args)
        records += _flat_optim.backward_records(UPDATE, *args)
    return records
