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
"""

from __future__ import annotations

import gzip
import importlib
import os
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sophon_fast.data.checks import check_classification_data

__all__ = [
    "ImageDataset",
    "load_cifar",
    "load_image_folder",
    "load_mnist_idx",
    "load_npz",
    "load_stl10",
    "read_idx",
    "resize_images",
    "set_channels",
]

# typing.Union, not "|": these aliases are evaluated at import and the package supports 3.9.
PathLike = Union[str, os.PathLike]
ImageSize = Union[int, tuple[int, int]]

_SPLITS = ("train", "test")
_IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_GREY_PIL_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
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


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# ---------------------------------------------------------------------------------------------

# The globals a numpy array pickle needs (protocol 2 as the CIFAR files were written with, up to
# protocol 5 for re-saved copies); nothing that can run code or touch the filesystem.
_ALLOWED_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Python 3 writes bytes as _codecs.encode(str, "latin1") under protocol 2.
        ("_codecs", "encode"),
    }
)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler for data files: dicts, lists, strings, numbers and numpy arrays only.

    A pickle can call any importable function while loading, so a downloaded "CIFAR batch" could
    run arbitrary code under a plain ``pickle.load``. The CIFAR batches need only the numpy array
    reconstructors, so everything else is refused.
    """

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing global {module}.{name}: a dataset pickle may hold only dicts, lists, "
                "strings, numbers and numpy arrays"
            )
        # numpy 2 moved numpy.core to numpy._core; old pickles name the former, which warns.
        if module.startswith("numpy.core.") and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return getattr(importlib.import_module(module), name)


def _read_pickle(path: Path) -> dict[str, object]:
    """Load a dataset pickle (Python 2 or 3) with :class:`_ArrayOnlyUnpickler`; str keys out."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with path.open("rb") as handle:
            # encoding="bytes": the CIFAR batches are Python 2 pickles whose str values hold raw
            # pixel bytes; decoding them as text would corrupt the arrays.
            content = _ArrayOnlyUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: not a readable CIFAR python pickle ({error})") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path}: holds a {type(content).__name__}; expected a dict batch")
    return {
        (key.decode("latin1") if isinstance(key, bytes) else str(key)): value
        for key, value in content.items()
    }


def _decode_names(names: object) -> list[str] | None:
    if not isinstance(names, list):
        return None
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def load_cifar(
    root: PathLike,
    split: str = "train",
    num_classes: int = 10,
    *,
    image_size: ImageSize | None = None,
    channels: int | None = None,
) -> ImageDataset:
    """Load CIFAR-10 or CIFAR-100 from the "python version" pickled batches.

    Layouts read (``root`` may be the batch folder itself or its parent):

    - CIFAR-10: ``cifar-10-batches-py/data_batch_1`` ... ``data_batch_5`` and ``test_batch``,
      labels under ``labels``; class names from ``batches.meta`` when present.
    - CIFAR-100: ``cifar-100-python/train`` and ``test``, labels under ``fine_labels``
      (``num_classes=100``) or ``coarse_labels`` (``num_classes=20``); names from ``meta``.

    Each batch holds ``data: (n, 3072)`` uint8, one row per image, 1024 red then 1024 green then
    1024 blue values, each plane row-major 32x32.

    The batches are pickles, the format the dataset is distributed in. They are read with an
    unpickler that resolves only numpy's array reconstructors, so a tampered file cannot run
    code; anything else in it raises ``ValueError``.

    Args:
        root: folder holding the batch files, or its parent.
        split: ``"train"`` (50,000 images) or ``"test"`` (10,000).
        num_classes: 10 (CIFAR-10), 100 (CIFAR-100 fine) or 20 (CIFAR-100 coarse).
        image_size: resize to this (int or ``(H, W)``); ``None`` keeps 32x32.
        channels: 1 turns RGB into grey; ``None`` or 3 keeps RGB.

    Returns:
        ImageDataset with ``images: (N, 3, 32, 32)`` (or as resized) and ``labels: (N,)``.

    Raises:
        FileNotFoundError: ``root`` or an expected batch file does not exist.
        ValueError: bad ``split``/``num_classes``, or a batch is not in the format above.
    """
    _check_split(split)
    if num_classes == 10:
        title = "CIFAR-10"
        folder, label_key, meta_file, names_key = (
            "cifar-10-batches-py",
            "labels",
            "batches.meta",
            "label_names",
        )
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    elif num_classes in (20, 100):
        title = "CIFAR-100"
        folder, meta_file = "cifar-100-python", "meta"
        label_key = "fine_labels" if num_classes == 100 else "coarse_labels"
        names_key = "fine_label_names" if num_classes == 100 else "coarse_label_names"
        files = [split]
    else:
        raise ValueError(
            f"num_classes is {num_classes}; expected 10 (CIFAR-10), 100 (CIFAR-100 fine labels) "
            "or 20 (CIFAR-100 coarse labels)"
        )
    directory = _existing_dir(root, [folder])
    missing = [name for name in files if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory}: missing {', '.join(missing)}; expected the {title} python batches "
            f"{', '.join(files)} (in {directory} or {directory / folder})"
        )

    image_parts, label_parts = [], []
    for file_name in files:
        path = directory / file_name
        batch = _read_pickle(path)
        if "data" not in batch or label_key not in batch:
            raise ValueError(
                f"{path}: keys {sorted(batch)}; expected 'data' and {label_key!r} "
                f"({title} batch format)"
            )
        data = np.asarray(batch["data"])
        labels = np.asarray(batch[label_key])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{path}: 'data' has shape {data.shape}, dtype {data.dtype}; "
                "expected (n, 3072) uint8 (3 planes of 32x32)"
            )
        if labels.shape != (data.shape[0],):
            raise ValueError(
                f"{path}: {labels.shape} labels for {data.shape[0]} images; expected one per image"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"{path}: {label_key!r} span {labels.min()}..{labels.max()}; "
                f"expected 0..{num_classes - 1}"
            )
        image_parts.append(data.reshape(-1, 3, 32, 32))
        label_parts.append(labels.astype(np.int64))

    class_names = None
    if (directory / meta_file).is_file():
        class_names = _decode_names(_read_pickle(directory / meta_file).get(names_key))
        if class_names is not None and len(class_names) != num_classes:
            class_names = None
    return _finish(
        _uint8_to_float(np.concatenate(image_parts)),
        np.concatenate(label_parts),
        num_classes,
        f"cifar{num_classes}/{split}",
        image_size,
        channels,
        class_names,
    )


# ---------------------------------------------------------------------------------------------
# MNIST IDX
# ---------------------------------------------------------------------------------------------

# IDX type byte -> numpy dtype; multi-byte types are big-endian by the format's definition.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: PathLike) -> np.ndarray:
    """Parse one IDX file (raw or gzip, detected from the content) into a numpy array.

    Header: two zero bytes, a type byte (0x08 = uint8, ...), a byte with the number of
    dimensions d, then d big-endian uint32 sizes; the values follow, row-major.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: bad magic, unknown type, or a size that disagrees with the header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path}: corrupt gzip stream ({error})") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: starts with {raw[:4].hex() or 'nothing'}; expected an IDX header "
            "00 00 <type> <ndim>"
        )
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: IDX type byte 0x{type_code:02x}; expected one of "
            f"{', '.join(f'0x{code:02x}' for code in _IDX_DTYPES)}"
        )
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise ValueError(f"{path}: truncated IDX header; expected {ndim} dimension sizes")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_bytes != expected_bytes:
        raise ValueError(
            f"{path}: {len(raw) - header_bytes} bytes of data; expected {expected_bytes} "
            f"for shape {shape} of {dtype}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_bytes).reshape(shape)


def _find_idx_file(directory: Path, prefix: str, kind: str, ndim: int) -> Path:
    # The original site spells "train-images-idx3-ubyte"; some mirrors use a dot before "idx".
    candidates = [
        f"{prefix}-{kind}{sep}idx{ndim}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")
    ]
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"{directory}: no {candidates[0]} (or {candidates[1]}); expected the MNIST-style IDX "
        f"files {prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]"
    )


