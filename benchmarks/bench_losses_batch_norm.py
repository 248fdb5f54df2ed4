"""Fused losses and the fused BatchNorm double backward against eager PyTorch.

Cases (same device, same run, interleaved repeats):
    losses fwd+bwd      ce / ice / ice_paper / klu at (150 x 10) and (4096 x 1000): the fused op
                        (value + gradient in one pass) vs the eager formulas of the reference.
    BN double backward  grad of a grad-norm through one BN layer at ResNet-18's BN shapes (batch
                        32, 32x32 input): only the second backward is timed (retain_graph), fused
                        vs eager autograd (~100 ops per layer).
    2nd-order step      SmallCNN, K = 2 inner SGD steps under create_graph, ice at the end, meta
                        gradient: model with nn.BatchNorm2d vs convert_batchnorm(model).
"""

from __future__ import annotations

import copy

import _harness
import torch
from torch.func import functional_call

from sophon_fast import _backend
from sophon_fast.models.classifiers import SmallCNN
from sophon_fast.nn import convert_batchnorm
from sophon_fast.ops import batch_norm as bn_ops
from sophon_fast.ops import losses as loss_ops
from sophon_fast.reference import batch_norm as bn_reference
from sophon_fast.reference import losses as loss_reference

SUITE = "ops"
LOSS_SHAPES = ((150, 10), (4096, 1000))
RESNET18_BN_SHAPES = ((32, 64, 32, 32), (32, 128, 16, 16), (32, 256, 8, 8), (32, 512, 4, 4))


def _loss_records(device, repeats, env):
    backend = next(iter(_harness.fused_backends(device)), None)
    records = []
    for batch, classes in LOSS_SHAPES:
        logits = torch.randn(batch, classes, device=device, requires_grad=True)
        labels = torch.randint(0, classes, (batch,), device=device)
        for kind in loss_ops.KINDS:
            eager_fn = loss_ops._REFERENCE[kind]

            def eager(fn=eager_fn, logits=logits, labels=labels):
                return torch.autograd.grad(fn(logits, labels), logits)

            def fused(kind=kind, logits=logits, labels=labels):
                with _backend.use_backend(backend):
                    return torch.autograd.grad(
                        loss_ops.classification_loss(logits, labels, kind), logits
                    )

            fns = {"eager": eager, f"fused[{backend}]": fused}
            samples = _harness.time_interleaved(fns, device, repeats=repeats)
            records.append(
                _harness.make_record(
                    SUITE,
                    f"{kind} fwd+bwd {batch}x{classes}",
                    f"fused[{backend}]",
                    "eager",
                    samples,
                    env,
                    bytes_per_call=8 * batch * classes,
                    ceiling="8 B/logit (read z, write grad) vs eager 24-40 B/logit",
                )
            )
    return records


def _bn_records(device, repeats, env):
    return [
        record
        for backend in _harness.fused_backends(device)
        for record in _bn_backend_records(device, backend, repeats, env)
    ]


def _bn_backend_records(device, backend, repeats, env):
    records = []
    for shape in RESNET18_BN_SHAPES:
        x = torch.randn(shape, device=device, requires_grad=True)
        weight = torch.randn(shape[1], device=device, requires_grad=True)
        bias = torch.randn(shape[1], device=device, requires_grad=True)
        fns = {}
        for name, fn in (
            ("eager", bn_reference.batch_norm2d),
            (f"fused[{backend}]", bn_ops.batch_norm2d),
        ):
            with _backend.use_backend(backend if name != "eager" else "reference"):
                y = fn(x, weight, bias, None, None, 0.1, 1e-5)
                gx, gw = torch.autograd.grad(y, (x, weight), torch.randn_like(y), create_graph=True)
            vx, vw = torch.randn_like(gx), torch.randn_like(gw)

            def second(gx=gx, gw=gw, vx=vx, vw=vw, x=x, weight=weight):
                return torch.autograd.grad((gx, gw), (x, weight), (vx, vw), retain_graph=True)

            fns[name] = second
        samples = _harness.time_interleaved(fns, device, repeats=repeats)
        records.append(
            _harness.make_record(
                SUITE,
                f"BN double backward {tuple(shape)}",
                f"fused[{backend}]",
                "eager",
                samples,
                env,
                bytes_per_call=32 * x.numel(),
                ceiling="32 B/element (3 reads twice, 2 writes) vs ~100 eager ops",
            )
        )
    return records


def _second_order_step(model, x, y, inner_steps=2, lr=0.01):
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    names = list(params)
    current = [params[n] for n in names]
    for _ in range(inner_steps):
        logits = functional_call(model, ({**dict(zip(names, current)), **buffers}), (x,))
        grads = torch.autograd.grad(
            loss_reference.cross_entropy(logits, y), current, create_graph=True
        )
        current = [p - lr * g for p, g in zip(current, grads)]
    logits = functional_call(model, ({**dict(zip(names, current)), **buffers}), (x,))
    return torch.autograd.grad(
        loss_reference.inverse_cross_entropy(logits, y), list(params.values())
    )


def _simulation_records(device, repeats, env):
    if device.type != "cpu" or _backend.why_unavailable("cpu", device) is not None:
        return []
    torch.manual_seed(0)
    eager_model = SmallCNN().to(device)
    fused_model = convert_batchnorm(copy.deepcopy(eager_model))
    x = torch.randn(32, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (32,), device=device)
    fns = {
        "eager": lambda: _second_order_step(eager_model, x, y),
        "fused BN[cpu]": lambda: _second_order_step(fused_model, x, y),
    }
    samples = _harness.time_interleaved(fns, device, repeats=repeats)
    return [
        _harness.make_record(
            SUITE,
            "SmallCNN 2nd-order step (K=2, batch 32)",
            "fused BN[cpu]",
            "eager",
            samples,
            env,
            ceiling="BN double backward ~40% of the eager step",
        )
    ]


def run(device: torch.device, quick: bool, env: dict, copy_gbps: float) -> list[_harness.Record]:
    repeats = 5 if quick else 7
    return (
        _loss_records(device, repeats, env)
        + _bn_records(device, repeats, env)
        + _simulation_records(device, repeats, env)
    )
