"""Read an export directory: ``manifest.json``, checksums, and refusal of artifacts built for something else.

This module does not import ``flowturbo.export`` or ``flowturbo.training``: it reads the manifest JSON
that the exporter wrote (format ``flowturbo.export/1``) and verifies every file's SHA-256 before a backend
touches it, so a truncated or corrupted engine is refused with a clear message instead of crashing deep
inside ONNX Runtime or AOTInductor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from flowturbo.errors import CheckpointError, FlowTurboError, SamplingError
from flowturbo.schedule import SamplingSchedule

EXPORT_FORMAT = "flowturbo.export/1"
MANIFEST_FILE = "manifest.json"
HASH_CHUNK_BYTES = 1 << 20
BATCH_AXIS = "batch"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class ArtifactEntry:
    """One exported module file: module name, role (predictor/refiner/decoder/unrolled), format, spec."""

    module: str
    role: str
    format: str
    path: Path
    spec: dict[str, Any]
    time: float | None

    def output_shape(self, name: str, batch: int) -> tuple[int, ...]:
        """Concrete shape of output ``name`` at ``batch`` images (from the spec)."""
        for tensor in self.spec["outputs"]:
            if tensor["name"] == name:
                return tuple(batch if d == BATCH_AXIS else int(d) for d in tensor["shape"])
        raise CheckpointError(f"{self.path.name}: spec has no output {name!r}")


@dataclasses.dataclass(frozen=True)
class ArtifactSet:
    """A verified export directory."""

    root: Path
    manifest: dict[str, Any]

    @property
    def schedule(self) -> SamplingSchedule:
        return SamplingSchedule.from_dict(self.manifest["schedule"])

    @property
    def variant(self) -> str:
        return self.manifest["variant"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def batch(self) -> tuple[int, int, int]:
        b = self.manifest["batch"]
        return int(b["min"]), int(b["opt"]), int(b["max"])

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest["model"]

    def entries(self, fmt: str) -> list[ArtifactEntry]:
        """Artifacts of format ``fmt`` (``onnx``, ``aoti``, ``tensorrt``); refuses when there are none."""
        found = [
            ArtifactEntry(a["module"], a["role"], a["format"], self.root / a["file"], a["spec"], a.get("time"))
            for a in self.manifest["artifacts"] if a["format"] == fmt
        ]
        if not found:
            have = sorted({a["format"] for a in self.manifest["artifacts"]})
            raise CheckpointError(
                f"{self.root} has no {fmt} artifacts (it has {have}); re-export with `flowturbo export --format {fmt}`"
            )
        return found

    def check_batch(self, batch: int) -> None:
        """Refuse a batch outside the exported profile, naming the re-export command."""
        low, opt, high = self.batch
        if not low <= batch <= high:
            raise SamplingError(
                f"batch of {batch} images is outside the exported profile {low}:{opt}:{high} of {self.root}; "
                f"use --batch between {low} and {high}, or re-export with --batch {min(low, batch)}:{opt}:{max(high, batch)}"
            )


    def check_schedule(self, schedule: SamplingSchedule | None) -> None:
        """Refuse a request for another schedule than the exported one (None: the exported one)."""
        exported = self.schedule
        if schedule is not None and schedule.id != exported.id:
            raise SamplingError(
                f"these artifacts were exported for schedule {exported} (id {exported.id}), not "
                f"{schedule} (id {schedule.id}); re-export with `flowturbo export --schedule {schedule.notation}`"
            )

    def batch_size_for(self, num_images: int, batch_size: int | None) -> int:
        """Images per batch for ``num_images`` (default: the profile's max); every batch must fit the profile.

        Checked for all batches before anything runs.
        """
        batch = min(num_images, self.batch[2]) if batch_size is None else int(batch_size)
        if batch < 1:
            raise FlowTurboError(f"batch size must be >= 1, got {batch_size}")
        for start in range(0, num_images, batch):
            self.check_batch(min(batch, num_images - start))
        return batch

    def check_classes(self, labels: Sequence[int]) -> None:
        """Refuse class ids outside ``[0, num_classes)`` of the exported model, naming the first few."""
        num_classes = int(self.model["num_classes"])
        bad = [int(c) for c in labels if not 0 <= int(c) < num_classes]
        if bad:
            raise SamplingError(f"class ids {bad[:5]} are outside [0, {num_classes}); "
                                f"this model has {num_classes} classes")


    def check_torch_version(self, running: str) -> None:
        """Refuse AOTInductor packages compiled by another torch release (major.minor) than ``running``.

        AOTInductor packages are compiled C++/CUDA against one libtorch; another release may not load them
        or may load them wrongly, so the mismatch is refused with the re-export command.
        """
        built = (self.manifest.get("tools") or {}).get("torch")
        if built is None:
            return
        if _major_minor(built) != _major_minor(running):
            raise CheckpointError(
                f"{self.root} was compiled by torch {built}, but this is torch {running}; AOTInductor packages "
                "only load in the torch release that built them: re-export with `flowturbo export --format aoti`"
            )


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def _differences(manifest: dict[str, Any], expect: dict[str, Any]) -> list[str]:
    actual = {
        "schedule_id": manifest.get("schedule_id"),
        "weights_sha256": manifest.get("model", {}).get("weights_sha256"),
        "precision": manifest.get("precision"),
        "variant": manifest.get("variant"),
        "key": manifest.get("key"),
    }
    lines = []
    for field, wanted in expect.items():
        if field not in actual:
            raise CheckpointError(f"cannot check unknown artifact field {field!r}; known: {sorted(actual)}")
        if wanted is not None and actual[field] != wanted:
            lines.append(f"{field}: artifacts have {actual[field]!r}, wanted {wanted!r}")
    return lines


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every file listed in the manifest exists with the recorded size and SHA-256."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{root / MANIFEST_FILE} lists no files; re-export the directory")
    for rel, entry in sorted(files.items()):
        path = root / rel
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in the manifest); re-export with `flowturbo export`")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(
                f"{path} has {size} bytes but the manifest records {entry.get('bytes')} (truncated or replaced); "
                "re-export with `flowturbo export`"
            )
        if sha256_file(path) != entry.get("sha256"):
            raise CheckpointError(
                f"{path} does not match its SHA-256 in the manifest (corrupted or modified); re-export with "
                "`flowturbo export`"
            )


def load_artifacts(
    folder: str | os.PathLike[str], *, expect: dict[str, Any] | None = None, verify: bool = True
) -> ArtifactSet:
    """Read and verify an export directory.

    ``expect`` maps ``schedule_id`` / ``weights_sha256`` / ``precision`` / ``variant`` / ``key`` to the
    values the caller needs (None: any); a mismatch raises CheckpointError listing every difference.
    """
    root = Path(folder)
    if not root.is_dir():
        raise CheckpointError(f"artifact directory not found: {root}; create one with `flowturbo export --out {root}`")
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{root} has no {MANIFEST_FILE}: it is not an export directory, or its export did not finish; "
            "re-run `flowturbo export`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); re-export the directory") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{path} has format {found!r}; this flowturbo reads {EXPORT_FORMAT!r}")
    missing = [k for k in ("schedule", "schedule_id", "variant", "precision", "batch", "model", "artifacts", "files")
               if k not in manifest]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; re-export the directory")
    if SamplingSchedule.from_dict(manifest["schedule"]).id != manifest["schedule_id"]:
        raise CheckpointError(f"{path}: schedule and schedule_id disagree (edited by hand?); re-export")
    if expect:
        diffs = _differences(manifest, expect)
        if diffs:
            raise CheckpointError(
                f"{root} was exported for something else; re-export with `flowturbo export` or pick the right "
                "directory:\n  " + "\n  ".join(diffs)
            )
    if verify:
        verify_files(root, manifest)
    return ArtifactSet(root, manifest)


__all__ = ["EXPORT_FORMAT", "MANIFEST_FILE", "ArtifactEntry", "ArtifactSet", "load_artifacts", "sha256_file",
           "verify_files"]
