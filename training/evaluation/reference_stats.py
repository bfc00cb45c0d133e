"""Reference statistics (features, mean, covariance) of the Fashion-MNIST test split, cached on disk.

The cache file name is a hash of everything the numbers depend on:
(feature extractor identity — its weights hash and preprocessing —, sha256 of the dataset's idx files,
split, number of samples, this format's version). A file is never trusted because it exists: a changed
classifier, a re-installed dataset or another sample count gives another key, and a file whose stored key
does not match (or that cannot be read) is recomputed and rewritten atomically.

Cache folder: the ``cache_dir`` argument, else ``$FLOWTURBO_CACHE_DIR``, else ``$XDG_CACHE_HOME/flowturbo``,
else ``~/.cache/flowturbo``; files live under ``<cache>/reference_stats/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from flowturbo.errors import FlowTurboError
from flowturbo.families import ImageSize
from flowturbo.fileio import sha256_file as file_sha256
from flowturbo.training.evaluation.features import FeatureExtractor
from flowturbo.training.evaluation.fid import ReferenceStatistics, load_reference_npz
from flowturbo.training.fashion_mnist import DEFAULT_ROOT, SPLIT_SIZES, load_fashion_mnist, split_files, to_model_range

CACHE_ENV_VAR = "FLOWTURBO_CACHE_DIR"
CACHE_SUBDIR = "reference_stats"
CACHE_FORMAT_VERSION = 1
DEFAULT_NUM_REFERENCE = SPLIT_SIZES["test"]  # the whole 10k test split
KEY_CHARS = 24  # hex digits of the key used in file names


def default_cache_dir() -> Path:
    """``$FLOWTURBO_CACHE_DIR``, else ``$XDG_CACHE_HOME/flowturbo``, else ``~/.cache/flowturbo``."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "flowturbo"


def dataset_hash(split: str, root: str | Path = DEFAULT_ROOT) -> str:
    """sha256 over the split's idx files (images then labels)."""
    h = hashlib.sha256()
    for path in split_files(split, root):
        h.update(file_sha256(path).encode())
    return h.hexdigest()


def reference_key_fields(
    extractor: FeatureExtractor,
    *,
    num_samples: int,
    split: str = "test",
    root: str | Path = DEFAULT_ROOT,
) -> dict:
    """Everything a reference-statistics cache entry depends on (hashed into its key, stored beside it)."""
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "extractor": extractor.identity(),
        "dataset": "fashion-mnist",
        "dataset_sha256": dataset_hash(split, root),
        "split": split,
        "num_samples": int(num_samples),
    }


def reference_cache_key(fields: dict) -> str:
    """sha256 of the canonical JSON of :func:`reference_key_fields` (shortened for file names)."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:KEY_CHARS]


def fashion_mnist_reference(
    extractor: FeatureExtractor,
    *,
    num_samples: int = DEFAULT_NUM_REFERENCE,
    split: str = "test",
    root: str | Path = DEFAULT_ROOT,
    cache_dir: str | Path | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> ReferenceStatistics:
    """Reference features + statistics of the first ``num_samples`` images of a Fashion-MNIST split.

    Loaded from the cache when an entry with the same key exists and reads back with the same stored key;
    otherwise computed with ``extractor`` and written atomically.
    """
    available = SPLIT_SIZES.get(split)
    if num_samples < 2 or (available is not None and num_samples > available):
        raise FlowTurboError(f"num_samples must be in 2..{available} for the {split!r} split, got {num_samples}")
    fields = reference_key_fields(extractor, num_samples=num_samples, split=split, root=root)
    key = reference_cache_key(fields)
    folder = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / CACHE_SUBDIR
    path = folder / f"fashion-mnist-{split}-{extractor.name}-{num_samples}-{key}.npz"

    if path.is_file():
        try:
            cached = load_reference_npz(path)
        except FlowTurboError as exc:
            warnings.warn(f"recomputing unreadable reference cache {path}: {exc}", stacklevel=2)
        else:
            if (cached.metadata or {}).get("key_fields") == fields and cached.features is not None:
                return cached
            warnings.warn(f"recomputing reference cache {path}: its stored key does not match", stacklevel=2)

    arrays = load_fashion_mnist(split, root, limit=num_samples)
    if arrays.images.shape[0] < num_samples:
        raise FlowTurboError(f"the {split!r} split under {root} has only {arrays.images.shape[0]} images, asked {num_samples}")
    images = to_model_range(arrays.images)  # (M, 1, 32, 32) in [-1, 1]
    features = extractor.extract(images, batch_size=batch_size, progress=progress)  # (M, D)
    stats = ReferenceStatistics.from_features(
        features, metadata={"key": key, "key_fields": fields, "num_samples": int(num_samples)}
    )
    folder.mkdir(parents=True, exist_ok=True)
    stats.save_npz(path)
    return stats


REFERENCE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REFERENCE_CHUNK = 32  # images read and featurised at a time (a 1024² RGB image is 12 MB as float32)


def folder_reference(folder: str | Path, extractor: FeatureExtractor, size: ImageSize, *,
                     progress: bool = True) -> ReferenceStatistics:
    """FID reference statistics of a folder of images (png / jpg / webp / bmp, sorted by name), each fitted to
    ``size`` (resized to cover it, centre-cropped: ``PIL.ImageOps.fit``) and converted to RGB."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    root = Path(folder)
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in REFERENCE_IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise FlowTurboError(f"--reference {root}: {len(files)} image file(s) ({', '.join(REFERENCE_IMAGE_SUFFIXES)}) "
                             "found; FID needs at least 2 reference images (thousands for a stable number)")
    features = []
    for start in tqdm(range(0, len(files), REFERENCE_CHUNK), desc="reference images", disable=not progress,
                      leave=False):
        chunk = []
        for path in files[start:start + REFERENCE_CHUNK]:
            try:
                with Image.open(path) as image:
                    fitted = ImageOps.fit(image.convert("RGB"), (size.width, size.height),
                                          method=Image.Resampling.BICUBIC)
            except (OSError, UnidentifiedImageError) as exc:
                raise FlowTurboError(f"--reference: {path} is not a readable image ({exc})") from None
            chunk.append(torch.from_numpy(np.asarray(fitted, dtype=np.uint8).copy()))
        pixels = torch.stack(chunk).permute(0, 3, 1, 2).float() / 127.5 - 1  # (b, 3, H, W) in [-1, 1]
        features.append(extractor.extract(pixels, progress=False))
    return ReferenceStatistics.from_features(torch.cat(features).numpy(), metadata={
        "source": str(root.resolve()), "num_samples": len(files), "size": str(size),
        "features": extractor.identity()})
