"""TensorRT engines from the exported ONNX, through the documented TensorRT Python API (no shelling out).

TensorRT cannot be installed on our machines (DESIGN.md §6). Everything that does not need it — the
optimization profile from the spec, precision flags, the cache key, the engine metadata and the refusal
of an engine built for something else — is plain Python and unit-tested; :func:`build_engine` needs the
``tensorrt`` module and refuses clearly without it.

Engine cache: ``<cache>/<module>-<key>.engine`` + ``.json`` metadata, where the key hashes weights,
schedule id, batch profile, precision, TensorRT version, GPU name and the module spec. A lookup re-reads
the metadata and the engine checksum; it never trusts a file for existing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.export.manifest import artifact_key, canonical_json, sha256_file
from flowturbo.export.specs import ModuleSpec

ENGINE_FORMAT = "flowturbo.tensorrt-engine/1"
ENGINE_SUFFIX = ".engine"
TRT_PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
DEFAULT_OPTIMIZATION_LEVEL = 3  # TensorRT's default builder optimization level (0..5)
MAX_OPTIMIZATION_LEVEL = 5
TIMING_CACHE_FILE = "timing.cache"
KEY_FIELDS = ("module", "weights_sha256", "schedule_id", "batch", "precision", "tensorrt_version", "gpu_name", "spec")


def tensorrt_unavailable_reason() -> str | None:
    """None when ``import tensorrt`` works, else the precise reason (used by skips and refusals)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return (f"TensorRT is not installed ({exc}); the PyPI wheels download their libraries from NVIDIA at install "
                "time, which these machines cannot reach: install the TensorRT SDK and its Python bindings")
    return None


@dataclasses.dataclass(frozen=True)
class TensorRTOptions:
    """Builder settings: precision flags and optimization level; the timing cache persists in the cache dir."""

    precision: str = "fp16"
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL

    def __post_init__(self) -> None:
        if self.precision not in TRT_PRECISIONS:
            raise FlowTurboError(f"TensorRT precision {self.precision!r} is unknown; choose one of {TRT_PRECISIONS}")
        if not 0 <= self.optimization_level <= MAX_OPTIMIZATION_LEVEL:
            raise FlowTurboError(f"TensorRT builder optimization level must be 0..{MAX_OPTIMIZATION_LEVEL}, "
                                 f"got {self.optimization_level}")

    def builder_flags(self) -> tuple[str, ...]:
        """Names of ``trt.BuilderFlag`` members to set; ``fp32`` clears TF32 (strict fp32 math)."""
        return {"fp32": (), "tf32": ("TF32",), "fp16": ("FP16",), "bf16": ("BF16",)}[self.precision]


def engine_metadata(
    spec: ModuleSpec, *, weights_sha256: str, schedule_id: str, precision: str, tensorrt_version: str, gpu_name: str,
) -> dict[str, Any]:
    """The metadata stored beside an engine; its ``key`` hashes :data:`KEY_FIELDS`."""
    fields = {
        "module": spec.name,
        "weights_sha256": weights_sha256,
        "schedule_id": schedule_id,
        "batch": spec.batch.describe(),
        "precision": precision,
        "tensorrt_version": tensorrt_version,
        "gpu_name": gpu_name,
        "spec": spec.to_dict(),
    }
    return {"format": ENGINE_FORMAT, "key": engine_cache_key(fields), **fields}


def engine_cache_key(fields: dict[str, Any]) -> str:
    """Hash of the fields an engine depends on (a missing field is an error, not a wildcard)."""
    missing = [f for f in KEY_FIELDS if f not in fields]
    if missing:
        raise FlowTurboError(f"engine metadata lacks {missing}")
    return artifact_key({f: fields[f] for f in KEY_FIELDS})


def metadata_differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Human lines ``field: engine has X, wanted Y`` for every key field that differs."""
    lines = []
    for field in KEY_FIELDS:
        have, want = found.get(field), expected.get(field)
        if canonical_json(have) != canonical_json(want):
            if field == "spec":
                lines.append("spec: the engine's inputs/outputs differ from the requested module spec")
            else:
                lines.append(f"{field}: engine has {have!r}, wanted {want!r}")
    return lines


def check_engine_metadata(found: dict[str, Any], expected: dict[str, Any], where: str = "engine") -> None:
    """Refuse an engine built for another model / schedule / batch / precision / TensorRT / GPU."""
    if found.get("format") != ENGINE_FORMAT:
        raise CheckpointError(f"{where}: metadata format {found.get('format')!r} is not {ENGINE_FORMAT!r}; rebuild it")
    diffs = metadata_differences(found, expected)
    if diffs:
        raise CheckpointError(
            f"{where} was built for something else; rebuild it: export again with --format tensorrt and --overwrite:"
            "\n  "
            + "\n  ".join(diffs)
        )
    if found.get("key") != engine_cache_key(found):
        raise CheckpointError(f"{where}: metadata key does not match its fields (edited by hand?); rebuild it")


def engine_paths(cache_dir: Path, metadata: dict[str, Any]) -> tuple[Path, Path]:
    """(engine file, metadata file) for ``metadata`` in ``cache_dir``."""
    stem = f"{metadata['module'].replace('@', '_t')}-{metadata['key']}"
    return cache_dir / f"{stem}{ENGINE_SUFFIX}", cache_dir / f"{stem}.json"


def lookup_engine(cache_dir: Path, expected: dict[str, Any]) -> Path | None:
    """The cached engine for ``expected`` metadata, verified (metadata fields + checksum), or None."""
    engine, meta_path = engine_paths(cache_dir, expected)
    if not (engine.is_file() and meta_path.is_file()):
        return None
    try:
        found = json.loads(meta_path.read_text())
    except ValueError:
        return None
    check_engine_metadata(found, expected, str(engine))
    if found.get("engine_sha256") != sha256_file(engine):
        raise CheckpointError(f"{engine} does not match its recorded checksum (corrupted or truncated); delete it")
    return engine


def build_engine(
    onnx_path: Path, spec: ModuleSpec, options: TensorRTOptions, metadata: dict[str, Any], cache_dir: Path,
) -> Path:
    """Build (or reuse) the engine for ``onnx_path``; writes engine + metadata atomically, persists the timing cache."""
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise FlowTurboError(reason)
    import tensorrt as trt

    from flowturbo.training.trainers.common import atomic_write_bytes, atomic_write_json

    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = lookup_engine(cache_dir, metadata)
    if cached is not None:
        return cached
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FlowTurboError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    if options.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    for flag in options.builder_flags():
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in spec.tensorrt_profile().items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    timing_path = cache_dir / TIMING_CACHE_FILE
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FlowTurboError(f"TensorRT failed to build an engine for {spec.name} ({options.precision}); see its log")
    atomic_write_bytes(timing_path, bytes(config.get_timing_cache().serialize()))
    engine, meta_path = engine_paths(cache_dir, metadata)
    atomic_write_bytes(engine, bytes(serialized))
    atomic_write_json(meta_path, {**metadata, "engine_sha256": sha256_file(engine),
                                  "optimization_level": options.optimization_level})
    return engine


__all__ = [
    "ENGINE_FORMAT",
    "TRT_PRECISIONS",
    "TensorRTOptions",
    "build_engine",
    "check_engine_metadata",
    "engine_cache_key",
    "engine_metadata",
    "lookup_engine",
    "metadata_differences",
    "tensorrt_unavailable_reason",
]
