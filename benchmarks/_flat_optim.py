"""What the flat optimizer benchmarks share (bench_flat_momentum.py, bench_flat_adam.py,
bench_flat_rmsprop.py, bench_flat_adagrad.py, bench_flat_adadelta.py): each compares its fused update against eager per-tensor updates,
torch._foreach and torch.optim.

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
    inplace   in-place outer steps vs torch.optim (foreach, and fused=True where the CPU has it)

Each row's case names the op family ("flat_optim <update> ..."), whichever file runs it. At
small-CNN size (0.11 M params) every variant is bound by per-op overhead instead of bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import _harness
import torch
from shapes import PARAM_LISTS

from sophon_fast import _backend, cpu_cache

SUITE = "ops"
OP = "flat_optim"
LR = 1e-2
STEP = 5


@dataclass(frozen=True)
class Update:
    """One optimizer's out-of-place update, as each benchmarked implementation runs it.

    eager / foreach: (params, grads, states) -> outputs, per tensor or through torch._foreach;
    fused: (flat_params, flat_grad, flat_states, step, out=None) -> outputs on flat buffers.
    """

    name: str
    n_states: int
    eager: Callable
    foreach: Callable
    fused: Callable
    fwd_bytes: int
    bwd_bytes: int
    fwd_ceiling: str
    bwd_ceiling: str


@dataclass(frozen=True)
class InPlace:
    """One in-place outer step: torch.optim's (made by ``torch_optimizer(params, flags)``, then
    stepped, after clip_grad_norm_ when ``clip``) against the fused step ``fused(*args)`` with
    args = (flat_params, flat_grad, *states, step, LR)."""

    kind: str
    n_states: int
    torch_optimizer: Callable
    fused: Callable
    bytes_per_param: int
    clip: bool = False


def cases():
    """(case label, shapes) of every parameter list."""
    for name, shape_fn in PARAM_LISTS.items():
        shapes = shape_fn()
        n = sum(torch.Size(s).numel() for s in shapes)
        yield f"{name} ({len(shapes)} tensors, {n / 1e6:.2f} M params)", shapes


def repeats(quick: bool) -> int:
    return 5 if quick else 9


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


def forward_records(update: Update, case, shapes, device, repeats, env, copy_gbps):
    params, grads = _tensors(shapes, device, 2)
    states = _tensors(shapes, device, update.n_states, positive=True)
    n = sum(p.numel() for p in params)
    flat_p, flat_g = _flat(params), _flat(grads)
    flat_states = [_flat(s) for s in states]
    step = torch.tensor(float(STEP), device=device)  # on the device: the kernels read it there
    out = tuple(torch.empty_like(t) for t in (flat_p, *flat_states))
    fns = {
        "eager": lambda: update.eager(params, grads, states),
        "foreach": lambda: update.foreach(params, grads, states),
    }
    for backend in _harness.fused_backends(device):

        def fused(backend=backend):
            with _backend.use_backend(backend):
                return update.fused(flat_p, flat_g, flat_states, step)

        def fused_out(backend=backend):
            with _backend.use_backend(backend):
                return update.fused(flat_p, flat_g, flat_states, step, out=out)

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
            f"{OP} {update.name} fwd {case}",
            impl,
            baseline,
            samples,
            env,
            peaks,
            update.fwd_bytes * n,
            copy_gbps,
            update.fwd_ceiling,
        )  # fmt: skip
        for impl in fns
        if impl.startswith("fused")
        for baseline in ("eager", "foreach")
    ]


def backward_records(update: Update, case, shapes, device, repeats, env, copy_gbps):
    """Backward alone through a retained graph: what the meta-backward pays per inner step."""
    params, grads = _tensors(shapes, device, 2, requires_grad=True)
    states = _tensors(shapes, device, update.n_states, requires_grad=True, positive=True)
    n = sum(p.numel() for p in params)
    eager_inputs = [t for group in (params, grads, *states) for t in group]
    eager_outputs = [t for group in update.eager(params, grads, states) for t in group]
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
            flat_outputs = update.fused(flat_inputs[0], flat_inputs[1], flat_inputs[2:], step)
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
            f"{OP} {update.name} bwd {case}",
            impl,
            "eager",
            samples,
            env,
            peaks,
            update.bwd_bytes * n,
            copy_gbps,
            update.bwd_ceiling,
        )  # fmt: skip
        for impl in fns
        if impl.startswith("fused")
    ]


def in_place_records(step_kind: InPlace, case, shapes, device, repeats, env, copy_gbps):
    kind = step_kind.kind
    params, grads = _tensors(shapes, device, 2)
    n = sum(p.numel() for p in params)
    flat_p, flat_g = _flat(params), _flat(grads)
    states = [torch.zeros_like(flat_p) for _ in range(step_kind.n_states)]
    step = torch.tensor(float(STEP), device=device)  # on the device: the kernels read it there
    fns = {}
    for impl in ("foreach", "fused"):
        tensors = [p.detach().clone().requires_grad_(True) for p in params]
        for t, g in zip(tensors, grads):
            t.grad = g.clone()
        flags = {"foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
        try:
            optimizer = step_kind.torch_optimizer(tensors, flags)
            optimizer.step()
        except RuntimeError:  # fused=True is not implemented for this device or dtype
            continue
        if step_kind.clip:

            def baseline(optimizer=optimizer, tensors=tensors):
                torch.nn.utils.clip_grad_norm_(tensors, 1.0, foreach=True)
                optimizer.step()

        else:
            baseline = optimizer.step
        fns[f"torch.optim {impl}"] = baseline
    for backend in _harness.fused_backends(device):
        args = (flat_p, flat_g, *states, step, LR)

        def fused(backend=backend, args=args):
            with _backend.use_backend(backend):
                return step_kind.fused(*args)

        fns[f"fused[{backend}]"] = fused
    samples = _harness.time_interleaved(fns, device, repeats=repeats)
    bytes_per_param = step_kind.bytes_per_param
    records = []
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
