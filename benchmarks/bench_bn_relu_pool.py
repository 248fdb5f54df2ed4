"""Fused BatchNorm2d -> ReLU -> MaxPool2d(2, 2) against the eager three modules.

Cases (same device, same run, interleaved repeats): forward + backward (input, weight and bias
gradients) of training-mode BN + ReLU + 2x2 max-pool at SmallCNN's two activation shapes (batch
130 = 110 restricted + 20 held-out samples at 28x28: 32 channels at 28x28, 64 at 14x14), NCHW and
channels_last, fused op vs ``max_pool2d(relu(batch_norm(x)))`` through eager autograd.

Bytes: the fused op's compulsory traffic at fp32 per input element: forward reads x (4 B) and
writes the pooled output (1 B); backward reads x and the pooled gradient (4 + 1 B) and writes dx
(4 B): 14 B/element. Eager moves ~70 B/element (four passes forward plus the int64 indices, five
backward including the zero-filled pool gradient).
"""

from __future__ import annotations

import _harness
import torch
import torch.nn.functional as F

from sophon_fast import _backend
from sophon_fast.ops.bn_relu_pool import batch_norm_relu_maxpool2d

SUITE = "ops"
OP = "BN+ReLU+MaxPool2d"
# SmallCNN (sophon_fast.models.SmallCNN, widths (32, 64), 28x28) at the simulation's batch 130.
SMALL_CNN_SHAPES = ((130, 32, 28, 28), (130, 64, 14, 14))
BYTES_PER_ELEMENT = 14  # fp32: forward 4 + 1, backward 4 + 1 + 4


def _eager(x, weight, bias, running_mean, running_var):
    z = F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
    return F.max_pool2d(F.relu(z), 2, 2)


def _records(shape, channels_last, device, repeats, env, copy_gbps):
    x = torch.randn(shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    weight = torch.randn(shape[1], device=device, requires_grad=True)
    bias = torch.randn(shape[1], device=device, requires_grad=True)
    running_mean = torch.zeros(shape[1], device=device)
    running_var = torch.ones(shape[1], device=device)
    grad_y = torch.randn_like(_eager(x, weight, bias, None, None))

    def eager():
        y = _eager(x, weight, bias, running_mean, running_var)
        return torch.autograd.grad(y, (x, weight, bias), grad_y)

    fns = {"eager": eager}
    for backend in _harness.fused_backends(device):

        def fused(backend=backend):
            with _backend.use_backend(backend):
                y = batch_norm_relu_maxpool2d(x, weight, bias, running_mean, running_var)
                return torch.autograd.grad(y, (x, weight, bias), grad_y)

        fns[f"fused[{backend}]"] = fused
    samples = _harness.time_interleaved(fns, device, repeats=repeats)
    peaks = {name: _harness.peak_memory_mb(fn, device) for name, fn in fns.items()}
    layout = "channels_last" if channels_last else "NCHW"
    return [
        _harness.make_record(
            SUITE,
            f"{OP} fwd+bwd {tuple(shape)} {layout}",
            impl,
            "eager",
            samples,
            env,
            peak_mem=peaks,
            bytes_per_call=BYTES_PER_ELEMENT * x.numel(),
            copy_gbps=copy_gbps,
            ceiling="14 B/element (x read once per direction) vs ~70 B eager",
        )
        for impl in fns
        if impl.startswith("fused")
    ]


def run(device: torch.device, quick: bool, env: dict, copy_gbps: float) -> list[_harness.Record]:
    repeats = 5 if quick else 7
    return [
        record
        for shape in SMALL_CNN_SHAPES
        for channels_last in (False, True)
        for record in _records(shape, channels_last, device, repeats, env, copy_gbps)
    ]
