"""One fine-tuning attack: train a copy of a model on restricted data and record test accuracy.

The official SOPHON evaluation (``finetune_test.py``) fine-tunes every parameter with the existing
head, SGD momentum 0.9, weight decay 1e-4, constant lr, and reports restricted test accuracy after
every epoch. :class:`FineTuneAttack` defaults to that; unlike the official loaders, test passes
keep the last partial batch.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .._progress import progress as progress_bar
from ..training import accuracy, as_tensors

OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class FineTuneAttack:
    """Full fine-tuning of every parameter on labelled restricted data.

    Attributes:
        optimizer: "sgd" (with ``momentum``, ``nesterov``) or "adam".
        lr: constant learning rate.
        momentum: SGD momentum (official 0.9).
        weight_decay: L2 coefficient (official 1e-4).
        epochs: passes over the restricted training data.
        batch_size: mini-batch size; the last partial batch of each epoch is kept.
    """

    optimizer: str = "sgd"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 20
    batch_size: int = 200

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"FineTuneAttack.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"
            )
        if not self.lr > 0:
            raise ValueError(f"FineTuneAttack.lr must be > 0, got {self.lr}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError(
                f"FineTuneAttack needs epochs >= 0 and batch_size >= 1, got {self.epochs}, {self.batch_size}"
            )

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )


def finetune(
    model: nn.Module,
    train,
    test,
    attack: FineTuneAttack = FineTuneAttack(),
    *,
    seed: int = 0,
    device=None,
    progress: bool = False,
    description: str = "fine-tune",
) -> list[float]:
    """Fine-tune a copy of ``model`` and return restricted test accuracy (%) per epoch.

    Args:
        model: the model under attack (not modified: a deep copy is trained).
        train: restricted training data, (images, labels) or a dataset with ``.tensors``.
        test: restricted test data, same forms.
        attack: the fine-tuning recipe.
        seed: seeds the batch order.
        device: where to run (default: the model's device).
        progress: show a tqdm bar over epochs.

    Returns:
        ``attack.epochs + 1`` accuracies: before fine-tuning (epoch 0), then after each epoch.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    victim = copy.deepcopy(model).to(device)
    dtype = next(victim.parameters()).dtype
    images, labels = as_tensors(train)
    images, labels = images.to(device=device, dtype=dtype), labels.to(device)
    optimizer = attack.make_optimizer(victim.parameters())
    generator = torch.Generator().manual_seed(seed)
    curve = [accuracy(victim, test, device=device)]
    for _ in progress_bar(range(attack.epochs), desc=description, enabled=progress):
        victim.train()
        order = torch.randperm(len(labels), generator=generator).to(device)
        for start in range(0, len(labels), attack.batch_size):
            index = order[start : start + attack.batch_size]
            loss = F.cross_entropy(victim(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        curve.append(accuracy(victim, test, device=device))
    return curve
