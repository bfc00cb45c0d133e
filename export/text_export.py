"""Export a text-to-image pipeline folder (diffusers SD3 / FLUX.1) + a fixed schedule into an artifact directory.

The same machinery and guarantees as the SiT export (:mod:`flowturbo.export.pipeline`): ``--out`` checked and locked
(:class:`flowturbo.fileio.OutputFolder`), a key over everything that decides the bytes, reuse only of a sealed
manifest with the same key and verifying checksums, everything built in a staging folder, each graph validated
against eager PyTorch, the sealed ``manifest.json`` written last, the folder swapped into place.

What differs (docs/predictor_protocol.md, "Export"):

* the graphs — a time-input predictor step whose inputs are the latents, ``t`` and the prompt embeddings (the
  negative prompt's for CFG, the distilled guidance value where the model embeds one; :mod:`.text_modules`), and the
  VAE decoder with its scale and shift; with ``--with-encoder`` also the VAE encoder for inpainting and editing,
  ``(mode - shift) * scale`` (the family's ``image_encoder()``, the decode's exact inverse), as class exports export
  theirs. The text encoders are not exported: they run once per prompt in PyTorch, from the pipeline folder the
  manifest records;
* the schedule — the family's own shifted time grid for the exported image size is baked into the recorded
  schedule (as ``Sampler.default_schedule(..., size=...)`` does for sampling); R steps export the family's
  attached token refiner (``--refiner RUN``) as a third graph, ``refiner_step`` (latents, v, t, dt, pooled prompt
  embeddings -> offset of the guided velocity); without one they are refused;
* the checks — besides ONNX Runtime / AOTInductor against the eager graph module, the eager graph module is checked
  once against the adapter's own model calls at a grid time (the PyTorch sampling path), so the time mapping, the
  CFG halves and the guidance input are validated, not only the tracing.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch

from flowturbo.dtypes import torch_dtype
from flowturbo.errors import FlowTurboError
from flowturbo.export.manifest import (
    EXPORT_FORMAT,
    MANIFEST_FILE,
    artifact_key,
    device_description,
    exporter_sha256,
    file_entries,
    tool_versions,
    weights_sha256,
)
from flowturbo.export.modules import DecoderStep, EncoderStep
from flowturbo.export.pipeline import (
    VALIDATION_ATOL,
    VALIDATION_SEED,
    ExportRequest,
    ExportResult,
    _max_error,
    build_formats,
    manifest_record,
    reuse_existing,
)
from flowturbo.export.specs import (
    DECODER,
    DT_INPUT,
    ENCODER,
    GUIDANCE_INPUT,
    PREDICTOR_STEP,
    REFINER_STEP,
    ModuleSpec,
    decoder_spec,
    encoder_spec,
    text_predictor_step_spec,
    text_refiner_step_spec,
)
from flowturbo.export.text_modules import text_predictor_step, text_refiner_step
from flowturbo.families import GuidanceRule, ImageSize, PromptEmbeddings, TextConditioning
from flowturbo.fileio import OutputFolder, atomic_write_bytes, sealed_json_bytes
from flowturbo.kernels import cfg_guided_reference
from flowturbo.refiner_dt import REFINER_DT_KEY
from flowturbo.schedule import SamplingSchedule

TEXT_FORMATS = ("onnx", "aoti")  # TensorRT engines of text models: not built yet
TEXT_VARIANT = "time-input"  # one predictor graph with t an input (per-step would copy the transformer per time)
PROMPT_ENCODER = ("the text encoders of the pipeline folder, in PyTorch, through its family adapter "
                  "(flowturbo.training.families)")


@dataclasses.dataclass(frozen=True)
class TextExport:
    """What a text-to-image export fixes besides the schedule: the image size and the prompt length."""

    size: ImageSize
    max_sequence_length: int
    guidance: float | None = None  # the default distilled guidance value recorded (None: the family's)


def text_schedule(family: Any, notation: str | None, cfg: float | None, size: ImageSize) -> SamplingSchedule:
    """The schedule ``notation`` (default: the family's) at ``cfg`` (default: the family's) on the family's own time
    grid for images of ``size``; R steps and what the family cannot run are refused."""
    defaults = family.defaults
    schedule = SamplingSchedule.parse(notation or defaults.schedule,
                                      guidance_scale=defaults.cfg if cfg is None else cfg)
    family.check_schedule(schedule)  # R steps: a refiner trained for this model, at this CFG (--refiner)
    grid = family.timesteps(schedule.num_steps, family.latent_shape(size))
    return schedule if grid is None else dataclasses.replace(schedule, timesteps=grid)


def check_text_request(family: Any, request: ExportRequest) -> None:
    """Refuse what a text-to-image export cannot build, one clear error each."""
    unsupported = [f for f in request.formats if f not in TEXT_FORMATS]
    if unsupported:
        raise FlowTurboError(f"--format {','.join(unsupported)}: text-to-image models export to "
                             f"{' and '.join(TEXT_FORMATS)} for now")
    if request.variant != TEXT_VARIANT:
        raise FlowTurboError(f"--variant {request.variant}: text-to-image models export the {TEXT_VARIANT} variant "
                             "only (one predictor graph, time an input; per-step and unrolled graphs would copy the "
                             "transformer's weights per step)")
    if request.kernel_backend != "reference":
        raise FlowTurboError("--kernels triton: our fused kernels are not wired into diffusers transformers; use "
                             "--kernels reference")
    if request.schedule.uses_refiner and family.refiner_record is None:
        raise FlowTurboError(f"schedule {request.schedule.notation} has R (refiner) steps, which need a refiner trained "
                             f"for this {family.description} model: pass --refiner RUN, or export H, P and E steps")
    if request.schedule.guidance_channels is not None:
        raise FlowTurboError(f"--guidance-channels: {family.description} models guide every latent channel")


@dataclasses.dataclass
class _Planned:
    stem: str
    role: str
    module: torch.nn.Module
    spec: ModuleSpec


def _embedding_shapes(family: Any) -> tuple[int, int, int]:
    """(L, D, P) of the family's prompt embeddings at its ``max_sequence_length``: read from one encoded prompt."""
    schedule = SamplingSchedule.parse("E1")
    with torch.no_grad():
        conditioning = family.condition(["a"], schedule)
    embeds, pooled = conditioning.prompt.embeds, conditioning.prompt.pooled
    return int(embeds.shape[1]), int(embeds.shape[2]), int(pooled.shape[1])


