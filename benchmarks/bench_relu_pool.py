"""Fused ReLU -> MaxPool2d(2, 2) (differentiable to any order) against the eager pair.

Cases (same device, same run, interleaved repeats) at SmallCNN's two activation shapes (batch 130,
32 channels at 28x28 and 64 at 14x14, NCHW, the layout of the second-order simulation): forward +
backward of ``relu_maxpool2d`` vs ``max_pool2d(relu(x), 2, 2)`` through eager autograd.

Bytes: forward reads x (4 B per input element) and writes y and the code (2 x 1 B); backward
reads the pooled gradient and the code (2 x 1 B) and writes dx (4 B): 12 B per input element.
Eager moves ~40 B (relu write, pool read, int64 indices, zero fill, scatter, threshold_backward).
"""

from __future__ import annotations

import _harness
import torch
import torch.nn.functional as F

from sophon_fast import _backend
from sophon_fast.ops.relu_pool import relu_maxpool2d

SUITE = "ops"
OP = "ReLU+MaxPool2d"
SMALL_CNN_SHAPES = ((130, 32, 28, 28), (130, 64, 14, 14))
BYTES_PER_ELEMENT = 12


def _eager(x):
    return F.max_pool2d(F.relu(x), 2, 2)


def _records(shape, device, repeats, env, copy_gbps):
    x = torch.randn(shape, device=device, requires_grad=True)
    grad_y = torch.randn_like(_eager(x))
    fns = {"eager": lambda: torch.autograd.grad(_eager(x), x, grad_y)}
    fused_ok = _backend.why_unavailable("cpu", device) is None and device.type == "cpu"
    if fused_ok:
        fns["fused[cpu]"] = lambda: torch.autograd.grad(relu_maxpool2d(x), x, grad_y)
    samples = _harness.time_interleaved(fns, device, repeats=repeats)
    peaks = {name: _harness.peak_memory_mb(fn, device) for name, fn in fns.items()}
    return [
        _harness.make_record(
            SUITE,
            f"{OP} fwd+bwd {tuple(shape)} NCHW",
            impl,
            "eager",
            samples,
            env,
            peak_mem=peaks,
            bytes_per_call=BYTES_PER_ELEMENT * x.numel(),
            copy_gbps=copy_gbps,
            ceiling="12 B/input element vs ~40 B eager",
        )
        for impl in fns
        if impl.startswith("fused")
    ]


def run(device: torch.device, quick: bool, env: dict, copy_gbps: float) -> list[_harness.Record]:
    if device.type != "cpu":  # the op has a CPU kernel only; elsewhere it is the eager pair
        return []
    repeats = 5 if quick else 7
    return [
        record
        for shape in SMALL_CNN_SHAPES
        for record in _records(shape, device, repeats, env, copy_gbps)
    ]
