"""Users' own images in ImageNet layout: ``root/<class_name>/*.JPEG|png``.

Preprocessing follows ADM / DiT / SiT (``center_crop_arr``): halve with a box filter while the short side
is at least twice the target, resize the short side to the target with bicubic, center crop; then an
optional horizontal flip. Flips are a deterministic function of ``(seed, epoch, index)`` (call
:meth:`ImageFolderDataset.set_epoch` each epoch), so a resumed training run sees exactly the same pixels and
worker processes need no shared random state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from flowturbo.errors import FlowTurboError
from flowturbo.imageio import open_image

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
PIL_MODES = {1: "L", 3: "RGB"}  # image channels -> PIL mode
FLIP_PROBABILITY = 0.5
PIXEL_MAX = 255.0


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's center crop: box-halve, bicubic-resize the short side to ``image_size``, crop the center."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def find_images(root: str | Path, classes: Sequence[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """Scan ``root/<class>/`` for images; returns ``(class_names, [(path, class_id), ...])``.

    Class ids follow the sorted folder names (torchvision ``ImageFolder`` / ImageNet synset order) unless
    ``classes`` fixes the list. Raises :class:`FlowTurboError` for a missing, empty or flat folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FlowTurboError(f"image folder {root} does not exist; pass a folder laid out as root/<class_name>/*.png")
    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        hint = f" (found {len(loose)} images directly in it: move them into one sub-folder per class)" if loose else ""
        raise FlowTurboError(f"image folder {root} has no class sub-folders{hint}; expected root/<class_name>/*.png")
    samples: list[tuple[Path, int]] = []
    for class_id, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            raise FlowTurboError(f"class folder {folder} does not exist; create it or drop {name!r} from the classes")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        samples.extend((p, class_id) for p in files)
    if not samples:
        exts = ", ".join(IMAGE_EXTENSIONS)
        raise FlowTurboError(f"image folder {root} has class folders but no images ({exts}); add images to train on")
    return list(classes), samples


def deterministic_flip(seed: int, epoch: int, index: int) -> bool:
    """Whether item ``index`` is mirrored in ``epoch``: a pure function, identical in every process."""
    return bool(np.random.default_rng([seed, epoch, index]).random() < FLIP_PROBABILITY)


class ImageFolderDataset(Dataset):
    """ImageNet-layout folder -> ``(image (C, R, R) float32 in [-1, 1], class_id)``.

    ``channels`` is 1 (grayscale) or 3 (RGB); every image is converted to that mode.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        *,
        channels: int = 3,
        random_flip: bool = True,
        seed: int = 0,
        classes: Sequence[str] | None = None,
    ) -> None:
        if channels not in PIL_MODES:
            raise FlowTurboError(f"channels must be one of {sorted(PIL_MODES)}, got {channels}")
        if resolution <= 0:
            raise FlowTurboError(f"resolution must be positive, got {resolution}")
        self.root = Path(root)
        self.resolution = resolution
        self.channels = channels
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        self.class_names, self.samples = find_images(self.root, classes)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def set_epoch(self, epoch: int) -> None:
        """Choose the flips of this epoch (deterministic in ``(seed, epoch, index)``)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def is_flipped(self, index: int) -> bool:
        """Whether item ``index`` is mirrored in the current epoch."""
        return self.random_flip and deterministic_flip(self.seed, self.epoch, index)

    def load_image(self, index: int) -> Image.Image:
        """The cropped (unflipped) PIL image of item ``index``; unreadable files raise :class:`FlowTurboError`."""
        path, _ = self.samples[index]
        img = open_image(path, "dataset image", "delete or replace the file").convert(PIL_MODES[self.channels])
        return center_crop_arr(img, self.resolution)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        arr = np.asarray(self.load_image(index), dtype=np.float32)  # (R, R) or (R, R, C)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if self.is_flipped(index):
            arr = arr[:, ::-1]
        image = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (C, R, R)
        image = image / (PIXEL_MAX / 2) - 1.0
        return image, self.samples[index][1]
