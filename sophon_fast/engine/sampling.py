"""Data and randomness shared by both engines, so they consume the RNG identically.

Every random choice of a protection run is drawn here, from ONE seeded CPU ``torch.Generator``,
in a fixed order per fine-tuning simulation:

1. ``inner_steps`` restricted batches of ``batch_size`` (an :class:`EpochSampler`: a fresh random
   permutation per epoch, every batch full: when fewer than ``batch_size`` samples remain, the
   remainder is skipped and a new epoch starts; the official code instead ran the simulation
   with one batch fewer whenever its iterator wrapped);
2. for each batch, a random adapt / evaluate split (``adapt_size`` adapt samples chosen without
   replacement, the rest evaluate; both keep the batch's order, as the official boolean masks);
3. the re-initialised head values (Xavier-uniform weight, zero bias), when the head is re-drawn;
4. the adversary, when there are several and one is sampled per simulation.

NTR batches come from a second :class:`EpochSampler` over the original data on the same
generator. The engines receive the drawn tensors and never touch the generator.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from sophon_fast.models.head import xavier_head_values

__all__ = ["EpochSampler", "SimulationDraw", "as_tensors", "draw_split", "masks_to_indices"]


def as_tensors(data, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise classification data as ``(images, labels)`` tensors.

    Accepts an ``(x, y)`` pair of tensors, an object with a ``.tensors`` pair (``ImageDataset``,
    ``TensorDataset``), a ``DataLoader`` (iterated once, batches concatenated) or any map-style
    ``Dataset`` whose items are ``(x, y)``.

    Returns:
        images: (N, ...) tensor; labels: (N,) tensor (validated by the caller).

    Raises:
        TypeError: anything else.
        ValueError: a dataset or loader yields nothing.
    """
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
    ):
        return data[0], data[1]
    tensors = getattr(data, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) == 2:
        return tensors[0], tensors[1]
    if isinstance(data, DataLoader):
        xs, ys = [], []
        for batch in data:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(
                    f"{name}: the DataLoader must yield (x, y) batches, got {type(batch).__name__}"
                )
            xs.append(torch.as_tensor(batch[0]))
            ys.append(torch.as_tensor(batch[1]))
        if not xs:
            raise ValueError(
                f"{name}: the DataLoader yielded no batches; expected a non-empty data set"
            )
        return torch.cat(xs), torch.cat(ys)
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        if len(data) == 0:
            raise ValueError(f"{name}: the Dataset is empty; expected at least one sample")
        items = [_pair(data[i], i, name) for i in range(len(data))]
        xs = torch.stack([torch.as_tensor(item[0]) for item in items])
        ys = torch.as_tensor(
            [_label(item[1], i, name) for i, item in enumerate(items)], dtype=torch.int64
        )
        return xs, ys
    raise TypeError(
        f"{name}: expected an (images, labels) tensor pair, a Dataset or a DataLoader; got {type(data).__name__}"
    )


def _pair(item, index: int, name: str):
    """A map-style dataset's item must be an (x, y) pair (a dict item raised KeyError: 0)."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise TypeError(
            f"{name}: dataset item {index} is a {type(item).__name__}"
            f"{f' of length {len(item)}' if isinstance(item, (tuple, list)) else ''}; "
            "expected an (x, y) pair"
        )
    return item


def _label(value, index: int, name: str) -> int:
    """An integer class index; a float label (1.7) was truncated to 1 silently."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(
                f"{name}: dataset item {index} has a {value.dtype} label {value.item()!r}; "
                "expected an integer class index"
            )
        return int(value.item())
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise ValueError(
        f"{name}: dataset item {index} has the label {value!r} ({type(value).__name__}); "
        "expected an integer class index"
    )


class EpochSampler:
    """Full batches of indices into N samples, a fresh permutation per epoch (drop-last epochs).

    State (for checkpoints): ``permutation`` (N,) int64 and ``position``.
    """

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n = n
        self.generator = generator
        self.permutation = torch.randperm(n, generator=generator)
        self.position = 0

    def next(self, batch_size: int) -> torch.Tensor:
        """(batch_size,) int64 CPU indices."""
        if batch_size > self.n:
            raise ValueError(f"batch of {batch_size} requested from {self.n} samples")
        if self.position + batch_size > self.n:
            self.permutation = torch.randperm(self.n, generator=self.generator)
            self.position = 0
        out = self.permutation[self.position : self.position + batch_size]
        self.position += batch_size
        return out

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint under ``prefix``."""
        return {
            f"{prefix}.permutation": self.permutation.clone(),
            f"{prefix}.position": torch.tensor([self.position], dtype=torch.int64),
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        """Restore from :meth:`state_tensors` output."""
        permutation = tensors[f"{prefix}.permutation"]
        if permutation.numel() != self.n:
            raise ValueError(
                f"checkpoint sampler {prefix!r} covers {permutation.numel()} samples, data has {self.n}"
            )
        self.permutation = permutation.clone().to(torch.int64)
        self.position = int(tensors[f"{prefix}.position"][0])


def draw_split(
    batch_size: int, adapt_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random adapt / evaluate split of one batch: two complementary (batch_size,) bool masks."""
    chosen = torch.randperm(batch_size, generator=generator)[:adapt_size]
    adapt = torch.zeros(batch_size, dtype=torch.bool)
    adapt[chosen] = True
    return adapt, ~adapt


def masks_to_indices(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Boolean (batch,) mask -> int64 indices on ``device`` (computed on the CPU: no device sync)."""
    return mask.detach().to("cpu").nonzero().squeeze(1).to(device)


@dataclass
class SimulationDraw:
    """Everything random about one fine-tuning simulation.

    Attributes:
        batches: ``inner_steps`` pairs (x: (batch, ...), y: (batch,)) on the device.
        adapt_masks / eval_masks: ``inner_steps`` (batch,) bool CPU masks.
        head_values: parameter name -> replacement value (the re-drawn head), or None.
        adversaries: the adversaries to simulate (one, or all of them to average).
    """

    batches: list[tuple[torch.Tensor, torch.Tensor]]
    adapt_masks: list[torch.Tensor]
    eval_masks: list[torch.Tensor]
    head_values: dict[str, torch.Tensor] | None
    adversaries: Sequence


def draw_simulation(
    *,
    images: torch.Tensor,
    labels: torch.Tensor,
    sampler: EpochSampler,
    generator: torch.Generator,
    inner_steps: int,
    batch_size: int,
    adapt_size: int,
    head: tuple[str, torch.nn.Linear] | None,
    adversaries: Sequence,
    sample_one: bool,
) -> SimulationDraw:
    """Draw one simulation's batches, splits, head values and adversary (order in module docs)."""
    batches, adapt_masks, eval_masks = [], [], []
    for _ in range(inner_steps):
        index = sampler.next(batch_size).to(images.device)
        batches.append((images.index_select(0, index), labels.index_select(0, index)))
        adapt, evaluate = draw_split(batch_size, adapt_size, generator)
        adapt_masks.append(adapt)
        eval_masks.append(evaluate)
    head_values = None
    if head is not None:
        name, linear = head
        weight, bias = xavier_head_values(linear, generator=generator)
        prefix = f"{name}." if name else ""  # "" when the model itself is the head Linear
        head_values = {f"{prefix}weight": weight}
        if bias is not None:
            head_values[f"{prefix}bias"] = bias
    chosen = list(adversaries)
    if sample_one and len(chosen) > 1:
        chosen = [chosen[int(torch.randint(len(chosen), (1,), generator=generator))]]
    return SimulationDraw(batches, adapt_masks, eval_masks, head_values, chosen)
