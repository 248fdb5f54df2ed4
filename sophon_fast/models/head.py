"""Classifier-head helpers: locate the head Linear, re-initialise it, read its class count.

The inverse-cross-entropy variant of SOPHON simulates an attacker who swaps the classifier
head before fine-tuning: at the start of every fine-tuning simulation the clone's head is
re-drawn with Xavier-uniform weights and a zero bias (the official code does this for
``fc`` on ResNets). The attack suite does the same for its head-replacing attacks.

Xavier-uniform for a weight of shape (fan_out, fan_in)::

    a = gain * sqrt(6 / (fan_in + fan_out)),   W ~ U(-a, a),   b = 0

It is written out with ``Tensor.uniform_(..., generator=...)`` so a ``torch.Generator``
makes the draw reproducible independently of the global RNG. :func:`xavier_head_values`
returns the draw as new tensors (for the functional engine, which swaps values into a flat
parameter vector); :func:`reinit_head_` copies that same draw into the module, so both
consume the generator identically.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

__all__ = ["find_head", "num_classes_of", "reinit_head_", "xavier_head_values"]


def _linear_names(model: nn.Module) -> list[str]:
    """Dotted names of every ``nn.Linear`` in ``model``, in ``named_modules`` order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def find_head(model: nn.Module, head: str | None = None) -> tuple[str, nn.Linear]:
    """Find the classifier head of ``model``.

    Resolution order:

    1. ``head``, a dotted submodule path such as ``"fc"`` or ``"head.fc.fc2"``;
    2. the model's ``head_name`` attribute (every zoo model has one);
    3. otherwise the last ``nn.Linear`` in ``model.named_modules()`` order, with a warning
       naming the pick and how to name it explicitly.

    Args:
        model: The classifier.
        head: Dotted path of the head ``nn.Linear`` inside ``model``. Default None.

    Returns:
        ``(name, linear)``: the dotted path and the head module itself.

    Raises:
        ValueError: The named submodule does not exist, is not an ``nn.Linear``, or (with
            nothing named) ``model`` contains no ``nn.Linear`` at all.
    """
    name = head if head is not None else getattr(model, "head_name", None)
    model_type = type(model).__name__
    if name is None:
        linears = _linear_names(model)
        if not linears:
            raise ValueError(
                f"{model_type} has no nn.Linear submodule, so it has no classifier head to find"
            )
        name = linears[-1]
        warnings.warn(
            f"no classifier head named for {model_type}; using the last nn.Linear {name!r} "
            f"({model.get_submodule(name)}). Pass head={name!r} (or set a `head_name` "
            f"attribute on the model) to name it explicitly.",
            stacklevel=2,
        )
        return name, model.get_submodule(name)
    source = "head" if head is not None else f"{model_type}.head_name"
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"{source}={name!r}: {model_type} has no submodule with that name; "
            f"its nn.Linear submodules are {_linear_names(model)}"
        ) from None
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"{source}={name!r} is a {type(module).__name__}, not an nn.Linear; "
            f"the nn.Linear submodules of {model_type} are {_linear_names(model)}"
        )
    return name, module


def xavier_head_values(
    linear: nn.Linear,
    generator: torch.Generator | None = None,
    gain: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw fresh head values (Xavier-uniform weight, zero bias) without touching ``linear``.

    The draw happens on the generator's device (or, without one, on the weight's device
    from the global RNG) in the weight's dtype, then moves to the weight's device, so a
    CPU generator also reproduces a head that lives on a GPU.

    Args:
        linear: The head whose shape, dtype and device the values follow.
        generator: Source of randomness; None uses the global RNG. Default None.
        gain: Xavier gain; bound ``a = gain * sqrt(6 / (fan_in + fan_out))``. Default 1.0.

    Returns:
        ``(weight, bias)``: weight: (out_features, in_features) ~ U(-a, a); bias:
        (out_features,) zeros, or None when ``linear`` has no bias. New tensors, no grad.
    """
    weight = linear.weight
    fan_out, fan_in = weight.shape
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    draw_device = generator.device if generator is not None else weight.device
    with torch.no_grad():
        new_weight = torch.empty(weight.shape, dtype=weight.dtype, device=draw_device)
        new_weight.uniform_(-bound, bound, generator=generator)
        new_weight = new_weight.to(weight.device)
        new_bias = None
        if linear.bias is not None:
            new_bias = torch.zeros_like(linear.bias, memory_format=torch.contiguous_format)
    return new_weight, new_bias


def reinit_head_(
    linear: nn.Linear,
    generator: torch.Generator | None = None,
    gain: float = 1.0,
) -> nn.Linear:
    """Re-initialise ``linear`` in place: Xavier-uniform weight, zero bias.

    Values are copied into the existing parameter storage (no new ``nn.Parameter``), so
    optimisers and flat buffers that view the parameters keep seeing them. Uses exactly the
    draw of :func:`xavier_head_values` with the same generator state.

    Args:
        linear: The head to overwrite.
        generator: Source of randomness; None uses the global RNG. Default None.
        gain: Xavier gain. Default 1.0.

    Returns:
        ``linear`` itself.
    """
    new_weight, new_bias = xavier_head_values(linear, generator=generator, gain=gain)
    with torch.no_grad():
        linear.weight.copy_(new_weight)
        if linear.bias is not None:
            linear.bias.copy_(new_bias)
    return linear


def num_classes_of(model: nn.Module, head: str | None = None) -> int:
    """Number of classes of ``model``: ``out_features`` of its head (see :func:`find_head`).

    Args:
        model: The classifier.
        head: Dotted path of the head ``nn.Linear``; None resolves as in :func:`find_head`.
            Default None.

    Returns:
        The head's ``out_features``.

    Raises:
        ValueError: As :func:`find_head`.
    """
    return find_head(model, head)[1].out_features
