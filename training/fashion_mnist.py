"""Fashion-MNIST reader (Debian package ``dataset-fashion-mnist``) and a padded [-1, 1] torch Dataset.

The Debian package installs the original idx files (gzip-compressed) under
``/usr/share/datasets/fashion-mnist/``. We parse the idx format ourselves with numpy + gzip:

    magic:  0x00 0x00 <dtype code> <ndim>
    dims:   ndim big-endian uint32
    data:   prod(dims) big-endian values of the dtype

Images are 28x28 uint8 (0 = background). Models in this project use 32x32 inputs in [-1, 1], so the Dataset
pads two pixels of background on every side and maps ``x -> x / 127.5 - 1``.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from flowturbo.errors import FlowTurboError
from flowturbo.fileio import atomic_write_bytes

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get install dataset-fashion-mnist"

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28  # stored resolution
PADDED_SIZE = 32  # model resolution (a power of two, patch-friendly)
PAD = (PADDED_SIZE - IMAGE_SIZE) // 2
PIXEL_MAX = 255.0
PIXEL_HALF_RANGE = PIXEL_MAX / 2.0  # 127.5: maps 0..255 onto [-1, 1]

# Split name -> idx file prefix.
SPLIT_PREFIXES: dict[str, str] = {"train": "train", "test": "t10k"}
SPLIT_SIZES: dict[str, int] = {"train": 60_000, "test": 10_000}

# idx dtype codes (third magic byte) -> big-endian numpy dtypes.
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_HEADER_BYTES = 4
_IDX_DIM_BYTES = 4


class FashionMNISTArrays(NamedTuple):
    """One split in memory: ``images`` uint8 (N, 28, 28) and ``labels`` int64 (N,) in 0..9."""

    images: np.ndarray
    labels: np.ndarray


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one idx file (gzip-compressed when the name ends in ``.gz``) into a numpy array.

    Raises FlowTurboError for a missing, truncated or malformed file.
    """
    path = Path(path)
    if not path.is_file():
        raise FlowTurboError(f"idx file {path} does not exist; install the dataset with `{INSTALL_HINT}`")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip raises BadGzipFile (an OSError) or EOFError when truncated
        raise FlowTurboError(f"cannot read idx file {path} ({exc}); reinstall with `{INSTALL_HINT}`") from exc

    if len(raw) < _IDX_HEADER_BYTES or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise FlowTurboError(f"{path} is not an idx file (bad magic {raw[:4]!r}); reinstall with `{INSTALL_HINT}`")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    data_start = _IDX_HEADER_BYTES + _IDX_DIM_BYTES * ndim
    if len(raw) < data_start:
        raise FlowTurboError(f"{path} is truncated inside its header; reinstall with `{INSTALL_HINT}`")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=_IDX_HEADER_BYTES))
    count = int(np.prod(dims, dtype=np.int64))
    expected = data_start + count * dtype.itemsize
    if len(raw) != expected:
        raise FlowTurboError(
            f"{path} holds {len(raw)} bytes but its header {dims} needs {expected}; "
            f"the file is damaged, reinstall with `{INSTALL_HINT}`"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=data_start).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)  # native byte order, writable


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as an idx file (gzip-compressed when the name ends in ``.gz``), atomically.

    The inverse of :func:`read_idx`; used to store subsets and by tests to build small datasets.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise FlowTurboError(f"idx cannot store dtype {array.dtype}; use one of {sorted(str(d) for d in codes)}")
    header = bytes([0, 0, codes[native], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(np.dtype(_IDX_DTYPES[codes[native]]), copy=False).tobytes()
    if path.suffix == ".gz":
        payload = gzip.compress(payload, mtime=0)
    return atomic_write_bytes(path, payload)  # temp file + fsync + rename; parent folders made as needed


def split_files(split: str, root: str | Path = DEFAULT_ROOT) -> tuple[Path, Path]:
    """The (images, labels) idx files of ``split`` ('train' or 'test') under ``root``.

    Accepts the gzip files the Debian package ships, or the same files uncompressed.
    """
    if split not in SPLIT_PREFIXES:
        raise FlowTurboError(f"unknown Fashion-MNIST split {split!r}; use one of {sorted(SPLIT_PREFIXES)}")
    root = Path(root)
    prefix = SPLIT_PREFIXES[split]
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{prefix}-{kind}-ubyte"
        candidates = (root / f"{name}.gz", root / name)
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FlowTurboError(
                f"Fashion-MNIST file {candidates[0]} not found; install the dataset with `{INSTALL_HINT}` "
                f"(or pass root= pointing at a folder holding the idx files)"
            )
        found.append(path)
    return found[0], found[1]


def load_fashion_mnist(split: str, root: str | Path = DEFAULT_ROOT, limit: int | None = None) -> FashionMNISTArrays:
    """Load one split: uint8 images (N, 28, 28) and int64 labels (N,), optionally only the first ``limit``."""
    images_path, labels_path = split_files(split, root)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.dtype != np.uint8:
        raise FlowTurboError(
            f"{images_path} holds {images.dtype} images of shape {images.shape}, expected uint8 (N, 28, 28); "
            f"reinstall with `{INSTALL_HINT}`"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise FlowTurboError(
            f"{labels_path} holds labels of shape {labels.shape} for {images.shape[0]} images; "
            f"reinstall with `{INSTALL_HINT}`"
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise FlowTurboError(f"{labels_path} holds labels outside 0..{NUM_CLASSES - 1}; reinstall with `{INSTALL_HINT}`")
    if limit is not None:
        if limit < 1:
            raise FlowTurboError(f"limit must be a positive number of images, got {limit}")
        images, labels = images[:limit], labels[:limit]
    return FashionMNISTArrays(images=images, labels=labels)


def pad_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> uint8 (N, 1, 32, 32) with two background (0) pixels on every side."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 3:
        raise FlowTurboError(f"expected uint8 images of shape (N, H, W), got {x.dtype} {tuple(x.shape)}")
    return torch.nn.functional.pad(x.unsqueeze(1), (PAD, PAD, PAD, PAD), value=0)  # (N, 1, 32, 32)


def uint8_to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> float32 in [-1, 1] (any shape)."""
    return x.to(torch.float32) / PIXEL_HALF_RANGE - 1.0


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 32, 32) in [-1, 1], background padded to -1."""
    return uint8_to_unit_range(pad_images(images))


class FashionMNISTDataset(Dataset):
    """Fashion-MNIST as (image float32 (1, 32, 32) in [-1, 1], label int64) pairs.

    ``hflip=True`` flips each drawn image left-right with probability 1/2 (data augmentation for training);
    pass a seeded ``generator`` for reproducible flips in a single process.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        hflip: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise FlowTurboError(f"{len(images)} images but {len(labels)} labels")
        self.images = pad_images(images)  # (N, 1, 32, 32) uint8; converted per item to keep memory 4x lower
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)  # (N,)
        self.hflip = hflip
        self.generator = generator

    @classmethod
    def from_split(
        cls,
        split: str,
        root: str | Path = DEFAULT_ROOT,
        *,
        limit: int | None = None,
        hflip: bool = False,
        generator: torch.Generator | None = None,
    ) -> "FashionMNISTDataset":
        """Build the dataset from one split on disk (see :func:`load_fashion_mnist`)."""
        arrays = load_fashion_mnist(split, root, limit=limit)
        return cls(arrays.images, arrays.labels, hflip=hflip, generator=generator)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = uint8_to_unit_range(self.images[index])  # (1, 32, 32)
        if self.hflip and bool(torch.rand((), generator=self.generator) < 0.5):
            x = x.flip(-1)
        return x, self.labels[index]
