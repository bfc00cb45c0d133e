"""Export a bundle + a fixed schedule into an artifact directory (ONNX / AOTInductor / TensorRT + manifest).

:func:`export_bundle` validates the request (formats, precision, opset, variant, R steps need a refiner),
checks and locks ``--out`` (:class:`flowturbo.fileio.OutputFolder`), computes the artifact key, reuses an
existing directory only when its sealed manifest has the same key and its checksums verify, and otherwise
builds everything in a hidden staging folder beside the target, validates each artifact against eager
PyTorch, writes the sealed ``manifest.json`` last and swaps the folder into place.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flowturbo.dtypes import torch_dtype
from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.fileio import OutputFolder, SealError, atomic_write_bytes, read_sealed_json, sealed_json_bytes
from flowturbo.export import aoti_export, onnx_export, tensorrt_export
from flowturbo.export.manifest import (
    EXPORT_FORMAT,
    MANIFEST_FILE,
    artifact_key,
    command_line,
    device_description,
    exporter_sha256,
    file_entries,
    sha256_file,
    tool_versions,
    weights_sha256,
)
from flowturbo.export.modules import (
    VARIANTS,
    DecoderStep,
    EncoderStep,
    FoldedPredictorStep,
    FoldedRefinerStep,
    PredictorStep,
    UnrolledSchedule,
    refiner_graph_keys,
    refiner_step,
    step_times,
)
from flowturbo.integrator import carries_halves, refiner_call_plan
from flowturbo.kernels import KernelBackend
from flowturbo.refiner_dt import REFINER_DT_KEY
from flowturbo.training.models import refiner_takes_dt
from flowturbo.export.specs import (
    DECODER,
    DT_INPUT,
    ENCODER,
    PREDICTOR_STEP,
    REFINER_STEP,
    UNROLLED,
    BatchProfile,
    ModuleSpec,
    check_precision,
    decoder_spec,
    encoder_spec,
    predictor_step_spec,
    refiner_step_spec,
    unrolled_spec,
)
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.bundle import Bundle, load_bundle

FORMATS = ("onnx", "aoti", "tensorrt")
# Measured (BENCHMARKS.md, bench/bench_export.py, default model, ONNX Runtime CPU): per-step is no faster than
# time-input and builds 6x slower; unrolled samples 1.66x faster than time-input but builds 12.7x slower (5.4 min).
# The default favours a fast, always-tested build; `--variant unrolled` is the deployment choice.
DEFAULT_VARIANT = "time-input"
# Export-time sanity bound on |exported - eager| (the tests check the strict tolerance table).
VALIDATION_ATOL = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 2e-1}
VALIDATION_SEED = 1234


@dataclasses.dataclass(frozen=True)
class ExportRequest:
    """What to build: schedule, batch profile, formats, precision, variant, ONNX opset, device, TensorRT options."""

    schedule: SamplingSchedule
    batch: BatchProfile = BatchProfile(1, 1, 16)
    formats: tuple[str, ...] = ("onnx",)
    precision: str = "fp32"
    variant: str = DEFAULT_VARIANT
    opset: int = onnx_export.DEFAULT_OPSET
    device: str = "cpu"
    validate: bool = True
    # What a module that differs from eager PyTorch by more than VALIDATION_ATOL does: "raise" (the default:
    # the export is refused) or "record" (the difference is written into the manifest's
    # "validation_failures" and the export goes on: the GPU suite measures such an export instead of losing it).
    on_validation_failure: str = "raise"
    tensorrt_optimization_level: int = tensorrt_export.DEFAULT_OPTIMIZATION_LEVEL
    kernel_backend: str = "reference"  # "triton": our fused kernels compiled into AOTInductor CUDA packages
    with_encoder: bool = False  # also export the image encoder (inpainting / editing on the exported backends)

    def __post_init__(self) -> None:
        formats = tuple(dict.fromkeys(self.formats))
        object.__setattr__(self, "formats", formats)
        object.__setattr__(self, "batch", BatchProfile.parse(self.batch))
        unknown = [f for f in formats if f not in FORMATS]
        if not formats or unknown:
            raise FlowTurboError(f"unknown export format(s) {unknown or formats}; choose from {', '.join(FORMATS)}")
        check_precision(self.precision)
        if self.on_validation_failure not in ("raise", "record"):
            raise FlowTurboError(f"on_validation_failure must be 'raise' or 'record', got {self.on_validation_failure!r}")
        if self.variant not in VARIANTS:
            raise FlowTurboError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if "onnx" in formats or "tensorrt" in formats:
            onnx_export.check_opset(self.opset)
        if "onnx" in formats:
            onnx_export.check_onnx_precision(self.precision)
        backend = KernelBackend.coerce(self.kernel_backend)
        object.__setattr__(self, "kernel_backend", backend.value)
        if backend is KernelBackend.TRITON:
            if formats != ("aoti",):
                raise FlowTurboError(
                    f"--kernels triton compiles our Triton kernels into AOTInductor packages only; ONNX and TensorRT "
                    f"graphs need standard ops: use --format aoti (got {','.join(formats)}) or --kernels reference"
                )
            if torch.device(self.device).type != "cuda":
                raise FlowTurboError(
                    "--kernels triton needs --device cuda: our Triton kernels run on CUDA, and AOTInductor CPU packages "
                    "use the reference ops (--kernels reference)"
                )
        if "tensorrt" in formats:
            reason = tensorrt_export.tensorrt_unavailable_reason()
            if reason is not None:
                raise FlowTurboError(f"--format tensorrt: {reason}")
            tensorrt_export.TensorRTOptions(self.precision, self.tensorrt_optimization_level)

    def key_fields(self) -> dict[str, Any]:
        return {
            "schedule_id": self.schedule.id,
            "batch": self.batch.describe(),
            "formats": sorted(self.formats),
            "precision": self.precision,
            "variant": self.variant,
            "opset": self.opset if ("onnx" in self.formats or "tensorrt" in self.formats) else None,
            "kernel_backend": self.kernel_backend,
            "with_encoder": self.with_encoder,
        }


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """The export directory, its manifest, and whether an up-to-date existing directory was reused."""

    path: Path
    manifest: dict[str, Any]
    reused: bool


@dataclasses.dataclass
class _Planned:
    """One module to build: file stem, role, wrapper module, spec."""

    stem: str
    role: str
    module: torch.nn.Module
    spec: ModuleSpec


def _plan(bundle: Bundle, request: ExportRequest) -> list[_Planned]:
    schedule, precision, batch = request.schedule, request.precision, request.batch
    latent, image = tuple(bundle.latent_shape), tuple(bundle.image_shape)
    scale, channels = schedule.guidance_scale, schedule.guidance_channels
    if request.variant == "unrolled":
        module = UnrolledSchedule(schedule, bundle.predictor, bundle.refiner, bundle.decoder)
        return [_Planned(UNROLLED, "unrolled", module, unrolled_spec(latent, image, precision, batch)),
                *_encoder_plan(bundle, request)]
    planned: list[_Planned] = []
    uses_refiner = schedule.uses_refiner
    halves = carries_halves(schedule, latent[0])  # per-CFG-half velocities under partial guidance
    dt_conditioning = refiner_takes_dt(bundle.refiner)  # the refiner graphs take / fold the velocity age
    if request.variant == "time-input":
        planned.append(_Planned(PREDICTOR_STEP, "predictor", PredictorStep(bundle.predictor, scale, channels,
                                                                           halves=halves),
                                predictor_step_spec(latent, precision, batch, halves=halves)))
        if uses_refiner:
            planned.append(_Planned(REFINER_STEP, "refiner", refiner_step(bundle.refiner, scale, channels, halves),
                                    refiner_step_spec(latent, precision, batch, halves=halves,
                                                      dt_conditioning=dt_conditioning)))
    else:  # per-step: one graph per distinct call time (refiner: per (t, dt) when dt-conditioned), folded
        index = {t: k for k, t in enumerate(schedule.timesteps)}
        for t in step_times(schedule):
            planned.append(_Planned(f"{PREDICTOR_STEP}_t{index[t]:03d}", "predictor",
                                    FoldedPredictorStep(bundle.predictor, scale, channels, t, halves),
                                    predictor_step_spec(latent, precision, batch, time=t, halves=halves)))
        origin = {(call.t, call.dt): call.velocity_time for call in refiner_call_plan(schedule)}
        for t, dt in refiner_graph_keys(schedule, bundle.refiner):
            # dt = t - t_v: the stem also names the grid index of t_v (v003: a velocity from t_3)
            stem = f"{REFINER_STEP}_t{index[t]:03d}" + ("" if dt is None else f"_v{index[origin[(t, dt)]]:03d}")
            planned.append(_Planned(stem, "refiner", FoldedRefinerStep(bundle.refiner, scale, channels, t, halves, dt),
                                    refiner_step_spec(latent, precision, batch, time=t, halves=halves,
                                                      dt_conditioning=dt_conditioning, dt=dt)))
    planned.append(_Planned(DECODER, "decoder", DecoderStep(bundle.decoder),
                            decoder_spec(latent, image, precision, batch)))
    return planned + _encoder_plan(bundle, request)


def _encoder_plan(bundle: Bundle, request: ExportRequest) -> list[_Planned]:
    """The encoder graph when asked for (``--with-encoder``)."""
    if not request.with_encoder:
        return []
    if bundle.encoder is None:
        raise FlowTurboError("--with-encoder needs a bundle with an encoder (config.json 'encoder'); repackage it "
                             "with `flowturbo train package` or drop --with-encoder")
    latent, image = tuple(bundle.latent_shape), tuple(bundle.image_shape)
    return [_Planned(ENCODER, "encoder", EncoderStep(bundle.encoder),
                     encoder_spec(image, latent, request.precision, request.batch))]


def example_inputs(spec: ModuleSpec, batch: int, num_classes: int, seed: int = VALIDATION_SEED,
                   device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Random non-zero inputs for ``spec`` at ``batch`` (normal latents, t in (0, 1), labels in range)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {}
    for tensor in spec.inputs:
        shape = tensor.shape_for(batch)
        if tensor.dtype == "int64":
            value = torch.randint(0, num_classes, shape, generator=generator)
        elif tensor.name in ("t", DT_INPUT):  # times and velocity ages in (0, 1)
            value = torch.rand(shape, generator=generator) * 0.98 + 0.01
        elif tensor.name == "images":  # images in [-1, 1]
            value = (torch.rand(shape, generator=generator) * 2 - 1).to(getattr(torch, tensor.dtype))
        else:
            value = torch.randn(shape, generator=generator).to(getattr(torch, tensor.dtype))
        inputs[tensor.name] = value.to(device)
    return inputs


def _outputs(module: torch.nn.Module, spec: ModuleSpec, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = module(*(inputs[n] for n in spec.input_names))
    return [o.detach().float().cpu() for o in (out if isinstance(out, tuple) else (out,))]


def _max_error(got: list[torch.Tensor], want: list[torch.Tensor], where: str, precision: str,
               failures: list[str] | None = None) -> float:
    """Largest |exported - eager| over the outputs; over VALIDATION_ATOL (or NaN) it raises, or, with a
    ``failures`` list (``on_validation_failure="record"``), appends the message there and returns the error."""
    error = max(float((g.float().cpu() - w).abs().max()) for g, w in zip(got, want))
    if not error <= VALIDATION_ATOL[precision]:  # also catches NaN
        message = (f"{where} differs from eager PyTorch by {error:.3g} (> {VALIDATION_ATOL[precision]}); "
                   "the export is wrong for this model: report it with the manifest")
        if failures is None:
            raise FlowTurboError(message)
        failures.append(message)
    return error


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """The sealed manifest of an existing export directory, or None (absent, unsealed or edited)."""
    if not (folder / MANIFEST_FILE).is_file():
        return None
    try:
        data = read_sealed_json(folder / MANIFEST_FILE, fix="it will be rebuilt")
    except SealError:
        return None
    return data if isinstance(data, dict) and data.get("format") == EXPORT_FORMAT else None


def _checksums_ok(folder: Path, manifest: dict[str, Any]) -> bool:
    for rel, entry in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
            return False
    return True


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    lines = [f"{k}: existing {old.get(k)!r}, requested {new.get(k)!r}" for k in sorted(new) if old.get(k) != new.get(k)]
    return "; ".join(lines) or "same fields, different key (tool versions?)"


def export_bundle(
    bundle: Bundle,
    request: ExportRequest,
    out: str | os.PathLike[str],
    *,
    source: str = "",
    command: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    wait: bool = False,
    before_module: Callable[[str, int, int], None] | None = None,
) -> ExportResult:
    """Export ``bundle`` for ``request`` into the directory ``out`` (atomically; manifest written last).

    ``before_module(stem, index, count)`` is called before each module is built (e.g. a time budget that raises
    to stop: nothing is left at ``out``, as for any failure).

    An existing ``out`` whose manifest has the same key and verifying checksums is reused as is; one built
    for anything else is replaced only with ``overwrite=True`` (else FlowTurboError saying what differs), and
    only if everything in it was written by flowturbo (its ownership record). ``out`` is locked for the whole
    export: a concurrent export to it fails at once (``wait=True``: queues behind it).
    """
    schedule = request.schedule
    if schedule.uses_refiner and bundle.refiner is None:
        raise FlowTurboError(
            f"schedule {schedule.notation} has R (refiner) steps but the model has no refiner; export a schedule "
            "without R (e.g. H8) or a bundle with a refiner"
        )
    if schedule.guidance_scale != 1.0 and not bundle.predictor.config.has_null_class:
        raise FlowTurboError("this model has no null class, so it cannot be guided: export with --cfg 1")
    device = torch.device(request.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlowTurboError("export --device cuda requested but this machine has no CUDA GPU; use --device cpu")
    for name, model in (("predictor", bundle.predictor), ("refiner", bundle.refiner)):
        if model is not None and model.kernel_backend.value != request.kernel_backend:
            raise FlowTurboError(
                f"the bundle's {name} runs the {model.kernel_backend.value!r} kernels but the export asks for "
                f"{request.kernel_backend!r}: load it with kernel_backend={request.kernel_backend!r} "
                "(export_model does it for you)"
            )
    dtype = torch_dtype(request.precision)
    if bundle.predictor.pos_embed.dtype != dtype or bundle.predictor.pos_embed.device != device:
        raise FlowTurboError(f"load the bundle in {dtype} on {device} for a {request.precision} export "
                             "(export_model does it for you)")
    parts = {"predictor": bundle.predictor, "refiner": bundle.refiner, "decoder": bundle.decoder}
    if request.with_encoder:
        parts["encoder"] = bundle.encoder
    weights = weights_sha256(parts)
    tools = tool_versions()
    device_text = device_description(device)
    key_fields = {"format": EXPORT_FORMAT, "weights_sha256": weights, **request.key_fields(), "tools": tools,
                  "exporter_sha256": exporter_sha256(),
                  "device": device_text}
    key = artifact_key(key_fields)
    with OutputFolder(out, command="export", what="export directory", wait=wait) as folder:
        target = folder.path  # the resolved target every step of the folder uses
        reused = reuse_existing(target, key, key_fields, overwrite)
        if reused is not None:
            return reused
        with folder.staging() as staging:
            manifest = _build(bundle, request, staging, device, weights, key, key_fields, source, command, progress,
                              before_module)
    return ExportResult(target, manifest, reused=False)


def build_formats(item: Any, request: ExportRequest, root: Path, entry_base: dict[str, Any],
                  inputs: dict[str, torch.Tensor], check_inputs: dict[str, torch.Tensor], *, weights: str,
                  failures: list[str] | None = None) -> tuple[list[dict[str, Any]], list[Path]]:
    """One planned module (``item``: ``stem``, ``module``, ``spec``) in every format of ``request``: ONNX, AOTInductor
    and TensorRT (built from the ONNX file). Traced at ``inputs``; with ``request.validate`` each artifact is run at
    ``check_inputs`` (another batch of the profile) against the eager module (:func:`_max_error`; ``failures``: record
    instead of raise). Returns the manifest entries (``entry_base`` + format, file, build time, error) and the files
    written."""
    artifacts: list[dict[str, Any]] = []
    written: list[Path] = []
    want = _outputs(item.module, item.spec, check_inputs) if request.validate else []
    check_batch = int(next(iter(check_inputs.values())).shape[0])
    onnx_path = None
    if "onnx" in request.formats or "tensorrt" in request.formats:
        onnx_path = root / f"{item.stem}.onnx"
        result = onnx_export.export_onnx(item.module, item.spec, inputs, onnx_path, opset=request.opset)
        written += list(result.files)
        entry = {**entry_base, "format": "onnx", "file": onnx_path.name, "build_seconds": result.seconds,
                 "external_data": result.external_data, "opset": request.opset}
        if request.validate:
            got = onnx_export.run_onnx(onnx_path, check_inputs)
            entry["max_abs_error"] = _max_error(got, want, f"{onnx_path.name} on ONNX Runtime", request.precision,
                                                failures)
        artifacts.append(entry)
    if "aoti" in request.formats:
        package = root / f"{item.stem}{aoti_export.PACKAGE_SUFFIX}"
        seconds = aoti_export.export_aoti(item.module, item.spec, inputs, package)
        written.append(package)
        entry = {**entry_base, "format": "aoti", "file": package.name, "build_seconds": seconds}
        if request.validate:
            runner = torch._inductor.aoti_load_package(str(package))
            try:
                with torch.no_grad():
                    out = runner(*(check_inputs[n] for n in item.spec.input_names))
            except RuntimeError as exc:
                raise FlowTurboError(f"{package.name} (AOTInductor) fails at batch {check_batch} of the profile "
                                     f"{request.batch.describe()}: {exc}") from exc
            got = list(out) if isinstance(out, (tuple, list)) else [out]
            entry["max_abs_error"] = _max_error(got, want, f"{package.name} (AOTInductor)", request.precision,
                                                failures)
        artifacts.append(entry)
    if "tensorrt" in request.formats:
        assert onnx_path is not None
        options = tensorrt_export.TensorRTOptions(request.precision, request.tensorrt_optimization_level)
        import tensorrt as trt

        meta = tensorrt_export.engine_metadata(
            item.spec, weights_sha256=weights, schedule_id=request.schedule.id, precision=request.precision,
            tensorrt_version=trt.__version__, gpu_name=torch.cuda.get_device_name() if torch.cuda.is_available()
            else "none")
        t0 = time.perf_counter()
        engine = tensorrt_export.build_engine(onnx_path, item.spec, options, meta, root / "tensorrt")
        written += [engine, tensorrt_export.engine_paths(root / "tensorrt", meta)[1]]
        artifacts.append({**entry_base, "format": "tensorrt", "file": engine.relative_to(root).as_posix(),
                          "build_seconds": time.perf_counter() - t0, "engine_key": meta["key"]})
    return artifacts, written


def _build(bundle: Bundle, request: ExportRequest, root: Path, device: torch.device, weights: str, key: str,
           key_fields: dict[str, Any], source: str, command: str | None, progress: bool,
           before_module: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    planned = _plan(bundle, request)
    failures: list[str] | None = [] if request.on_validation_failure == "record" else None
    artifacts: list[dict[str, Any]] = []
    written: list[Path] = []
    started = time.perf_counter()
    example_batch = request.batch.example_batch()
    # Builds take seconds (ONNX time-input) to minutes (AOTInductor / unrolled): show which module is building.
    bar = tqdm(planned, desc="export", unit="module", disable=not progress, leave=False)
    for index, item in enumerate(bar):
        if before_module is not None:
            before_module(item.stem, index, len(planned))
        bar.set_postfix_str(f"{item.stem} ({', '.join(request.formats)})")
        item.module.eval()
        inputs = example_inputs(item.spec, example_batch, bundle.num_classes, device=device)
        check_batch = request.batch.min if request.batch.min != example_batch else request.batch.max
        check_inputs = example_inputs(item.spec, check_batch, bundle.num_classes, seed=VALIDATION_SEED + 1,
                                      device=device)
        entry_base = {"module": item.stem, "role": item.role, "spec": item.spec.to_dict(), "time": item.spec.time}
        if item.spec.dt is not None:  # a dt-conditioned refiner's per-step graph: the velocity age it folds
            entry_base["dt"] = item.spec.dt
        entries, files = build_formats(item, request, root, entry_base, inputs, check_inputs, weights=weights,
                                       failures=failures)
        artifacts += entries
        written += files
    timing_cache = root / "tensorrt" / tensorrt_export.TIMING_CACHE_FILE
    if timing_cache.is_file():
        written.append(timing_cache)
    model = {
        "source": source,
        "weights_sha256": weights,
        "num_classes": bundle.num_classes,
        "latent_shape": list(bundle.latent_shape),
        "image_shape": list(bundle.image_shape),
        "class_names": bundle.class_names,
        "has_refiner": bundle.refiner is not None,
        # The refiner graphs take (time-input) or fold (per-step, unrolled) the velocity age dt; the runtime
        # refuses graphs that do not (flowturbo.runtime.artifacts.check_refiner_dt).
        "refiner_dt_conditioning": refiner_takes_dt(bundle.refiner),
        REFINER_DT_KEY: None if bundle.refiner_dt is None else bundle.refiner_dt.to_dict(),
        "decoder": bundle.decoder.decoder_type,
        "defaults": bundle.defaults.to_dict(),
    }
    manifest = manifest_record(request, key, key_fields, model, artifacts, file_entries(root, written), command,
                               started, with_encoder=request.with_encoder)
    if failures is not None:
        manifest["validation_failures"] = failures
    # Last, sealed: a directory without it is incomplete, and an edited one is refused by every reader.
    atomic_write_bytes(root / MANIFEST_FILE, sealed_json_bytes(manifest))
    return manifest


def reuse_existing(target: Path, key: str, key_fields: dict[str, Any], overwrite: bool) -> ExportResult | None:
    """An existing export at ``target`` with the same key and intact checksums (reused as is), else None when it may
    be (re)built; a folder holding anything else is refused unless ``overwrite``, naming what differs."""
    if not target.exists():
        return None
    existing = _read_manifest(target)
    if existing is not None and existing.get("key") == key and _checksums_ok(target, existing):
        return ExportResult(target, existing, reused=True)
    if any(target.iterdir()) and not overwrite:
        what = ("artifacts built for something else (" + _differences(existing.get("key_fields", {}), key_fields) + ")"
                if existing is not None else "an export that is incomplete, unsealed or edited by hand")
        raise FlowTurboError(f"{target} holds {what}; pass --overwrite to rebuild or choose another --out")
    return None


def manifest_record(request: "ExportRequest", key: str, key_fields: dict[str, Any], model: dict[str, Any],
                    artifacts: list[dict[str, Any]], files: Any, command: str | None, started: float, *,
                    with_encoder: bool) -> dict[str, Any]:
    """The manifest every export writes (class bundles and text-to-image pipelines): the request, the artifact key,
    ``model`` (what the runtime needs to know about the model), the artifacts and their file checksums, the tools,
    device, command and timing. The caller seals it last (:func:`flowturbo.fileio.sealed_json_bytes`)."""
    return {
        "format": EXPORT_FORMAT,
        "key": key,
        "key_fields": key_fields,
        "schedule": request.schedule.describe(),
        "schedule_id": request.schedule.id,
        "variant": request.variant,
        "precision": request.precision,
        "kernel_backend": request.kernel_backend,
        "batch": request.batch.to_dict(),
        "formats": list(request.formats),
        "with_encoder": with_encoder,
        "model": model,
        "artifacts": artifacts,
        "files": files,
        "tools": key_fields["tools"],
        "device": key_fields["device"],
        "command": command if command is not None else command_line(),
        "created_unix": time.time(),
        "export_seconds": time.perf_counter() - started,
    }


def export_model(
    model: str | os.PathLike[str],
    request: ExportRequest,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    command: str | None = None,
    wait: bool = False,
) -> ExportResult:
    """Load the bundle folder ``model`` in the request's precision and device, then :func:`export_bundle`."""
    folder = Path(model)
    try:
        bundle = load_bundle(folder, device=request.device, dtype=torch_dtype(request.precision),
                             kernel_backend=request.kernel_backend)
    except CheckpointError:
        raise
    return export_bundle(bundle, request, out, source=str(folder), command=command, overwrite=overwrite, wait=wait)


__all__ = [
    "DEFAULT_VARIANT",
    "FORMATS",
    "ExportRequest",
    "ExportResult",
    "example_inputs",
    "export_bundle",
    "export_model",
]
