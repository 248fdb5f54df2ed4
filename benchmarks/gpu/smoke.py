"""GPU smoke check: every CUDA and Triton op against the reference, graphs and autocast vs eager.

    python benchmarks/gpu/smoke.py --out ops.json [--dry-run] [--sizes tiny|full] [--budget S]

What it checks (one verdict per check, every check independent):

- ops: for each op that has a Triton or CUDA path (flat_sgd_step; flat_optim momentum, adam,
  adamw, rmsprop, centered rmsprop, adagrad, adadelta forward and fused backward, the in-place
  forms, clip + Adam and accumulate; the ce / ice / ice_paper / klu / mse_ascent / dos losses, value and gradient;
  batch_norm forward, backward and double backward; bn_relu_pool forward and backward) and each
  fused backend of the device (GPU: cuda, triton; dry run: cpu, interpreted triton), the op is
  compared with the reference backend at a small odd size and at ResNet-18 size (11,173,962
  flat parameters; BatchNorm at a ResNet-18 layer, 32x64x56x56) in float32 and bfloat16, plus
  one float64 case at the small size. relu_pool (no Triton or CUDA kernel: CUDA tensors run the
  eager composition) is checked for exact equality with the eager pair.
- engine: SmallCNN (28x28x1, batch 150 = 130 adapt + 20 evaluate; 40 = 32 + 8 in a dry run; SGD
  1e-4 adversary) through ProtectionRun.outer_step as protect() builds it: the fused backends
  against the reference backend (float64, see ENGINE_CHECKS); on CUDA also
  ``cuda_graphs="inner"`` (order 1) and ``"simulation"`` (order 2) against the same engine with
  graphs off, and ``autocast="bf16"`` against float32. The meta-gradient of every outer step and
  the suppression loss are compared (relative errors recorded); a graph capture that fell back
  to eager is a failure.

Tolerances come from tests/_tolerances.py, scaled per op as the op's own test file scales them
(the factor and its reason sit next to each op below). Comparisons are allclose-style:
``|got - want| <= atol + rtol * |want|`` element-wise, NaN where the reference has none fails;
for ops with reductions (losses, BatchNorm) atol is in units of the magnitude the rounding errors
scale with (the largest reference value, the logits, 1 / batch), since their outputs are sums of
cancelling terms. Each check records max |got - want|, that over max |want|, the relative L2
error and the worst ratio to the tolerance (<= 1 passes).

Robustness (the GPU run gets one try): the checks run in worker processes (``--workers``, 4 on
the GPU, each taking whole op families: Triton compiles every kernel specialisation on first use,
kernels x dtypes x constexpr flags, one CPU core per process); the parent watches each worker's
progress file, kills a check that runs past its limit (timed_out), restarts a worker after a
crash or a lost CUDA context (the check that was running is failed with the worker's last
output) and stops at ``--budget`` seconds (checks not reached are skipped, with the reason). A
CUDA graph check that fails under CUDA_LAUNCH_BLOCKING=1 is run again without it, as an extra
check named ``<name> [launch_blocking=0]``. ``--out`` is rewritten (atomically) as results come
in, so a kill from outside still leaves every finished verdict.

``--filter REGEX`` runs only the checks whose names match (e.g. ``'ops/batch_norm/.*/cuda/'``).
``--dry-run`` runs the same plan on the CPU (cpu + interpreted Triton backends, tiny sizes; the
CUDA-only engine checks are skipped with the reason "no CUDA"); ``--sizes full`` runs the GPU
sizes on the CPU instead (slow, minutes per BatchNorm check under the interpreter: for
calibrating tolerances without a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# ----------------------------------------------------------------------------- the plan
DTYPES = ("fp32", "bf16", "fp64")
# (dtype, size) pairs each op variant is checked at: float32 and bfloat16 at both sizes, float64
# once at the small size (the reference twin's own precision, cheapest to run).
CASES = (
    ("fp32", "small"),
    ("fp32", "large"),
    ("bf16", "small"),
    ("bf16", "large"),
    ("fp64", "small"),
)

# Sizes per kind of input. full: the GPU run; tiny: the CPU dry run (same plan, seconds to run
# under the Triton interpreter). small sizes are odd (tests/_shapes.py's rule: primes, one past a
# block boundary); large ones are ResNet-18's: 11,173,962 flat parameters (ResNet18CIFAR), a
# 32x64x56x56 BatchNorm input (batch 32 at ImageNet's first stage), a 1024 x 1000 logit batch.
SIZES = {
    "full": {
        "flat": {"small": 1031, "large": 11_173_962},
        "image": {"small": (3, 5, 7, 6), "large": (32, 64, 56, 56)},
        "logits": {"small": (7, 13), "large": (1024, 1000)},
        "noise": {"small": (2, 3, 5, 7), "large": (16, 3, 64, 64)},
    },
    "tiny": {
        "flat": {"small": 7, "large": 4099},
        "image": {"small": (2, 3, 5, 4), "large": (3, 4, 6, 7)},
        "logits": {"small": (7, 13), "large": (9, 130)},
        "noise": {"small": (2, 3, 5, 7), "large": (2, 3, 9, 11)},
    },
}

UPDATES = ("momentum", "adam", "adamw", "rmsprop", "rmsprop_centered", "adagrad", "adadelta")
# (op family, variant, kind of input size)
OP_VARIANTS = (
    [("flat_sgd_step", "forward", "flat"), ("flat_sgd_step", "backward", "flat")]
    + [("flat_optim", f"{u}.{stage}", "flat") for u in UPDATES for stage in ("forward", "backward")]
    + [("flat_optim", v, "flat") for v in ("momentum_", "adam_", "adamw_", "rmsprop_", "adagrad_", "adadelta_", "clip_adam_", "accumulate_")]
    + [("losses", k, "logits") for k in ("ce", "ice", "ice_paper", "klu")]
    + [("losses", k, "noise") for k in ("mse_ascent", "dos")]
    + [("batch_norm", v, "image") for v in ("forward", "backward", "double_backward")]
    + [("bn_relu_pool", v, "image") for v in ("forward", "backward")]
)  # fmt: skip

# Engine checks: name -> (CUDA only, dtype, order, inner steps K, variant options, variant
# backend, baseline options, baseline backend, outer steps, tolerance on the meta-gradient's
# relative L2 error and the loss's relative error).
ENGINE_CHECKS = {
    # Same maths, fused kernels vs pure PyTorch, in float64: in float32 the two roundings pick a
    # different max-pool window maximum wherever two values are within ~1e-7 (measured: 6.5e-4
    # relative L2 on the meta-gradient at batch 40, K=3), which says nothing about the kernels.
    "fused_vs_reference": (False, "fp64", 1, 3, None, "auto", None, "reference", 2, 1e-9),
    # graphs.py: the replayed step runs the eager step's kernels in the same order, except that
    # the inner graph accumulates the meta-gradient as multiply + add where eager fuses them (one
    # float32 rounding per step and element); cuDNN is put in deterministic mode for these checks.
    # 1e-5 relative L2 is ~100x those roundings over K=3 steps.
    "cuda_graphs_inner": (True, "fp32", 1, 3, {"cuda_graphs": "inner"}, "auto", None, "auto", 2, 1e-5),
    "cuda_graphs_simulation": (True, "fp32", 2, 2, {"cuda_graphs": "simulation"}, "auto", None, "auto", 2, 1e-5),
    # graphs.py measured ~1e-2 relative on the meta-gradient for bf16 autocast; 5e-2 allows the
    # spread over K=3 steps while a wrong weight cache (~80 % off, graphs.py) still fails.
    "autocast_bf16": (True, "fp32", 1, 3, {"autocast": "bf16"}, "auto", None, "auto", 1, 5e-2),
}  # fmt: skip


def device_backends(dry_run: bool) -> tuple[str, ...]:
    """The fused backends a run compares with the reference: the GPU's, or the CPU's."""
    return ("cpu", "triton") if dry_run else ("cuda", "triton")


def build_plan(dry_run: bool, pattern: str | None = None) -> list[dict]:
    """Every check of a run, in order (the same list in the parent and in each worker); with
    ``pattern``, only the checks whose names match that regular expression."""
    plan = []
    for op, variant, kind in OP_VARIANTS:
        for backend in device_backends(dry_run):
            for dtype, size in CASES:
                name = f"ops/{op}/{variant}/{backend}/{dtype}/{size}"
                plan.append(dict(name=name, group="ops", op=op, variant=variant, kind=kind,
                                 backend=backend, dtype=dtype, size=size))  # fmt: skip
    for dtype, size in CASES:
        plan.append(dict(name=f"ops/relu_pool/forward_backward/auto/{dtype}/{size}", group="ops",
                         op="relu_pool", variant="forward_backward", kind="image", backend="auto",
                         dtype=dtype, size=size))  # fmt: skip
    for check in ENGINE_CHECKS:
        plan.append(dict(name=f"engine/small_cnn/{check}", group="engine", check=check))
    if pattern:
        plan = [spec for spec in plan if re.search(pattern, spec["name"])]
    return plan


# ----------------------------------------------------------------------------- comparisons
class CheckFailed(AssertionError):
    """A comparison outside its tolerance (the message says which output, where and by how much)."""


def compare(what: str, got, want, rtol: float, atol: float, *, atol_scale=None) -> dict:
    """allclose-style comparison of ``got`` with ``want``; metrics, and 'error' when outside.

    atol_scale: None (atol is absolute), a number atol is multiplied by, or "max_ref" for
    max |want|: outputs that are sums of cancelling terms have an absolute error that scales with
    the magnitude of the terms, not with each result; and outputs far below 1 (a gradient
    divided by the batch) must not be waved through by an atol larger than themselves.
    """
    import torch

    got = got.detach()
    want = want.detach().to(got.device)
    if got.shape != want.shape:
        return {"ok": False, "error": f"{what}: shape {tuple(got.shape)}, want {tuple(want.shape)}"}
    if got.numel() == 0:
        return {"ok": True}
    g, w = got.double().flatten(), want.double().flatten()
    finite = torch.isfinite(w)
    scale = float(w[finite].abs().max()) if bool(finite.any()) else 0.0
    a = atol * (scale if atol_scale == "max_ref" else 1.0 if atol_scale is None else atol_scale)
    diff = (g - w).abs()
    bad_special = (~finite & ~((g == w) | (g.isnan() & w.isnan()))) | (finite & ~torch.isfinite(g))
    # 0 where equal (an exact comparison has a zero bound), inf where a zero bound is exceeded.
    ratio = torch.where(finite & (diff != 0), diff / (a + rtol * w.abs()), torch.zeros_like(diff))
    ratio = torch.nan_to_num(ratio, nan=0.0)  # NaN against a finite value: counted as special
    worst = int(ratio.argmax())
    max_abs = float(torch.where(finite, diff, torch.zeros_like(diff)).max())
    norm = float(w[finite].norm())
    metrics = {
        "max_abs": max_abs,
        "max_abs_over_max_ref": max_abs / scale if scale > 0 else max_abs,
        "rel_l2": float(torch.where(finite, diff, torch.zeros_like(diff)).norm()) / norm
        if norm > 0
        else max_abs,
        "tol_ratio": float(ratio[worst]),
        "rtol": rtol,
        "atol": a,
    }
    n_special = int(bad_special.sum())
    metrics["ok"] = n_special == 0 and metrics["tol_ratio"] <= 1.0
    if n_special:
        i = int(bad_special.nonzero()[0])
        metrics["error"] = (
            f"{what}: {n_special} non-finite values differ from the reference (first at flat "
            f"index {i}: got {float(g[i])!r}, want {float(w[i])!r})"
        )
    elif not metrics["ok"]:
        metrics["error"] = (
            f"{what}: |got - want| = {float(diff[worst]):.3g} at flat index {worst} (got "
            f"{float(g[worst])!r}, want {float(w[worst])!r}) is {metrics['tol_ratio']:.3g}x the "
            f"tolerance (rtol {rtol:.3g}, atol {a:.3g}); max |got - want| / max |want| = "
            f"{metrics['max_abs_over_max_ref']:.3g}, relative L2 error {metrics['rel_l2']:.3g}"
        )
    return metrics


def _collect(results: dict) -> tuple[dict, list[str]]:
    """(metrics per output, errors) from {output name: compare(...)}."""
    errors = [m["error"] for m in results.values() if not m.get("ok") and m.get("error")]
    for name, m in results.items():
        if not m.get("ok") and not m.get("error"):
            errors.append(f"{name}: outside tolerance")
    return {
        k: {x: y for x, y in v.items() if x not in ("ok", "error")} for k, v in results.items()
    }, errors


# ----------------------------------------------------------------------------- op checks
def _torch_dtype(label):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[label]


def _tolerance(dtype, scale: float = 1.0) -> tuple[float, float]:
    from _tolerances import elementwise

    tol = elementwise(dtype)
    return tol["rtol"] * scale, tol["atol"] * scale


class Inputs:
    """Seeded random inputs on the device (fresh values per check, the same for both sides)."""

    def __init__(self, device, seed: int) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def randn(self, shape, dtype, scale=1.0, shift=0.0):
        torch = self.torch
        work = torch.float64 if dtype == torch.float64 else torch.float32
        x = torch.randn(shape, generator=self.gen, device=self.device, dtype=work)
        return (x * scale + shift).to(dtype)

    def rand(self, shape, dtype):
        torch = self.torch
        work = torch.float64 if dtype == torch.float64 else torch.float32
        return torch.rand(shape, generator=self.gen, device=self.device, dtype=work).to(dtype)

    def randint(self, high, shape):
        return self.torch.randint(0, high, shape, generator=self.gen, device=self.device)


# Hyper-parameters away from the defaults so a dropped term shows (tests/test_flat_optim.py's).
HYPER = {
    "momentum": {"lr": 0.1, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.05},
    "adam": {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.05},
    "adamw": {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.05},
    "rmsprop": {"lr": 0.01, "alpha": 0.9, "eps": 1e-3, "weight_decay": 0.05},
    "rmsprop_centered": {"lr": 0.01, "alpha": 0.9, "eps": 1e-3, "weight_decay": 0.05},
    "adagrad": {"lr": 0.1, "lr_decay": 0.05, "weight_decay": 0.05, "eps": 1e-3},
    "adadelta": {"lr": 0.5, "rho": 0.8, "eps": 1e-3, "weight_decay": 0.05},
}


def _flat_state(update, n, dtype, inputs):
    from sophon_fast.ops.flat_optim import state_dtype

    sd = state_dtype(dtype)
    if update.startswith("momentum"):
        return [inputs.randn(n, sd)]
    if update.startswith("adam"):
        # A second moment above grad_avg^2 keeps every root real (as the tests draw it).
        return [inputs.randn(n, sd), inputs.randn(n, sd).square() + 1.0]
    states = [inputs.randn(n, sd).square() + 1.0]
    if update == "adadelta":
        states.append(inputs.randn(n, sd).square())
    if update == "rmsprop_centered":
        states.append(inputs.randn(n, sd, scale=0.1))
    return states


def _call_update(update, params, grad, states, step):
    from sophon_fast.ops import flat_optim as ops

    hp = HYPER[update]
    if update == "momentum":
        return ops.flat_momentum_step(params, grad, states[0], step, **hp)
    if update == "adam":
        return ops.flat_adam_step(params, grad, *states, step, **hp)
    if update == "adamw":
        return ops.flat_adamw_step(params, grad, *states, step, **hp)
    if update == "adagrad":
        return ops.flat_adagrad_step(params, grad, states[0], step, **hp)
    if update == "adadelta":
        return ops.flat_adadelta_step(params, grad, *states, **hp)
    grad_avg = states[1] if update == "rmsprop_centered" else None
    return ops.flat_rmsprop_step(params, grad, states[0], **hp, grad_avg=grad_avg)


def check_flat(spec, size, dtype, device, run_fused, run_reference, inputs) -> dict:
    """flat_sgd_step and flat_optim: the fused backend against the reference backend, same dtype
    and device (the reference computes in the state dtype and rounds once, as the kernels do)."""
    import torch

    from sophon_fast.ops import flat_optim as ops
    from sophon_fast.ops.flat_optim import state_dtype
    from sophon_fast.ops.flat_sgd_step import flat_sgd_step

    n, variant, sd = size, spec["variant"], state_dtype(dtype)
    results = {}
    params, grad = inputs.randn(n, dtype), inputs.randn(n, dtype)
    if spec["op"] == "flat_sgd_step":
        tol = _tolerance(dtype)  # one rounding of the storage dtype (test_flat_sgd_step.py)
        if variant == "forward":
            got = run_fused(lambda: flat_sgd_step(params, grad, 0.37, 0.05))
            want = run_reference(lambda: flat_sgd_step(params, grad, 0.37, 0.05))
            results["new_params"] = compare("new_params", got, want, *tol)
        else:
            grad_out = inputs.randn(n, dtype)

            def vjp():
                leaves = [params.clone().requires_grad_(True), grad.clone().requires_grad_(True)]
                return torch.autograd.grad(flat_sgd_step(*leaves, 0.37, 0.05), leaves, grad_out)

            for name, g, w in zip(("d_params", "d_grad"), run_fused(vjp), run_reference(vjp)):
                results[name] = compare(name, g, w, *tol)
        return results

    step = torch.tensor(2.0, dtype=sd, device=device)
    if "." in variant:
        update, stage = variant.split(".")
        states = _flat_state(update, n, dtype, inputs)
        names = ["params"] + [f"state{i}" for i in range(len(states))]
        if stage == "forward":
            got = run_fused(lambda: _call_update(update, params, grad, states, step))
            want = run_reference(lambda: _call_update(update, params, grad, states, step))
            for name, g, w in zip(names, got, want):
                # Parameters round to their dtype; states are in the state dtype.
                results[name] = compare(name, g, w, *_tolerance(g.dtype))
            return results
        leaves_src = [params, grad, *states]
        grad_outputs = [inputs.randn(t.shape, t.dtype) for t in (params, *states)]

        def vjp():
            leaves = [t.clone().requires_grad_(True) for t in leaves_src]
            outputs = _call_update(update, leaves[0], leaves[1], leaves[2:], step)
            return torch.autograd.grad(outputs, leaves, grad_outputs)

        labels = ["d_params", "d_grad"] + [f"d_state{i}" for i in range(len(states))]
        for name, g, w, x in zip(labels, run_fused(vjp), run_reference(vjp), leaves_src):
            # The VJP chains ~10 roundings of the compute dtype (test_flat_optim.py: 8x).
            results[name] = compare(name, g, w, *_tolerance(x.dtype, 8.0))
        return results

    if variant == "accumulate_":
        acc = inputs.randn(n, sd)

        def accumulate():
            out = acc.clone()
            return ops.flat_accumulate_(out, grad, 0.37)

        results["acc"] = compare(
            "acc", run_fused(accumulate), run_reference(accumulate), *_tolerance(sd)
        )
        return results

    update = {"momentum_": "momentum", "adam_": "adam", "adamw_": "adamw", "rmsprop_": "rmsprop",
              "adagrad_": "adagrad", "adadelta_": "adadelta", "clip_adam_": "adam"}[variant]  # fmt: skip
    states = _flat_state(update, n, dtype, inputs)

    def in_place(cast=lambda t: t):
        p, g, ss, s = (
            cast(params).clone(),
            cast(grad),
            [cast(t).clone() for t in states],
            cast(step).clone(),
        )
        hp = dict(HYPER[update])
        if variant == "momentum_":
            ops.flat_momentum_step_(p, g, ss[0], s, **hp)
        elif variant in ("adam_", "adamw_"):
            ops.flat_adam_step_(p, g, *ss, s, **hp, decoupled=variant == "adamw_")
        elif variant == "rmsprop_":
            ops.flat_rmsprop_step_(p, g, ss[0], **hp)
        elif variant == "adagrad_":
            ops.flat_adagrad_step_(p, g, ss[0], s, **hp)
        elif variant == "adadelta_":
            ops.flat_adadelta_step_(p, g, *ss, **hp)
        else:  # max_norm far below |grad| (~sqrt(n)): the clip is active at every size
            hp["weight_decay"] = 0.01
            norm = ops.flat_clip_adam_step_(p, g, *ss, s, **hp, max_norm=0.5)
            return p, *ss, s, norm
        return p, *ss, s

    if variant == "clip_adam_":
        # Against the reference on float64 copies: the clip coefficient is a reduction over all n
        # values, and the reference's float32 norm is not the oracle (measured on the CPU at
        # 11,173,962 values: torch.linalg.vector_norm 3342.317, float64 3343.781, the fused
        # kernel 3343.781). 4x the table: the coefficient's rounding enters every update.
        got, want = run_fused(in_place), run_reference(lambda: in_place(lambda t: t.double()))
        scale = 4.0
    else:
        got, want = run_fused(in_place), run_reference(in_place)
        scale = 1.0
    names = ["params"] + [f"state{i}" for i in range(len(states))] + ["step"]
    for name, g, w in zip(names, got, want):
        results[name] = compare(name, g, w, *_tolerance(g.dtype, scale))
    if variant == "clip_adam_":
        # The norm itself, float32 sums against float64 (test_flat_optim.py: 10x the table's rtol).
        rtol, _ = _tolerance(sd, 10.0)
        results["norm"] = compare("norm", got[-1], want[-1], rtol, 0.0)
    return results


# Loss value and gradient against float64, per dtype: float32 maths throughout, so one storage
# rounding of the gradient plus float32 accumulation over the classes; the factors over the
# table are test_losses_ops.py's (float32 1e-5 = 10x, bfloat16 2^-6 = 2x). The atol is in units
# of what the rounding errors scale with: for the classification losses
# the logits' magnitude (the value is a difference of two log-sum-exps, ice_paper's nearly
# equal where p_y is small: measured 5e-8 absolute on a 3e-4 value, Triton at 9 x 130) and 1 / B
# (every softmax term of the gradient is at most 1 / B, and ice_paper's gradient is a difference
# of two of them); for mse / dos the largest reference value.
LOSS_SCALE = {"fp64": 1.0, "fp32": 10.0, "bf16": 2.0}


def check_losses(spec, size, dtype, device, run_fused, run_reference, inputs) -> dict:
    """Fused loss value and gradient against the reference twin on float64 copies of the inputs
    (the reference computes in the storage dtype; only the fused kernels promise float32)."""
    import torch

    from sophon_fast.ops import losses as ops
    from sophon_fast.reference import losses as reference

    kind = spec["variant"]
    rtol, atol = _tolerance(dtype, LOSS_SCALE[spec["dtype"]])
    results = {}
    if kind in ("mse_ascent", "dos"):
        prediction = inputs.randn(size, dtype)
        target = inputs.randn(size, dtype) if kind == "mse_ascent" else None
        sources = [prediction] + ([target] if target is not None else [])

        def value_and_grads(fn, cast):
            leaves = [cast(t).clone().requires_grad_(True) for t in sources]
            value = fn(*leaves)
            return (value, *torch.autograd.grad(value, leaves))

        fused, twin = getattr(ops, kind), getattr(reference, kind)
        got = run_fused(lambda: value_and_grads(fused, lambda t: t))
        want = run_reference(lambda: value_and_grads(twin, lambda t: t.double()))
        names = ("value", "d_prediction", "d_target")
        scales = ("max_ref", "max_ref", "max_ref")
    else:
        logits = inputs.randn(size, dtype, scale=3.0)
        labels = inputs.randint(size[1], (size[0],))
        fused = {"ce": ops.cross_entropy, "ice": ops.inverse_cross_entropy,
                 "ice_paper": ops.inverse_cross_entropy_paper, "klu": ops.kl_uniform}[kind]  # fmt: skip
        twin = {"ce": reference.cross_entropy, "ice": reference.inverse_cross_entropy,
                "ice_paper": reference.inverse_cross_entropy_paper, "klu": reference.kl_uniform}[kind]  # fmt: skip

        def value_and_grad(fn, z):
            z = z.clone().requires_grad_(True)
            value = fn(z, labels)
            return value, torch.autograd.grad(value, z)[0]

        got = run_fused(lambda: value_and_grad(fused, logits))
        want = run_reference(lambda: value_and_grad(twin, logits.double()))
        names = ("value", "d_logits")
        scales = (max(1.0, float(logits.abs().max())), 1.0 / size[0])
    for name, g, w, scale in zip(names, got, want, scales):
        if g.dtype != dtype:
            raise CheckFailed(f"{name}: dtype {g.dtype}, want {dtype}")
        results[name] = compare(name, g, w, rtol, atol, atol_scale=scale)
    return results


# BatchNorm against float64, per dtype. Forward and backward: test_batch_norm.py's float32 1e-5
# (10x the table) and float64 1e-10 (100x: sums over M values); bfloat16 2x for the one rounding
# of the output after float32 statistics. Double backward: float64 1e-9 as the test (1000x), and
# the same 100x / 8x over more chained reductions in float32 / bfloat16.
BN_SCALE = {
    "forward": {"fp64": 100.0, "fp32": 10.0, "bf16": 2.0},
    "backward": {"fp64": 100.0, "fp32": 10.0, "bf16": 2.0},
    "double_backward": {"fp64": 1000.0, "fp32": 100.0, "bf16": 8.0},
}
# bn_relu_pool: test_bn_relu_pool.py's float32 10x (statistics over M values) and float64 1x;
# bfloat16 2x as BatchNorm.
BNRP_SCALE = {"fp64": 1.0, "fp32": 10.0, "bf16": 2.0}


def _bn_inputs(shape, dtype, inputs, *, grid: bool):
    """x, weight, bias, running mean, running var for a (N, C, H, W) BatchNorm input.

    grid: x on a 1/32 grid (exactly representable in bfloat16) and |weight| >= 0.5, so two
    window values are equal or differ in z = a x + b by >= |a| / 32 >> float32 rounding: the
    pooled arg-max cannot flip between float32 and the float64 reference (near-ties would, about
    ten times per 32x64x56x56 input with continuous values).
    """
    import torch

    c = shape[1]
    if grid:
        x = (torch.round(inputs.randn(shape, torch.float64, scale=64.0)) / 32).clamp(-7.5, 7.5)
        x = (x + 0.5).to(dtype)
        magnitude = 0.5 + inputs.rand(c, torch.float64)
        sign = torch.where(inputs.rand(c, torch.float64) < 0.5, -1.0, 1.0)
        sign[0] = -1.0  # the min branch (z decreasing in x) at least once
        weight = (magnitude * sign).to(dtype)
    else:
        x = inputs.randn(shape, dtype, scale=2.0, shift=0.5)
        weight = inputs.randn(c, dtype)
    bias = inputs.randn(c, dtype)
    running = (inputs.randn(c, dtype), inputs.rand(c, dtype) + 0.5)
    return x, weight, bias, running


def check_batch_norm(spec, size, dtype, device, run_fused, run_reference, inputs) -> dict:
    """batch_norm2d / batch_norm_relu_maxpool2d against the reference on float64 copies."""
    import torch

    from sophon_fast.ops.batch_norm import batch_norm2d
    from sophon_fast.ops.bn_relu_pool import batch_norm_relu_maxpool2d

    pooled = spec["op"] == "bn_relu_pool"
    variant = spec["variant"]
    x, weight, bias, running = _bn_inputs(size, dtype, inputs, grid=pooled)
    fn = batch_norm_relu_maxpool2d if pooled else batch_norm2d
    scale = BNRP_SCALE[spec["dtype"]] if pooled else BN_SCALE[variant][spec["dtype"]]
    rtol, atol = _tolerance(dtype, scale)
    out_shape = (size[0], size[1], size[2] // 2, size[3] // 2) if pooled else size
    grad_y = inputs.randn(out_shape, dtype)

    def run(cast):
        leaves = [cast(t).clone().requires_grad_(variant != "forward") for t in (x, weight, bias)]
        rm, rv = (cast(t).clone() for t in running)
        y = fn(*leaves, rm, rv, 0.1, 1e-3)
        if variant == "forward":
            return y, rm, rv
        first = torch.autograd.grad(
            y, leaves, cast(grad_y), create_graph=variant == "double_backward"
        )
        if variant == "backward":
            return first
        norm = sum(
            g.float().square().sum() if g.dtype == torch.bfloat16 else g.square().sum()
            for g in first
        )
        # bias does not reach the first derivatives: its second derivative is 0 (as the test).
        return torch.autograd.grad(norm, leaves, allow_unused=True, materialize_grads=True)

    got = run_fused(lambda: run(lambda t: t))
    want = run_reference(lambda: run(lambda t: t.double()))
    names = {"forward": ("y", "running_mean", "running_var"), "backward": ("dx", "dweight", "dbias"),
             "double_backward": ("d2x", "d2weight", "d2bias")}[variant]  # fmt: skip
    return {
        name: compare(name, g, w, rtol, atol, atol_scale="max_ref")
        for name, g, w in zip(names, got, want)
    }


def check_relu_pool(spec, size, dtype, device, inputs) -> dict:
    """relu_maxpool2d on the device against the eager pair: values and gradients exactly equal."""
    import torch
    import torch.nn.functional as F

    from sophon_fast.ops.relu_pool import relu_maxpool2d

    x = inputs.randn(size, dtype)
    x.view(-1)[::5] = 0.5  # exact ties in windows: the first maximum wins in both
    grad_y = inputs.randn((size[0], size[1], size[2] // 2, size[3] // 2), dtype)

    def run(fn):
        leaf = x.clone().requires_grad_(True)
        y = fn(leaf)
        return y, torch.autograd.grad(y, leaf, grad_y)[0]

    got = run(relu_maxpool2d)
    want = run(lambda t: F.max_pool2d(F.relu(t), 2, 2))
    return {name: compare(name, g, w, 0.0, 0.0) for name, g, w in zip(("y", "dx"), got, want)}


def run_op_check(spec, device, sizes, unavailable, dry_run) -> dict:
    """One op check -> {verdict, metrics, error, ...}."""
    from sophon_fast import _backend

    dtype = _torch_dtype(spec["dtype"])
    size = SIZES[sizes][spec["kind"]][spec["size"]]
    backend = spec["backend"]
    if backend in unavailable:
        reason = f"backend {backend} unavailable: {unavailable[backend]}"
        # On the GPU a missing CUDA or Triton backend is what this run exists to catch; on the
        # CPU the compiled extension is optional (SOPHON_FAST_NO_EXT=1 installs).
        return {"verdict": "skipped" if dry_run else "failed", "error": reason}
    seed = sum(ord(c) for c in spec["name"])  # the same inputs for a check on every backend
    inputs = Inputs(device, seed)

    def run_fused(fn):
        with _backend.use_backend(backend):
            return fn()

    def run_reference(fn):
        with _backend.use_backend("reference"):
            return fn()

    op = spec["op"]
    if op == "relu_pool":
        results = check_relu_pool(spec, size, dtype, device, inputs)
    elif op in ("flat_sgd_step", "flat_optim"):
        results = check_flat(spec, size, dtype, device, run_fused, run_reference, inputs)
    elif op == "losses":
        results = check_losses(spec, size, dtype, device, run_fused, run_reference, inputs)
    else:
        results = check_batch_norm(spec, size, dtype, device, run_fused, run_reference, inputs)
    metrics, errors = _collect(results)
    out = {"verdict": "failed" if errors else "passed", "metrics": metrics}
    if errors:
        out["error"] = "; ".join(errors)
    out["size"] = list(size) if isinstance(size, tuple) else size
    return out


# ----------------------------------------------------------------------------- engine checks
def build_small_cnn_run(device, dtype, *, order, inner_steps, batch, adapt, options):
    """A ProtectionRun as protect() builds it (benchmarks/bench_e2e.py's build_run, with a dtype):
    SmallCNN 28x28x1, random restricted / original pools of 2000 images, SGD 1e-4 adversary,
    evaluation and guard off."""
    import torch

    from sophon_fast import api
    from sophon_fast.api import ProtectConfig
    from sophon_fast.engine.outer import ProtectionRun
    from sophon_fast.models import SmallCNN, find_head

    torch.manual_seed(0)
    model = SmallCNN(num_classes=10, in_channels=1, image_size=28).to(device=device, dtype=dtype)
    model.train()
    kwargs = dict(inner_steps=inner_steps, batch_size=batch, adapt_size=adapt, order=order,
                  adversaries=(("sgd", 1e-4),), eval_every=0, guard_threshold=None, outer_steps=10**9)  # fmt: skip
    if options is not None:
        kwargs["engine_options"] = options
    config = ProtectConfig(engine="fast", **kwargs)
    engine = api._make_engine(config, model)
    head = find_head(model, None) if config.reinit_head_resolved else None

    def pool(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2000, 1, 28, 28, generator=g, dtype=torch.float64)
        return x.to(device=device, dtype=dtype), torch.randint(0, 10, (2000,), generator=g).to(
            device
        )

    return ProtectionRun(engine=engine, config=config, restricted=pool(1), original=pool(2),
                         original_eval=None, head=head)  # fmt: skip


def run_engine_check(spec, device, sizes) -> dict:
    """SmallCNN outer steps, variant against baseline (see ENGINE_CHECKS)."""
    import contextlib
    import warnings

    import torch

    from sophon_fast import _backend

    cuda_only, dtype_label, order, k, options, backend, base_options, base_backend, steps, tol = (
        ENGINE_CHECKS[spec["check"]]
    )
    if cuda_only and device.type != "cuda":
        return {"verdict": "skipped", "error": "no CUDA: the option runs on CUDA devices only"}
    batch, adapt = (150, 130) if sizes == "full" else (40, 32)
    dtype = _torch_dtype(dtype_label)
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # same algorithms, same bits, both sides
    outcome = {}
    try:
        for label, opts, be in (
            ("variant", options, backend),
            ("baseline", base_options, base_backend),
        ):
            run = build_small_cnn_run(device, dtype, order=order, inner_steps=k, batch=batch,
                                      adapt=adapt, options=opts)  # fmt: skip
            grads: list = []
            original = run.engine.meta_step

            def meta_step(grad, max_norm, _original=original, _grads=grads):
                _grads.append(grad.detach().double().clone())
                return _original(grad, max_norm)

            run.engine.meta_step = meta_step
            theta0 = run.engine.flat.params.detach().double().clone()
            context = contextlib.nullcontext() if be == "auto" else _backend.use_backend(be)
            with warnings.catch_warnings(record=True) as caught, context:
                warnings.simplefilter("always")
                losses = [run.outer_step()["suppression_loss"] for _ in range(steps)]
            if device.type == "cuda":
                torch.cuda.synchronize()
            outcome[label] = dict(
                grads=grads, losses=losses, graphs=list(getattr(run.engine, "_graphs", {}).values()),
                warnings=[str(w.message) for w in caught], resolved=dict(run.engine.resolved),
                delta=run.engine.flat.params.detach().double() - theta0,
            )  # fmt: skip
            del run
    finally:
        torch.backends.cudnn.deterministic = deterministic
    v, b = outcome["variant"], outcome["baseline"]
    errors = []
    metrics = {"dtype": dtype_label, "steps": steps, "inner_steps": k, "order": order, "batch": batch,
               "options": options, "backend": backend, "baseline_backend": base_backend,
               "tolerance_rel": tol}  # fmt: skip
    if options and "cuda_graphs" in options:
        captured = [g is not None for g in v["graphs"]]
        metrics["graphs_captured"] = f"{sum(captured)}/{len(captured)}"
        if not captured or not all(captured):
            notes = [w for w in v["warnings"] if "capture" in w] or ["no graph was built"]
            errors.append("CUDA graph capture failed, the engine ran eagerly: " + " | ".join(notes))
    if options and options.get("autocast") and v["resolved"].get("autocast") != options["autocast"]:
        errors.append(f"autocast not applied: engine resolved {v['resolved'].get('autocast')!r}")
    per_step = []
    for i, (gv, gb, lv, lb) in enumerate(zip(v["grads"], b["grads"], v["losses"], b["losses"])):
        scale, norm = float(gb.abs().max()), float(gb.norm())
        rel_l2 = float((gv - gb).norm()) / norm if norm > 0 else float((gv - gb).norm())
        max_rel = float((gv - gb).abs().max()) / scale if scale > 0 else 0.0
        loss_rel = abs(lv - lb) / max(abs(lb), 1e-30)
        per_step.append({"meta_grad_rel_l2": rel_l2, "meta_grad_max_abs_over_max_ref": max_rel,
                         "loss": lv, "baseline_loss": lb, "loss_rel_err": loss_rel})  # fmt: skip
        if not (bool(torch.isfinite(gv).all()) and math.isfinite(lv)):
            errors.append(f"outer step {i + 1}: non-finite meta-gradient or loss")
        elif rel_l2 > tol or loss_rel > tol:
            errors.append(
                f"outer step {i + 1}: meta-gradient relative L2 error {rel_l2:.3g} (max |diff| / "
                f"max |ref| {max_rel:.3g}), loss relative error {loss_rel:.3g} (losses {lv!r} vs "
                f"{lb!r}); tolerance {tol:g}"
            )
    if len(per_step) != steps:
        errors.append(f"{len(v['grads'])} / {len(b['grads'])} meta steps recorded, want {steps}")
    metrics["per_step"] = per_step
    # After the meta (and NTR) Adam steps: informative only, Adam's first step is ~lr * sign(g).
    metrics["theta_delta_rel_l2"] = float((v["delta"] - b["delta"]).norm()) / max(
        float(b["delta"].norm()), 1e-30
    )
    out = {"verdict": "failed" if errors else "passed", "metrics": metrics}
    if errors:
        out["error"] = "; ".join(errors)
    return out


# ----------------------------------------------------------------------------- the worker
def _header(device) -> dict:
    import platform

    import torch

    from sophon_fast import _backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    ext = _backend.extension()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_mode": _backend.triton_mode(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "cuda_launch_blocking": os.environ.get("CUDA_LAUNCH_BLOCKING", ""),
        "extension": None if ext is None else getattr(ext, "__file__", "?"),
        "extension_with_cuda": None if ext is None else bool(getattr(ext, "with_cuda", False)),
        "available_backends": _backend.available_backends(),
        "unavailable_backends": _backend.unavailable_backends(),
    }
    if device.type == "cuda":
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


def _context_alive(device) -> str | None:
    """None when the CUDA context still works after a failed check, else the error."""
    if device.type != "cuda":
        return None
    import torch

    try:
        torch.cuda.synchronize()
        torch.ones(4, device=device).sum().item()
    except Exception as error:  # noqa: BLE001 - a sticky CUDA error poisons the whole process
        return f"{type(error).__name__}: {error}"
    return None


def worker(args) -> int:
    """Run the checks ``--only`` names (plan indices), in order, reporting to ``--progress``."""
    progress = open(args.progress, "a", buffering=1)

    def emit(record):
        progress.write(json.dumps(record, default=str) + "\n")
        progress.flush()

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))  # _tolerances
    import torch

    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        emit({"event": "header", "error": "no CUDA device is visible to torch"})
        return 2
    torch.set_flush_denormal(True)
    emit({"event": "header", **_header(device)})
    from sophon_fast import _backend

    unavailable = _backend.unavailable_backends()
    plan = build_plan(args.dry_run, args.filter)
    # SOPHON_SMOKE_FAULT="crash:REGEX;hang:REGEX" makes the checks whose names match die or hang
    # (tests/test_gpu_script.py checks that the parent records them and goes on).
    faults = [
        f.partition(":")[::2] for f in os.environ.get("SOPHON_SMOKE_FAULT", "").split(";") if f
    ]
    for i in [int(i) for i in args.only.split(",") if i]:
        spec = plan[i]
        emit({"event": "start", "index": i})
        started = time.perf_counter()
        for kind, pattern in faults:
            if re.search(pattern, spec["name"]):
                if kind == "crash":
                    os._exit(9)
                time.sleep(3600)  # hang
        try:
            if spec["group"] == "engine":
                result = run_engine_check(spec, device, args.sizes)
            else:
                result = run_op_check(spec, device, args.sizes, unavailable, args.dry_run)
        except Exception as error:  # noqa: BLE001 - every check is independent: record, go on
            tail = "".join(traceback.format_exception(type(error), error, error.__traceback__)[-3:])
            result = {
                "verdict": "failed",
                "error": f"{type(error).__name__}: {error}",
                "traceback": tail[-2000:],
            }
        if device.type == "cuda":
            try:
                torch.cuda.synchronize()
            except Exception as error:  # noqa: BLE001
                result = {
                    "verdict": "failed",
                    "error": f"after the check: {type(error).__name__}: {error}",
                }
        result["seconds"] = round(time.perf_counter() - started, 3)
        emit({"event": "result", "index": i, **result})
        print(f"[{i}] {spec['name']}: {result['verdict']}", flush=True)
        if result["verdict"] == "failed":
            dead = _context_alive(device)
            if dead is not None:
                emit({"event": "context_lost", "index": i, "error": dead})
                return 3
    emit({"event": "done"})
    return 0


# ----------------------------------------------------------------------------- the parent
def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def make_shards(plan: list[dict], n: int) -> list[list[int]]:
    """Plan indices split over ``n`` workers, one op family (one set of kernels to compile)
    per worker where possible; the engine checks weigh 10 op checks each (model runs, capture)."""
    groups: dict[str, list[int]] = {}
    for i, spec in enumerate(plan):
        key = (
            "engine"
            if spec["group"] == "engine"
            else f"{spec['op']}/{spec['variant'].split('.')[0]}"
        )
        groups.setdefault(key, []).append(i)
    shards: list[list[int]] = [[] for _ in range(max(1, n))]
    load = [0] * len(shards)

    def weight(indices):
        return sum(10 if plan[i]["group"] == "engine" else 1 for i in indices)

    for _, indices in sorted(groups.items(), key=lambda kv: -weight(kv[1])):
        k = load.index(min(load))
        shards[k] += indices
        load[k] += weight(indices)
    return [sorted(s) for s in shards if s]


class Shard:
    """One worker slot: its list of plan indices and the process now running them."""

    def __init__(self, number: int, indices: list[int], env: dict | None = None) -> None:
        self.number, self.indices, self.env = number, indices, env or {}
        self.next = 0  # position in indices of the first check not yet given a verdict
        self.proc = None
        self.progress = self.log = None
        self.offset, self.current, self.current_start = 0, None, 0.0
        self.launches, self.empty_launches = 0, 0
        self.started_any = False
        self.done = False


class Runner:
    """Runs the plan in worker processes and keeps every verdict (see the module docstring)."""

    def __init__(self, args) -> None:
        self.args = args
        self.plan = build_plan(args.dry_run, args.filter)
        self.results: dict[int, dict] = {}
        self.extra: list[dict] = []  # re-runs without CUDA_LAUNCH_BLOCKING
        self.header: dict = {}
        self.worker_errors: list[str] = []
        self.started = time.monotonic()
        self.deadline = self.started + args.budget
        self.logdir = Path(args.logdir) if args.logdir else Path(args.out).resolve().parent
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.workers = 0
        self.last_write = 0.0

    # -- output
    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_write < 1.0:
            return
        self.last_write = now
        checks = []
        for i, spec in enumerate(self.plan):
            record = {k: spec[k] for k in spec if k not in ("kind",)}
            record.update(self.results.get(i, {"verdict": "pending"}))
            checks.append(record)
        checks += self.extra
        counts: dict[str, int] = {}
        for c in checks:
            counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
        header = (
            dict(self.header, worker_errors=self.worker_errors)
            if self.worker_errors
            else self.header
        )
        doc = {
            "schema": 1,
            "mode": "dry-run" if self.args.dry_run else "gpu",
            "sizes": self.args.sizes,
            "budget_s": self.args.budget,
            "seconds": round(now - self.started, 1),
            "workers_started": self.workers,
            "header": header,
            "counts": counts,
            "checks": checks,
        }
        out = Path(self.args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        os.replace(tmp, out)

    def record(self, shard: Shard, index: int, result: dict) -> None:
        spec = self.plan[index]
        if shard.env:  # a re-run: an extra check beside the plan's
            name = f"{spec['name']} [launch_blocking={shard.env.get('CUDA_LAUNCH_BLOCKING')}]"
            self.extra.append(
                {**{k: v for k, v in spec.items() if k != "kind"}, **result, "name": name}
            )
        else:
            self.results[index] = result
        error = f" ({result['error'][:300]})" if result.get("error") else ""
        print(f"  {self.plan[index]['name']}{' (re-run)' if shard.env else ''}: {result['verdict']}{error}",
              flush=True)  # fmt: skip

    # -- workers
    def launch(self, shard: Shard) -> None:
        self.workers += 1
        shard.launches += 1
        shard.progress = self.logdir / f"smoke-worker-{self.workers}.jsonl"
        shard.log = self.logdir / f"smoke-worker-{self.workers}.log"
        todo = shard.indices[shard.next :]
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--progress", str(shard.progress),
                   "--sizes", self.args.sizes, "--only", ",".join(map(str, todo))]  # fmt: skip
        command += ["--dry-run"] if self.args.dry_run else []
        command += ["--filter", self.args.filter] if self.args.filter else []
        env = dict(os.environ, PYTHONUNBUFFERED="1", **shard.env)
        with open(shard.log, "w") as log_file:
            shard.proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True, cwd=str(ROOT))  # fmt: skip
        shard.offset, shard.current = 0, None
        shard.started_any = False

    def _skip_to_after(self, shard: Shard, index: int) -> None:
        shard.next = shard.indices.index(index) + 1

    def read_events(self, shard: Shard, now: float) -> None:
        """Take in the complete lines the shard's worker has written since the last call."""
        text = shard.progress.read_text() if shard.progress.exists() else ""
        complete = text[shard.offset :].rsplit("\n", 1)
        if len(complete) == 2:
            shard.offset += len(complete[0]) + 1
            for line in complete[0].splitlines():
                record = json.loads(line)
                event = record.pop("event")
                if event == "header":
                    if "error" in record or not self.header:
                        self.header = record
                elif event == "start":
                    shard.current, shard.current_start = record["index"], now
                    shard.started_any = True
                elif event == "result":
                    index = record.pop("index")
                    self.record(shard, index, record)
                    self._skip_to_after(shard, index)
                    shard.current = None
                elif event == "context_lost":
                    name = self.plan[record["index"]]["name"]
                    print(f"  CUDA context lost after {name}: {record['error']}", flush=True)

    def poll(self, shard: Shard, now: float) -> None:
        """Read the shard's progress; handle a finished, crashed or overdue worker."""
        exited = shard.proc.poll() is not None  # before reading: then every line is written
        self.read_events(shard, now)
        if shard.current is not None and now - shard.current_start > self.args.check_limit:
            _kill(shard.proc)
            self.record(shard, shard.current, {
                "verdict": "timed_out", "seconds": round(now - shard.current_start, 1),
                "error": f"still running after the {self.args.check_limit:g} s limit of one check; worker "
                         f"output: {_tail(shard.log, 600)}"})  # fmt: skip
            self._skip_to_after(shard, shard.current)
            self.relaunch(shard)
            return
        if not exited:
            return
        rc = shard.proc.returncode
        if rc == 0 or shard.next >= len(shard.indices):
            shard.done = True
            return
        if rc == 2:  # no CUDA device: nothing can run here
            self.fail_rest(shard, f"the smoke worker could not start: {self.header.get('error')}")
            return
        if shard.current is not None:
            self.record(shard, shard.current, {
                "verdict": "failed",
                "error": f"the worker process died during this check (exit code {rc}); its last "
                         f"output: {_tail(shard.log)}"})  # fmt: skip
            self._skip_to_after(shard, shard.current)
        elif rc != 3:  # died before its first check (import, CUDA init, backend probe)
            self.worker_errors.append(f"worker {self.workers} exit code {rc}: {_tail(shard.log)}")
            shard.empty_launches += 1
            if shard.empty_launches >= 2:
                self.fail_rest(
                    shard,
                    "the smoke worker could not start twice: " + self.worker_errors[-1][-1500:],
                )
                return
        self.relaunch(shard)

    def relaunch(self, shard: Shard) -> None:
        if shard.next >= len(shard.indices):
            shard.done = True
        elif time.monotonic() < self.deadline:
            self.launch(shard)

    def fail_rest(self, shard: Shard, error: str) -> None:
        for index in shard.indices[shard.next :]:
            self.record(shard, index, {"verdict": "failed", "error": error[-2000:]})
        shard.next, shard.done = len(shard.indices), True

    def run_shards(self, shards: list[Shard]) -> None:
        for shard in shards:
            self.launch(shard)
        while not all(s.done for s in shards):
            now = time.monotonic()
            for shard in shards:
                if not shard.done:
                    self.poll(shard, now)
            if now > self.deadline:
                for shard in shards:
                    if shard.done:
                        continue
                    _kill(shard.proc)
                    self.read_events(shard, now)  # results written before the kill
                    if shard.current is not None:
                        self.record(shard, shard.current, {
                            "verdict": "timed_out", "seconds": round(now - shard.current_start, 1),
                            "error": f"the smoke's {self.args.budget:g} s budget ran out during this check"})  # fmt: skip
                    shard.done = True
                break
            self.write()
            time.sleep(0.05)

    def run(self) -> int:
        shards = [
            Shard(k, indices) for k, indices in enumerate(make_shards(self.plan, self.args.workers))
        ]
        print(
            f"smoke: {len(self.plan)} checks in {len(shards)} worker(s), budget {self.args.budget:g} s",
            flush=True,
        )
        self.run_shards(shards)
        if not self.args.dry_run and os.environ.get("CUDA_LAUNCH_BLOCKING") == "1":
            retry = [i for i, spec in enumerate(self.plan)
                     if spec["group"] == "engine" and "cuda_graphs" in spec["check"]
                     and self.results.get(i, {}).get("verdict") == "failed"
                     and "capture" in self.results[i].get("error", "")]  # fmt: skip
            if retry and time.monotonic() < self.deadline:
                print(
                    f"re-running {len(retry)} graph check(s) without CUDA_LAUNCH_BLOCKING",
                    flush=True,
                )
                self.run_shards([Shard(len(shards), retry, {"CUDA_LAUNCH_BLOCKING": "0"})])
        for i in range(len(self.plan)):
            self.results.setdefault(
                i,
                {
                    "verdict": "skipped",
                    "error": f"not reached: the smoke's {self.args.budget:g} s budget ran out",
                },
            )
        self.write(force=True)
        counts: dict[str, int] = {}
        for record in list(self.results.values()) + self.extra:
            counts[record["verdict"]] = counts.get(record["verdict"], 0) + 1
        print(
            f"smoke: {counts} in {time.monotonic() - self.started:.0f} s -> {self.args.out}",
            flush=True,
        )
        return 0 if not counts.get("failed") and not counts.get("timed_out") else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where the JSON of every check goes (ops.json)")
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU: cpu + interpreted Triton, tiny sizes"
    )
    parser.add_argument(
        "--sizes", choices=sorted(SIZES), help="default: full on the GPU, tiny in a dry run"
    )
    parser.add_argument(
        "--budget", type=float, default=70.0, help="seconds for all checks (default 70)"
    )
    parser.add_argument("--check-limit", type=float, default=None, help="seconds for one check")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default 4 on the GPU, 2 in a dry run)",
    )
    parser.add_argument("--logdir", help="worker logs and progress files (default: beside --out)")
    parser.add_argument(
        "--filter", help="only the checks whose names match this regular expression"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--progress", help=argparse.SUPPRESS)
    parser.add_argument("--only", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = "tiny" if args.dry_run else "full"
    if args.dry_run:
        # No GPU in a dry run, even on a GPU machine; Triton kernels run under the interpreter
        # (which must be chosen before any kernel is defined, as tests/conftest.py does).
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["TRITON_INTERPRET"] = "1"
    if args.worker:
        return worker(args)
    if not args.out:
        parser.error("--out is required")
    if args.workers is None:
        # Triton compiles each kernel specialisation on first use, one CPU core per process:
        # four workers, whole op families each, share that out (the GPU machine has 16 cores).
        args.workers = 2 if args.dry_run else 4
    if args.check_limit is None:
        # The first check of a kernel compiles it (Triton: ~1 s per specialisation on a GPU host);
        # interpreted kernels at the full sizes take tens of seconds on 2 cores.
        args.check_limit = 45.0 if args.sizes == "tiny" or not args.dry_run else 300.0
    return Runner(args).run()


if __name__ == "__main__":
    sys.exit(main())
