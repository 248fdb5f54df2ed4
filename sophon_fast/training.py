"""Plain supervised training and accuracy on in-memory tensors: pre-training and test passes.

Mini-batches are drawn from a seeded ``torch.Generator`` permutation per epoch, so two runs with
the same seed see the same batches. Test passes run in eval mode (BatchNorm running statistics)
and never drop the last partial batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._progress import progress as progress_bar


def as_tensors(data) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of an ImageDataset, a TensorDataset or an (x, y) pair."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    if hasattr(data, "tensors"):
        images, labels = data.tensors[:2]
        return images, labels
    raise TypeError(
        f"expected an (images, labels) pair, an ImageDataset or a TensorDataset, got {type(data).__name__}"
    )


@torch.no_grad()
def accuracy(model: nn.Module, data, *, device=None, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent of ``model`` (eval mode) on ``data``; the model's mode is restored.

    Args:
        model: a classifier returning logits (batch, classes).
        data: (images (N, ...), labels (N,)) or a dataset with ``.tensors``.
        device: where to run (default: the model's device).
        batch_size: evaluation batch size; the last partial batch is kept.
    """
    images, labels = as_tensors(data)
    if len(labels) == 0:
        raise ValueError("accuracy: the evaluation data is empty")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(labels), batch_size):
            x = images[start : start + batch_size].to(device=device, dtype=dtype)
            y = labels[start : start + batch_size].to(device)
            correct += (model(x).argmax(dim=1) == y).sum().item()
    finally:
        model.train(was_training)
    return 100.0 * correct / len(labels)


def train_classifier(
    model: nn.Module,
    data,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    device=None,
    progress: bool = False,
    description: str = "train",
) -> list[float]:
    """Train ``model`` in place with Adam and cross-entropy; returns the mean loss per epoch.

    Args:
        model: classifier to train (moved to ``device``).
        data: (images (N, ...), labels (N,)) or a dataset with ``.tensors``.
        epochs: passes over the data (>= 1).
        lr: Adam learning rate.
        batch_size: mini-batch size; the last partial batch of each epoch is kept.
        seed: seeds the batch order.
        device: where to train (default: the model's device).
        progress: show a tqdm bar over epochs.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    images, labels = as_tensors(data)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).train()
    dtype = next(model.parameters()).dtype
    images, labels = images.to(device=device, dtype=dtype), labels.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in progress_bar(range(epochs), desc=description, enabled=progress):
        order = torch.randperm(len(labels), generator=generator).to(device)
        total = 0.0
        for start in range(0, len(labels), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        losses.append(total / len(labels))
    return losses
