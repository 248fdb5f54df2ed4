"""flat_adam_step and flat_clip_adam_step_ against eager per-tensor Adam, torch._foreach and
torch.optim.Adam (after clip_grad_norm_ for the clip + Adam step).

The cases and their baselines: _flat_optim.py. Bytes per parameter at float32 (fused | eager ops,
each op reading its operands and writing one result): forward 28 | 84 (8 ops: ceiling 3.0x);
backward with weight_decay 0: 40; in place 28, clip + Adam 32 (one more pass for the norm).
"""

from __future__ import annotations

import math

import _flat_optim
import _harness
import torch

from sophon_fast.ops import flat_optim as ops

LR = _flat_optim.LR
BETAS, EPS = (0.9, 0.999), 1e-8
_BC1 = 1 - BETAS[0] ** (_flat_optim.STEP + 1)
_SQRT_BC2 = math.sqrt(1 - BETAS[1] ** (_flat_optim.STEP + 1))


def _eager(params, grads, states):
    exp_avgs, exp_avg_sqs = states
    new_p, new_m, new_v = [], [], []
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        m = torch.add(m * BETAS[0], g, alpha=1 - BETAS[0])
        v = torch.addcmul(v * BETAS[1], g, g, value=1 - BETAS[1])
        denom = (v.sqrt() / _SQRT_BC2).add(EPS)
        new_p.append(torch.addcdiv(p, m, denom, value=-LR / _BC1))
        new_m.append(m)
        new_v.append(v)
    return new_p, new_m, new_v


def _foreach(params, grads, states):
    m = torch._foreach_add(torch._foreach_mul(states[0], BETAS[0]), grads, alpha=1 - BETAS[0])
    v = torch._foreach_addcmul(
        torch._foreach_mul(states[1], BETAS[1]), grads, grads, value=1 - BETAS[1]
    )
    denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(v), _SQRT_BC2), EPS)
    return torch._foreach_addcdiv(params, m, denom, value=-LR / _BC1), m, v


def _fused(params, grad, states, step, out=None):
    return ops.flat_adam_step(params, grad, *states, step, LR, BETAS, EPS, out=out)


def _torch_adam(params, flags):
    return torch.optim.Adam(params, lr=LR, betas=BETAS, eps=EPS, **flags)


UPDATE = _flat_optim.Update(
    name="adam",
    n_states=2,
    eager=_eager,
    foreach=_foreach,
    fused=_fused,
    fwd_bytes=28,
    bwd_bytes=40,
    fwd_ceiling="28 vs eager 84 B/param: <= 3.0x when memory-bound",
    bwd_ceiling="40 B/param vs autograd through 8 eager ops (~200 B)",
)

IN_PLACE = (
    _flat_optim.InPlace(
        kind="adam",
        n_states=2,
        torch_optimizer=_torch_adam,
        fused=lambda *args: ops.flat_adam_step_(*args, BETAS, EPS),
        bytes_per_param=28,
    ),
    _flat_optim.InPlace(
        kind="clip+adam",
        n_states=2,
        torch_optimizer=_torch_adam,
        fused=lambda *args: ops.flat_clip_adam_step_(*args, BETAS, EPS, max_norm=1.0),
        bytes_per_param=32,
        clip=True,
    ),
)


def run(device: torch.device, quick: bool, env: dict, copy_gbps: float) -> list[_harness.Record]:
    records = []
    repeats = _flat_optim.repeats(quick)
    for case, shapes in _flat_optim.cases():
        args = (case, shapes, device, repeats, env, copy_gbps)
        records += _flat_optim.forward_records(UPDATE, *args)
        records += _flat_optim.backward_records(UPDATE, *args)
        for step_kind in IN_PLACE:
            records += _flat_optim.in_place_records(step_kind, *args)
    return records
