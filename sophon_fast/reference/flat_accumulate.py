"""Pure-PyTorch twin of :mod:`sophon_fast.ops.flat_accumulate`: ``acc += weight * grad``."""

from __future__ import annotations

import torch

__all__ = ["flat_accumulate_"]


@torch.no_grad()
def flat_accumulate_(acc: torch.Tensor, grad: torch.Tensor, weight: float) -> torch.Tensor:
    """acc += weight * grad; acc (n,) in the state dtype of grad (n,). Returns acc."""
    return acc.add_(grad.to(acc.dtype), alpha=weight)
