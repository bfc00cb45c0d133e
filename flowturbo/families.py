"""The predictor protocol: what a model family implements so that the one step loop samples it.

Documented in docs/predictor_protocol.md.

A *family* (class-conditional SiT, Stable Diffusion 3, FLUX.1, ...) is one adapter object that holds a loaded
model and turns it into the integrator's :class:`~flowturbo.integrator.ModelCalls` on flowturbo's time convention
(``t = 0`` noise -> ``t = 1`` data, ``x_t = t x_data + (1 - t) noise``, velocity ``x_data - noise``). Everything
family-specific lives behind :class:`ModelFamily`:

* **conditioning** — what a request is conditioned on, as data: :class:`ClassConditioning` (class ids) or
  :class:`TextConditioning` (prompt embeddings + pooled embeddings + attention mask, the negative prompt's for
  CFG, and a distilled guidance value where the model takes one). Text encoders run once per prompt, in the
  adapter; exported graphs will take the embeddings as inputs.
* **guidance** (:class:`GuidanceRule`) — CFG on a doubled batch ``[cond; uncond]`` that the solver ops combine
  (``u + s (c - u)``, on every channel or, as the official SiT checkpoints, the first ``guidance_channels``), a
  distilled guidance *embedding* (FLUX.1-dev: a model input, one batch, no doubling), or none.
* **latents** — the latent shape for an image size (sizes a model cannot take are refused naming the nearest
  ones), any packing the model wants (FLUX packs 2x2 patches into tokens: the adapter packs on the way in and
  unpacks on the way out, so the solver state stays (B, C, h, w)), and the decode with the VAE's scale and shift.
* **time grid** — the family's own time shift: a schedule of N steps runs on the grid the model's scheduler
  would use (SD3: a static shift; FLUX.1-dev: a resolution-dependent one), mapped from sigma (1 -> 0) to
  ``t = 1 - sigma`` in one place, the adapter.
* **defaults** (:class:`FamilyDefaults`) — schedule, CFG scale and channels, distilled guidance, time shift.

The rest of the runtime — the sampler, the command line, the output writer — sees only this protocol. This
module is torch-free (tensors are whatever the adapter works on); the adapters live in the training layer
(``flowturbo.training.families``: they build models).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Protocol, Union, runtime_checkable

from flowturbo.errors import FlowTurboError
from flowturbo.integrator import ModelCalls
from flowturbo.schedule import SamplingSchedule

Tensor = Any  # a torch.Tensor (this module does not import torch)


class ConditioningKind(str, enum.Enum):
    """What a family's requests name: class ids or text prompts."""

    CLASSES = "classes"
    PROMPTS = "prompts"


class GuidanceRule(str, enum.Enum):
    """How a family is guided (a request's CFG scale lives in its schedule, a distilled value in its conditioning)."""

    CFG = "cfg"  # a doubled batch [cond; uncond], combined by the solver ops: u + s (c - u) (SiT: first G channels)
    EMBEDDED = "embedded"  # a distilled guidance value is a model input: one batch, no doubling (FLUX.1-dev)
    NONE = "none"  # the model takes no guidance (FLUX.1-schnell); CFG only from an explicit negative prompt


