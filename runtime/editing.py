"""Inpainting and SDEdit-style editing with FlowTurbo schedules, on every backend whose step loop runs in Python.

Both are *tasks* for the one step loop (:func:`flowturbo.integrator.integrate`): a task prepares the starting
latents and extra inputs of a batch, gives the loop its per-step hooks and (for editing) its time grid, and
post-processes the decoded images. The PyTorch :class:`~flowturbo.runtime.sampler.Sampler` (eager or inside a
CUDA graph: the hooks are plain tensor ops, so they are captured too) and the exported backends
(:class:`~flowturbo.runtime.exported.ExportedSampler`: ONNX Runtime, AOTInductor, TensorRT) run the same
task objects; the C++ runner does not (it refuses with a clear message).

**Inpainting** (white mask pixels are regenerated, black ones kept). The image is encoded once, ``x_1 = E(image)``.
After every step, at its end time ``t``, the known region of the latent is replaced by the encoded image moved
to ``t`` along the linear path with the *same noise* the sample started from: ``x_t = t x_1 + (1 - t) z``. At
``t = 1`` that is ``x_1`` itself. The mask reaches latent resolution by max-pooling (a latent cell is
regenerated if any of its pixels is). The carried velocity is left as the models computed it (see the
integrator's docstring): P and R steps reuse it at the pasted ``x``. Finally the decoded image is blended with
the input in pixel space through a feathered mask that is 0 wherever the user's mask is black, so kept pixels
are exactly the input's (bit for bit, in the PNGs too); it ramps up inside the white region over
``feather`` pixels. A mask that is white everywhere is plain sampling (bit-identical); one that is black
everywhere returns the input (with a warning).

**Editing** (SDEdit on the linear path). Strength ``S`` in (0, 1]: start at ``t0 = 1 - S`` from
``x_t0 = t0 x_1 + (1 - t0) z`` and run the schedule's step kinds on its grid rescaled onto ``[t0, 1]``
(``t0 + (1 - t0) t_k``). The call counts do not change (the same steps, each shorter); ``S = 1`` is plain
sampling (bit-identical).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flowturbo.errors import FlowTurboError, FlowTurboWarning
from flowturbo.imageio import open_image
from flowturbo.integrator import IntegratorState, StepHooks, StepInfo
from flowturbo.schedule import SamplingSchedule

MASK_THRESHOLD = 0.5  # mask pixels >= this (after scaling to [0, 1]) are regenerated
DEFAULT_FEATHER_PX = 2  # width of the blend ramp inside the regenerated region, in image pixels
MIN_STEP_AT_ONE = 2.0**-20  # an edit's shortest step: 8 float32 ulps at t = 1 (steps below are lost to rounding)


class EditingWarning(FlowTurboWarning):
    """Something the user should know about an inpaint / edit request that still gives a correct result."""


# ----------------------------------------------------------------------------------------------- inputs
@dataclasses.dataclass(frozen=True)
class ImageInput:
    """An input image (1, C, H, W) in [-1, 1] as the model sees it, and what was done to get there."""

    pixels: torch.Tensor  # (1, C, H, W) float32 in [-1, 1]
    notes: tuple[str, ...] = ()


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # how PIL opens 16-bit grayscale PNGs


def _eight_bit(image: Any, notes: list[str], what: str) -> Any:
    """A 16-bit grayscale image (PIL mode ``I;16`` / ``I``) as 8-bit ``L``: ``round(v / 257)``, so 0..65535 maps
    onto 0..255 and a 16-bit copy of an 8-bit image (``v * 257``) gives back its exact bytes. (PIL's own
    ``convert("L")`` clips every value above 255 to white.) Other modes are returned as they are."""
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    from PIL import Image

    values = np.asarray(image).astype(np.float64)
    if values.min() < 0 or values.max() > 65535:
        raise FlowTurboError(f"{what} holds values outside 0..65535 (a {image.mode} image); give an 8- or 16-bit "
                             "PNG or a JPEG")
    notes.append(f"converted the 16-bit {image.mode} {what.lstrip('-')} to 8 bits (value / 257, rounded)")
    return Image.fromarray(np.rint(values / 257.0).astype(np.uint8), mode="L")


def _wh(size: int | tuple[int, int]) -> tuple[int, int]:
    """A side (a square) or (width, height) as (width, height)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def load_image(path: str | os.PathLike[str], *, channels: int, size: int | tuple[int, int],
               resize: bool = False) -> ImageInput:
    """Read an image file as (1, channels, H, W) in [-1, 1] (``size``: H = W, or (W, H)).

    A colour image for a grayscale model is converted (and the note says so), likewise grayscale for an RGB
    model; a 16-bit grayscale image is scaled to 8 bits (:func:`_eight_bit`, noted); a size other than the
    model's is refused unless ``resize`` (bicubic, noted).
    """
    image = open_image(path, "--image")
    notes: list[str] = []
    image = _eight_bit(image, notes, "--image")
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:
        notes.append(f"converted the {image.mode} image to {mode} for a {channels}-channel model")
        image = image.convert(mode)
    width, height = _wh(size)
    if image.size != (width, height):
        if not resize:
            raise FlowTurboError(f"--image is {image.size[0]}x{image.size[1]} but the model makes {width}x{height} "
                                 "images; pass --resize to resize it")
        notes.append(f"resized the image from {image.size[0]}x{image.size[1]} to {width}x{height}")
        image = image.resize((width, height), _bicubic())
    array = np.asarray(image, dtype=np.uint8)
    array = array[..., None] if array.ndim == 2 else array  # (H, W, C)
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, C, H, W)
    return ImageInput(pixels, tuple(notes))


