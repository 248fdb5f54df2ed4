"""FlatParams: every parameter of a module as a view of ONE contiguous buffer.

Three buffers describe a module's whole mutable state:

- ``params``   (n_params,)  every parameter, in ``named_parameters()`` order (tied parameters once);
- ``stats``    (n_stats,)   every floating-point buffer: BatchNorm ``running_mean`` / ``running_var``
                            (and any other float buffer, so nothing is left behind);
- ``counters`` (n_counters,) int64, every integer buffer: BatchNorm ``num_batches_tracked``. It is
                            kept explicitly because BatchNorm with ``momentum=None`` averages with
                            1 / num_batches_tracked, so it changes results.

With flat buffers a clone, a backup, a restore or a BatchNorm snapshot is one ``copy_`` (8 B/param
at float32) instead of one small kernel per tensor, and an inner optimizer step is one elementwise
op over the whole model. Views for :func:`torch.func.functional_call` come from
:meth:`FlatLayout.param_views` and friends; :meth:`FlatParams.write_to` puts values back into a
module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["FlatLayout", "FlatParams"]


@dataclass(frozen=True)
class _Segment:
    name: str
    offset: int
    shape: torch.Size

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


def _segments(named: list[tuple[str, torch.Tensor]]) -> tuple[tuple[_Segment, ...], int]:
    out, offset = [], 0
    for name, tensor in named:
        out.append(_Segment(name, offset, tensor.shape))
        offset += tensor.numel()
    return tuple(out), offset


class FlatLayout:
    """Name -> slice maps of the three flat buffers of a module (see the module docstring)."""

    def __init__(self, module: nn.Module) -> None:
        named_params = list(module.named_parameters())
        float_buffers = [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
        int_buffers = [(n, b) for n, b in module.named_buffers() if not b.is_floating_point()]
        dtypes = {p.dtype for _, p in named_params} | {b.dtype for _, b in float_buffers}
        if len(dtypes) > 1:
            raise ValueError(
                f"FlatParams needs one floating dtype for all parameters and float buffers; "
                f"found {sorted(str(d) for d in dtypes)} (convert the model with .to(dtype) first)"
            )
        if not named_params:
            raise ValueError(f"{type(module).__name__} has no parameters to protect")
        self.param_segments, self.n_params = _segments(named_params)
        self.stat_segments, self.n_stats = _segments(float_buffers)
        self.counter_segments, self.n_counters = _segments(int_buffers)
        self._param_index = {s.name: s for s in self.param_segments}

    @property
    def param_names(self) -> list[str]:
        """Parameter names in buffer order."""
        return [s.name for s in self.param_segments]

    def param_slice(self, name: str) -> slice:
        """Slice of parameter ``name`` in the (n_params,) buffer."""
        return self._param_index[name].slice

    @staticmethod
    def _views(flat: torch.Tensor, segments: tuple[_Segment, ...]) -> dict[str, torch.Tensor]:
        if not segments:
            return {}
        pieces = torch.split(flat, [s.numel for s in segments])
        return {s.name: piece.view(s.shape) for s, piece in zip(segments, pieces)}

    def param_views(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> view of the (n_params,) vector ``params`` (differentiable: views keep the graph)."""
        return self._views(params, self.param_segments)

    def stat_views(self, stats: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> view of the (n_stats,) buffer; in-place BatchNorm updates land in ``stats``."""
        return self._views(stats, self.stat_segments)

    def counter_views(self, counters: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> 0-d view of the (n_counters,) int64 buffer."""
        return self._views(counters, self.counter_segments)

    def unflatten(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> tensor for every parameter: the views of ``params``, as a dict."""
        return self.param_views(params)


def _flatten(tensors: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.cat([t.detach().reshape(-1) for t in tensors]).to(dtype=dtype, device=device)


class FlatParams:
    """The parameters, float buffers and integer buffers of a module in three flat buffers.

    Attributes:
        layout: the :class:`FlatLayout` (names, offsets, shapes).
        params: (n_params,) parameters.
        stats: (n_stats,) float buffers (BatchNorm running statistics).
        counters: (n_counters,) int64 buffers (BatchNorm ``num_batches_tracked``).
    """

    def __init__(
        self, layout: FlatLayout, params: torch.Tensor, stats: torch.Tensor, counters: torch.Tensor
    ) -> None:
        self.layout = layout
        self.params = params
        self.stats = stats
        self.counters = counters

    @classmethod
    def from_module(cls, module: nn.Module, layout: FlatLayout | None = None) -> FlatParams:
        """Copy ``module``'s current state into new flat buffers on the module's device."""
        layout = layout or FlatLayout(module)
        params = [p for _, p in module.named_parameters()]
        buffers = dict(module.named_buffers())
        device, dtype = params[0].device, params[0].dtype
        return cls(
            layout,
            _flatten(params, dtype, device),
            _flatten([buffers[s.name] for s in layout.stat_segments], dtype, device),
            _flatten([buffers[s.name] for s in layout.counter_segments], torch.int64, device),
        )

    def clone(self) -> FlatParams:
        """Independent copy: one copy per buffer."""
        return FlatParams(
            self.layout, self.params.detach().clone(), self.stats.clone(), self.counters.clone()
        )

    def copy_from(self, other: FlatParams) -> None:
        """Overwrite these buffers in place with ``other``'s values (a restore: one copy each)."""
        with torch.no_grad():
            self.params.copy_(other.params)
            self.stats.copy_(other.stats)
            self.counters.copy_(other.counters)

    def write_to(self, module: nn.Module) -> None:
        """Copy the flat values into ``module``'s own parameters and buffers (in place)."""
        with torch.no_grad():
            named_params = dict(module.named_parameters())
            for name, view in self.layout.param_views(self.params.detach()).items():
                named_params[name].copy_(view)
            buffers = dict(module.named_buffers())
            for name, view in self.layout.stat_views(self.stats).items():
                buffers[name].copy_(view)
            for name, view in self.layout.counter_views(self.counters).items():
                buffers[name].copy_(view)

    def named_params(self, params: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """name -> detached copy of each parameter (of ``params`` if given, else of ``self.params``)."""
        source = self.params if params is None else params
        return {n: v.detach().clone() for n, v in self.layout.param_views(source).items()}