# ------------------------------------------------------------------------------------------------ conditioning
def _is_tensor(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


class _TensorFields:
    """Row slicing and tensor flattening over a frozen dataclass's tensor fields (nested conditioning included):
    what batching (:meth:`rows`) and CUDA-graph capture (:meth:`tensors` / :meth:`with_tensors`) need."""

    def rows(self, rows: slice) -> Any:
        """The conditioning of the batch rows ``rows``."""
        changes = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if _is_tensor(value):
                changes[field.name] = value[rows]
            elif isinstance(value, _TensorFields):
                changes[field.name] = value.rows(rows)
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def tensors(self) -> tuple[Tensor, ...]:
        """Every tensor, in a fixed order (None fields skipped)."""
        found: list[Tensor] = []
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if _is_tensor(value):
                found.append(value)
            elif isinstance(value, _TensorFields):
                found.extend(value.tensors())
        return tuple(found)

    def static_key(self) -> tuple[Any, ...]:
        """What a captured graph bakes in: every tensor's shape and dtype and every other field's value."""
        key: list[Any] = []
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if _is_tensor(value):
                key.append((field.name, tuple(value.shape), str(value.dtype)))
            elif isinstance(value, _TensorFields):
                key.append((field.name, value.static_key()))
            else:
                key.append((field.name, value))
        return tuple(key)

    def with_tensors(self, tensors: Sequence[Tensor]) -> Any:
        """The same conditioning over other tensors of the same layout (:meth:`tensors`' order)."""
        supply = iter(tensors)
        made = self._take(supply)
        if next(supply, None) is not None:
            raise FlowTurboError(f"{type(self).__name__}.with_tensors: more tensors than fields")
        return made

    def _take(self, supply: Iterator[Tensor]) -> Any:
        changes = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if _is_tensor(value):
                changes[field.name] = next(supply)
            elif isinstance(value, _TensorFields):
                changes[field.name] = value._take(supply)
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclasses.dataclass(frozen=True)
class ClassConditioning(_TensorFields):
    """Class-conditional requests: one class id per image (the null class for CFG is the family's business)."""

    kind: ClassVar[ConditioningKind] = ConditioningKind.CLASSES
    labels: Tensor  # (B,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True)
class PromptEmbeddings(_TensorFields):
    """A text encoder stack's output for one batch of prompts."""

    embeds: Tensor  # (B, L, D) per-token embeddings
    pooled: Tensor | None = None  # (B, P) pooled embeddings (SD3: two CLIPs' projections; FLUX: CLIP's pooler)
    mask: Tensor | None = None  # (B, L) 1 = attend; None: every token (SD3 and FLUX pad without a mask)


@dataclasses.dataclass(frozen=True)
class TextConditioning(_TensorFields):
    """Text-to-image requests: the prompts' embeddings, the negative prompts' (the unconditional half of CFG; None
    without CFG) and, for guidance-distilled models, the guidance value the model embeds."""

    kind: ClassVar[ConditioningKind] = ConditioningKind.PROMPTS
    prompt: PromptEmbeddings
    negative: PromptEmbeddings | None = None
    guidance: float | None = None  # GuidanceRule.EMBEDDED: the distilled guidance value (a model input)

    def __len__(self) -> int:
        return int(self.prompt.embeds.shape[0])


Conditioning = Union[ClassConditioning, TextConditioning]


# ---------------------------------------------------------------------------------------------------- defaults
@dataclasses.dataclass(frozen=True)
class FamilyDefaults:
    """What a family samples with when a request names nothing (travels into every record of a run)."""

    schedule: str  # schedule notation, e.g. "H1P5R3" or a diffusers pipeline's own "E28"
    cfg: float = 1.0  # CFG scale of the doubled batch (1: none)
    guidance_channels: int | None = None  # CFG on the first N latent channels only (None: all)
    guidance: float | None = None  # distilled guidance value (GuidanceRule.EMBEDDED), else None
    time_shift: str = "none"  # how the time grid is made: "none" (the schedule's own), or the model's shift
    inpaint_schedule: str | None = None  # inpainting's schedule when the request names none (None: ``schedule``)

    def schedule_for(self, task: str = "sample") -> str:
        """The default schedule notation for ``task`` (``sample``, ``inpaint`` or ``edit``)."""
        return self.inpaint_schedule if task == "inpaint" and self.inpaint_schedule else self.schedule

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------- image sizes
@dataclasses.dataclass(frozen=True, order=True)
class ImageSize:
    """An image size in pixels (``--size WIDTHxHEIGHT``, or one number for a square)."""

    width: int
    height: int

    @classmethod
    def parse(cls, text: str, flag: str = "--size") -> "ImageSize":
        match = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*", str(text))
        if match is None or int(match.group(1)) < 1 or (match.group(2) is not None and int(match.group(2)) < 1):
            raise FlowTurboError(f"{flag} must be WIDTHxHEIGHT in pixels (e.g. 1024x1024) or one number for a square, "
                                 f"got {text!r}")
        width = int(match.group(1))
        return cls(width, int(match.group(2)) if match.group(2) is not None else width)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def nearest_multiples(value: int, multiple: int) -> tuple[int, ...]:
    """The multiples of ``multiple`` nearest to ``value`` (the one below, if positive, and the one above)."""
    below = value // multiple * multiple
    return tuple(v for v in (below, below + multiple) if v > 0)


def check_image_size(size: ImageSize, multiple: int, why: str, flag: str = "--size") -> ImageSize:
    """Refuse a size whose sides are not multiples of ``multiple`` (``why`` says where it comes from), naming the
    nearest valid sizes."""
    if size.width % multiple == 0 and size.height % multiple == 0:
        return size
    widths, heights = nearest_multiples(size.width, multiple), nearest_multiples(size.height, multiple)
    options = sorted({ImageSize(w, h) for w in widths for h in heights},
                     key=lambda s: (abs(s.width - size.width) + abs(s.height - size.height), s))
    raise FlowTurboError(f"{flag} {size} is not a multiple of {multiple} on both sides ({why}); the nearest valid "
                         f"sizes are {', '.join(str(s) for s in options[:4])}")


# ---------------------------------------------------------------------------------------------------- protocol
@runtime_checkable
class ModelFamily(Protocol):
    """One loaded model of a family, as the runtime sees it (module docstring; docs/predictor_protocol.md)."""

    name: str  # "sit", "sd3", "flux", ...: recorded in every run
    conditioning_kind: ConditioningKind
    guidance_rule: GuidanceRule
    defaults: FamilyDefaults

    def latent_shape(self, size: ImageSize | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the solver state for an image size (None: the model's default size); sizes the model cannot
        take are a FlowTurboError naming the nearest valid ones."""
        ...

    def image_size(self, latent_shape: Sequence[int]) -> ImageSize:
        """The decoded image size of a latent shape."""
        ...

    def timesteps(self, num_steps: int, latent_shape: Sequence[int]) -> tuple[float, ...] | None:
        """The family's time grid for ``num_steps`` steps on latents of ``latent_shape`` (N + 1 increasing floats
        from 0 to 1, on flowturbo's time axis), or None when the family uses the schedule's own grid."""
        ...

    def check_schedule(self, schedule: SamplingSchedule) -> None:
        """Refuse a schedule this model cannot run (R steps without a refiner, CFG it cannot take, ...)."""
        ...

    def condition(self, requests: Sequence[Any], schedule: SamplingSchedule, *,
                  negative: Sequence[str] | None = None, guidance: float | None = None) -> Conditioning:
        """The conditioning of one image per entry of ``requests`` (class ids or prompts); ``negative``: negative
        prompts (one, or one per request); ``guidance``: a distilled guidance value. Wrong kinds are refused."""
        ...

    def model_calls(self, conditioning: Conditioning, schedule: SamplingSchedule) -> ModelCalls:
        """The integrator's model calls for one batch: raw outputs on flowturbo's time convention, ``[cond; uncond]``
        rows when the schedule's CFG scale is not 1, B already-guided rows otherwise."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Final latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        ...

    def describe(self) -> dict[str, Any]:
        """What run records say about the model (family, source, defaults, ...)."""
        ...


MAX_PROMPTS = 100_000  # per --prompts file: more is a mistake (each prompt is encoded and sampled)


def read_prompts(path: str, flag: str = "--prompts") -> list[str]:
    """One prompt per line of a UTF-8 file (surrounding blanks stripped, blank lines skipped); ``flag`` names it in
    errors."""
    try:
        with open(path, encoding="utf-8") as handle:
            prompts = [line.strip() for line in handle if line.strip()]
    except UnicodeDecodeError:
        raise FlowTurboError(f"{flag} {path} is not UTF-8 text; save it as UTF-8, one prompt per line") from None
    except OSError as exc:
        raise FlowTurboError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    if not prompts:
        raise FlowTurboError(f"{flag} {path} holds no prompt; write one prompt per line")
    if len(prompts) > MAX_PROMPTS:
        raise FlowTurboError(f"{flag} {path} holds {len(prompts)} prompts, more than {MAX_PROMPTS}; split the file")
    return prompts


PIPELINE_INDEX = "model_index.json"  # what makes a folder a diffusers pipeline (its _class_name: the pipeline class)


def diffusers_pipeline_class(path: str) -> str | None:
    """The pipeline class named by a diffusers pipeline folder's ``model_index.json`` (None: not a pipeline folder);
    cheap and torch-free, for commands that must refuse such folders before loading anything."""
    index = os.path.join(path, PIPELINE_INDEX)
    if not os.path.isfile(index):
        return None
    try:
        with open(index, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError):
        return "(unreadable model_index.json)"
    name = data.get("_class_name") if isinstance(data, dict) else None
    return str(name) if name else "(unnamed)"


def conditioning_mismatch(family: ModelFamily, given: ConditioningKind) -> FlowTurboError:
    """The error for a request of the wrong kind (``--classes`` for a text model, ``--prompt`` for a class model)."""
    if family.conditioning_kind is ConditioningKind.PROMPTS:
        return FlowTurboError(f"this {family.name} model is conditioned on text prompts, not class ids: pass --prompt "
                              "TEXT or --prompts FILE instead of --classes")
    return FlowTurboError(f"this {family.name} model is conditioned on class ids, not text prompts: pass --classes "
                          "(or nothing: every class once) instead of --prompt/--prompts, or a text-to-image "
                          "--pipeline folder")


__all__ = [
    "ClassConditioning",
    "Conditioning",
    "ConditioningKind",
    "FamilyDefaults",
    "GuidanceRule",
    "ImageSize",
    "ModelFamily",
    "PromptEmbeddings",
    "TextConditioning",
    "check_image_size",
    "conditioning_mismatch",
    "diffusers_pipeline_class",
    "nearest_multiples",
    "read_prompts",
]