def _bicubic() -> Any:
    from PIL import Image

    return Image.Resampling.BICUBIC


def load_mask(path: str | os.PathLike[str], *, size: int | tuple[int, int], image_size: tuple[int, int] | None = None,
              resize: bool = False) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Read a mask file as (1, 1, H, W) floats in {0, 1} (``size``: H = W, or (W, H)): 1 (white) = regenerate,
    0 (black) = keep.

    Grey levels are thresholded at :data:`MASK_THRESHOLD` (noted); colour masks are converted to gray first. A
    mask whose size differs from the image's (``image_size``, as read from disk) is refused naming both sizes,
    unless ``resize`` (nearest neighbour, noted).
    """
    image = open_image(path, "--mask")
    notes: list[str] = []
    width, height = _wh(size)
    want = image_size or (width, height)
    if image.size != want and not resize:
        raise FlowTurboError(f"--mask is {image.size[0]}x{image.size[1]} but --image is {want[0]}x{want[1]}; "
                             "give a mask of the image's size or pass --resize")
    image = _eight_bit(image, notes, "--mask")
    gray = _mask_channel(image, notes)
    if gray.size != (width, height):
        notes.append(f"resized the mask from {gray.size[0]}x{gray.size[1]} to {width}x{height} (nearest)")
        from PIL import Image

        gray = gray.resize((width, height), Image.Resampling.NEAREST)
    values = torch.from_numpy(np.asarray(gray, dtype=np.uint8).copy()).float() / 255.0  # (H, W) in [0, 1]
    binary = values >= MASK_THRESHOLD
    if not torch.equal(values, binary.float()):
        notes.append(f"the mask is not binary: pixels >= {MASK_THRESHOLD} count as white (regenerate)")
    return binary.float()[None, None], tuple(notes)


def _mask_channel(image: Any, notes: list[str]) -> Any:
    """The 8-bit gray image a mask is read from: its gray levels, or its alpha channel when that is where it was
    drawn (the colour is the same everywhere and the alpha varies: opaque = regenerate). A mask with both a
    drawn colour and a drawn alpha is ambiguous and refused."""
    if "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA") if image.mode != "LA" else image
        alpha = np.asarray(rgba.getchannel("A"))
        colour = np.asarray(rgba.convert("L"))
        if alpha.min() != alpha.max():  # the alpha channel holds a drawing
            if colour.min() != colour.max():
                raise FlowTurboError(
                    f"--mask has both a drawn colour and a drawn alpha channel ({image.mode}), so which one is the mask "
                    "is ambiguous; save it as a grayscale PNG (white = regenerate, black = keep), or keep the colour "
                    "the same everywhere to use the alpha (opaque = regenerate)"
                )
            notes.append(f"used the {image.mode} mask's alpha channel (its colour is the same everywhere): "
                         "opaque = regenerate, transparent = keep")
            return rgba.getchannel("A")
    if image.mode not in ("L", "1"):
        notes.append(f"converted the {image.mode} mask to grayscale")
    return image.convert("L")


def check_task_inputs(image: ImageInput, mask: torch.Tensor | None, image_shape: tuple[int, ...],
                      num_results: int) -> None:
    """Images (1 or one per result, C, H, W) and masks (1 or one per result, 1, H, W) of the model's image shape."""
    pixels = image.pixels
    if pixels.dim() != 4 or tuple(pixels.shape[1:]) != tuple(image_shape) or pixels.shape[0] not in (1, num_results):
        raise FlowTurboError(f"the image must be (1 or {num_results}, {', '.join(map(str, image_shape))}) (N, C, H, W) "
                             f"in [-1, 1] for this model, got {tuple(pixels.shape)}")
    if mask is not None and (tuple(mask.shape[-2:]) != tuple(image_shape[1:]) or mask.shape[0] not in (1, num_results)):
        raise FlowTurboError(f"the mask must be {image_shape[1]}x{image_shape[2]} like the image (1 or {num_results} of "
                             f"them), got {tuple(mask.shape)}")


