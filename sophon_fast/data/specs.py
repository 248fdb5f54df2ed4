"""Data specs for configs and the CLI: a string ``"builtin:NAME"`` or a table naming a format.

    "builtin:mnist5k"                                   a built-in domain (train and test splits)
    {format = "cifar", root = "data/cifar-10-batches-py", num_classes = 10}
    {format = "mnist_idx", root = "data/MNIST/raw"}
    {format = "stl10", root = "data/stl10_binary"}
    {format = "image_folder", root = "data/train", test_root = "data/test"}
    {format = "npz", path = "train.npz", test_path = "test.npz"}

Every table may add the loaders' own keywords (``image_size``, ``channels``, ...).
:func:`load_spec` returns the training part and the held-out test part (None when the format has
no split and no test location was given).
"""

from __future__ import annotations

from typing import Any

from sophon_fast.data.builtin import list_builtin, load_builtin
from sophon_fast.data.cifar import load_cifar
from sophon_fast.data.dataset import ImageDataset
from sophon_fast.data.idx import load_mnist_idx
from sophon_fast.data.image_folder import load_image_folder
from sophon_fast.data.npz import load_npz
from sophon_fast.data.stl10 import load_stl10

_SPLIT_LOADERS = {"cifar": load_cifar, "mnist_idx": load_mnist_idx, "stl10": load_stl10}
FORMATS = ("builtin", *_SPLIT_LOADERS, "image_folder", "npz")


def load_spec(spec: Any, *, what: str = "data") -> tuple[ImageDataset, ImageDataset | None]:
    """Load ``(train, test)`` from a data spec (see the module docstring).

    Raises:
        ValueError: an unknown format or built-in name, or a table missing its location key.
        TypeError: a spec that is neither a string nor a table.
    """
    if isinstance(spec, str):
        if not spec.startswith("builtin:"):
            raise ValueError(
                f"{what}: a string data spec must look like 'builtin:NAME' (one of "
                f"{', '.join(list_builtin())}), got {spec!r}; use a table for files on disk"
            )
        spec = {"format": "builtin", "name": spec.split(":", 1)[1]}
    if not isinstance(spec, dict):
        raise TypeError(
            f"{what}: expected 'builtin:NAME' or a table with a 'format' key, got {spec!r}"
        )
    options = dict(spec)
    fmt = options.pop("format", None)
    if fmt not in FORMATS:
        raise ValueError(f"{what}: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "builtin":
        name = options.pop("name", None)
        if name not in list_builtin():
            raise ValueError(
                f"{what}: unknown built-in domain {name!r}; choose from {', '.join(list_builtin())}"
            )
        return load_builtin(name, "train", **options), load_builtin(name, "test", **options)
    if fmt in _SPLIT_LOADERS:
        _require(options, "root", what, fmt)
        loader = _SPLIT_LOADERS[fmt]
        return loader(split="train", **options), loader(split="test", **options)
    key, test_key, loader = (
        ("root", "test_root", load_image_folder)
        if fmt == "image_folder"
        else ("path", "test_path", load_npz)
    )
    _require(options, key, what, fmt)
    test_location = options.pop(test_key, None)
    train = loader(options.pop(key), **options)
    test = loader(test_location, **options) if test_location is not None else None
    return train, test


def _require(options: dict, key: str, what: str, fmt: str) -> None:
    if key not in options:
        raise ValueError(f"{what}: format {fmt!r} needs a {key!r} entry")
