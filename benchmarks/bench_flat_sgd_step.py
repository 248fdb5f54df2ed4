"""flat_sgd_step against the eager per-tensor update and torch._foreach, forward and backward.

Baselines, on the same parameter list and device:
    eager    ``[p - lr * g for p, g in zip(params, grads)]`` per tensor, as learn2learn/higher run
             a MAML inner step (20 B/param at fp32: mul writes a temporary, sub reads it back).
    foreach  ``torch._foreach_add(params, grads, alpha=-lr)`` (12 B/param, multi-tensor).
Fused: one kernel on the flat buffer holding the same parameters (12 B/param forward; with
weight_decay = 0 the fused backward hands d_out back as d_params and writes only d_grad: 8 B/param). Memory-bound ceiling of the fused
forward over eager: 20/12 = 1.67x at large sizes; at small sizes launch overhead dominates.
"""

from __future__ import annotations

import _harness
import torch
from shapes import PARAM_LISTS

import sophon_fast
from sophon_fast import _backend

SUITE = "ops"
OP = "flat_sgd_step"
LR = 1e-2
FORWARD_BYTES_PER_PARAM = 12  # read params, grad; write params' (fp32)
BACKWARD_BYTES_PER_PARAM = 8  # read d_out; write d_grad (d_params is d_out: weight_decay = 0)


def _make(shapes, device, requires_grad=False):
    tensors = [torch.randn(s, device=device, requires_grad=requires_grad) for s in shapes]
    return tensors


def _forward_records(case, shapes, device, repeats, env, copy_gbps):
    params, grads = _make(shapes, device), _make(shapes, device)
    n = sum(p.numel() for p in params)
    flat_p = torch.cat([p.reshape(-1) for p in params])
    flat_g = torch.cat([g.reshape(-1) for g in grads])
    flat_out = torch.empty_like(flat_p)
    fns = {
        "eager": lambda: [p - LR * g for p, g in zip(params, grads)],
        "foreach": lambda: torch._foreach_add(params, grads, alpha=-LR),
    }
    for backend in _harness.fused_backends(device):

        def fused(backend=backend):
            with _backend.use_backend(backend):
                return sophon_fast.flat_sgd_step(flat_p, flat_g, LR)

        # Into a reused buffer, as an engine ping-ponging two buffers runs it: no fresh pages to
        # fault in (on the CPU a fresh 45 MB buffer costs more than the step itself).
        def fused_out(backend=backend):
            with _backend.use_backend(backend):
                return sophon_fast.flat_sgd_step(flat_p, flat_g, LR, out=flat_out)

        fns[f"fused[{backend}]"] = fused
        fns[f"fused[{backend}] out="] = fused_out
    samples = _harness.time_interleaved(fns, device, repeats=repeats)
    peaks = {name: _harness.peak_memory_mb(fn, device) for name, fn in fns.items()}
    return [
        _harness.make_record(
            SUITE,
            f"{OP} fwd {case}",
            impl,
            baseline,
            samples,
            env,
            peak_mem=peaks,
            bytes_per_call=FORWARD_BYTES_PER_PARAM * n,
            copy_gbps=copy_gbps,
            ceiling="12 B/param vs eager 20 B/param: <= 1.67x when memory-bound",
        )
        for impl in fns
        if impl.startswith("fused")
        for baseline in ("eager", "foreach")
    ]


def _forward_backward_records(case, shapes, device, repeats, env, copy_gbps):
    """Forward + backward: what a second-order meta-gradient pays per inner step."""
    params, grads = _make(shapes, device, True), _make(shapes, device, True)
    grad_outs = _make(shapes, device)
    n = sum(p.numel() for p in params)
    flat_p = torch.cat([p.detach().reshape(-1) for p in params]).requires_grad_(True)
    flat_g = torch.cat([g.detach().reshape(-1) for g in grads]).requires_grad_(True)
    flat_grad_out = torch.cat([d.reshape(-1) for d in grad_outs])

    def eager_fwd_bwd():
        outs = [p - LR * g for p, g in zip(params, grads)]
        return torch.autograd.grad(outs, params + grads, grad_outs)

    fns = {"eager": eager_fwd_bwd}
    for backend in _harness.fused_backends(device):

        def fused_fwd_bwd(backend=backend):
            with _backend.use_backend(backend):
                out = sophon_fast.flat_sgd_step(flat_p, flat_g, LR)
                return torch.autograd.grad(out, (flat_p, flat_g), flat_grad_out)

        fns[f"fused[{backend}]"] = fused_fwd_bwd
    samples = _harness.time_interleaved(fns, device, repeats=repeats)
    peaks = {name: _harness.peak_memory_mb(fn, device) for name, fn in fns.items()}
    return [
        _harness.make_record(
            SUITE,
            f"{OP} fwd+bwd {case}",
            impl,
            "eager",
            samples,
            env,
            peak_mem=peaks,
            bytes_per_call=(FORWARD_BYTES_PER_PARAM + BACKWARD_BYTES_PER_PARAM) * n,
            copy_gbps=copy_gbps,
            ceiling="20 B/param vs autograd through eager 28 B/param: <= 1.4x",
        )
        for impl in fns
        if impl.startswith("fused")
    ]


def run(device: torch.device, quick: bool, env: dict, copy_gbps: float) -> list[_harness.Record]:
    records = []
    repeats = 5 if quick else 9
    for name, shape_fn in PARAM_LISTS.items():
        shapes = shape_fn()
        n = sum(torch.Size(s).numel() for s in shapes)
        case = f"{name} ({len(shapes)} tensors, {n / 1e6:.2f} M params)"
        records += _forward_records(case, shapes, device, repeats, env, copy_gbps)
        records += _forward_backward_records(case, shapes, device, repeats, env, copy_gbps)
    return records
