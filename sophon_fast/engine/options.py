"""Speed options of the fast engine (``ProtectConfig.engine_options``): what each one does.

Every option changes how the simulation is *run*, never what it computes: with the defaults the
meta-gradient equals the reference engine's to rounding (float64 tests check order 1 and 2 with
the defaults applied). Measured effects are per outer step on the 2-core CPU (AMD EPYC, torch
2.13, fp32; noisy shared machine), small CNN (conv32-BN-ReLU-pool, conv64-BN-ReLU-pool, fc)
unless stated; ``benchmarks/results/e2e.csv`` has the full runs.

"auto" is decided per device type (:data:`AUTO_DEFAULTS`). The table's auto values are the CPU's,
where they were measured. On CUDA nothing has been measured yet, so auto switches on nothing
there: ``channels_last``, ``fused_batchnorm``, ``fused_bn_relu_pool``, ``fused_relu_pool`` and
``vmap_adversaries`` are all off (the CUDA BatchNorm kernels are NCHW-only and copy a
channels_last input in and its outputs out, so the CPU's NHWC + fused-BN choice could be slower
there; sophon_fast._backend.AUTO_ORDER_BY_OP is empty for the same reason). Any device type other
than "cpu" and "cuda" gets the CUDA column. Set an option explicitly to use it anyway.

=====================  =========  ==================================================================
option                 default    what it does / measured effect
=====================  =========  ==================================================================
``channels_last``      auto       4-D inputs in NHWC (explicit strides, so 1-channel inputs too)
                                  inside the simulation and NTR. auto = on in order 1 only: with
                                  the fused BN+ReLU+pool it makes the first-order step (K=50)
                                  1.77x the reference's (1.0x flat NCHW); one adapt forward +
                                  backward 161 -> 114 ms. In order 2 NHWC convolution double
                                  backward is ~2x slower, so it stays off.
``fused_batchnorm``    auto       forward through a private model copy whose BatchNorm2d layers are
                                  :class:`sophon_fast.nn.FusedBatchNorm2d` (one-pass C++ double
                                  backward). auto = on in order 2 (BN double backward was 40 % of
                                  the step): K=5 step 2616 -> 1887 ms (1.39x); off in order 1,
                                  where aten's BN is as fast.
``fused_bn_relu_pool`` auto       BatchNorm2d + ReLU + MaxPool2d as one fused op through
                                  ``sophon_fast.nn.fuse_bn_relu_pool`` on the private copy (first
                                  order only: it is once differentiable). auto = on in order 1 when
                                  the op is installed.
``fused_relu_pool``    auto       ReLU + MaxPool2d(2, 2) pairs as one op through
                                  ``sophon_fast.nn.fuse_relu_pool`` on the private copy, after
                                  the two above (a pair whose BatchNorm was already fused is
                                  gone). Differentiable to any order; equal to the eager pair
                                  exactly. auto = on in order 2: at 130x32x28x28 forward 0.6 vs
                                  7.0 ms, backward 0.4 vs 1.6 ms (eager NCHW max-pool was ~15 %
                                  of the second-order step).
``cuda_graphs``        "off"      CUDA only. "inner": capture one first-order inner step (adapt
                                  forward/backward, update, evaluation forward/backward, meta-grad
                                  accumulation) once and replay it K times. "simulation": capture
                                  the whole simulation (K steps, any order). Static shapes only.
``autocast``           None       CUDA only: "bf16" (torch.autocast bfloat16 per forward, weight
                                  cache off: a cache would keep step-0 weights for all K steps and
                                  bend the meta-gradient by ~80 %) or "tf32" (TF32 matmul / cuDNN
                                  conv). Changes the numbers (bf16 ~1e-2 relative), off by default.
``vmap_adversaries``   auto       simulate several adversaries of one draw in one pass with
                                  torch.func.vmap over stacked flat parameters. auto (CPU) = on
                                  when the model has no running statistics and all adversaries
                                  share one optimizer; otherwise (or on any vmap failure) one loop
                                  per adversary.
``flush_denormal``     True       torch.set_flush_denormal(True) on the CPU during protect() (long
                                  runs slowed 2.6x midway on denormals without it).
=====================  =========  ==================================================================

:class:`FastOptions`, :func:`resolve_options` and :data:`AUTO_DEFAULTS` are defined in
:mod:`sophon_fast.engine_options`, below the engine, so that ``ProtectConfig`` validates the
options on construction; this module re-exports them beside the checks that need a run.
"""

from __future__ import annotations

import torch

from sophon_fast.engine_options import (
    AUTO_DEFAULTS,
    FastOptions,
    bn_relu_pool_available,
    resolve_options,
)

__all__ = [
    "AUTO_DEFAULTS",
    "FastOptions",
    "bn_relu_pool_available",
    "check_device",
    "describe_defaults",
    "resolve_options",
]


def check_device(options: FastOptions, device: torch.device) -> None:
    """Raise ValueError for CUDA-only options on another device."""
    if device.type != "cuda":
        for name, off in (("cuda_graphs", "off"), ("autocast", None)):
            if getattr(options, name) != off:
                raise ValueError(
                    f"engine_options[{name!r}]={getattr(options, name)!r} needs a CUDA device; "
                    f"the run is on {device.type}"
                )


def describe_defaults(order: int, device: torch.device) -> str:
    """One line naming the options the defaults switch on (benchmark records carry it)."""
    resolved = FastOptions().resolved(order, device)
    on = [k for k, v in resolved.items() if v is True]
    on += [f"{k}={v}" for k, v in resolved.items() if v not in (True, False, None, "off")]
    return ", ".join(on) or "none"