def _plan(family: Any, request: ExportRequest, options: TextExport) -> tuple[list[_Planned], dict[str, int]]:
    latent = tuple(family.latent_shape(options.size))
    image = (int(family.decoder.image_channels), options.size.height, options.size.width)
    sequence, width, pooled = _embedding_shapes(family)
    scale = request.schedule.guidance_scale
    spec = text_predictor_step_spec(latent, request.precision, request.batch, sequence_length=sequence,
                                    embed_dim=width, pooled_dim=pooled, negative=scale != 1.0,
                                    guidance_input=family.guidance_rule is GuidanceRule.EMBEDDED)
    planned = [_Planned(PREDICTOR_STEP, "predictor", text_predictor_step(family, scale), spec)]
    if request.schedule.uses_refiner:
        refiner = family.refiner
        planned.append(_Planned(REFINER_STEP, "refiner", text_refiner_step(refiner), text_refiner_step_spec(
            latent, request.precision, request.batch, pooled_dim=pooled, dt_conditioning=refiner.takes_dt)))
    planned.append(_Planned(DECODER, "decoder", DecoderStep(family.decoder),
                            decoder_spec(latent, image, request.precision, request.batch)))
    if request.with_encoder:  # inpainting / editing: images -> (mode - shift) * scale, as the class exports' encoder
        planned.append(_Planned(ENCODER, "encoder", EncoderStep(family.image_encoder()),
                                encoder_spec(image, latent, request.precision, request.batch)))
    return planned, {"sequence_length": sequence, "embed_dim": width, "pooled_dim": pooled}


def _refiner_dt(family: Any) -> dict[str, Any] | None:
    dt = getattr(family, "refiner_dt", None)
    return None if dt is None else dt.to_dict()


