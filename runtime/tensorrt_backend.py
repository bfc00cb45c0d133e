"""The ``tensorrt`` backend: runs an export directory's TensorRT engines with the shared E/H/P/R loop.

``flowturbo export --format tensorrt`` writes, per module, ``tensorrt/<module>-<key>.engine`` and beside it
``<module>-<key>.json``: the engine metadata (format :data:`ENGINE_FORMAT`, the :data:`KEY_FIELDS` the engine
depends on, their hash ``key`` and the engine's ``engine_sha256``). Before deserializing anything this backend
re-reads that metadata and refuses, with one :class:`~flowturbo.errors.CheckpointError` listing every
difference, an engine whose bytes do not match its checksum or that was built for another model, schedule,
batch profile, precision, module spec, TensorRT version or GPU than the ones at hand. An engine is only ever
valid for the TensorRT version and GPU that built it, so this check is what turns TensorRT's own cryptic
deserialization failure into a message that names the fix.

The key check is re-implemented here (runtime does not import ``flowturbo.export``, DESIGN.md §3); the field
names and the format string must stay identical to ``export/tensorrt_export.py`` (a test compares them).

Execution uses the TensorRT 10 tensor API only: ``IExecutionContext.set_input_shape`` with the actual batch,
``set_tensor_address`` with torch CUDA tensors' ``data_ptr()`` (inputs, and outputs preallocated from the spec
and cached per batch size), ``execute_async_v3`` on torch's current CUDA stream. The shared loop runs on the
GPU: :meth:`TensorRTSampler.run_batch` hands it CUDA noise and labels, so latents and velocities never leave
the device between engine calls; only the decoded images and final latents are copied back to the CPU.

TensorRT cannot be installed on our machines (DESIGN.md §6): without it, or without a CUDA GPU,
:meth:`TensorRTSampler.from_artifacts` raises FlowTurboError with the precise reason
(:func:`tensorrt_unavailable_reason`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from flowturbo.errors import CheckpointError, FlowTurboError, SamplingError
from flowturbo.runtime.artifacts import BATCH_AXIS, ArtifactEntry, ArtifactSet, load_artifacts
from flowturbo.dtypes import torch_dtype
from flowturbo.runtime.exported import ExportedSampler, ModuleFn

# Must equal flowturbo.export.tensorrt_export.ENGINE_FORMAT / KEY_FIELDS (tests/runtime/test_tensorrt_backend.py).
ENGINE_FORMAT = "flowturbo.tensorrt-engine/1"
KEY_FIELDS = ("module", "weights_sha256", "schedule_id", "batch", "precision", "tensorrt_version", "gpu_name", "spec")
KEY_HEX_DIGITS = 16  # = flowturbo.export.manifest.KEY_HEX_DIGITS
METADATA_SUFFIX = ".json"
REBUILD = ("rebuild it: run flowturbo export --format tensorrt again with the directory's other settings (its "
           "manifest.json records the command it was built with) and --overwrite")

# Spec dtype name -> name of the ``tensorrt.DataType`` member an engine must report for that tensor.
TRT_DTYPE_NAMES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64"}


# ------------------------------------------------------------------------------------------- availability
def tensorrt_unavailable_reason(device: str | torch.device = "cuda") -> str | None:
    """None when this backend can run on ``device``, else the precise reason (used by refusals and test skips)."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: bindings present, libnvinfer missing
        return (f"the tensorrt backend needs TensorRT, which is not installed ({exc}); its PyPI wheels download "
                "their libraries from NVIDIA at install time, which these machines cannot reach: install the "
                "TensorRT SDK and its Python bindings, or use --backend onnxruntime or aoti")
    device = torch.device(device)
    if device.type != "cuda":
        return f"the tensorrt backend runs on a CUDA GPU, not on {device}"
    if not torch.cuda.is_available():
        return (f"the tensorrt backend needs a CUDA GPU; this machine has none (torch {torch.__version__}: "
                "torch.cuda.is_available() is False); use --backend onnxruntime or aoti")
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"the tensorrt backend was asked for {device}, but this machine has {torch.cuda.device_count()} GPU(s)"
    return None


def gpu_name(device: torch.device) -> str:
    """The GPU name engines are keyed by (the exporter records ``torch.cuda.get_device_name()``)."""
    return torch.cuda.get_device_name(device)