def load_mnist_idx(
    root: PathLike,
    split: str = "train",
    *,
    num_classes: int = 10,
    image_size: ImageSize | None = None,
    channels: int | None = None,
) -> ImageDataset:
    """Load MNIST (or Fashion-MNIST, KMNIST: same files) from IDX files, raw or gzipped.

    Reads ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` (split ``"train"``) or
    ``t10k-images-idx3-ubyte`` / ``t10k-labels-idx1-ubyte`` (split ``"test"``), each optionally
    ``.gz``, from ``root``, ``root/raw`` or ``root/MNIST/raw`` (torchvision's layout).

    Args:
        root: folder holding the IDX files.
        split: ``"train"`` or ``"test"``.
        num_classes: number of classes (10 for MNIST-style sets).
        image_size: resize to this (int or ``(H, W)``); ``None`` keeps 28x28.
        channels: 3 repeats the grey channel; ``None`` or 1 keeps one channel.

    Returns:
        ImageDataset with ``images: (N, 1, 28, 28)`` (or as resized) and ``labels: (N,)``.

    Raises:
        FileNotFoundError: ``root`` or one of the two files does not exist.
        ValueError: bad ``split``, malformed IDX data, images not ``(N, H, W)`` uint8, labels
            not ``(N,)``, or labels outside ``[0, num_classes)``.
    """
    _check_split(split)
    directory = _existing_dir(root, ["raw", "MNIST/raw"])
    prefix = "train" if split == "train" else "t10k"
    images_path = _find_idx_file(directory, prefix, "images", 3)
    labels_path = _find_idx_file(directory, prefix, "labels", 1)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path}: shape {images.shape}, dtype {images.dtype}; expected (N, H, W) uint8"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{labels_path}: shape {labels.shape}; expected ({images.shape[0]},), one label "
            f"per image in {images_path.name}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{images_path}: holds no images; expected at least one")
    if labels.max() >= num_classes:
        raise ValueError(
            f"{labels_path}: largest label is {labels.max()}; expected labels in "
            f"[0, {num_classes}) (pass num_classes for sets with more classes)"
        )
    return _finish(
        _uint8_to_float(images[:, None]),
        labels,
        num_classes,
        # torchvision keeps the files in <set>/raw; name the set, not "raw".
        f"{(directory.parent if directory.name == 'raw' else directory).name}/{split}",
        image_size,
        channels,
    )


# ---------------------------------------------------------------------------------------------
# STL-10
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Image folder
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------------

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
            images = archive[images_key]
            labels = archive[labels_key]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            # object arrays (never unpickled here), a truncated member, a bad CRC
            raise ValueError(
                f"{path}: arrays {images_key!r}/{labels_key!r} unreadable ({error})"
            ) from error

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

    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise ValueError(
            f"{path}: {labels_key!r} has shape {labels.shape}, dtype {labels.dtype}; "
            "expected (N,) integer class indices"
        )
    if labels.shape[0] != tensor.shape[0]:
        raise ValueError(
            f"{path}: {tensor.shape[0]} images but {labels.shape[0]} labels; "
            "expected one label per image"
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
    return _finish(
        tensor,
        labels.astype(np.int64),
        num_classes,
        name or path.stem,
        image_size,
        channels,
    )
