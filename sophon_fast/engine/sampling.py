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

With an attacker distribution (``ProtectConfig(adversaries={"families": ...})``) the attacker is
drawn FIRST, before step 1 (its batch size and horizon decide the batches):
:meth:`sophon_fast.reference.adversary_distribution.AdversaryDistribution.draw` documents its
own order; steps 1-3 follow with the drawn batch size, adapt size, horizon and head choice, and
step 4 is skipped.

NTR batches come from a second :class:`EpochSampler` over the original data on the same
generator. The engines receive the drawn tensors and never touch the generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sophon_fast.data.tensors import as_tensors
from sophon_fast.models.head import xavier_head_values
from sophon_fast.reference.adversary_distribution import AdversaryDistribution

__all__ = [
    "EpochSampler",
    "IndexedBatches",
    "SimulationDraw",
    "as_tensors",
    "draw_split",
    "masks_to_indices",
]


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


class IndexedBatches(Sequence):
    """A simulation's K restricted batches, gathered from the data when read.

    Holds the K index tensors (batch_size int64 each) instead of K copies of the images, so a
    draw's memory does not grow with the images' size times K: at K = 200 and batch 150 of
    28x28 float32 images the copies were 94 MB per draw; the indices are 240 KB. Item k is
    ``(images[index_k], labels[index_k])``, the same tensors the copies held; a slice is a list.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: list[torch.Tensor]):
        self.images, self.labels, self.indices = images, labels, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        index = self.indices[k]
        return self.images.index_select(0, index), self.labels.index_select(0, index)


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
        batches: ``inner_steps`` pairs (x: (batch, ...), y: (batch,)) on the device, gathered
            when read (:class:`IndexedBatches`).
        adapt_masks / eval_masks: ``inner_steps`` (batch,) bool CPU masks.
        head_values: parameter name -> replacement value (the re-drawn head), or None.
        adversaries: the adversaries to simulate (one, or all of them to average).
        plan: the drawn attacker (JSON form) under an attacker distribution, else None.
    """

    batches: list[tuple[torch.Tensor, torch.Tensor]]
    adapt_masks: list[torch.Tensor]
    eval_masks: list[torch.Tensor]
    head_values: dict[str, torch.Tensor] | None
    adversaries: Sequence
    plan: dict | None = None


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
    distribution: AdversaryDistribution | None = None,
    reinit_head: bool = True,
) -> SimulationDraw:
    """Draw one simulation's batches, splits, head values and adversary (order in module docs).

    ``head`` is the (name, Linear) a simulation may re-draw; without a distribution it is
    re-drawn whenever given, with one the drawn plan decides (``reinit_head`` is the run's
    setting, used where the distribution leaves the head to it)."""
    plan = None
    if distribution is not None:
        plan = distribution.draw(
            generator, batch_size=batch_size, adapt_size=adapt_size, inner_steps=inner_steps,
            reinit_head=reinit_head and head is not None,
        )  # fmt: skip
        batch_size, adapt_size, inner_steps = plan.batch_size, plan.adapt_size, plan.inner_steps
        if not plan.reinit_head:
            head = None
        adversaries, sample_one = [plan.adversary], False
    indices, adapt_masks, eval_masks = [], [], []
    for _ in range(inner_steps):
        indices.append(sampler.next(batch_size).to(images.device))
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
    record = None if plan is None else plan.to_json()
    batches = IndexedBatches(images, labels, indices)
    return SimulationDraw(batches, adapt_masks, eval_masks, head_values, chosen, record)
