"""The image-set container and the helpers every on-disk loader shares.

:class:`ImageDataset` holds ``images: (N, C, H, W)`` float32 in ``[0, 1]`` and ``labels: (N,)``
int64 in ``[0, num_classes)``; every loader of :mod:`sophon_fast.data` returns one.
:func:`resize_images` and :func:`set_channels` bring a set to the size and channel count a model
expects. The private helpers (split check, folder lookup, uint8 scaling, the final resize +
channel + wrap step) are shared by the format modules (:mod:`~sophon_fast.data.cifar`,
:mod:`~sophon_fast.data.idx`, :mod:`~sophon_fast.data.stl10`,
:mod:`~sophon_fast.data.image_folder`, :mod:`~sophon_fast.data.npz`) so that each reports errors
and scales pixels the same way.

Resizing is bilinear (``torch.nn.functional.interpolate``, ``align_corners=False``), antialiased
when shrinking so that a 96x96 STL-10 image brought down to 32x32 does not alias.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sophon_fast.data.checks import check_classification_data

__all__ = ["ImageDataset", "ImageSize", "PathLike", "resize_images", "set_channels"]

# typing.Union, not "|": these aliases are evaluated at import and the package supports 3.9.
PathLike = Union[str, os.PathLike]
ImageSize = Union[int, tuple[int, int]]

_SPLITS = ("train", "test")
# ITU-R BT.601 luma, the weights PIL's convert("L") uses, so that RGB -> grey here matches PIL.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)


class ImageDataset(Dataset):
    """An in-memory labelled image set.

    Attributes:
        images: ``(N, C, H, W)`` float32 in ``[0, 1]``.
        labels: ``(N,)`` int64 in ``[0, num_classes)``.
        num_classes: number of classes (may exceed the labels present, e.g. in a small subset).
        name: what the set is called in messages and reports (``"mnist5k/train"``).
        class_names: optional ``num_classes`` names, index ``i`` naming label ``i``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        name: str = "data",
        class_names: Sequence[str] | None = None,
    ) -> None:
        """Validate and hold the tensors (no copy); raises ``ValueError`` on bad data."""
        check_classification_data(images, labels, num_classes=num_classes, name=name)
        if images.ndim != 4:
            raise ValueError(
                f"{name}: images have shape {tuple(images.shape)}; expected (N, C, H, W)"
            )
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"{name}: {len(class_names)} class names for {num_classes} classes; "
                "expected one name per class"
            )
        self.images = images.to(torch.float32)
        self.labels = labels.to(torch.int64)
        self.num_classes = int(num_classes)
        self.name = name
        self.class_names = tuple(class_names) if class_names is not None else None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(image: (C, H, W), label: ())``."""
        return self.images[index], self.labels[index]

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images: (N, C, H, W), labels: (N,))``, the held tensors themselves (no copy)."""
        return self.images, self.labels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> ImageDataset:
        """Return a new set with the images at ``indices`` (ints or a boolean mask of length N).

        Same ``num_classes``, ``name`` and ``class_names``; the tensors are copies. An empty
        selection raises ``ValueError`` (an empty set cannot be trained or evaluated on).
        """
        index = torch.as_tensor(np.asarray(indices) if not torch.is_tensor(indices) else indices)
        if index.dtype != torch.bool:
            index = index.to(torch.int64)
        return ImageDataset(
            self.images[index],
            self.labels[index],
            self.num_classes,
            name=self.name,
            class_names=self.class_names,
        )

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, size={len(self)}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes})"
        )


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _as_hw(image_size: ImageSize) -> tuple[int, int]:
    if isinstance(image_size, int):
        height = width = image_size
    else:
        height, width = (int(v) for v in image_size)
    if height < 1 or width < 1:
        raise ValueError(f"image_size is {image_size!r}; expected positive height and width")
    return height, width


def resize_images(images: torch.Tensor, image_size: ImageSize) -> torch.Tensor:
    """Bilinearly resize ``images: (N, C, H, W)`` to ``image_size`` (an int or ``(H, W)``).

    Antialiased when shrinking; clamped to ``[0, 1]``; returns the input itself when the size
    already matches.
    """
    height, width = _as_hw(image_size)
    if images.shape[-2:] == (height, width):
        return images
    shrinking = height < images.shape[-2] or width < images.shape[-1]
    resized = F.interpolate(
        images, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking
    )
    return resized.clamp_(0.0, 1.0)


def set_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    """Return ``images: (N, C, H, W)`` with ``channels`` channels (``None`` keeps C).

    Grey to RGB repeats the one channel; RGB to grey takes BT.601 luma (as PIL's ``convert("L")``).
    """
    if channels is None or images.shape[1] == channels:
        return images
    if channels == 3 and images.shape[1] == 1:
        return images.repeat(1, 3, 1, 1)
    if channels == 1 and images.shape[1] == 3:
        weights = torch.tensor(_LUMA_WEIGHTS, dtype=images.dtype).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True).clamp_(0.0, 1.0)
    raise ValueError(
        f"cannot turn {images.shape[1]}-channel images into {channels} channels; "
        "expected channels=1 or channels=3 from 1- or 3-channel images"
    )


def _check_split(split: str, allowed: Sequence[str] = _SPLITS) -> None:
    if split not in allowed:
        raise ValueError(f"split is {split!r}; expected one of {', '.join(map(repr, allowed))}")


def _existing_dir(root: PathLike, nested: Sequence[str] = ()) -> Path:
    """``root`` itself, or ``root/<name>`` for the first ``nested`` folder that exists."""
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root}: is a file; expected a folder")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    for name in nested:
        if (root / name).is_dir():
            return root / name
    return root


def _uint8_to_float(array: np.ndarray) -> torch.Tensor:
    # float32 / 255 keeps every 0..255 value within one ulp of k/255, and 0 and 255 exact.
    # astype copies, so read-only inputs (np.frombuffer, cached arrays) are never shared.
    return torch.from_numpy(array.astype(np.float32)).div_(255.0)


def _finish(
    images: torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    num_classes: int,
    name: str,
    image_size: ImageSize | None,
    channels: int | None,
    class_names: Sequence[str] | None = None,
) -> ImageDataset:
    if image_size is not None:
        images = resize_images(images, image_size)
    images = set_channels(images, channels)
    labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return ImageDataset(images, labels, num_classes, name=name, class_names=class_names)
