"""The image-set container and loaders for the on-disk formats users already have.

Every loader returns an :class:`ImageDataset`: ``images: (N, C, H, W)`` float32 in ``[0, 1]``,
``labels: (N,)`` int64 in ``[0, num_classes)``. Nothing here downloads: each loader reads the files
a user already has and raises ``FileNotFoundError`` (file absent) or ``ValueError`` (file present
but not in the expected format) with the path and what was expected.

Formats:

- CIFAR-10 / CIFAR-100 "python version" pickled batches (:func:`load_cifar`);
- MNIST-style IDX files, raw or gzipped (:func:`load_mnist_idx`): MNIST, Fashion-MNIST, KMNIST;
- STL-10 binaries (:func:`load_stl10`);
- one folder per class of image files (:func:`load_image_folder`);
- ``.npz`` arrays (:func:`load_npz`).

Resizing is bilinear (``torch.nn.functional.interpolate``, ``align_corners=False``), antialiased
when shrinking so that a 96x96 STL-10 image brought down to 32x32 does not alias.

The container and the shared helpers live in :mod:`sophon_fast.data.dataset`, each format in its
own module; this module gathers them under the path they have always been imported from.
"""

from __future__ import annotations

from sophon_fast.data.cifar import load_cifar
from sophon_fast.data.dataset import (
    ImageDataset,
    ImageSize,
    PathLike,
    resize_images,
    set_channels,
)
from sophon_fast.data.idx import load_mnist_idx, read_idx
from sophon_fast.data.image_folder import load_image_folder
from sophon_fast.data.npz import load_npz
from sophon_fast.data.stl10 import load_stl10

__all__ = [
    "ImageDataset",
    "ImageSize",
    "PathLike",
    "load_cifar",
    "load_image_folder",
    "load_mnist_idx",
    "load_npz",
    "load_stl10",
    "read_idx",
    "resize_images",
    "set_channels",
]