def check_strength(strength: float) -> float:
    """Refuse an edit strength outside (0, 1]."""
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and 0 < strength <= 1):
        raise FlowTurboError(f"--strength must be in (0, 1] (1 = plain sampling from noise), got {strength}")
    return float(strength)


def latent_keep_mask(mask: torch.Tensor, latent_size: int | tuple[int, int]) -> torch.Tensor:
    """(1, 1, H, W) pixel mask (1 = regenerate) -> (1, 1, h, w) bool *keep* mask at latent resolution (``latent_size``:
    h = w, or (h, w)).

    A latent cell is regenerated when any of its pixels is (max-pooling), so no generated pixel depends on a
    latent that was pinned to the input.
    """
    regenerate = F.adaptive_max_pool2d(mask.float(), latent_size)  # (N, 1, h, w)
    return regenerate < 0.5


def feathered_blend(mask: torch.Tensor, feather: int) -> torch.Tensor:
    """(1, 1, H, W) weights of the generated image in the final blend: exactly 0 where the mask is black,
    ramping up to 1 inside the white region over ``feather`` pixels (a box blur of the mask, times the mask)."""
    if feather < 0:
        raise FlowTurboError(f"--feather must be >= 0 pixels, got {feather}")
    mask = mask.float()
    if feather == 0:
        return mask
    k = 2 * feather + 1
    blurred = F.avg_pool2d(F.pad(mask, (feather,) * 4, mode="replicate"), k, stride=1)  # (1, 1, H, W)
    return mask * blurred


# ------------------------------------------------------------------------------------------------ tasks
def _rows(tensor: torch.Tensor, rows: slice, batch: int) -> torch.Tensor:
    """A task tensor for one batch: one shared row expanded, or the batch's own rows (one per result)."""
    return tensor.expand(batch, *tensor.shape[1:]) if tensor.shape[0] == 1 else tensor[rows]


