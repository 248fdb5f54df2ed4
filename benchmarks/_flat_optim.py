"""flat_optim against eager per-tensor updates, torch._foreach and torch.optim.

Cases, on the ResNet-18 and small-CNN parameter lists, float32, step count 5 (past the first-step
special cases), hyper-parameters at torch.optim's defaults (momentum 0.9):
    fwd       out-of-place differentiable update (what an order-2 inner step runs):
              eager    per tensor, as higher's DifferentiableSGD/Adam and learn2learn run it
              foreach  the same ops through torch._foreach_* (multi-tensor, still differentiable)
              fused    one kernel on the flat buffer; fresh outputs of 4 MiB and more come from
                       the extension's CPU buffer cache (sophon_fast.cpu_cache), ``out=`` writes
                       into given buffers; ``no cache`` (CPU) maps every fresh output anew, as
                       glibc does for each buffer above 32 MiB: the kernel zeroes its pages on
                       first touch, ~2.4 ms per 45 MB buffer on the 2-core reference machine
    bwd       the backward alone (graph retained), fused kernel vs autograd through eager
    inplace   in-place outer steps vs torch.optim (foreach, and fused=True where the CPU has it),
              and clip + Adam vs clip_grad_norm_ + torch.optim.Adam

Bytes per parameter at float32 (fused | eager ops, each op reading its operands and writing one
result): momentum fwd 20 | 32 (mul, add, add: ceiling 1.6x), Adam fwd 28 | 84 (8 ops: ceiling
3.0x), RMSprop fwd 20 | 56 (5 ops: 2.8x); backwards with weight_decay 0: momentum 16, Adam 40,
RMSprop 28. At small-CNN size (0.11 M params) every variant is bound by per-op overhead instead.
"""

from __future__ import annotations

import math

import _harness
import torch
from shapes import PARAM_LISTS

from sophon_fast import _backend, cpu_cache
from sophon_fast.ops import flat_optim as ops

SUITE = "ops"
OP = "flat_optim"
LR, MU, BETAS, EPS, ALPHA = 1e-2, 0.9, (0.9, 0.999), 1e-8, 0.99
STEP = 5
FWD_BYTES = {"momentum": 20, "adam": 28, "rmsprop": 20}
BWD_BYTES = {"momentum": 16, "adam": 40, "rmsprop": 28}
FWD_CEILING = {
    "momentum": "20 vs eager 32 B/param: <= 1.6x when memory-bound",
    "adam": "28 vs eager 84 B/param: <= 3.0x when memory-bound",
    "rmsprop": "20 vs eager 56 B/param: <= 2.8x when memory-bound",
}
BWD_CEILING = {
    "momentum": "16 B/param vs autograd's per-op backward (mul/add chain, ~40 B)",
    "adam": "40 B/param vs autograd through 8 eager ops (~200 B)",
    "rmsprop": "28 B/param vs autograd through 5 eager ops (~130 B)",
}
STATES = {"momentum": 1, "adam": 2, "rmsprop": 1}
_BC1 = 1 - BETAS[0] ** (STEP + 1)
_SQRT_BC2 = math.sqrt(1 - BETAS[1] ** (STEP + 1))


# Eager per-tensor updates (the baseline a MAML library runs), out of place and differentiable.
def _eager(update, params, grads, states):
    if update == "momentum":
        (bufs,) = states
        new_bufs = [torch.add(b * MU, g) for b, g in zip(bufs, grads)]
        return [torch.add(p, b, alpha=-LR) for p, b in zip(params, new_bufs)], new_bufs
    if update == "adam":
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
    (square_avgs,) = states
    new_v = [torch.addcmul(v * ALPHA, g, g, value=1 - ALPHA) for v, g in zip(square_avgs, grads)]
    new_p = [
        torch.addcdiv(p, g, v.sqrt().add(EPS), value=-LR) for p, g, v in zip(params, grads, new_v)
    ]
    return new_p, new_v


def _foreach(update, params, grads, states):
    if update == "momentum":
        bufs = torch._foreach_add(torch._foreach_mul(states[0], MU), grads)
        return torch._foreach_add(params, bufs, alpha=-LR), bufs
    if update == "adam":
        m = torch._foreach_add(torch._foreach_mul(states[0], BETAS[0]), grads, alpha=1 - BETAS[0])
        v = torch._foreach_addcmul(
            torch._foreach_mul(states[1], BETAS[1]), grads, grads, value=1 - BETAS[1]
        )
        denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(v), _SQRT_BC2), EPS)
        return torch._foreach_addcdiv(params, m, denom, value=-LR / _BC1), m, v
    v = torch._foreach_addcmul(torch._foreach_mul(states[0], ALPHA), grads, grads, value=1 - ALPHA)
    denom = torch._foreach_add(torch._foreach_sqrt(v), EPS)
    return torch._foreach_addcdiv(params, grads, denom, value=-LR), v


