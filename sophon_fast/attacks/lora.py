"""Low-rank adapters (LoRA) on ``nn.Linear`` and ``nn.Conv2d``, with a merge back into plain layers.

A LoRA layer keeps its base weight W frozen and learns a rank-r update::

    Linear:  y = x W^T + b + s * (x A^T) B^T              A: (r, in),  B: (out, r)
    Conv2d:  y = conv(x, W) + b + s * conv1x1(conv(x, A), B)
             A: (r, in, kh, kw) with W's stride/padding/dilation,  B: (out, r, 1, 1)

with s = alpha / r. B starts at zero, so the wrapped model computes exactly the base function
before training. :func:`merge_lora` folds ``W + s * B @ A`` (conv: over the flattened kernel)
back into the base layer and puts it where the wrapper was, so an attacked model leaves the
attack as the same architecture it entered with. Grouped convolutions are left unwrapped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRAConv2d", "LoRALinear", "add_lora", "merge_lora"]


class LoRALinear(nn.Module):
    """``base(x) + scale * x A^T B^T``; x: (batch, *, in) -> (batch, *, out)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        weight = base.weight
        a = torch.empty(rank, base.in_features, dtype=weight.dtype)
        bound = 1.0 / math.sqrt(base.in_features)  # Kaiming-uniform(a=sqrt(5)), as nn.Linear
        a.uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a.to(weight.device))
        self.lora_b = nn.Parameter(
            torch.zeros(base.out_features, rank, dtype=weight.dtype, device=weight.device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight.add_(self.scale * (self.lora_b @ self.lora_a))
        return self.base


class LoRAConv2d(nn.Module):
    """``base(x) + scale * conv1x1(conv(x, A), B)``; x: (batch, in, H, W) -> (batch, out, H', W')."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        weight = base.weight
        out_channels, in_channels, kh, kw = weight.shape
        a = torch.empty(rank, in_channels, kh, kw, dtype=weight.dtype)
        bound = 1.0 / math.sqrt(in_channels * kh * kw)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a.to(weight.device))
        self.lora_b = nn.Parameter(
            torch.zeros(out_channels, rank, 1, 1, dtype=weight.dtype, device=weight.device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        low = F.conv2d(x, self.lora_a, None, base.stride, base.padding, base.dilation)
        return base(x) + self.scale * F.conv2d(low, self.lora_b)

    def merged(self) -> nn.Conv2d:
        with torch.no_grad():
            update = self.lora_b.flatten(1) @ self.lora_a.flatten(1)  # (out, in*kh*kw)
            self.base.weight.add_(self.scale * update.view_as(self.base.weight))
        return self.base


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def add_lora(
    model: nn.Module,
    rank: int,
    *,
    alpha: float | None = None,
    generator: torch.Generator | None = None,
) -> list[nn.Parameter]:
    """Wrap every ``nn.Linear`` and ungrouped ``nn.Conv2d`` of ``model`` in place; return the adapters.

    Args:
        model: the model to adapt (modified in place; the base weights are not touched).
        rank: r >= 1, the adapters' rank.
        alpha: scale numerator, s = alpha / r; None means alpha = r (s = 1).
        generator: draws the A matrices; None uses a fresh generator seeded 0.

    Returns:
        The new ``lora_a``/``lora_b`` parameters, in module order.

    Raises:
        ValueError: rank < 1, or no Linear/Conv2d layer to wrap.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    alpha = float(rank) if alpha is None else float(alpha)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if name and isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)
    ]
    if not targets:
        raise ValueError(
            f"LoRA: {type(model).__name__} has no nn.Linear or nn.Conv2d layer to adapt"
        )
    params: list[nn.Parameter] = []
    for name, module in targets:
        cls = LoRALinear if isinstance(module, nn.Linear) else LoRAConv2d
        wrapper = cls(module, rank, alpha, generator)
        _replace(model, name, wrapper)
        params += [wrapper.lora_a, wrapper.lora_b]
    return params


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA wrapper of ``model`` into its base layer, in place; returns ``model``."""
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAConv2d))]
    for name, wrapper in wrappers:
        _replace(model, name, wrapper.merged())
    return model
