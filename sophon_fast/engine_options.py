"""The fast engine's speed options as data: :class:`FastOptions`, their validation and "auto".

They sit below the engine so that :class:`sophon_fast.config.ProtectConfig` validates
``engine_options`` on construction without importing the engine. What each option does, and the
measurements behind every "auto" choice, are in :mod:`sophon_fast.engine.options`, which
re-exports these names beside the checks that need a run (device, benchmark description).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

try:  # the fused BatchNorm+ReLU+MaxPool2d op and its module converter (fused_bn_relu_pool)
    from sophon_fast.nn import fuse_bn_relu_pool  # noqa: F401
    from sophon_fast.ops.bn_relu_pool import batch_norm_relu_maxpool2d  # noqa: F401

    _BN_RELU_POOL = True
except ImportError:
    _BN_RELU_POOL = False

__all__ = ["AUTO_DEFAULTS", "FastOptions", "bn_relu_pool_available", "resolve_options"]

_GRAPH_MODES = ("off", "inner", "simulation")
_AUTOCAST = (None, "bf16", "tf32")


def bn_relu_pool_available() -> bool:
    """True when the fused BatchNorm+ReLU+MaxPool2d op and its module converter are installed."""
    return _BN_RELU_POOL


# What "auto" (None) means per device type: option -> its value for (order). None left in the
# result means "the engine decides" (vmap_adversaries: when the model allows it). CPU: measured
# (sophon_fast.engine.options). CUDA: nothing measured on a GPU yet, so nothing is switched on.
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
    """Validated fast-engine options (:mod:`sophon_fast.engine.options` has each one's effect).

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
