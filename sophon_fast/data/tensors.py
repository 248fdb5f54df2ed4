"""Materialise user data as tensors: classification ``(images, labels)`` pairs and image batches.

Below the engine and the attacks (both read user data the same way); nothing here draws randomness.
"""

from __future__ import annotations

import numbers

import torch
from torch.utils.data import DataLoader, Dataset

from sophon_fast.data.dataset import ImageDataset
from sophon_fast.diffusion import to_model_range

__all__ = ["as_images", "as_tensors"]


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


def as_images(data, name: str) -> torch.Tensor:
    """Images (N, C, H, W) from a tensor, an ``(images, labels)`` pair, a Dataset/DataLoader of
    ``(x, y)`` or an object with ``.tensors`` (labels are ignored), taken as given (the model's
    range); an :class:`~sophon_fast.data.ImageDataset` (documented [0, 1], what the CLI's data
    specs load) is mapped to [-1, 1], the range of :mod:`sophon_fast.diffusion`."""
    if isinstance(data, ImageDataset):
        images = to_model_range(data.images)
    elif isinstance(data, torch.Tensor):
        images = data
    else:
        tensors = getattr(data, "tensors", None)
        if isinstance(tensors, (tuple, list)) and len(tensors) == 1:
            images = tensors[0]
        else:
            images = as_tensors(data, name)[0]
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected image tensors, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(
            f"{name}: expected images (N, channels, height, width), got shape {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"{name}: expected floating-point images (in the model's range, [-1, 1] for "
            f"sophon_fast.diffusion), got {images.dtype}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{name}: no images")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name}: images contain NaN or infinite values")
    return images