# --------------------------------------------------------------------------------------- engine metadata
def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def engine_key(fields: dict[str, Any]) -> str:
    """The hash of :data:`KEY_FIELDS` the exporter stores as ``key`` (same as ``engine_cache_key``)."""
    missing = [f for f in KEY_FIELDS if f not in fields]
    if missing:
        raise CheckpointError(f"engine metadata lacks {missing}; {REBUILD}")
    picked = {f: fields[f] for f in KEY_FIELDS}
    return hashlib.sha256(_canonical_json(picked).encode()).hexdigest()[:KEY_HEX_DIGITS]


def expected_engine_fields(
    entry: ArtifactEntry, manifest: dict[str, Any], *, tensorrt_version: str, gpu: str
) -> dict[str, Any]:
    """The :data:`KEY_FIELDS` an engine for ``entry`` must have been built with, here and now."""
    batch = manifest["batch"]
    return {
        "module": entry.spec["name"],  # the spec name ("predictor_step@0.25"), not the file stem
        "weights_sha256": manifest["model"].get("weights_sha256"),
        "schedule_id": manifest["schedule_id"],
        "batch": f"{int(batch['min'])}:{int(batch['opt'])}:{int(batch['max'])}",
        "precision": manifest["precision"],
        "tensorrt_version": tensorrt_version,
        "gpu_name": gpu,
        "spec": entry.spec,
    }


def engine_problems(found: dict[str, Any], expected: dict[str, Any], *, engine_sha256: str | None = None,
                    manifest_key: str | None = None) -> list[str]:
    """Every reason the engine described by metadata ``found`` must not be used, one human line each.

    ``expected`` holds the :data:`KEY_FIELDS` wanted; ``engine_sha256`` is the hash of the engine file's bytes
    (checked against the metadata's record when given); ``manifest_key`` the key the manifest lists for it.
    """
    problems = []
    if found.get("format") != ENGINE_FORMAT:
        problems.append(f"format: metadata has {found.get('format')!r}, this flowturbo reads {ENGINE_FORMAT!r}")
    for field in KEY_FIELDS:
        have, want = found.get(field), expected.get(field)
        if _canonical_json(have) == _canonical_json(want):
            continue
        if field == "spec":
            problems.append("spec: the engine's inputs/outputs differ from the module spec in the manifest")
        elif field == "gpu_name":
            problems.append(f"gpu_name: engine was built on {have!r}, this GPU is {want!r}")
        elif field == "tensorrt_version":
            problems.append(f"tensorrt_version: engine was built with TensorRT {have!r}, this is TensorRT {want!r}")
        else:
            problems.append(f"{field}: engine has {have!r}, the manifest wants {want!r}")
    if engine_sha256 is not None and found.get("engine_sha256") != engine_sha256:
        problems.append(f"engine_sha256: the engine file hashes to {engine_sha256[:16]}..., its metadata records "
                        f"{str(found.get('engine_sha256'))[:16]}... (corrupted, truncated or replaced)")
    if all(f in found for f in KEY_FIELDS) and found.get("key") != engine_key(found):
        problems.append(f"key: metadata key {found.get('key')!r} does not match its fields (edited by hand?)")
    if manifest_key is not None and found.get("key") != manifest_key:
        problems.append(f"key: the manifest lists engine key {manifest_key!r}, the metadata has {found.get('key')!r}")
    return problems


def check_engine(found: dict[str, Any], expected: dict[str, Any], where: str | os.PathLike[str], *,
                 engine_sha256: str | None = None, manifest_key: str | None = None) -> None:
    """Refuse (CheckpointError listing every problem) an engine that :func:`engine_problems` objects to."""
    problems = engine_problems(found, expected, engine_sha256=engine_sha256, manifest_key=manifest_key)
    if problems:
        raise CheckpointError(f"TensorRT engine {where} cannot be used here; {REBUILD}:\n  " + "\n  ".join(problems))


def metadata_path(engine: Path) -> Path:
    """``tensorrt/<module>-<key>.engine`` -> ``tensorrt/<module>-<key>.json``."""
    return engine.with_suffix(METADATA_SUFFIX)


