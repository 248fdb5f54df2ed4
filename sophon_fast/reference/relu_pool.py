"""relu_maxpool2d, pure-torch twin: ``max_pool2d(relu(x), 2, 2)`` as eager modules compute it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["relu_maxpool2d"]


def relu_maxpool2d(x: torch.Tensor) -> torch.Tensor:
    """ReLU then a 2x2, stride-2 max-pool (floor mode); differentiable to any order by autograd.

    Shapes:
        x: (N, C, H, W) -> (N, C, H // 2, W // 2)
    """
    return F.max_pool2d(F.relu(x), 2, 2)
