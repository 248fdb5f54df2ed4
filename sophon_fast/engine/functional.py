"""Stateless forward of a module over views of flat parameter and statistics buffers.

``FunctionalModel(module, layout)(params, stats, counters, x, train=...)`` runs ``module`` through
:func:`torch.func.functional_call` with every parameter replaced by a view of ``params``
(n_params,) and every buffer by a view of ``stats`` (n_stats,) / ``counters`` (n_counters,).
The module's own tensors are never read or written.

BatchNorm in train mode normalises with batch statistics and updates ``running_mean`` /
``running_var`` in place with ``(1 - momentum) * running + momentum * batch`` and increments
``num_batches_tracked``; functional_call swaps our views in, so those in-place updates land in
the flat ``stats`` / ``counters`` buffers exactly as they would in the module's own buffers
(tests check it bit for bit). Gradients flow through the parameter views to ``params``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from sophon_fast.engine.flat import FlatLayout

__all__ = ["FunctionalModel", "to_channels_last"]


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A 4-D (N, C, H, W) tensor with NHWC strides, even for C == 1 (where ``contiguous(
    memory_format=channels_last)`` keeps NCHW strides and convolutions then stay NCHW); other
    ranks unchanged."""
    if x.dim() != 4 or x.stride(1) == 1:
        return x
    return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)


class FunctionalModel:
    """Callable ``(params, stats, counters, x, train) -> logits`` over flat buffers.

    Shapes: params (n_params,), stats (n_stats,), counters (n_counters,), x (batch, ...) ->
    logits (batch, classes).
    """

    def __init__(self, module: nn.Module, layout: FlatLayout) -> None:
        self.module = module
        self.layout = layout

    def __call__(
        self,
        params: torch.Tensor,
        stats: torch.Tensor,
        counters: torch.Tensor,
        x: torch.Tensor,
        *,
        train: bool,
    ) -> torch.Tensor:
        if self.module.training != train:
            self.module.train(train)
        tensors = self.layout.param_views(params)
        tensors.update(self.layout.stat_views(stats))
        tensors.update(self.layout.counter_views(counters))
        return functional_call(self.module, tensors, (x,), tie_weights=True, strict=True)