def read_engine_metadata(engine: Path) -> dict[str, Any]:
    """The metadata JSON beside ``engine`` (CheckpointError when missing or unreadable)."""
    path = metadata_path(engine)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"TensorRT engine {engine} has no metadata file {path.name} beside it; {REBUILD}") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"TensorRT engine metadata {path} is unreadable ({exc}); {REBUILD}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"TensorRT engine metadata {path} is not a JSON object; {REBUILD}")
    return data


# ------------------------------------------------------------------------------------------------ module
def _stream_handle(device: torch.device) -> int:
    """The raw ``cudaStream_t`` of torch's current stream on ``device`` (0 off CUDA: fake engines in tests)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class TensorRTModule:
    """One deserialized engine + one execution context, called with keyword tensors (spec input names).

    Inputs are moved to :attr:`device` (no-op when already there) and made contiguous; their dtype and shape
    must match the spec. Outputs are written into buffers preallocated on :attr:`device` from the spec and cached
    per batch size; the call returns copies of them, because the shared loop keeps returned velocities across
    calls (the carried ``d'``) and the next call overwrites the buffers. ``synchronize`` makes the call wait for
    the stream (used for the decoder/unrolled module so stage timings are wall-clock honest).
    """

    def __init__(self, entry: ArtifactEntry, engine_bytes: bytes, trt: Any, device: torch.device, *,
                 synchronize: bool = False) -> None:
        self.entry = entry
        self.device = torch.device(device)
        self.synchronize = synchronize
        self.inputs = [(t["name"], t["dtype"], tuple(t["shape"])) for t in entry.spec["inputs"]]
        self.outputs = [(t["name"], t["dtype"], tuple(t["shape"])) for t in entry.spec["outputs"]]
        self.input_names = [name for name, _, _ in self.inputs]
        self._trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)  # TensorRT's own messages go to stderr
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise CheckpointError(f"TensorRT could not deserialize {entry.path} (see its log above); {REBUILD}")
        self._check_io()
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise FlowTurboError(f"TensorRT could not create an execution context for {entry.path.name} "
                                 "(out of GPU memory?); free GPU memory or use a smaller batch profile")
        self._buffers: dict[int, list[torch.Tensor]] = {}

    def _check_io(self) -> None:
        """The engine's IO tensors are exactly the spec's, with the spec's dtypes (else CheckpointError)."""
        trt, engine = self._trt, self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        want_in, want_out = self.input_names, [name for name, _, _ in self.outputs]
        if sorted(ins) != sorted(want_in) or sorted(outs) != sorted(want_out):
            raise CheckpointError(
                f"TensorRT engine {self.entry.path} has inputs {ins} and outputs {outs}, but its spec has inputs "
                f"{want_in} and outputs {want_out}; {REBUILD}")
        wrong = []
        for name, dtype, _ in (*self.inputs, *self.outputs):
            want = getattr(trt.DataType, TRT_DTYPE_NAMES[dtype])
            have = engine.get_tensor_dtype(name)
            if have != want:
                wrong.append(f"{name}: engine {have}, spec {dtype} ({want})")
        if wrong:
            raise CheckpointError(f"TensorRT engine {self.entry.path} disagrees with its spec on dtypes: "
                                  f"{'; '.join(wrong)}; {REBUILD}")

    def output_buffers(self, batch: int) -> list[torch.Tensor]:
        """Output tensors for ``batch`` images on :attr:`device`, allocated once per batch size."""
        buffers = self._buffers.get(batch)
        if buffers is None:
            buffers = [torch.empty(self.entry.output_shape(name, batch), dtype=torch_dtype(dtype), device=self.device)
                       for name, dtype, _ in self.outputs]  # (batch, ...) from the spec
            self._buffers[batch] = buffers
        return buffers

    def __call__(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise SamplingError(f"{self.entry.path.name} needs inputs {self.input_names}; missing {missing}")
        batch = int(inputs[self.input_names[0]].shape[0])
        ctx = self.context
        bound = []  # the device copies must stay referenced until execute_async_v3 has been enqueued
        for name, dtype, shape in self.inputs:
            tensor = inputs[name].to(self.device).contiguous()
            want_shape = tuple(batch if d == BATCH_AXIS else int(d) for d in shape)
            if tensor.dtype != torch_dtype(dtype) or tuple(tensor.shape) != want_shape:
                raise SamplingError(f"{self.entry.path.name}: input {name} must be {dtype} {want_shape}, got "
                                    f"{str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}")
            if not ctx.set_input_shape(name, want_shape):
                raise SamplingError(f"{self.entry.path.name}: TensorRT rejected input {name} of shape {want_shape} "
                                    "(outside the engine's optimization profile?); re-export with a --batch "
                                    "profile that covers it")
            ctx.set_tensor_address(name, tensor.data_ptr())
            bound.append(tensor)
        outputs = self.output_buffers(batch)
        for (name, _, _), buffer in zip(self.outputs, outputs):
            ctx.set_tensor_address(name, buffer.data_ptr())
        # Enqueued on torch's current stream, so it is ordered after the kernels that produced the inputs, and
        # the caching allocator will not hand the temporary input copies to other streams before it finishes.
        if not ctx.execute_async_v3(_stream_handle(self.device)):
            raise SamplingError(f"TensorRT failed to run {self.entry.path.name} at batch {batch}; see its log above")
        result = [buffer.clone() for buffer in outputs]  # the loop keeps results across calls: hand out copies
        if self.synchronize:
            _synchronize(self.device)
        return result


# ----------------------------------------------------------------------------------------------- sampler
class TensorRTSampler(ExportedSampler):
    """``TensorRTSampler.from_artifacts(DIR).sample([0, 1], seed=0)`` on a CUDA GPU with TensorRT installed."""

    backend = "tensorrt"
    artifact_format = "tensorrt"

    def __init__(self, artifacts: ArtifactSet, *, device: str | torch.device = "cuda") -> None:
        reason = tensorrt_unavailable_reason(device)
        if reason is not None:
            raise FlowTurboError(reason)
        import tensorrt as trt

        self._trt = trt
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.tensorrt_version = str(trt.__version__)
        self.gpu_name = gpu_name(self.device)
        super().__init__(artifacts)

    @classmethod
    def from_artifacts(cls, folder: str | os.PathLike[str], *, expect: dict[str, Any] | None = None,
                       **kwargs: Any) -> TensorRTSampler:
        """Refuse without TensorRT / CUDA first (before hashing the directory), then load and verify it."""
        reason = tensorrt_unavailable_reason(kwargs.get("device", "cuda"))
        if reason is not None:
            raise FlowTurboError(reason)
        return cls(load_artifacts(folder, expect=expect), **kwargs)

    def _manifest_key(self, entry: ArtifactEntry) -> str | None:
        rel = entry.path.relative_to(self.artifacts.root).as_posix()
        for artifact in self.artifacts.manifest["artifacts"]:
            if artifact.get("format") == self.artifact_format and artifact.get("file") == rel:
                return artifact.get("engine_key")
        return None

    def _load(self, entry: ArtifactEntry) -> ModuleFn:
        found = read_engine_metadata(entry.path)
        expected = expected_engine_fields(entry, self.artifacts.manifest, tensorrt_version=self.tensorrt_version,
                                          gpu=self.gpu_name)
        try:
            data = entry.path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"cannot read TensorRT engine {entry.path} ({exc}); {REBUILD}") from None
        check_engine(found, expected, entry.path, engine_sha256=hashlib.sha256(data).hexdigest(),
                     manifest_key=self._manifest_key(entry))
        return TensorRTModule(entry, data, self._trt, self.device, synchronize=entry.role in ("decoder", "unrolled"))

    # The shared loop computes on the device of the tensors it is given: hand it CUDA noise/labels so x, d, d'
    # stay on the GPU between engine calls; synchronize at stage ends so StageTimes measure the GPU work.
    def _integrate(self, noise: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        latents = super()._integrate(noise, labels, **kwargs)
        _synchronize(self.device)
        return latents

    def run_batch(self, noise: torch.Tensor, labels: torch.Tensor, task: Any = None,
                  rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        images, latents, sample_s, decode_s = super().run_batch(noise.to(self.device), labels.to(self.device), task, rows)
        return images.cpu(), latents.cpu(), sample_s, decode_s

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": str(self.device), "gpu_name": self.gpu_name,
                "tensorrt_version": self.tensorrt_version}


__all__ = [
    "ENGINE_FORMAT",
    "KEY_FIELDS",
    "TensorRTModule",
    "TensorRTSampler",
    "check_engine",
    "engine_key",
    "engine_problems",
    "expected_engine_fields",
    "read_engine_metadata",
    "tensorrt_unavailable_reason",
]
