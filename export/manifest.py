"""Hashes, cache keys and the ``manifest.json`` of an export directory.

An export directory is keyed by a hash of everything that decides its bytes — the weights, the schedule
id, the batch profile, the precision, the variant, the formats, the opset, the tool versions and the
device — never by "the file exists". The manifest is written last (atomically), so a directory without
one is incomplete by definition, and sealed (:func:`flowturbo.fileio.sealed_json_bytes`: it carries the SHA-256
of its own canonical content), so a hand edit is refused. ``flowturbo.runtime.artifacts`` and the C++ runner
read it back without importing this code.
"""

from __future__ import annotations

import hashlib
import platform
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

# Re-exported: tensorrt_export and older callers import them from here. The key is computed in the torch-free
# fileio so that the runtime re-derives it from the manifest's key_fields with the very same function.
from flowturbo.fileio import KEY_HEX_DIGITS, artifact_key, canonical_json, sha256_file

EXPORT_FORMAT = "flowturbo.export/1"
MANIFEST_FILE = "manifest.json"
VERSIONED_TOOLS = ("torch", "onnx", "onnxruntime", "onnxscript", "tensorrt", "flowturbo")


def weights_sha256(modules: Mapping[str, torch.nn.Module | None]) -> str:
    """SHA-256 over every named tensor (name, dtype, shape, bytes) of the given modules, in name order."""
    digest = hashlib.sha256()
    for prefix in sorted(modules):
        module = modules[prefix]
        if module is None:
            digest.update(f"{prefix}:none;".encode())
            continue
        for name, tensor in sorted(module.state_dict().items()):
            data = tensor.detach().to("cpu").contiguous()
            digest.update(f"{prefix}.{name}:{data.dtype}:{tuple(data.shape)};".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def tool_versions() -> dict[str, str | None]:
    """Installed versions of the tools that shape the artifacts (None when absent), plus Python."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__
    return versions


def exporter_sha256() -> str:
    """SHA-256 over the source of the export package (and the model code it traces), in path order.

    Part of the artifact key: an export directory written by other exporter or model code (e.g. before a
    bug fix) is rebuilt, not reused, even when the flowturbo version string did not change.
    """
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    traced = ("models.py", "decoders.py", "autoencoder.py")  # the model code the graphs are traced from
    loop = (here.parent / "flowturbo" / "integrator.py", here.parent / "kernels" / "solver.py",
            here.parent / "kernels" / "adaln.py")  # the step loop and the ops traced into the graphs
    sources = sorted(here.glob("*.py")) + [here.parent / "training" / name for name in traced] + list(loop)
    for path in sources:
        digest.update(f"{path.parent.name}/{path.name}:".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def device_description(device: torch.device) -> str:
    """``'cpu (x86_64)'`` or ``'cuda: NVIDIA H100 80GB HBM3'``."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu ({platform.machine()})"


def file_entries(root: Path, files: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "bytes"}}`` for the manifest."""
    entries = {}
    for path in sorted(files):
        entries[path.relative_to(root).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return entries


def command_line() -> str:
    return " ".join(sys.argv)


__all__ = [
    "EXPORT_FORMAT",
    "KEY_HEX_DIGITS",
    "MANIFEST_FILE",
    "artifact_key",
    "canonical_json",
    "command_line",
    "device_description",
    "exporter_sha256",
    "file_entries",
    "sha256_file",
    "tool_versions",
    "weights_sha256",
]
