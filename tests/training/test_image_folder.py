"""ImageNet-layout image folders: ADM center crop, deterministic flips, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowturbo.errors import FlowTurboError
from flowturbo.training.image_folder import ImageFolderDataset, center_crop_arr

RES = 12


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, count in (("zebra", 3), ("apple", 2)):
        for i in range(count):
            _write(tmp_path / name / f"img{i}.png", rng.integers(1, 255, (30 + 3 * i, 17 + i, 3), dtype=np.uint8))
    _write(tmp_path / "apple" / "nested" / "deep.JPEG", rng.integers(1, 255, (40, 40, 3), dtype=np.uint8))
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    return tmp_path


def test_classes_sorted_and_images_found(folder: Path) -> None:
    ds = ImageFolderDataset(folder, RES, channels=3, random_flip=False)
    assert ds.class_names == ["apple", "zebra"] and ds.num_classes == 2
    assert len(ds) == 6
    labels = [label for _, label in ds.samples]
    assert labels == [0, 0, 0, 1, 1, 1]
    image, label = ds[5]
    assert image.shape == (3, RES, RES) and image.dtype == torch.float32 and label == 1
    assert image.min() >= -1.0 and image.max() <= 1.0 and image.std() > 0.1


def test_center_crop_matches_adm_reference(folder: Path) -> None:
    # Reference: ADM's crop written out by hand for a 30x17 image -> 12: scale 12/17, resize, crop center rows.
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 255, (30, 17, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    scale = RES / 17
    resized = np.array(img.resize((round(17 * scale), round(30 * scale)), resample=Image.BICUBIC))
    top = (resized.shape[0] - RES) // 2
    expected = resized[top : top + RES, :RES]
    np.testing.assert_array_equal(np.array(center_crop_arr(img, RES)), expected)
    # Box-halving kicks in for images at least twice the target.
    big = Image.fromarray(rng.integers(0, 255, (100, 60, 3), dtype=np.uint8))
    assert center_crop_arr(big, RES).size == (RES, RES)


def test_grayscale_and_pixel_mapping(tmp_path: Path) -> None:
    arr = np.full((RES, RES), 255, dtype=np.uint8)
    arr[:, : RES // 2] = 0
    _write(tmp_path / "only" / "a.png", arr)
    ds = ImageFolderDataset(tmp_path, RES, channels=1, random_flip=False)
    image, _ = ds[0]
    assert image.shape == (1, RES, RES)
    assert image[0, 0, 0] == -1.0 and image[0, 0, -1] == 1.0


def test_flips_are_deterministic_per_epoch(folder: Path) -> None:
    ds = ImageFolderDataset(folder, RES, random_flip=True, seed=5)
    plain = ImageFolderDataset(folder, RES, random_flip=False)
    pattern = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        flags = [ds.is_flipped(i) for i in range(len(ds))]
        pattern.append(flags)
        for i, flipped in enumerate(flags):
            expected = plain[i][0].flip(-1) if flipped else plain[i][0]
            assert torch.equal(ds[i][0], expected)
    assert any(any(f) for f in pattern) and not all(all(f) for f in pattern)
    again = ImageFolderDataset(folder, RES, random_flip=True, seed=5)
    again.set_epoch(2)
    assert [again.is_flipped(i) for i in range(len(ds))] == pattern[2]


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FlowTurboError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", RES)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FlowTurboError, match="no class sub-folders"):
        ImageFolderDataset(empty, RES)
    flat = tmp_path / "flat"
    _write(flat / "a.png", np.ones((4, 4, 3), dtype=np.uint8))
    with pytest.raises(FlowTurboError, match="directly in it"):
        ImageFolderDataset(flat, RES)
    no_images = tmp_path / "noimg"
    (no_images / "cls").mkdir(parents=True)
    (no_images / "cls" / "x.txt").write_text("x")
    with pytest.raises(FlowTurboError, match="no images"):
        ImageFolderDataset(no_images, RES)
    broken = tmp_path / "broken"
    (broken / "cls").mkdir(parents=True)
    (broken / "cls" / "bad.png").write_bytes(b"this is not a png")
    ds = ImageFolderDataset(broken, RES)
    with pytest.raises(FlowTurboError, match=r"dataset image .*bad\.png is not a readable image"):
        ds[0]
