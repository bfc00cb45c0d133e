"""One I/O contract per exportable module (DESIGN.md §3, "TensorRT diffusion demo" style).

A :class:`ModuleSpec` names every input and output, its dtype and its shape, where the leading ``"batch"``
axis is dynamic within a :class:`BatchProfile` (min/opt/max images). The same spec drives

* ONNX export (``dynamic_shapes`` for the dynamo exporter) and the check that the batch axis really stayed
  symbolic in the written graph,
* TensorRT optimization profiles (:meth:`ModuleSpec.tensorrt_profile`),
* AOTInductor dynamic shapes (:meth:`ModuleSpec.export_dynamic_shapes`),
* the runtime's output buffers (:meth:`TensorSpec.shape_for`; the runtime reads the spec from the manifest).

Callers always pass B *images*: the classifier-free-guidance doubling ``[x; x]`` / ``[y; null]`` and the
combination ``u + s (c - u)`` happen inside the exported graphs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flowturbo.dtypes import precision_dtype_name
from flowturbo.errors import FlowTurboError

BATCH_AXIS = "batch"  # the symbolic name of the dynamic leading axis
PRECISIONS = ("fp32", "fp16", "bf16")
TIME_DTYPE = "float32"  # times (t and the refiner's dt) stay float32 at every precision (sinusoids in fp32)
DT_INPUT = "dt"  # a dt-conditioned refiner's input: the age of its velocity (flowturbo.integrator)
LABEL_DTYPE = "int64"
MAX_BATCH = 65536  # sanity bound for profiles typed by hand

# Module names (also the artifact file stems).
PREDICTOR_STEP = "predictor_step"
REFINER_STEP = "refiner_step"
DECODER = "decoder"
ENCODER = "encoder"
UNROLLED = "unrolled_schedule"


@dataclasses.dataclass(frozen=True)
class BatchProfile:
    """Images per call an artifact accepts: ``min <= opt <= max`` (opt is what engines tune for)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        values = (self.min, self.opt, self.max)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise FlowTurboError(f"batch profile values must be integers, got {values}")
        if not 1 <= self.min <= self.opt <= self.max <= MAX_BATCH:
            raise FlowTurboError(
                f"batch profile must satisfy 1 <= min <= opt <= max <= {MAX_BATCH}, got {self.describe()}; "
                "write it as MIN:OPT:MAX, e.g. 1:4:16"
            )

    @classmethod
    def parse(cls, text: str | int | "BatchProfile") -> "BatchProfile":
        """``'1:4:16'`` -> (1, 4, 16); ``'8'`` -> static (8, 8, 8); ``'1:16'`` -> (1, 16, 16)."""
        if isinstance(text, BatchProfile):
            return text
        if isinstance(text, int) and not isinstance(text, bool):
            return cls(text, text, text)
        parts = str(text).strip().split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise FlowTurboError(f"batch profile {text!r} is not MIN:OPT:MAX integers, e.g. 1:4:16") from None
        if len(values) == 1:
            return cls(values[0], values[0], values[0])
        if len(values) == 2:
            return cls(values[0], values[1], values[1])
        if len(values) == 3:
            return cls(*values)
        raise FlowTurboError(f"batch profile {text!r} has {len(values)} fields; write MIN:OPT:MAX, e.g. 1:4:16")

    @property
    def is_static(self) -> bool:
        return self.min == self.max

    def contains(self, batch: int) -> bool:
        return self.min <= batch <= self.max

    def describe(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def example_batch(self) -> int:
        """A batch to trace with: ``opt``, but at least 2 when the axis is dynamic (tracers specialise 1)."""
        if self.is_static:
            return self.opt
        return min(max(self.opt, 2), self.max)

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BatchProfile":
        return cls(int(data["min"]), int(data["opt"]), int(data["max"]))


Dim = int | str


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One named input or output: dtype name (``float32``/``float16``/``bfloat16``/``int64``) and shape.

    ``shape`` holds ints and, at position 0 only, the symbolic :data:`BATCH_AXIS`.
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        for axis, dim in enumerate(self.shape):
            if isinstance(dim, str) and (dim != BATCH_AXIS or axis != 0):
                raise FlowTurboError(f"{self.name}: only axis 0 may be symbolic ({BATCH_AXIS!r}), got {self.shape}")

    @property
    def batched(self) -> bool:
        return bool(self.shape) and self.shape[0] == BATCH_AXIS

    def shape_for(self, batch: int) -> tuple[int, ...]:
        """Concrete shape at ``batch`` images."""
        return tuple(batch if dim == BATCH_AXIS else int(dim) for dim in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TensorSpec":
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


@dataclasses.dataclass(frozen=True)
class ModuleSpec:
    """The I/O contract of one exported module at one batch profile.

    ``time`` is the folded time of a per-step graph (variant ``per-step``), None when time is an input
    or the graph covers the whole schedule. ``dt`` is the folded velocity age of a dt-conditioned refiner's
    per-step graph (one graph per (t, dt) the schedule calls it at), None otherwise.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch: BatchProfile
    time: float | None = None
    dt: float | None = None

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for spec in (*self.inputs, *self.outputs):
            if spec.name == name:
                return spec
        raise FlowTurboError(f"module {self.name} has no tensor {name!r}; it has {self.input_names + self.output_names}")

    def export_dynamic_shapes(self) -> dict[str, dict[int, Any]] | None:
        """``dynamic_shapes`` for ``torch.export`` / the dynamo ONNX exporter (None when the profile is static).

        Keys are the input names, which must equal the wrapped module's ``forward`` parameter names.
        """
        if self.batch.is_static:
            return None
        import torch

        batch = torch.export.Dim(BATCH_AXIS, min=self.batch.min, max=self.batch.max)
        return {t.name: ({0: batch} if t.batched else {}) for t in self.inputs}

    def tensorrt_profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Input name -> (min, opt, max) shapes for ``IOptimizationProfile.set_shape``."""
        b = self.batch
        return {t.name: (t.shape_for(b.min), t.shape_for(b.opt), t.shape_for(b.max)) for t in self.inputs}

    def to_dict(self) -> dict[str, Any]:
        data = {
            "name": self.name,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "batch": self.batch.to_dict(),
            "time": self.time,
        }
        if self.dt is not None:  # only dt-conditioned per-step refiner graphs fold a dt
            data["dt"] = self.dt
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModuleSpec":
        return cls(
            data["name"],
            tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
            BatchProfile.from_dict(data["batch"]),
            data.get("time"),
            data.get("dt"),
        )


def check_precision(precision: str) -> str:
    """Refuse unknown precisions with the list of valid ones."""
    if precision not in PRECISIONS:
        raise FlowTurboError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def _latent(name: str, latent_shape: tuple[int, int, int], dtype: str) -> TensorSpec:
    return TensorSpec(name, dtype, (BATCH_AXIS, *latent_shape))


def velocity_shape(latent_shape: tuple[int, int, int], halves: bool) -> tuple[int, int, int]:
    """(C, H, W) of a velocity, or (2C, H, W) in the per-CFG-half layout (``flowturbo.integrator``)."""
    channels, height, width = latent_shape
    return (2 * channels if halves else channels, height, width)


def predictor_step_spec(
    latent_shape: tuple[int, int, int], precision: str, batch: BatchProfile, *, time: float | None = None,
    halves: bool = False,
) -> ModuleSpec:
    """Predictor step: latents (B,C,H,W), [t (B,)], labels (B,) -> guided velocity (B,C,H,W)
    ((B,2C,H,W) with ``halves``: both CFG halves, as the integrator carries them under partial guidance)."""
    fp = precision_dtype_name(check_precision(precision))
    inputs = [_latent("latents", latent_shape, fp)]
    if time is None:
        inputs.append(TensorSpec("t", TIME_DTYPE, (BATCH_AXIS,)))
    inputs.append(TensorSpec("labels", LABEL_DTYPE, (BATCH_AXIS,)))
    name = PREDICTOR_STEP if time is None else f"{PREDICTOR_STEP}@{time!r}"
    output = _latent("velocity", velocity_shape(latent_shape, halves), fp)
    return ModuleSpec(name, tuple(inputs), (output,), batch, time)


def refiner_step_spec(
    latent_shape: tuple[int, int, int], precision: str, batch: BatchProfile, *, time: float | None = None,
    halves: bool = False, dt_conditioning: bool = False, dt: float | None = None,
) -> ModuleSpec:
    """Refiner step: latents, carried velocity v, [t], [dt], labels -> guided velocity offset (B,C,H,W)
    (v and the offset (B,2C,H,W) with ``halves``).

    A ``dt_conditioning`` refiner takes the velocity age as the input ``dt`` (B,) float32 when time is an input
    too; a per-step graph (``time`` given) folds it instead (``dt`` given), named ``refiner_step@t/dt=dt``.
    """
    fp = precision_dtype_name(check_precision(precision))
    velocity = velocity_shape(latent_shape, halves)
    if (time is None) != (dt is None) and dt_conditioning:
        raise FlowTurboError("a dt-conditioned refiner's per-step graph folds both t and dt (give both), its "
                             "time-input graph takes both as inputs (give neither)")
    if dt is not None and not dt_conditioning:
        raise FlowTurboError("only a dt-conditioned refiner's graph can fold a dt")
    inputs = [_latent("latents", latent_shape, fp), _latent("v", velocity, fp)]
    if time is None:
        inputs.append(TensorSpec("t", TIME_DTYPE, (BATCH_AXIS,)))
        if dt_conditioning:
            inputs.append(TensorSpec(DT_INPUT, TIME_DTYPE, (BATCH_AXIS,)))
    inputs.append(TensorSpec("labels", LABEL_DTYPE, (BATCH_AXIS,)))
    name = REFINER_STEP if time is None else f"{REFINER_STEP}@{time!r}" + (f"/dt={dt!r}" if dt is not None else "")
    return ModuleSpec(name, tuple(inputs), (_latent("offset", velocity, fp),), batch, time, dt)


# Text-to-image predictor graphs (export/text_export.py): the prompt embeddings are inputs, the text encoders are not.
PROMPT_EMBEDS = "prompt_embeds"  # (B, L, D) per-token embeddings
POOLED_PROMPT_EMBEDS = "pooled_prompt_embeds"  # (B, P)
NEGATIVE_PROMPT_EMBEDS = "negative_prompt_embeds"  # (B, L, D): CFG's unconditional half
NEGATIVE_POOLED_PROMPT_EMBEDS = "negative_pooled_prompt_embeds"  # (B, P)
GUIDANCE_INPUT = "guidance"  # (B,) float32: the distilled guidance value of guidance-embedding models
TEXT_INPUTS = (PROMPT_EMBEDS, POOLED_PROMPT_EMBEDS, NEGATIVE_PROMPT_EMBEDS, NEGATIVE_POOLED_PROMPT_EMBEDS,
               GUIDANCE_INPUT)


def text_predictor_step_spec(
    latent_shape: tuple[int, int, int], precision: str, batch: BatchProfile, *, sequence_length: int,
    embed_dim: int, pooled_dim: int, negative: bool, guidance_input: bool,
) -> ModuleSpec:
    """Text-to-image predictor step: latents (B,C,H,W), t (B,), prompt_embeds (B,L,D), pooled_prompt_embeds (B,P),
    [negative_prompt_embeds (B,L,D), negative_pooled_prompt_embeds (B,P)] (CFG), [guidance (B,) float32]
    -> guided velocity (B,C,H,W) on flowturbo's time axis. L is fixed by the export (``--max-sequence-length``)."""
    fp = precision_dtype_name(check_precision(precision))
    inputs = [_latent("latents", latent_shape, fp), TensorSpec("t", TIME_DTYPE, (BATCH_AXIS,)),
              TensorSpec(PROMPT_EMBEDS, fp, (BATCH_AXIS, sequence_length, embed_dim)),
              TensorSpec(POOLED_PROMPT_EMBEDS, fp, (BATCH_AXIS, pooled_dim))]
    if negative:
        inputs += [TensorSpec(NEGATIVE_PROMPT_EMBEDS, fp, (BATCH_AXIS, sequence_length, embed_dim)),
                   TensorSpec(NEGATIVE_POOLED_PROMPT_EMBEDS, fp, (BATCH_AXIS, pooled_dim))]
    if guidance_input:
        inputs.append(TensorSpec(GUIDANCE_INPUT, TIME_DTYPE, (BATCH_AXIS,)))
    return ModuleSpec(PREDICTOR_STEP, tuple(inputs), (_latent("velocity", latent_shape, fp),), batch)


def text_refiner_step_spec(
    latent_shape: tuple[int, int, int], precision: str, batch: BatchProfile, *, pooled_dim: int,
    dt_conditioning: bool,
) -> ModuleSpec:
    """Text-to-image refiner step (a token refiner): latents (B,C,H,W), the carried guided velocity v (B,C,H,W), t (B,),
    [dt (B,)], pooled_prompt_embeds (B,P) -> offset (B,C,H,W) of the guided velocity (no CFG halves: it corrects the
    guided velocity of the CFG it was trained at)."""
    fp = precision_dtype_name(check_precision(precision))
    inputs = [_latent("latents", latent_shape, fp), _latent("v", latent_shape, fp),
              TensorSpec("t", TIME_DTYPE, (BATCH_AXIS,))]
    if dt_conditioning:
        inputs.append(TensorSpec(DT_INPUT, TIME_DTYPE, (BATCH_AXIS,)))
    inputs.append(TensorSpec(POOLED_PROMPT_EMBEDS, fp, (BATCH_AXIS, pooled_dim)))
    return ModuleSpec(REFINER_STEP, tuple(inputs), (_latent("offset", latent_shape, fp),), batch)


def decoder_spec(
    latent_shape: tuple[int, int, int], image_shape: tuple[int, int, int], precision: str, batch: BatchProfile
) -> ModuleSpec:
    """Decoder: latents (B,C,H,W) -> images (B,C_img,H_img,W_img) in [-1, 1]."""
    fp = precision_dtype_name(check_precision(precision))
    return ModuleSpec(
        DECODER,
        (_latent("latents", latent_shape, fp),),
        (TensorSpec("images", fp, (BATCH_AXIS, *image_shape)),),
        batch,
    )


def encoder_spec(
    image_shape: tuple[int, int, int], latent_shape: tuple[int, int, int], precision: str, batch: BatchProfile
) -> ModuleSpec:
    """Encoder (inpainting / editing): images (B,C_img,H_img,W_img) in [-1, 1] -> scaled latents (B,C,H,W)."""
    fp = precision_dtype_name(check_precision(precision))
    return ModuleSpec(
        ENCODER,
        (TensorSpec("images", fp, (BATCH_AXIS, *image_shape)),),
        (_latent("latents", latent_shape, fp),),
        batch,
    )


def unrolled_spec(
    latent_shape: tuple[int, int, int], image_shape: tuple[int, int, int], precision: str, batch: BatchProfile
) -> ModuleSpec:
    """Whole schedule + decode: noise (B,C,H,W), labels (B,) -> images and final latents."""
    fp = precision_dtype_name(check_precision(precision))
    return ModuleSpec(
        UNROLLED,
        (_latent("noise", latent_shape, fp), TensorSpec("labels", LABEL_DTYPE, (BATCH_AXIS,))),
        (TensorSpec("images", fp, (BATCH_AXIS, *image_shape)), _latent("latents", latent_shape, fp)),
        batch,
    )


__all__ = [
    "BATCH_AXIS",
    "DECODER",
    "DT_INPUT",
    "ENCODER",
    "GUIDANCE_INPUT",
    "NEGATIVE_POOLED_PROMPT_EMBEDS",
    "NEGATIVE_PROMPT_EMBEDS",
    "POOLED_PROMPT_EMBEDS",
    "PROMPT_EMBEDS",
    "TEXT_INPUTS",
    "PRECISIONS",
    "PREDICTOR_STEP",
    "REFINER_STEP",
    "UNROLLED",
    "BatchProfile",
    "ModuleSpec",
    "TensorSpec",
    "check_precision",
    "decoder_spec",
    "encoder_spec",
    "predictor_step_spec",
    "refiner_step_spec",
    "text_predictor_step_spec",
    "text_refiner_step_spec",
    "unrolled_spec",
    "velocity_shape",
]
