"""Reading image files: the one reader of every flowturbo command, with one error vocabulary.

``inpaint`` / ``edit`` inputs (``--image``, ``--mask``), sample folders read back by ``eval --samples`` and
``sample`` under torchrun, and image-folder datasets of the trainers all open images here. Whatever goes wrong
ends in one :class:`~flowturbo.errors.FlowTurboError` naming the flag (or role) and the file:

* ``--image x.png not found`` / ``... is not a file``;
* ``... is not a readable image (...)``: not an image, a truncated or corrupt file;
* ``... has W x H pixels, more than Pillow's decompression-bomb limit of N``: an image this large is refused
  before it is decoded (Pillow warns above its ``MAX_IMAGE_PIXELS`` and raises above twice that; both are
  refused here, with the same message).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from flowturbo.errors import FlowTurboError


def open_image(path: str | os.PathLike[str], what: str, fix: str = "give a PNG or JPEG file") -> Any:
    """Open and fully decode the image file ``path`` (a ``PIL.Image.Image``); ``what`` names it in errors
    (``--image``, ``sample image``), ``fix`` ends the message of an unreadable file."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    if not file.is_file():
        raise FlowTurboError(f"{what} {file} not found" if not file.exists() else f"{what} {file} is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(file)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise FlowTurboError(
            f"{what} {file} has {_pixels(file)}, more than Pillow's decompression-bomb limit of "
            f"{Image.MAX_IMAGE_PIXELS:,} pixels, so flowturbo does not decode it; give a smaller image"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise FlowTurboError(f"{what} {file} is not a readable image ({exc}); {fix}") from None
    return image


def _pixels(file: Path) -> str:
    """``W x H pixels`` from the header alone (no decoding), or ``too many pixels``."""
    from PIL import Image, UnidentifiedImageError

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # read the header without the bomb check
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(file) as header:
                width, height = header.size
        return f"{width} x {height} = {width * height:,} pixels"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):  # only the message: the refusal stands
        return "too many pixels"
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def read_image_array(path: str | os.PathLike[str], what: str, fix: str = "give a PNG or JPEG file") -> Any:
    """:func:`open_image` as a (H, W, C) ``uint8`` numpy array (gray images get C = 1; other modes, e.g. 16-bit
    or palette, are converted to ``L`` / ``RGB`` / ``RGBA`` first)."""
    import numpy as np

    image = open_image(path, what, fix)
    if image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else ("L" if len(image.getbands()) == 1 else "RGB"))
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


__all__ = ["open_image", "read_image_array"]