class InpaintHook(StepHooks):
    """After each step (end time t): the kept latent cells become ``t x_1 + (1 - t) z`` exactly."""

    def __init__(self, known: torch.Tensor, noise: torch.Tensor, keep: torch.Tensor) -> None:
        self.known, self.noise, self.keep = known, noise, keep  # (B, C, h, w) x2, (B, 1, h, w) bool

    def after_step(self, step: StepInfo, state: IntegratorState) -> None:
        t = step.t_end
        on_path = self.known * t + self.noise * (1.0 - t)  # the input moved to t along the linear path
        state.x = torch.where(self.keep, on_path.to(state.x.dtype), state.x)


class InpaintTask:
    """Inpainting as a task for the samplers (module docstring)."""

    name = "inpaint"
    timesteps: tuple[float, ...] | None = None

    def __init__(self, image: ImageInput, mask: torch.Tensor, known: torch.Tensor, latent_size: int | tuple[int, int], *,
                 feather: int = DEFAULT_FEATHER_PX, mask_notes: Sequence[str] = ()) -> None:
        self.image = image
        self.mask = mask  # (1, 1, H, W) in {0, 1}
        self.known = known  # (1, C, h, w) scaled latents of the image
        self.keep = latent_keep_mask(mask, latent_size)  # (1, 1, h, w) bool
        self.blend = feathered_blend(mask, feather)  # (1, 1, H, W)
        self.feather = feather
        self.notes = tuple(image.notes) + tuple(mask_notes)
        self.key = ("inpaint",)

    @property
    def regenerates_nothing(self) -> bool:  # noqa: D102 - every mask black
        return not bool(self.mask.any())

    def prepare(self, noise: torch.Tensor, conditioning: Any,
                rows: slice = slice(None)) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(starting latents, extra per-batch inputs) for the batch of result ``rows``: start from the noise; the
        hook needs x_1, z and the keep mask (the batch's ``conditioning`` — labels — is not needed)."""
        b = noise.shape[0]
        known = _rows(self.known, rows, b).to(device=noise.device, dtype=noise.dtype).contiguous()
        keep = _rows(self.keep, rows, b).to(noise.device).contiguous()
        return noise, (known, noise, keep)

    def hooks(self, known: torch.Tensor, noise: torch.Tensor, keep: torch.Tensor) -> list[StepHooks]:
        return [InpaintHook(known, noise, keep)]

    def finish(self, images: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """Blend in pixel space: kept pixels are exactly the input's."""
        b = images.shape[0]
        blend = _rows(self.blend, rows, b).to(device=images.device, dtype=torch.float32)
        image = _rows(self.image.pixels, rows, b).to(device=images.device)
        return blend * images.float() + (1.0 - blend) * image

    def describe(self) -> dict[str, Any]:
        return {"task": "inpaint", "regenerated_fraction": float(self.mask.mean()),
                "regenerated_latent_fraction": float((~self.keep).float().mean()), "feather_px": self.feather,
                "mask_threshold": MASK_THRESHOLD, "notes": list(self.notes)}


class EditTask:
    """SDEdit-style editing as a task for the samplers (module docstring)."""

    name = "edit"

    def __init__(self, image: ImageInput, known: torch.Tensor, strength: float, schedule: SamplingSchedule) -> None:
        self.image = image
        self.known = known  # (1, C, h, w)
        self.strength = check_strength(strength)
        self.t0 = 1.0 - self.strength
        self.timesteps = edit_timesteps(schedule, self.strength)
        self.notes = tuple(image.notes)
        self.key = ("edit", self.strength)

    def prepare(self, noise: torch.Tensor, conditioning: Any,
                rows: slice = slice(None)) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        known = _rows(self.known, rows, noise.shape[0]).to(device=noise.device, dtype=noise.dtype)
        if self.t0 == 0.0:
            return noise, ()  # strength 1: plain sampling, bit for bit
        return known * self.t0 + noise * (1.0 - self.t0), ()  # x_t0 on the linear path

    def hooks(self) -> list[StepHooks]:
        return []

    def finish(self, images: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        return images

    def describe(self) -> dict[str, Any]:
        return {"task": "edit", "strength": self.strength, "t0": self.t0, "timesteps": list(self.timesteps),
                "notes": list(self.notes)}


def edit_timesteps(schedule: SamplingSchedule, strength: float) -> tuple[float, ...]:
    """The schedule's grid rescaled onto ``[1 - strength, 1]``; strength 1 gives the grid itself.

    A strength so small that the rescaled steps are lost to float32 rounding (the models' time dtype) is
    refused, naming the smallest strength for this schedule (:func:`smallest_strength`).
    """
    t0 = 1.0 - check_strength(strength)
    least = smallest_strength(schedule)
    if strength < least:
        raise FlowTurboError(
            f"--strength {strength:g} is too small for the {schedule.num_steps} steps of {schedule.notation}: it "
            f"starts the edit at t = 1 - {strength:g}, and steps that short are no steps in float32 time (the input "
            f"would come back unchanged); use --strength {least:g} or more"
        )
    return (t0, *(t0 + (1.0 - t0) * t for t in schedule.timesteps[1:-1]), 1.0)  # both ends exact


def smallest_strength(schedule: SamplingSchedule) -> float:
    """The smallest edit strength for ``schedule`` (one significant digit, rounded up): its shortest step,
    rescaled onto ``[1 - strength, 1]``, must be at least :data:`MIN_STEP_AT_ONE`."""
    shortest = min(b - a for a, b in zip(schedule.timesteps, schedule.timesteps[1:]))
    exact = MIN_STEP_AT_ONE / shortest
    digits = 10.0 ** math.floor(math.log10(exact))
    return float(f"{math.ceil(exact / digits) * digits:.1g}")  # as printed: that strength itself passes


def input_only_samples(image: ImageInput, classes: Sequence[Any], schedule: SamplingSchedule, num_classes: int,
                       notes: Sequence[str], *, prompts: bool = False) -> Any:
    """The result of an all-black mask: every output is the input image; no model call is made. ``prompts``:
    ``classes`` are a text model's prompts (labels index the distinct ones, as ``sample``'s)."""
    from flowturbo.runtime.results import Samples, StageTimes

    distinct = list(dict.fromkeys(classes)) if prompts else None
    labels = [distinct.index(p) for p in classes] if distinct is not None else [int(c) for c in classes]
    if not labels:
        raise FlowTurboError("no prompts given: pass at least one prompt" if prompts else
                             "no classes given: pass at least one class id")
    bad = [] if prompts else [c for c in labels if not 0 <= c < num_classes]
    if bad:
        raise FlowTurboError(f"class ids {bad[:5]} are outside [0, {num_classes}); this model has {num_classes} classes")
    return Samples(images=_rows(image.pixels.float().cpu(), slice(None), len(labels)).contiguous(), labels=labels,
                   schedule=schedule, predictor_calls=0, refiner_calls=0, num_batches=0, times=StageTimes(0.0, 0.0),
                   prompts=distinct,
                   task={"task": "inpaint", "regenerated_fraction": 0.0,
                         "notes": [*image.notes, *notes, "the mask is black everywhere: the input is returned"]})


def warn_nothing_to_regenerate() -> None:
    warnings.warn("the mask is black everywhere: nothing to regenerate, returning the input image",
                  EditingWarning, stacklevel=3)


__all__ = [
    "DEFAULT_FEATHER_PX",
    "EditTask",
    "EditingWarning",
    "ImageInput",
    "InpaintHook",
    "InpaintTask",
    "MASK_THRESHOLD",
    "check_strength",
    "check_task_inputs",
    "edit_timesteps",
    "input_only_samples",
    "feathered_blend",
    "latent_keep_mask",
    "load_image",
    "load_mask",
]