def _fused(update, params, grad, states, step, out=None):
    if update == "momentum":
        return ops.flat_momentum_step(params, grad, states[0], step, LR, MU, out=out)
    if update == "adam":
        return ops.flat_adam_step(params, grad, *states, step, LR, BETAS, EPS, out=out)
    return ops.flat_rmsprop_step(params, grad, states[0], LR, ALPHA, EPS, out=out)


def _tensors(shapes, device, count, requires_grad=False, positive=False):
    out = []
    for _ in range(count):
        group = [torch.randn(s, device=device) for s in shapes]
        if positive:
            group = [t.abs_() for t in group]
        out.append([t.requires_grad_(requires_grad) for t in group])
    return out


def _flat(tensors, requires_grad=False):
    return torch.cat([t.detach().reshape(-1) for t in tensors]).requires_grad_(requires_grad)


def _record(case, impl, baseline, samples, env, peaks, bytes_per_call, copy_gbps, ceiling):
    return _harness.make_record(
        SUITE, case, impl, baseline, samples, env, peak_mem=peaks,
        bytes_per_call=bytes_per_call, copy_gbps=copy_gbps, ceiling=ceiling,
    )  # fmt: skip


def _forward_records(update, case, shapes, device, repeats, env, copy_gbps):
    n_states = STATES[update]
    params, grads = _tensors(shapes, device, 2)
    states = _tensors(shapes, device, n_states, positive=True)
    n = sum(p.numel() for p in params)
    flat_p, flat_g = _flat(params), _flat(grads)
    flat_states = [_flat(s) for s in states]
    step = torch.tensor(float(STEP), device=device)  # on the device: the kernels read it there
    out = tuple(torch.empty_like(t) for t in (flat_p, *flat_states))
    fns = {
        "eager": lambda: _eager(update, params, grads, states),
        "foreach": lambda: _foreach(update, params, grads, states),
    }
    for backend in _harness.fused_backends(device):

        def fused(backend=backend):
            with _backend.use_backend(backend):
                return _fused(update, flat_p, flat_g, flat_states, step)

        def fused_out(backend=backend):
            with _backend.use_backend(backend):
                return _fused(update, flat_p, flat_g, flat_states, step, out=out)

        fns[f"fused[{backend}]"] = fused
        fns[f"fused[{backend}] out="] = fused_out
    samples = _harness.time_interleaved(fns, device, repeats=repeats)
    if "fused[cpu]" in fns:
        # Separately, so the cache stays warm for the fused rows above.
        cpu_cache.set_limit(0)
        try:
            uncached = {"fused[cpu] no cache": fns["fused[cpu]"]}
            samples.update(_harness.time_interleaved(uncached, device, repeats=repeats))
            peaks = {"fused[cpu] no cache": _harness.peak_memory_mb(fns["fused[cpu]"], device)}
        finally:
            cpu_cache.set_limit(None)
        fns.update(uncached)
    else:
        peaks = {}
    peaks.update(
        {name: _harness.peak_memory_mb(fn, device) for name, fn in fns.items() if name not in peaks}
    )
    return [
        _record(
            f"{OP} {update} fwd {case}",
            impl,
            baseline,
            samples,
            env,
            peaks,
            FWD_BYTES[update] * n,
            copy_gbps,
            FWD_CEILING[update],
        )  # fmt: skip
        for impl in fns
        if impl.startswith("fused")
        for baseline in ("eager", "foreach")
    ]


