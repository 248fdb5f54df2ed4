"""relu_maxpool2d, pure-torch twin: ``max_pool2d(relu(x), 2, 2)`` as eager modules compute it.

Also the pure-torch forms of the fused op's three kernels (:mod:`sophon_fast.ops.relu_pool`):
the forward writes y and a per-window code (the position 0..3 of the window's first maximum m in
row-major order, or -1 where m <= 0 and the ReLU passes no gradient), the scatter S puts a
pooled gradient at the coded positions and the gather G, its transpose, reads them back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "relu_maxpool2d",
    "relu_maxpool2d_forward",
    "relu_maxpool2d_gather",
    "relu_maxpool2d_scatter",
]


def relu_maxpool2d(x: torch.Tensor) -> torch.Tensor:
    """ReLU then a 2x2, stride-2 max-pool (floor mode); differentiable to any order by autograd.

    Shapes:
        x: (N, C, H, W) -> (N, C, H // 2, W // 2)
    """
    return F.max_pool2d(F.relu(x), 2, 2)


def relu_maxpool2d_forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, code), both (N, C, H // 2, W // 2) in x's dtype: y = relu(m) for each window's maximum
    m (max_pool2d's tie and NaN rules), code its window position 0..3, -1 where m <= 0."""
    width = x.shape[3]
    m, index = F.max_pool2d(x, 2, 2, return_indices=True)
    position = (index // width % 2) * 2 + index % width % 2
    code = torch.where(m <= 0, -1, position).to(x.dtype)
    return F.relu(m), code


def _windows(t: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
    """(N, C, oh, ow, 4): the 2x2 windows of t's top-left (2 oh, 2 ow) corner, row-major."""
    n, c = t.shape[:2]
    t = t[:, :, : 2 * oh, : 2 * ow].reshape(n, c, oh, 2, ow, 2)
    return t.permute(0, 1, 2, 4, 3, 5).reshape(n, c, oh, ow, 4)


def relu_maxpool2d_scatter(
    grad_y: torch.Tensor, code: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """S: (N, C, height, width), grad_y (N, C, OH, OW) at each window's coded position, 0
    elsewhere (a -1 code, and an odd last row or column, get none)."""
    n, c, oh, ow = grad_y.shape
    picked = code.long().unsqueeze(-1) == torch.arange(4, device=code.device)
    windows = torch.where(picked, grad_y.unsqueeze(-1), torch.zeros((), dtype=grad_y.dtype))
    dx = windows.reshape(n, c, oh, ow, 2, 2).permute(0, 1, 2, 4, 3, 5)
    dx = dx.reshape(n, c, 2 * oh, 2 * ow)
    return F.pad(dx, (0, width - 2 * ow, 0, height - 2 * oh))


def relu_maxpool2d_gather(v: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """G = S^T: (N, C, OH, OW), v (N, C, H, W) at each window's coded position, 0 for -1."""
    oh, ow = code.shape[2:]
    index = code.long()
    picked = _windows(v, oh, ow).gather(-1, index.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(index >= 0, picked, torch.zeros((), dtype=v.dtype))
