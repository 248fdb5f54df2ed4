"""flat_momentum_step against eager per-tensor momentum SGD, torch._foreach and torch.optim.SGD.

The cases and their baselines: _flat_optim.py. Bytes per parameter at float32 (fused | eager ops,
each op reading its operands and writing one result): forward 20 | 32 (mul, add, add: ceiling
1.6x); backward with weight_decay 0: 16; in place 20.
"""

from __future__ import annotations

import _flat_optim
import _harness
import torch

from sophon_fast.ops import flat_optim as ops

LR = _flat_optim.LR
MU = 0.9


def _eager(params, grads, states):
    (bufs,) = states
    new_bufs = [torch.add(b * MU, g) for b, g in zip(bufs, grads)]
    return [torch.add(p, b, alpha=-LR) for p, b in zip(params, new_bufs)], new_bufs


def _foreach(params, grads, states):
    bufs = torch._foreach_add(torch._foreach_mul(states[0], MU), grads)
    return torch._foreach_add(params, bufs, alpha=-LR), bufs


def _fused(params, grad, states, step, out=None):
    return ops.flat_momentum_step(params, grad, states[0], step, LR, MU, out=out)


UPDATE = _flat_optim.Update(
    name="momentum",
    n_states=1,
    eager=_eager,
    foreach=_foreach,
    fused=_fused,
    fwd_bytes=20,
    bwd_bytes=16,
    fwd_ceiling="20 vs eager 32 B/param: <= 1.6x when memory-bound",
    bwd_ceiling="16 B/param vs autograd's per-op backward (mul/add chain, ~40 B)",
)

IN_PLACE = _flat_optim.InPlace(
    kind="momentum",
    n_states=1,
    torch_optimizer=lambda params, flags: torch.optim.SGD(params, lr=LR, momentum=MU, **flags),
    fused=lambda *args: ops.flat_momentum_step_(*args, MU),
    bytes_per_param=20,
)


def run(device: torch.device, quick: bool, env: dict, copy_gbps: float) -> list[_harness.Record]:
    records = []
    repeats = _flat_optim.repeats(quick)
    for case, shapes in _flat_optim.cases():
        args = (case, shapes, device, repeats, env, copy_gbps)
        records += _flat_optim.forward_records(UPDATE, *args)
        records += _flat_optim.backward_records(UPDATE, *args)
        records += _flat_optim.in_place_records(IN_PLACE, *args)
    return records
