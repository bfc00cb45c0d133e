"""The SiT family: class-conditional SiT predictors (+ FlowTurbo refiners) as a
:class:`~flowturbo.families.ModelFamily`.

The first adapter of the predictor protocol (docs/predictor_protocol.md). SiT already samples on flowturbo's time
convention (``t = 0`` noise -> ``t = 1`` data, DESIGN.md §2), so the adapter maps nothing: it runs the predictor and the refiner
on the doubled batch ``[x; x]`` with labels ``[y; null]`` (:class:`CFGModelCalls`), guides all channels or, as the
official checkpoints, the first ``guidance_channels`` (the solver ops do, with the per-CFG-half carry of
:mod:`flowturbo.integrator`), uses the schedule's own time grid, and decodes with the bundle's decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from flowturbo.errors import FlowTurboError, SamplingError
from flowturbo.families import (
    ClassConditioning,
    ConditioningKind,
    FamilyDefaults,
    GuidanceRule,
    ImageSize,
    conditioning_mismatch,
)
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.models import refiner_takes_dt

# model(x (M, C, H, W), t (M,), y (M,)) -> (M, >=C, H, W); the first C channels are the velocity.
PredictorFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# refiner(x (M, C, H, W), t (M,), y (M,), v (M, C, H, W)[, dt (M,)]) -> velocity offset (M, C, H, W); dt (the age
# of v, flowturbo.integrator) is passed only to refiners that take it (models.refiner_takes_dt).
RefinerFn = Callable[..., torch.Tensor]


def _parameter_dtype(model: object) -> torch.dtype | None:
    """The dtype of a module's first floating-point parameter (None for plain callables)."""
    parameters = getattr(model, "parameters", None)
    if parameters is None:
        return None
    for p in parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _parameter_device(model: object) -> torch.device:
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if parameters is not None else None
    return first.device if first is not None else torch.device("cpu")


