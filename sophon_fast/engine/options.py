"""Speed options of the fast engine (``ProtectConfig.engine_options``), validated in one place.

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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["FastOptions", "resolve_options", "describe_defaults"]

_GRAPH_MODES = ("off", "inner", "simulation")
_AUTOCAST = (None, "bf16", "tf32")

# What "auto" (None) means per device type: option -> its value for (order). None left in the
# result means "the engine decides" (vmap_adversaries: when the model allows it). CPU: measured
# (module docstring). CUDA: nothing measured on a GPU yet, so nothing is switched on.
AUTO_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {
        "channels_last": lambda order: order == 1,
        "fused_batchnorm": lambda order: order == 2,
        "fused_bn_relu_pool": lambda order: order == 1 and bn_relu_pool_available(),
        "fused_relu_pool": lambda order: order == 2,
        "vmap_adversaries": lambda order: None,
    },
    "cuda": {
        "channels_last": lambda order: False,
        "fused_batchnorm": lambda order: False,
        "fused_bn_relu_pool": lambda order: False,
        "fused_relu_pool": lambda order: False,
        "vmap_adversaries": lambda order: False,
    },
}


@dataclasses.dataclass(frozen=True)
class FastOptions:
    """Validated fast-engine options (see the module docstring for each one's effect).

    ``None`` means "auto": the engine decides from the order, the model and the device.
    """

    channels_last: bool | None = None
    fused_batchnorm: bool | None = None
    fused_bn_relu_pool: bool | None = None
    fused_relu_pool: bool | None = None
    cuda_graphs: str = "off"
    autocast: str | None = None
    vmap_adversaries: bool | None = None
    flush_denormal: bool = True

    def resolved(self, order: int, device: torch.device | str) -> dict[str, Any]:
        """The options with every "auto" decided for ``order`` on ``device`` (its type's
        :data:`AUTO_DEFAULTS`; a type without an entry gets the CUDA one: nothing measured)."""
        device = torch.device(device)
        auto = AUTO_DEFAULTS.get(device.type, AUTO_DEFAULTS["cuda"])

        def pick(name: str) -> Any:
            value = getattr(self, name)
            return auto[name](order) if value is None else value

        return {
            "channels_last": pick("channels_last"),
            "fused_batchnorm": pick("fused_batchnorm"),
            "fused_bn_relu_pool": pick("fused_bn_relu_pool"),
            "fused_relu_pool": pick("fused_relu_pool"),
            "cuda_graphs": self.cuda_graphs,
            "autocast": self.autocast,
            "vmap_adversaries": pick("vmap_adversaries"),
            "flush_denormal": self.flush_denormal and device.type == "cpu",
        }


def bn_relu_pool_available() -> bool:
    """True when the fused BatchNorm+ReLU+MaxPool2d op and its module converter are installed."""
    try:
        from sophon_fast.nn import fuse_bn_relu_pool  # noqa: F401
        from sophon_fast.ops.bn_relu_pool import batch_norm_relu_maxpool2d  # noqa: F401
    except ImportError:
        return False
    return True


def _optional_bool(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(
            f"engine_options[{name!r}]: expected True, False or None (auto), got {value!r}"
        )


def resolve_options(options: Any, *, order: int = 1) -> FastOptions:
    """Validate ``options`` (None, a mapping or a FastOptions) into a :class:`FastOptions`.

    Args:
        options: None (all defaults), a dict with some of the option names, or FastOptions.
        order: the meta-gradient order the options will run with.

    Returns:
        FastOptions.

    Raises:
        TypeError: not a mapping, or a value of the wrong type.
        ValueError: an unknown option name or value, or a combination that cannot run
            (``cuda_graphs="inner"`` with order 2, ``fused_bn_relu_pool=True`` with order 2 or
            without the op installed).
    """
    if options is None:
        options = FastOptions()
    elif isinstance(options, Mapping):
        names = {f.name for f in dataclasses.fields(FastOptions)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(
                f"engine_options: unknown options {unknown}; expected some of {sorted(names)}"
            )
        options = FastOptions(**dict(options))
    elif not isinstance(options, FastOptions):
        raise TypeError(
            f"engine_options: expected a dict, FastOptions or None, got {type(options).__name__}"
        )
    for name in (
        "channels_last",
        "fused_batchnorm",
        "fused_bn_relu_pool",
        "fused_relu_pool",
        "vmap_adversaries",
    ):
        _optional_bool(name, getattr(options, name))
    if not isinstance(options.flush_denormal, bool):
        raise TypeError(
            f"engine_options['flush_denormal']: expected a bool, got {options.flush_denormal!r}"
        )
    if options.cuda_graphs not in _GRAPH_MODES:
        raise ValueError(
            f"engine_options['cuda_graphs']: expected one of {list(_GRAPH_MODES)}, got {options.cuda_graphs!r}"
        )
    if options.autocast not in _AUTOCAST:
        raise ValueError(
            f"engine_options['autocast']: expected one of {list(_AUTOCAST)}, got {options.autocast!r}"
        )
    if options.cuda_graphs == "inner" and order != 1:
        raise ValueError(
            "engine_options['cuda_graphs']='inner' captures the first-order inner step; with order=2 "
            "use 'simulation' (the whole simulation in one graph) or 'off'"
        )
    if options.fused_bn_relu_pool:
        if order != 1:
            raise ValueError(
                "engine_options['fused_bn_relu_pool']=True: the fused op is once differentiable, so "
                "it runs in order 1 only (order 2 needs the double backward)"
            )
        if not bn_relu_pool_available():
            raise ValueError(
                "engine_options['fused_bn_relu_pool']=True, but sophon_fast.ops.bn_relu_pool / "
                "sophon_fast.nn.fuse_bn_relu_pool are not installed; leave it None (auto)"
            )
    return options


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
