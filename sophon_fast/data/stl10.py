"""STL-10 from its binary release (:func:`load_stl10`)."""

from __future__ import annotations

import numpy as np

from sophon_fast.data.dataset import (
    ImageDataset,
    ImageSize,
    PathLike,
    _check_split,
    _existing_dir,
    _finish,
    _uint8_to_float,
)

__all__ = ["load_stl10"]

_STL_SIDE = 96
_STL_IMAGE_BYTES = 3 * _STL_SIDE * _STL_SIDE


def load_stl10(
    root: PathLike,
    split: str = "train",
    *,
    image_size: ImageSize | None = None,
    channels: int | None = None,
) -> ImageDataset:
    """Load STL-10 from its binary release (``stl10_binary/{train,test}_{X,y}.bin``).

    ``*_X.bin`` is uint8, 27,648 bytes per image: 3 planes (R, G, B) of 96x96, each plane
    column-major (MATLAB order), so it is read as ``(N, 3, W, H)`` and transposed. ``*_y.bin`` is
    one uint8 per image, labels 1..10, returned as 0..9. Class names come from
    ``class_names.txt`` when present. The unlabelled split is not read (it has no labels).

    Args:
        root: the ``stl10_binary`` folder or its parent.
        split: ``"train"`` (5,000 images) or ``"test"`` (8,000).
        image_size: resize to this (int or ``(H, W)``); ``None`` keeps 96x96.
        channels: 1 turns RGB into grey; ``None`` or 3 keeps RGB.

    Returns:
        ImageDataset with ``images: (N, 3, 96, 96)`` (or as resized), ``labels: (N,)`` in 0..9.

    Raises:
        FileNotFoundError: ``root`` or one of the two files does not exist.
        ValueError: bad ``split``, an image file whose size is not a multiple of 27,648 bytes,
            a label count that differs from the image count, or labels outside 1..10.
    """
    _check_split(split)
    directory = _existing_dir(root, ["stl10_binary"])
    images_path, labels_path = directory / f"{split}_X.bin", directory / f"{split}_y.bin"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no such file; expected the STL-10 binaries {split}_X.bin and "
                f"{split}_y.bin in {directory}"
            )
    pixels = np.fromfile(images_path, dtype=np.uint8)
    if pixels.size == 0 or pixels.size % _STL_IMAGE_BYTES:
        raise ValueError(
            f"{images_path}: {pixels.size} bytes; expected a non-zero multiple of "
            f"{_STL_IMAGE_BYTES} (3x96x96 uint8 per image)"
        )
    labels = np.fromfile(labels_path, dtype=np.uint8).astype(np.int64)
    count = pixels.size // _STL_IMAGE_BYTES
    if labels.shape[0] != count:
        raise ValueError(
            f"{labels_path}: {labels.shape[0]} labels; expected {count}, one per image in "
            f"{images_path.name}"
        )
    if labels.min() < 1 or labels.max() > 10:
        raise ValueError(
            f"{labels_path}: labels span {labels.min()}..{labels.max()}; expected 1..10"
        )
    images = pixels.reshape(count, 3, _STL_SIDE, _STL_SIDE).transpose(0, 1, 3, 2)
    class_names = None
    names_path = directory / "class_names.txt"
    if names_path.is_file():
        names = [line.strip() for line in names_path.read_text().splitlines() if line.strip()]
        class_names = names if len(names) == 10 else None
    return _finish(
        _uint8_to_float(images),
        labels - 1,
        10,
        f"stl10/{split}",
        image_size,
        channels,
        class_names,
    )