def _cast(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return x if dtype is None or x.dtype == dtype else x.to(dtype)


class CFGModelCalls:
    """:class:`flowturbo.integrator.ModelCalls` over PyTorch models for one label batch.

    With guidance every call runs the doubled batch ``[x; x]`` with labels ``[y; null]`` (DESIGN.md §2) and
    returns the raw output (2B rows) for the solver ops to combine; with ``guided=False`` (scale 1) only the
    conditional rows run. The refiner gets the carried velocity per CFG half: a (B, 2C, H, W) per-half
    velocity is split into its halves, a (B, C, H, W) one is used for both; a dt-conditioned refiner also gets
    the velocity's age ``dt`` (one value for every row), others are called exactly as the released code does.
    """

    def __init__(self, predictor: PredictorFn | None, refiner: RefinerFn | None, labels: torch.Tensor,
                 null_label: int, guided: bool) -> None:
        self.predictor_model = predictor
        self.refiner_model = refiner
        self.guided = bool(guided)
        null = torch.full_like(labels, null_label)
        self.labels = torch.cat([labels, null]) if self.guided else labels  # (M,) M = 2B or B
        # Models may run narrower than the solver state (bf16 weights, float32 state): inputs are cast to the
        # model's parameter dtype, outputs go to the solver ops as they are (the ops widen them).
        self.predictor_dtype = _parameter_dtype(predictor)
        self.refiner_dtype = _parameter_dtype(refiner)
        self.refiner_takes_dt = refiner_takes_dt(refiner)

    def _times(self, t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and t.ndim == 1:  # per-sample times (B,)
            return torch.cat([t, t]) if self.guided else t
        return torch.full((self.labels.shape[0],), float(t), dtype=x.dtype, device=x.device)

    def predictor(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Raw predictor output at (x, t): (M, C_out, H, W)."""
        if self.predictor_model is None:
            raise SamplingError("no predictor was given")
        xx = torch.cat([x, x]) if self.guided else x  # (M, C, H, W)
        return self.predictor_model(_cast(xx, self.predictor_dtype), self._times(t, x), self.labels)

    def refiner(self, x: torch.Tensor, t: float, v: torch.Tensor, dt: float) -> torch.Tensor:
        """Raw refiner offset at (x, t) given the carried velocity v of age dt: (M, C, H, W)."""
        if self.refiner_model is None:
            raise SamplingError("an R step needs a refiner; load a bundle with one or use a schedule without R")
        channels, dtype = x.shape[1], self.refiner_dtype
        age = (self._times(dt, x),) if self.refiner_takes_dt else ()  # (M,) for dt-conditioned refiners only
        if not self.guided:
            return self.refiner_model(_cast(x, dtype), self._times(t, x), self.labels, _cast(v[:, :channels], dtype),
                                      *age)
        halves = (v[:, :channels], v[:, channels:]) if v.shape[1] == 2 * channels else (v, v)
        return self.refiner_model(_cast(torch.cat([x, x]), dtype), self._times(t, x), self.labels,
                                  _cast(torch.cat(halves), dtype), *age)


def check_labels(labels: torch.Tensor, num_classes: int, batch: int) -> None:
    """Refuse class ids outside ``[0, num_classes)`` or a label batch that does not match the noise."""
    if labels.ndim != 1 or labels.shape[0] != batch:
        raise SamplingError(f"labels must have shape ({batch},) to match the noise batch, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise SamplingError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if batch and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)].tolist()
        raise SamplingError(f"class ids {bad[:5]} are outside [0, {num_classes}); this model has {num_classes} classes")


def check_refiner_present(schedule: SamplingSchedule, refiner: object | None, fix: str) -> None:
    """Refuse a schedule with R steps when there is no refiner; ``fix`` ends the message."""
    if schedule.uses_refiner and refiner is None:
        raise SamplingError(f"schedule {schedule.notation} has R steps but {fix}")


class SiTFamily:
    """One loaded SiT predictor (+ optional refiner) and its decoder as a :class:`~flowturbo.families.ModelFamily`.

    ``defaults`` is anything with ``schedule``, ``cfg`` and ``guidance_channels`` (a bundle's ``BundleDefaults``, whose
    ``inpaint_schedule`` is kept when it has one);
    ``device``: where the class ids go (None: the predictor's parameters' device).
    """

    name = "sit"
    conditioning_kind = ConditioningKind.CLASSES
    guidance_rule = GuidanceRule.CFG

    def __init__(self, predictor: PredictorFn, refiner: RefinerFn | None, decoder: Any, num_classes: int,
                 latent_shape: Sequence[int], defaults: Any, device: torch.device | None = None) -> None:
        self.predictor, self.refiner, self.decoder = predictor, refiner, decoder
        self.device = device
        self.num_classes = int(num_classes)
        self._latent_shape = tuple(int(d) for d in latent_shape)  # (C, h, w)
        self.defaults = FamilyDefaults(schedule=defaults.schedule, cfg=defaults.cfg,
                                       guidance_channels=defaults.guidance_channels,
                                       inpaint_schedule=getattr(defaults, "inpaint_schedule", None))

    def latent_shape(self, size: ImageSize | None = None) -> tuple[int, int, int]:
        """The model's one latent shape; a ``size`` other than its image size is refused."""
        if size is not None and size != self.image_size(self._latent_shape):
            raise FlowTurboError(f"this class-conditional model makes {self.image_size(self._latent_shape)} images "
                                 f"only; drop --size {size}")
        return self._latent_shape  # type: ignore[return-value]

    def image_size(self, latent_shape: Sequence[int]) -> ImageSize:
        height, width = (self.decoder.image_size(int(side)) for side in latent_shape[1:])
        return ImageSize(width, height)

    def timesteps(self, num_steps: int, latent_shape: Sequence[int]) -> None:
        """SiT samples on the schedule's own grid (no time shift)."""
        return None

    def check_schedule(self, schedule: SamplingSchedule) -> None:
        check_refiner_present(schedule, self.refiner, "this model has no refiner; use a schedule without R (e.g. "
                              "'H8') or a bundle with a refiner")
        channels = self._latent_shape[0]
        if schedule.guidance_channels is not None and schedule.guidance_channels > channels:
            raise SamplingError(f"--guidance-channels {schedule.guidance_channels} is more than this model's "
                                f"{channels} latent channels; pass --guidance-channels {channels} or less (or none: all)")

    def condition(self, requests: Sequence[Any], schedule: SamplingSchedule, *,
                  negative: Sequence[str] | None = None, guidance: float | None = None) -> ClassConditioning:
        """Class ids (checked against the model's classes) on the model's device."""
        if any(isinstance(r, str) for r in requests):
            raise conditioning_mismatch(self, ConditioningKind.PROMPTS)
        if negative is not None or guidance is not None:
            raise FlowTurboError("negative prompts and a distilled guidance value are for text-to-image models; a "
                                 "class-conditional model is guided by --cfg")
        labels = torch.as_tensor(list(requests), dtype=torch.long)
        if labels.numel() == 0:
            raise SamplingError("no classes given: pass at least one class id")
        check_labels(labels, self.num_classes, labels.shape[0])
        return ClassConditioning(labels.to(self.device or _parameter_device(self.predictor)))

    def model_calls(self, conditioning: ClassConditioning, schedule: SamplingSchedule) -> CFGModelCalls:
        return CFGModelCalls(self.predictor, self.refiner, conditioning.labels, self.num_classes,
                             schedule.guidance_scale != 1.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode(latents)

    def describe(self) -> dict[str, Any]:
        return {"family": self.name, "conditioning": self.conditioning_kind.value, "num_classes": self.num_classes,
                "guidance_rule": self.guidance_rule.value, "defaults": self.defaults.to_dict()}


__all__ = ["CFGModelCalls", "PredictorFn", "RefinerFn", "SiTFamily", "check_labels", "check_refiner_present"]
