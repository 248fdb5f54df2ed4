"""Module-level entry to the fused ops: :func:`convert_batchnorm`, :func:`fuse_bn_relu_pool`.

The swap changes a BatchNorm2d's class, not its state: parameters, buffers (running statistics,
``num_batches_tracked``) and ``state_dict`` keys stay the same objects, so optimisers, flat
parameter views and checkpoints keep working. :func:`fuse_bn_relu_pool` also turns the ReLU and
MaxPool2d that follow a BatchNorm2d in an ``nn.Sequential`` into ``nn.Identity`` (neither holds
state), the BatchNorm2d then computing all three.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops.batch_norm import batch_norm2d
from .ops.bn_relu_pool import batch_norm_relu_maxpool2d
from .ops.relu_pool import relu_maxpool2d

__all__ = [
    "FusedBatchNorm2d",
    "FusedBatchNormReLUMaxPool2d",
    "convert_batchnorm",
    "FusedReLUMaxPool2d",
    "fuse_bn_relu_pool",
    "fuse_relu_pool",
]


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


class FusedBatchNormReLUMaxPool2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that also applies ReLU and MaxPool2d(2, 2): the three modules in one.

    Training mode with batch statistics runs
    :func:`sophon_fast.ops.bn_relu_pool.batch_norm_relu_maxpool2d` (running statistics,
    momentum=None cumulative averaging and ``num_batches_tracked`` as nn.BatchNorm2d); eval mode
    with running statistics runs the eager ``max_pool2d(relu(batch_norm(x)), 2, 2)`` unchanged.
    Made by :func:`fuse_bn_relu_pool`, which replaces the ReLU and MaxPool2d by ``nn.Identity``.

    Shapes:
        x: (batch, channels, height, width) -> (batch, channels, height // 2, width // 2)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, channels, height, width) -> (batch, channels, height // 2, width // 2)."""
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not batch_stats:
            z = F.batch_norm(
                x,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                False,
                factor,
                self.eps,
            )
            return F.max_pool2d(F.relu(z), 2, 2)
        track = not self.training or self.track_running_stats
        return batch_norm_relu_maxpool2d(
            x,
            self.weight,
            self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            factor,
            self.eps,
        )


def _fuse_runs(model: nn.Module, length: int, matches, fused) -> nn.Module:
    """In every ``nn.Sequential`` of ``model``, each run of ``length`` consecutive children with
    ``matches(*children)`` true becomes ``fused(first child)`` followed by ``nn.Identity``s (the
    container keeps its child names); runs are taken left to right, without overlap."""
    for container in list(model.modules()):
        if type(container) is not nn.Sequential:
            continue
        names = list(container._modules)
        i = 0
        while i + length <= len(names):
            run = names[i : i + length]
            if matches(*(container._modules[n] for n in run)):
                container._modules[run[0]] = fused(container._modules[run[0]])
                for name in run[1:]:
                    container._modules[name] = nn.Identity()
                i += length
            else:
                i += 1
    return model


def _is_pool_2x2(module: nn.Module) -> bool:
    """An exact nn.MaxPool2d with kernel 2, stride 2, no padding, dilation 1, floor, no indices."""

    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    return (
        type(module) is nn.MaxPool2d
        and pair(module.kernel_size) == (2, 2)
        and pair(module.stride if module.stride is not None else module.kernel_size) == (2, 2)
        and pair(module.padding) == (0, 0)
        and pair(module.dilation) == (1, 1)
        and not module.ceil_mode
        and not module.return_indices
    )


def fuse_bn_relu_pool(model: nn.Module) -> nn.Module:
    """Fuse every BatchNorm2d -> ReLU -> MaxPool2d(2, 2) run of an ``nn.Sequential``, in place.

    Inside each ``nn.Sequential`` of ``model`` (SmallCNN's ``features`` among them), three
    consecutive children that are exactly nn.BatchNorm2d (or :class:`FusedBatchNorm2d`), nn.ReLU
    and nn.MaxPool2d with kernel 2, stride 2, no padding, dilation 1, floor mode and no indices
    become one :class:`FusedBatchNormReLUMaxPool2d` (the BatchNorm2d object, its class swapped)
    followed by two ``nn.Identity``. An in-place ReLU fuses too: there it overwrites the
    BatchNorm output, a temporary no other module sees. Nothing else changes: no parameter,
    buffer or ``state_dict`` key is touched (ReLU and MaxPool2d hold none), so flat-parameter
    views, optimisers, checkpoints and ``torch.func.functional_call`` keep working. Runs that do
    not match (other pool geometry, BatchNorm subclasses, other activations, modules called
    outside a Sequential) are left as they are and compute exactly as before.

    Args:
        model: any module.

    Returns:
        ``model`` (the same object), for chaining.
    """

    def matches(bn, relu, pool):
        return (
            type(bn) in (nn.BatchNorm2d, FusedBatchNorm2d)
            and type(relu) is nn.ReLU
            and _is_pool_2x2(pool)
        )

    def fused(bn):
        bn.__class__ = FusedBatchNormReLUMaxPool2d
        return bn

    return _fuse_runs(model, 3, matches, fused)


class FusedReLUMaxPool2d(nn.Module):
    """ReLU followed by MaxPool2d(2, 2) as :func:`sophon_fast.ops.relu_pool.relu_maxpool2d`.

    Exactly the eager pair's values and derivatives of every order (the op's backward is itself
    differentiable), with one pass over the input instead of three; holds no parameters.

    Shapes:
        x: (N, C, H, W) -> (N, C, H // 2, W // 2)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu_maxpool2d(x)


def fuse_relu_pool(model: nn.Module) -> nn.Module:
    """Fuse every ReLU -> MaxPool2d(2, 2) pair of an ``nn.Sequential`` into one module, in place.

    Inside each ``nn.Sequential`` of ``model``, two consecutive children that are exactly nn.ReLU
    (in place or not: there it only overwrites a temporary) and an nn.MaxPool2d with kernel 2,
    stride 2, no padding, dilation 1, floor mode and no indices become a
    :class:`FusedReLUMaxPool2d` followed by an ``nn.Identity``. Neither module holds parameters
    or buffers, so ``state_dict`` keys, flat-parameter views and checkpoints are unchanged.
    Run after :func:`fuse_bn_relu_pool` when both apply (that one takes the BatchNorm too).

    Args:
        model: any module.

    Returns:
        ``model`` (the same object), for chaining.
    """

    def matches(relu, pool):
        return type(relu) is nn.ReLU and _is_pool_2x2(pool)

    return _fuse_runs(model, 2, matches, lambda relu: FusedReLUMaxPool2d())
