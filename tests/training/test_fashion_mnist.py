"""Fashion-MNIST idx reader and padded [-1, 1] Dataset (synthetic idx files; the real files when installed)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from tolerances import tol

from flowturbo.errors import FlowTurboError
from flowturbo.training.fashion_mnist import (
    CLASS_NAMES,
    DEFAULT_ROOT,
    NUM_CLASSES,
    FashionMNISTDataset,
    load_fashion_mnist,
    read_idx,
    split_files,
    to_model_range,
    write_idx,
)

N_SYNTH = 13  # odd on purpose


def make_split(root, split: str = "test", n: int = N_SYNTH, seed: int = 0, compress: bool = True):
    """Write a small random split in the Debian package's layout; return (images, labels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, size=(n,), dtype=np.uint8)
    prefix = {"train": "train", "test": "t10k"}[split]
    ext = ".gz" if compress else ""
    write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return images, labels


def test_class_names():
    assert len(CLASS_NAMES) == NUM_CLASSES == 10
    assert CLASS_NAMES[0] == "T-shirt/top" and CLASS_NAMES[9] == "Ankle boot"


@pytest.mark.parametrize("name", ["a.idx.gz", "a.idx"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(1, 3 * 5 * 7 + 1, dtype=np.uint8).reshape(3, 5, 7),
        np.arange(-7, 8, dtype=np.int32).reshape(3, 5),
        np.linspace(-1.5, 2.5, 9, dtype=np.float32),
    ],
)
def test_idx_round_trip(tmp_path, name, array):
    back = read_idx(write_idx(tmp_path / name, array))
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_idx_header_is_the_documented_format(tmp_path):
    array = np.arange(1, 7, dtype=np.uint8).reshape(2, 3)
    raw = gzip.decompress(write_idx(tmp_path / "x.gz", array).read_bytes())
    assert raw[:4] == bytes([0, 0, 0x08, 2])
    assert raw[4:12] == (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    assert raw[12:] == bytes(range(1, 7))


def test_idx_rejects_damaged_files(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(FlowTurboError, match="not an idx file"):
        read_idx(bad_magic)
    truncated = tmp_path / "short"
    truncated.write_bytes(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(FlowTurboError, match="damaged"):
        read_idx(truncated)
    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (9).to_bytes(4, "big") + b"x" * 9)[:-12])
    with pytest.raises(FlowTurboError, match="cannot read"):
        read_idx(broken_gz)


@pytest.mark.parametrize("compress", [True, False])
def test_load_synthetic_split(tmp_path, compress):
    images, labels = make_split(tmp_path, "test", compress=compress)
    data = load_fashion_mnist("test", root=tmp_path)
    assert data.images.dtype == np.uint8 and data.images.shape == (N_SYNTH, 28, 28)
    assert data.labels.dtype == np.int64 and data.labels.shape == (N_SYNTH,)
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)
    few = load_fashion_mnist("test", root=tmp_path, limit=5)
    np.testing.assert_array_equal(few.images, images[:5])
    np.testing.assert_array_equal(few.labels, labels[:5])


def test_missing_dataset_names_the_apt_package(tmp_path):
    with pytest.raises(FlowTurboError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path / "nowhere")
    with pytest.raises(FlowTurboError, match="unknown Fashion-MNIST split"):
        split_files("validation", tmp_path)


def test_inconsistent_files_are_rejected(tmp_path):
    make_split(tmp_path, "test")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(N_SYNTH - 1, np.uint8))
    with pytest.raises(FlowTurboError, match="labels of shape"):
        load_fashion_mnist("test", root=tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(N_SYNTH, NUM_CLASSES, np.uint8))
    with pytest.raises(FlowTurboError, match="outside 0..9"):
        load_fashion_mnist("test", root=tmp_path)


def test_to_model_range_pads_and_scales():
    rng = np.random.default_rng(3)
    images = rng.integers(1, 256, size=(3, 28, 28), dtype=np.uint8)
    x = to_model_range(images)
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32
    expected = torch.from_numpy(images).float() / 127.5 - 1.0
    torch.testing.assert_close(x[:, 0, 2:30, 2:30], expected, **tol(torch.float32))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert bool((x[:, 0][:, border] == -1.0).all())
    assert float(to_model_range(np.full((1, 28, 28), 255, np.uint8))[0, 0, 10, 10]) == 1.0


def test_dataset_items_and_flips(tmp_path):
    images, labels = make_split(tmp_path, "train", n=7)
    plain = FashionMNISTDataset.from_split("train", tmp_path)
    assert len(plain) == 7
    x, y = plain[4]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x, to_model_range(images[4:5])[0], **tol(torch.float32))
    assert int(y) == int(labels[4])

    flipping = FashionMNISTDataset(images, labels, hflip=True, generator=torch.Generator().manual_seed(0))
    draws = [flipping[2][0] for _ in range(40)]
    reference = to_model_range(images[2:3])[0]
    n_same = sum(bool(torch.equal(d, reference)) for d in draws)
    n_flipped = sum(bool(torch.equal(d, reference.flip(-1))) for d in draws)
    assert n_same + n_flipped == len(draws)  # nothing but the image or its mirror
    assert 5 < n_same < 35  # both orientations drawn


@pytest.mark.skipif(not DEFAULT_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_real_dataset():
    test = load_fashion_mnist("test")
    assert test.images.shape == (10_000, 28, 28) and test.labels.shape == (10_000,)
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), np.full(10, 1000))
    train = load_fashion_mnist("train", limit=11)
    assert train.images.shape == (11, 28, 28)
    assert train.labels[0] == 9  # the first training image is an ankle boot
