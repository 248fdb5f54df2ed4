"""Module-level entry to the fused ops: :func:`convert_batchnorm`.

The swap changes a BatchNorm2d's class, not its state: parameters, buffers (running statistics,
``num_batches_tracked``) and ``state_dict`` keys stay the same objects, so optimisers, flat
parameter views and checkpoints keep working.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops.batch_norm import batch_norm2d

__all__ = ["FusedBatchNorm2d", "convert_batchnorm"]


class FusedBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode forward is :func:`sophon_fast.ops.batch_norm.batch_norm2d`.

    Identical semantics to nn.BatchNorm2d (momentum, momentum=None cumulative averaging,
    ``num_batches_tracked``, eval with running statistics, track_running_stats=False); eval mode
    runs ``F.batch_norm`` unchanged (an affine map, nothing to fuse).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, channels, height, width) -> same shape."""
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not batch_stats:
            return F.batch_norm(
                x,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                False,
                factor,
                self.eps,
            )
        track = not self.training or self.track_running_stats
        return batch_norm2d(
            x,
            self.weight,
            self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            factor,
            self.eps,
        )


def convert_batchnorm(model: nn.Module) -> nn.Module:
    """Swap every ``nn.BatchNorm2d`` in ``model`` for :class:`FusedBatchNorm2d`, in place.

    Only the class changes: no parameter, buffer or ``state_dict`` key is touched, so the call is
    safe on a model already handed to an optimiser or a flat-parameter engine. Subclasses of
    BatchNorm2d other than the exact class are left alone (their forward may differ).

    Args:
        model: any module (itself a BatchNorm2d or containing some).

    Returns:
        ``model`` (the same object), for chaining.
    """
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = FusedBatchNorm2d
    return model