def _image_encoder_record(family: Any) -> dict[str, Any]:
    """What the manifest says about the exported image encoder (``--with-encoder``)."""
    encoder = family.image_encoder()
    return {"graph": ENCODER, "type": encoder.encoder_type, "latent_scale": encoder.latent_scale,
            "latent_shift": encoder.latent_shift,
            "computes": "(vae.encode(images).latent_dist.mode() - latent_shift) * latent_scale, exported as a graph "
                        "(the decoder's exact inverse; the mode, not a sample: deterministic)"}


def text_example_inputs(spec: ModuleSpec, batch: int, seed: int = VALIDATION_SEED,
                        device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Random non-zero inputs for a text graph's ``spec`` at ``batch`` (t in (0, 1), guidance in [1, 5))."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {}
    for tensor in spec.inputs:
        shape = tensor.shape_for(batch)
        if tensor.name == "t":
            value = torch.rand(shape, generator=generator) * 0.98 + 0.01
        elif tensor.name == DT_INPUT:
            value = torch.rand(shape, generator=generator) * 0.5
        elif tensor.name == GUIDANCE_INPUT:
            value = torch.rand(shape, generator=generator) * 4 + 1
        else:
            value = torch.randn(shape, generator=generator).to(getattr(torch, tensor.dtype))
        inputs[tensor.name] = value.to(device)
    return inputs


def check_against_adapter(family: Any, step: torch.nn.Module, spec: ModuleSpec, schedule: SamplingSchedule,
                          precision: str) -> float:
    """The eager graph module against the adapter's own model calls (the PyTorch sampling path) at a grid time:
    the time mapping, the CFG halves and the guidance input; returns the largest difference (refuses above
    the export's validation bound)."""
    inputs = text_example_inputs(spec, 2, seed=VALIDATION_SEED + 2, device=family.device)
    t = float(schedule.timesteps[1])  # a grid time inside (0, 1)
    inputs["t"] = torch.full_like(inputs["t"], t)
    guidance = None
    if GUIDANCE_INPUT in inputs:
        guidance = float(inputs[GUIDANCE_INPUT][0])
        inputs[GUIDANCE_INPUT] = torch.full_like(inputs[GUIDANCE_INPUT], guidance)
    prompt = PromptEmbeddings(inputs["prompt_embeds"], inputs["pooled_prompt_embeds"])
    negative = (PromptEmbeddings(inputs["negative_prompt_embeds"], inputs["negative_pooled_prompt_embeds"])
                if "negative_prompt_embeds" in inputs else None)
    with torch.no_grad():
        raw = family.model_calls(TextConditioning(prompt, negative, guidance), schedule).predictor(inputs["latents"], t)
        want = cfg_guided_reference(raw, inputs["latents"].shape[0], raw.shape[1], schedule.guidance_scale)
        got = step(*(inputs[name] for name in spec.input_names))
    return _max_error([got.float()], [want.float().cpu()], "the text predictor graph module (against the family "
                      "adapter's own calls)", precision)


def export_text_pipeline(
    family: Any,
    request: ExportRequest,
    options: TextExport,
    out: str | os.PathLike[str],
    *,
    source: str,
    command: str | None = None,
    overwrite: bool = False,
    wait: bool = False,
) -> ExportResult:
    """Export a loaded text-to-image family adapter for ``request`` (its schedule on the family's grid for
    ``options.size``: :func:`text_schedule`) into the directory ``out``, atomically, as
    :func:`flowturbo.export.pipeline.export_bundle` (reuse, ``overwrite``, ``wait`` alike)."""
    check_text_request(family, request)
    if options.guidance is not None and family.guidance_rule is not GuidanceRule.EMBEDDED:
        raise FlowTurboError(f"--guidance {options.guidance:g}: {family.description} has no guidance embedding; use "
                             "--cfg S (classifier-free guidance)")
    device = torch.device(request.device)
    if family.device != device or family.dtype != torch_dtype(request.precision):
        raise FlowTurboError(f"load the pipeline in {request.precision} on {device} for this export "
                             f"(it is {family.dtype} on {family.device})")
    latent = list(family.latent_shape(options.size))
    parts = {"transformer": family.transformer, "decoder": family.decoder}
    if request.schedule.uses_refiner:
        parts["refiner"] = family.refiner
    if request.with_encoder:
        parts["encoder"] = family.image_encoder()
    weights = weights_sha256(parts)
    text_fields = {"family": family.name, "latent_shape": latent, "image_size": str(options.size),
                   "max_sequence_length": options.max_sequence_length, "guidance": options.guidance}
    key_fields = {"format": EXPORT_FORMAT, "weights_sha256": weights, **request.key_fields(), "text": text_fields,
                  "tools": tool_versions(), "exporter_sha256": exporter_sha256(),
                  "device": device_description(device)}
    key = artifact_key(key_fields)
    with OutputFolder(out, command="export", what="export directory", wait=wait) as folder:
        target = folder.path
        reused = reuse_existing(target, key, key_fields, overwrite)
        if reused is not None:
            return reused
        with folder.staging() as staging:
            manifest = _build(family, request, options, staging, device, weights, key, key_fields, source, command)
    return ExportResult(target, manifest, reused=False)


def _build(family: Any, request: ExportRequest, options: TextExport, root: Path, device: torch.device, weights: str,
           key: str, key_fields: dict[str, Any], source: str, command: str | None) -> dict[str, Any]:
    planned, shapes = _plan(family, request, options)
    artifacts: list[dict[str, Any]] = []
    written: list[Path] = []
    started = time.perf_counter()
    example_batch = request.batch.example_batch()
    check_batch = request.batch.min if request.batch.min != example_batch else request.batch.max
    adapter_error = None
    for item in planned:
        item.module.eval()
        if item.role == "predictor" and request.validate:
            adapter_error = check_against_adapter(family, item.module, item.spec, request.schedule, request.precision)
        inputs = text_example_inputs(item.spec, example_batch, device=device)
        check_inputs = text_example_inputs(item.spec, check_batch, seed=VALIDATION_SEED + 1, device=device)
        base = {"module": item.stem, "role": item.role, "spec": item.spec.to_dict(), "time": None}
        entries, files = build_formats(item, request, root, base, inputs, check_inputs, weights=weights)
        artifacts += entries
        written += files
    described = family.describe()
    model = {
        "source": source,
        "weights_sha256": weights,
        "conditioning": "prompts",
        "family": family.name,
        "description": family.description,
        "pipeline": source,
        "prompt_encoder": PROMPT_ENCODER,
        "max_sequence_length": options.max_sequence_length,
        "guidance_rule": family.guidance_rule.value,
        "image_size": str(options.size),
        "latent_shape": key_fields["text"]["latent_shape"],
        "image_shape": [int(family.decoder.image_channels), options.size.height, options.size.width],
        "text_inputs": shapes,
        "has_refiner": request.schedule.uses_refiner,
        "refiner_dt_conditioning": bool(request.schedule.uses_refiner and family.refiner.takes_dt),
        REFINER_DT_KEY: _refiner_dt(family) if request.schedule.uses_refiner else None,
        "refiner_trained_for": (family.refiner_record.to_dict() if request.schedule.uses_refiner else None),
        "decoder": family.decoder.decoder_type,
        "image_encoder": _image_encoder_record(family) if request.with_encoder else None,
        "defaults": {**family.defaults.to_dict(),
                     **({} if options.guidance is None else {"guidance": float(options.guidance)})},
        "adapter": {k: described[k] for k in ("pipeline_class", "transformer", "scheduler") if k in described},
        "adapter_check_max_abs_error": adapter_error,
    }
    manifest = manifest_record(request, key, key_fields, model, artifacts, file_entries(root, written), command,
                               started, with_encoder=request.with_encoder)
    manifest["validation_bound"] = VALIDATION_ATOL[request.precision]
    atomic_write_bytes(root / MANIFEST_FILE, sealed_json_bytes(manifest))
    return manifest


__all__ = ["PROMPT_ENCODER", "TEXT_FORMATS", "TEXT_VARIANT", "TextExport", "check_text_request",
           "check_against_adapter", "export_text_pipeline", "text_example_inputs", "text_schedule"]
