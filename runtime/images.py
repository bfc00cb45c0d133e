"""Turning decoded images into files: uint8 conversion, grids, and atomic output folders."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flowturbo.errors import FlowTurboError
from flowturbo.fileio import OutputFolder, json_text
from flowturbo.imageio import read_image_array

RUN_RECORD = "run.json"
INPUT_IMAGE_FILES = ("input.png", "mask.png")  # inpaint / edit outputs: the inputs, beside the results


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8 (grey images keep one channel)."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, H, W)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into one (rows*(H+p)+p, cols*(W+p)+p, C) image."""
    n, h, w, c = images.shape
    cols = columns or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def _png(array: np.ndarray, path: Path, scale: int = 1) -> None:
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)


def write_sample_folder(
    out_dir: str | Path | OutputFolder,
    images: np.ndarray,
    labels: list[int],
    record: dict[str, Any],
    class_names: list[str] | None = None,
    grid_scale: int = 1,
    inputs: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``grid.png``, one PNG per image and ``run.json`` into ``out_dir`` atomically.

    ``inputs`` (inpaint / edit): named (H, W, C) uint8 images (``input.png``, ``mask.png``) written beside the
    results and shown first in the grid (``input | mask | results``).

    Everything goes into a hidden staging folder beside ``out_dir`` first, which replaces ``out_dir`` only
    when complete (:class:`flowturbo.fileio.OutputFolder`). An existing ``out_dir`` is replaced only when every
    entry in it is listed in flowturbo's ownership record. Pass an entered :class:`OutputFolder` (as
    ``flowturbo sample`` does, to check and lock ``--out`` before sampling) or a path.
    """
    if isinstance(out_dir, OutputFolder):
        return _write_into(out_dir, images, labels, record, class_names, grid_scale, inputs)
    with OutputFolder(out_dir, command="sample", what="output") as out:
        return _write_into(out, images, labels, record, class_names, grid_scale, inputs)


def _write_into(out: OutputFolder, images: np.ndarray, labels: list[int], record: dict[str, Any],
                class_names: list[str] | None, grid_scale: int, inputs: dict[str, np.ndarray] | None = None) -> Path:
    inputs = dict(inputs or {})
    unknown = sorted(set(inputs) - set(INPUT_IMAGE_FILES))
    if unknown:
        raise FlowTurboError(f"input images must be named {INPUT_IMAGE_FILES}, got {unknown}")
    with out.staging() as staging:
        shown = np.concatenate([*(a[None] for a in inputs.values()), images]) if inputs else images
        columns = min(len(shown), 10) if inputs else None
        _png(make_grid(shown, columns=columns), staging / "grid.png", grid_scale)
        for name, array in inputs.items():
            _png(array, staging / name)
        write_image_files(staging, images, labels, class_names)
        (staging / RUN_RECORD).write_text(json_text(record))
    return out.target


def image_filename(index: int, total: int, label: int, class_names: list[str] | None) -> str:
    """``07_Sneaker.png``: the global image index, zero-padded to the width of ``total - 1``, and its class."""
    width = len(str(max(total - 1, 0)))
    name = class_names[label].replace("/", "-").replace(" ", "_") if class_names else f"class{label}"
    return f"{index:0{width}d}_{name}.png"


def write_image_files(folder: Path, images: np.ndarray, labels: list[int], class_names: list[str] | None, *,
                      first_index: int = 0, total: int | None = None) -> list[str]:
    """One PNG per image into ``folder`` (a staging folder): images ``first_index ..`` of ``total``."""
    total = len(images) if total is None else total
    names = []
    for j, (image, label) in enumerate(zip(images, labels)):
        names.append(image_filename(first_index + j, total, label, class_names))
        _png(image, folder / names[-1])
    return names


def write_grid(folder: Path, images: np.ndarray, grid_scale: int = 1) -> None:
    """``grid.png`` of (N, H, W, C) uint8 images into ``folder``."""
    _png(make_grid(images), folder / "grid.png", grid_scale)


def _image_pngs(folder: Path) -> list[Path]:
    """The image PNGs of a sample folder (not grid.png nor an inpaint/edit input), in index order."""
    skipped = {"grid.png", *INPUT_IMAGE_FILES}
    return sorted(p for p in folder.glob("*.png") if p.name not in skipped)


def _read_pngs(folder: Path, files: list[Path]) -> np.ndarray:
    """``files`` of the sample folder ``folder`` as (N, H, W, C) uint8, through the one image reader
    (:func:`flowturbo.imageio.read_image_array`); one that is unreadable or of another size than the first is
    refused naming both."""
    fix = f"delete or replace it, or sample {folder} again"
    arrays = [read_image_array(path, "sample image", fix) for path in files]
    for path, array in zip(files, arrays):
        if array.shape != arrays[0].shape:
            raise FlowTurboError(f"sample image {path} is {_size(array)} but {files[0].name} is {_size(arrays[0])}: "
                                 f"every image of a sample folder has one size; {fix}")
    return np.stack(arrays)


def _size(array: np.ndarray) -> str:
    """``WxHxC`` of an (H, W, C) image."""
    return f"{array.shape[1]}x{array.shape[0]}x{array.shape[2]}"


def read_image_files(folder: str | Path) -> np.ndarray:
    """The image PNGs of a sample folder (not grid.png nor an inpaint/edit input), in index order: (N, H, W, C) uint8."""
    return _read_pngs(Path(folder), _image_pngs(Path(folder)))


def read_sample_folder(folder: str | Path) -> tuple[torch.Tensor, list[int], dict[str, Any]]:
    """Read back a ``flowturbo sample`` output: images (N, C, H, W) in [-1, 1], labels, run record."""
    root = Path(folder)
    record_path = root / RUN_RECORD
    if not record_path.is_file():
        raise FlowTurboError(f"{root} is not a flowturbo sample folder (no {RUN_RECORD}); run `flowturbo sample` first")
    try:
        record = json.loads(record_path.read_text())
        labels = [int(v) for v in record.get("labels", [])]
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise FlowTurboError(f"{record_path} is not a readable flowturbo run record ({exc}); sample again") from None
    files = _image_pngs(root)
    if len(files) != len(labels) or not files:
        raise FlowTurboError(f"{root} holds {len(files)} image PNGs but run.json lists {len(labels)} labels")
    stacked = _read_pngs(root, files)  # (N, H, W, C) uint8
    images = torch.from_numpy(stacked).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, C, H, W)
    return images, labels, record
