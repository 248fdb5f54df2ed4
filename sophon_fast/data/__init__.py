"""Offline image domains and loaders: everything returns an :class:`ImageDataset`.

- :func:`list_builtin` / :func:`load_builtin`: small real domains (MNIST-5k, its 0-4 and 5-9
  halves, scikit-learn digits, LFW faces) read from files inside PyPI packages, no network.
- :func:`load_cifar`, :func:`load_mnist_idx`, :func:`load_stl10`, :func:`load_image_folder`,
  :func:`load_npz`: the standard on-disk formats a user already has.
- :func:`check_classification_data`, :func:`check_num_classes`: validation run on user data
  before training, failing fast with a message that says what was expected.

Images are ``(N, C, H, W)`` float32 in ``[0, 1]``; labels ``(N,)`` int64.
"""

from sophon_fast.data.builtin import list_builtin, load_builtin
from sophon_fast.data.checks import check_classification_data, check_num_classes
from sophon_fast.data.cifar import load_cifar
from sophon_fast.data.dataset import ImageDataset, resize_images, set_channels
from sophon_fast.data.idx import load_mnist_idx, read_idx
from sophon_fast.data.image_folder import load_image_folder
from sophon_fast.data.npz import load_npz
from sophon_fast.data.specs import FORMATS, load_spec
from sophon_fast.data.stl10 import load_stl10

__all__ = [
    "FORMATS",
    "ImageDataset",
    "check_classification_data",
    "check_num_classes",
    "list_builtin",
    "load_builtin",
    "load_cifar",
    "load_image_folder",
    "load_mnist_idx",
    "load_npz",
    "load_spec",
    "load_stl10",
    "read_idx",
    "resize_images",
    "set_channels",
]
