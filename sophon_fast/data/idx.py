"""MNIST-style IDX files, raw or gzipped (:func:`read_idx`, :func:`load_mnist_idx`).

MNIST, Fashion-MNIST and KMNIST ship the same files, so one loader reads all three.
"""

from __future__ import annotations

import gzip
from pathlib import Path

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

__all__ = ["load_mnist_idx", "read_idx"]

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
