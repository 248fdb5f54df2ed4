"""CIFAR-10 / CIFAR-100 from the "python version" pickled batches (:func:`load_cifar`).

The batches are pickles, the format the dataset is distributed in; they are read with an
unpickler that resolves only numpy's array reconstructors, so a tampered file cannot run code.
"""

from __future__ import annotations

import importlib
import pickle
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

__all__ = ["load_cifar"]

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
