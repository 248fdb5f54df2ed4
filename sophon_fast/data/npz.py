"""Images and labels from a ``.npz`` archive (:func:`load_npz`), read without pickles."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from sophon_fast.data.dataset import (
    ImageDataset,
    ImageSize,
    PathLike,
    _finish,
    _uint8_to_float,
)

__all__ = ["load_npz"]

_CHANNEL_COUNTS = (1, 3)


def load_npz(
    path: PathLike,
    images_key: str = "x",
    labels_key: str = "y",
    *,
    num_classes: int | None = None,
    image_size: ImageSize | None = None,
    channels: int | None = None,
    name: str | None = None,
) -> ImageDataset:
    """Load images and labels from a ``.npz`` file (read with ``allow_pickle=False``).

    The rule for the images array:

    - **scale from the dtype**: unsigned integers (uint8) are pixels in 0..255 and are divided
      by 255; floating-point arrays must already be in ``[0, 1]``; other dtypes are refused.
    - **layout from the channel axis**: 3-D ``(N, H, W)`` is one channel. For 4-D, a channel
      axis has 1 or 3 entries: if only the last axis qualifies it is NHWC, if only axis 1 it is
      NCHW; if both do, uint8 is taken as NHWC (as image libraries and TensorFlow save) and
      float as NCHW (as PyTorch saves).

    Labels: ``(N,)`` or ``(N, 1)`` integers.

    Args:
        path: the ``.npz`` file.
        images_key: name of the images array in the file.
        labels_key: name of the labels array in the file.
        num_classes: number of classes; ``None`` takes ``max(label) + 1``.
        image_size: resize to this (int or ``(H, W)``); ``None`` keeps the stored size.
        channels: 1 or 3 to convert; ``None`` keeps the stored channel count.
        name: the set's name; defaults to the file name without suffix.

    Returns:
        ImageDataset with ``images: (N, C, H, W)`` float32 in ``[0, 1]``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a key is missing, the images break the rule above, or the labels are not
            ``N`` non-negative integers below ``num_classes``.
    """
    path = Path(path).expanduser()
    images, labels = _read_arrays(path, images_key, labels_key)
    tensor = _images_to_tensor(path, images, images_key)
    labels, num_classes = _checked_labels(path, labels, labels_key, tensor.shape[0], num_classes)
    return _finish(
        tensor,
        labels.astype(np.int64),
        num_classes,
        name or path.stem,
        image_size,
        channels,
    )


def _read_arrays(path: Path, images_key: str, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    """The two arrays of the archive, refusing pickles, single arrays and non-zip files."""
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; expected a .npz archive")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected a .npz archive")
    if not zipfile.is_zipfile(path):  # np.load would try it as a pickle or a truncated zip
        with open(path, "rb") as handle:
            if handle.read(6) == b"\x93NUMPY":
                raise ValueError(f"{path}: holds a single array (.npy); expected a .npz archive")
        raise ValueError(
            f"{path}: not a readable .npz archive (not a zip file: empty, truncated or another "
            "format)"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: not a readable .npz archive ({error})") from error
    with archive:
        if not hasattr(archive, "files"):
            raise ValueError(f"{path}: holds a single array; expected a .npz archive")
        for key in (images_key, labels_key):
            if key not in archive.files:
                raise ValueError(
                    f"{path}: no array {key!r}; expected keys {images_key!r} and {labels_key!r}, "
                    f"found {archive.files}"
                )
        try:
            return archive[images_key], archive[labels_key]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            # object arrays (never unpickled here), a truncated member, a bad CRC
            raise ValueError(
                f"{path}: arrays {images_key!r}/{labels_key!r} unreadable ({error})"
            ) from error


def _images_to_tensor(path: Path, images: np.ndarray, images_key: str) -> torch.Tensor:
    """``(N, C, H, W)`` float32 in ``[0, 1]`` by the dtype and layout rule of :func:`load_npz`."""
    if images.dtype.kind == "u":
        if images.size and images.max() > 255:
            raise ValueError(
                f"{path}: {images_key!r} is {images.dtype} with values up to {images.max()}; "
                "expected pixels in 0..255"
            )
        float_images = False
    elif images.dtype.kind == "f":
        float_images = True
    else:
        raise ValueError(
            f"{path}: {images_key!r} has dtype {images.dtype}; expected uint8 pixels (0..255) "
            "or floats in [0, 1]"
        )
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        last_is_channel = images.shape[3] in _CHANNEL_COUNTS
        second_is_channel = images.shape[1] in _CHANNEL_COUNTS
        if not (last_is_channel or second_is_channel):
            raise ValueError(
                f"{path}: {images_key!r} has shape {images.shape}; expected NHWC or NCHW with "
                f"{' or '.join(map(str, _CHANNEL_COUNTS))} channels"
            )
        channels_last = last_is_channel and (not second_is_channel or not float_images)
        if channels_last:
            images = images.transpose(0, 3, 1, 2)
    else:
        raise ValueError(
            f"{path}: {images_key!r} has shape {images.shape}; expected (N, H, W), (N, H, W, C) "
            "or (N, C, H, W)"
        )

    if float_images:
        tensor = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            raise ValueError(
                f"{path}: {images_key!r} has {int((~finite).sum())} NaN or inf values; "
                "expected finite floats in [0, 1]"
            )
        if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
            raise ValueError(
                f"{path}: {images_key!r} spans [{tensor.min():.4g}, {tensor.max():.4g}]; "
                "expected floats in [0, 1] (store uint8 0..255, or undo normalisation)"
            )
    else:
        tensor = _uint8_to_float(images.astype(np.uint8, copy=False))
    return tensor


def _checked_labels(
    path: Path, labels: np.ndarray, labels_key: str, count: int, num_classes: int | None
) -> tuple[np.ndarray, int]:
    """``(N,)`` integer labels, one per image, in ``[0, num_classes)``; infers ``num_classes``."""
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise ValueError(
            f"{path}: {labels_key!r} has shape {labels.shape}, dtype {labels.dtype}; "
            "expected (N,) integer class indices"
        )
    if labels.shape[0] != count:
        raise ValueError(
            f"{path}: {count} images but {labels.shape[0]} labels; expected one label per image"
        )
    if labels.size == 0:
        raise ValueError(f"{path}: no images; expected at least one")
    if labels.min() < 0:
        raise ValueError(f"{path}: smallest label is {labels.min()}; expected labels >= 0")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    elif labels.max() >= num_classes:
        raise ValueError(
            f"{path}: largest label is {labels.max()}; expected labels in [0, {num_classes})"
        )
    return labels, num_classes
