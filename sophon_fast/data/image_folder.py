"""One folder of image files per class (:func:`load_image_folder`); needs Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sophon_fast.data.dataset import (
    ImageDataset,
    ImageSize,
    PathLike,
    _existing_dir,
    _uint8_to_float,
    resize_images,
)

__all__ = ["load_image_folder"]

_IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_GREY_PIL_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def load_image_folder(
    root: PathLike,
    image_size: ImageSize | None = None,
    *,
    channels: int | None = None,
    name: str | None = None,
) -> ImageDataset:
    """Load ``root/<class>/<image>`` files: one sub-folder per class, label = sorted position.

    Class folders are sorted by name (hidden ones skipped) and label ``i`` is the ``i``-th;
    files within a class are read in sorted order, so the result is the same on every machine.
    Files with suffixes .png .jpg .jpeg .bmp .gif .tif .tiff .webp .ppm .pgm are read; others
    are ignored. Colour is made consistent across the set: if every image is single-channel
    (PIL modes 1, L, LA, I, F) all are read as grey ("L"), otherwise all as "RGB".

    Args:
        root: the folder holding one sub-folder per class.
        image_size: resize every image to this (int or ``(H, W)``); required when the images
            differ in size.
        channels: force 1 (grey) or 3 (RGB) instead of the rule above.
        name: the set's name; defaults to the folder name.

    Returns:
        ImageDataset with ``images: (N, C, H, W)`` and ``class_names`` the folder names.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no class folders, a class folder with no images, an unreadable image, or
            images of different sizes without ``image_size``.
        ModuleNotFoundError: Pillow is not installed.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("load_image_folder needs Pillow: pip install pillow") from error
    directory = _existing_dir(root)
    class_dirs = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(
            f"{directory}: no sub-folders; expected one sub-folder of images per class"
        )
    files: list[tuple[Path, int]] = []
    for label, class_dir in enumerate(class_dirs):
        class_files = sorted(
            p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
        )
        if not class_files:
            raise ValueError(
                f"{class_dir}: no image files; expected at least one of "
                f"{', '.join(sorted(_IMAGE_SUFFIXES))} per class folder"
            )
        files.extend((path, label) for path in class_files)

    def open_image(path: Path):
        try:
            return Image.open(path)
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{path}: not a readable image ({error})") from error

    if channels is None:
        # Image.open reads only the header, so this pass is cheap.
        all_grey = True
        for path, _ in files:
            with open_image(path) as image:
                if image.mode not in _GREY_PIL_MODES:
                    all_grey = False
                    break
        channels = 1 if all_grey else 3
    if channels not in (1, 3):
        raise ValueError(f"channels is {channels!r}; expected None, 1 or 3")
    mode = "L" if channels == 1 else "RGB"

    tensors = []
    first_size: tuple[tuple[int, int], Path] | None = None
    for path, _ in files:
        with open_image(path) as image:
            array = np.asarray(image.convert(mode), dtype=np.uint8)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        tensor = _uint8_to_float(array)[None]
        if image_size is not None:
            tensor = resize_images(tensor, image_size)
        elif first_size is None:
            first_size = (tuple(tensor.shape[-2:]), path)
        elif tuple(tensor.shape[-2:]) != first_size[0]:
            raise ValueError(
                f"{path}: size {tuple(tensor.shape[-2:])} (H, W) but {first_size[1]} is "
                f"{first_size[0]}; expected equal sizes, or pass image_size to resize all"
            )
        tensors.append(tensor)
    labels = np.array([label for _, label in files], dtype=np.int64)
    return ImageDataset(
        torch.cat(tensors),
        torch.from_numpy(labels),
        len(class_dirs),
        name=name or directory.name,
        class_names=[p.name for p in class_dirs],
    )