def _backward_records(update, case, shapes, device, repeats, env, copy_gbps):
    """Backward alone through a retained graph: what the meta-backward pays per inner step."""
    n_states = STATES[update]
    params, grads = _tensors(shapes, device, 2, requires_grad=True)
    states = _tensors(shapes, device, n_states, requires_grad=True, positive=True)
    n = sum(p.numel() for p in params)
    eager_inputs = [t for group in (params, grads, *states) for t in group]
    eager_outputs = [t for group in _eager(update, params, grads, states) for t in group]
    eager_grad_outputs = [torch.randn_like(t) for t in eager_outputs]
    flat_inputs = [_flat(t, True) for t in (params, grads, *states)]
    step = torch.tensor(float(STEP), device=device)  # on the device: the kernels read it there

    fns = {
        "eager": lambda: torch.autograd.grad(
            eager_outputs, eager_inputs, eager_grad_outputs, retain_graph=True
        )
    }
    for backend in _harness.fused_backends(device):
        with _backend.use_backend(backend):
            flat_outputs = _fused(update, flat_inputs[0], flat_inputs[1], flat_inputs[2:], step)
        flat_grad_outputs = [torch.randn_like(t) for t in flat_outputs]

        def fused(flat_outputs=flat_outputs, flat_grad_outputs=flat_grad_outputs):
            return torch.autograd.grad(
                flat_outputs, flat_inputs, flat_grad_outputs, retain_graph=True
            )

        fns[f"fused[{backend}]"] = fused
    samples = _harness.time_interleaved(fns, device, repeats=repeats)
    peaks = {name: _harness.peak_memory_mb(fn, device) for name, fn in fns.items()}
    return [
        _record(
            f"{OP} {update} bwd {case}",
            impl,
            "eager",
            samples,
            env,
            peaks,
            BWD_BYTES[update] * n,
            copy_gbps,
            BWD_CEILING[update],
        )  # fmt: skip
        for impl in fns
        if impl.startswith("fused")
    ]


def _torch_optimizer(kind, params, impl):
    flags = {"foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    if kind == "momentum":
        return torch.optim.SGD(params, lr=LR, momentum=MU, **flags)
    return torch.optim.Adam(params, lr=LR, betas=BETAS, eps=EPS, **flags)


def _in_place_records(case, shapes, device, repeats, env, copy_gbps):
    records = []
    for kind in ("momentum", "adam", "clip+adam"):
        params, grads = _tensors(shapes, device, 2)
        n = sum(p.numel() for p in params)
        flat_p, flat_g = _flat(params), _flat(grads)
        states = [torch.zeros_like(flat_p) for _ in range(1 if kind == "momentum" else 2)]
        step = torch.tensor(float(STEP), device=device)  # on the device: the kernels read it there
        fns = {}
        for impl in ("foreach", "fused"):
            tensors = [p.detach().clone().requires_grad_(True) for p in params]
            for t, g in zip(tensors, grads):
                t.grad = g.clone()
            try:
                optimizer = _torch_optimizer(kind.split("+")[-1], tensors, impl)
                optimizer.step()
            except RuntimeError:  # fused=True is not implemented for this device or dtype
                continue
            if kind == "clip+adam":

                def baseline(optimizer=optimizer, tensors=tensors):
                    torch.nn.utils.clip_grad_norm_(tensors, 1.0, foreach=True)
                    optimizer.step()

            else:
                baseline = optimizer.step
            fns[f"torch.optim {impl}"] = baseline
        for backend in _harness.fused_backends(device):
            args = (flat_p, flat_g, *states, step, LR)

            def fused(backend=backend, kind=kind, args=args):
                with _backend.use_backend(backend):
                    if kind == "momentum":
                        return ops.flat_momentum_step_(*args, MU)
                    if kind == "adam":
                        return ops.flat_adam_step_(*args, BETAS, EPS)
                    return ops.flat_clip_adam_step_(*args, BETAS, EPS, max_norm=1.0)

            fns[f"fused[{backend}]"] = fused
        samples = _harness.time_interleaved(fns, device, repeats=repeats)
        bytes_per_param = {"momentum": 20, "adam": 28, "clip+adam": 32}[kind]
        for impl in fns:
            if not impl.startswith("fused"):
                continue
            for baseline in fns:
                if baseline.startswith("torch.optim"):
                    records.append(
                        _record(f"{OP} {kind}_ inplace {case}", impl, baseline, samples, env,
                                None, bytes_per_param * n, copy_gbps,
                                f"{bytes_per_param} B/param, one pass (clip: +1 norm pass)")
                    )  # fmt: skip
    return records


def run(device: torch.device, quick: bool, env: dict, copy_gbps: float) -> list[_harness.Record]:
    records = []
    repeats = 5 if quick else 9
    for name, shape_fn in PARAM_LISTS.items():
        shapes = shape_fn()
        n = sum(torch.Size(s).numel() for s in shapes)
        case = f"{name} ({len(shapes)} tensors, {n / 1e6:.2f} M params)"
        for update in ("momentum", "adam", "rmsprop"):
            records += _forward_records(update, case, shapes, device, repeats, env, copy_gbps)
            records += _backward_records(update, case, shapes, device, repeats, env, copy_gbps)
        records += _in_place_records(case, shapes, device, repeats, env, copy_gbps)
    return records
