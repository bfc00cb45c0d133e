"""Read an export directory: ``manifest.json``, checksums, and refusal of artifacts built for something else.

This module does not import ``flowturbo.export`` or ``flowturbo.training``: it reads the manifest JSON
that the exporter wrote (format ``flowturbo.export/1``) and verifies it before a backend touches anything:

* the manifest is sealed (:func:`flowturbo.fileio.read_sealed_json`): it carries the SHA-256 of its own
  canonical content, so a hand edit (a batch range, a precision, a removed file entry) is refused;
* the manifest agrees with itself (:func:`check_consistent`): its key is re-derived from its ``key_fields``,
  and the top-level batch range, precision, variant, schedule, formats, weights and tools must equal those
  fields, and every graph's spec must have that batch range and the precision's dtypes. An edit that was
  re-sealed (a tool recomputing ``manifest_sha256``) is refused too, unless every copy of the value and the key
  were forged together: the seal detects accidents and hand edits, not deliberate forgery;
* the files it must list follow from its variant and formats (:func:`required_files`), and each is listed
  with its size and SHA-256;
* every listed file exists with that size and SHA-256, so a truncated or corrupted engine is refused with a
  clear message instead of crashing deep inside ONNX Runtime or AOTInductor.

``runtime/csrc/manifest.cpp`` (the C++ runner's reader) applies the same rules to the same bytes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import warnings
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from flowturbo.dtypes import PRECISION_DTYPE_NAMES
from flowturbo.errors import CheckpointError, FlowTurboError, FlowTurboWarning, SamplingError
from flowturbo.fileio import SealError, artifact_key, read_sealed_json, sha256_file
from flowturbo.refiner_dt import REFINER_DT_KEY, DtDistribution, read_dt_record
from flowturbo.schedule import SamplingSchedule, uniform_timesteps

EXPORT_FORMAT = "flowturbo.export/1"
MANIFEST_FILE = "manifest.json"
BATCH_AXIS = "batch"
# The fix when no command can be built (the directory's own manifest is unreadable): what to do, in words.
REEXPORT = ("re-export the directory: run the flowturbo export command it was built with again (its manifest.json "
            "records it under \"command\") with --overwrite")
# The graphs each variant consists of, by role (the refiner only when the schedule has R steps).
VARIANT_ROLES = {"time-input": ("predictor", "refiner", "decoder"), "per-step": ("predictor", "refiner", "decoder"),
                 "unrolled": ("unrolled",)}
ONNX_EXTERNAL_DATA_SUFFIX = ".data"
# Inputs whose dtype does not follow the precision (= flowturbo.export.specs: TIME_DTYPE, LABEL_DTYPE).
FIXED_DTYPES = {"t": "float32", "dt": "float32", "labels": "int64", "guidance": "float32"}
DT_INPUT = "dt"  # a dt-conditioned refiner's velocity-age input (= flowturbo.export.specs.DT_INPUT)


@dataclasses.dataclass(frozen=True)
class ArtifactEntry:
    """One exported module file: module name, role (predictor/refiner/decoder/unrolled), format, spec."""

    module: str
    role: str
    format: str
    path: Path
    spec: dict[str, Any]
    time: float | None
    dt: float | None = None  # the folded velocity age of a dt-conditioned refiner's per-step graph

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

    @property
    def refiner_dt(self) -> DtDistribution | None:
        """The dt distribution the exported refiner was trained on (its ``max_dt``: the trained range); None when
        the export records none (an official refiner, an older export)."""
        try:
            return read_dt_record(self.model.get(REFINER_DT_KEY))
        except FlowTurboError as exc:
            raise CheckpointError(f"{self.root / MANIFEST_FILE}: bad {REFINER_DT_KEY} record ({exc}); {REEXPORT}") from None

    @property
    def refiner_dt_conditioning(self) -> bool:
        """Whether the refiner graphs take (time-input) or fold (per-step, unrolled) the velocity age dt."""
        return bool(self.model.get("refiner_dt_conditioning", False))

    def entries(self, fmt: str) -> list[ArtifactEntry]:
        """Artifacts of format ``fmt`` (``onnx``, ``aoti``, ``tensorrt``); refuses when there are none."""
        found = [
            ArtifactEntry(a["module"], a["role"], a["format"], self.root / a["file"], a["spec"], a.get("time"),
                          a.get("dt"))
            for a in self.manifest["artifacts"] if a["format"] == fmt
        ]
        if not found:
            have = sorted({a["format"] for a in self.manifest["artifacts"]})
            wanted = {**self.manifest, "formats": [fmt]}
            out = new_export_folder(self.root, fmt)
            raise CheckpointError(
                f"{self.root} has no {fmt} artifacts (it has {have}); export them with "
                f"`{export_command(self.schedule, wanted, out=out)}`"
            )
        return found

    def check_batch(self, batch: int) -> None:
        """Refuse a batch outside the exported profile, naming the re-export command."""
        low, opt, high = self.batch
        if not low <= batch <= high:
            profile = {"min": min(low, batch), "opt": opt, "max": max(high, batch)}
            wider = export_command(self.schedule, {**self.manifest, "batch": profile},
                                   out=new_export_folder(self.root, f"b{profile['min']}-{profile['max']}"))
            raise SamplingError(
                f"batch of {batch} images is outside the exported profile {low}:{opt}:{high} of {self.root}; "
                f"use --batch between {low} and {high}, or re-export with a wider profile: `{wider}`"
            )


    def check_schedule(self, schedule: SamplingSchedule | None) -> None:
        """Refuse a request for another schedule than the exported one (None: the exported one)."""
        exported = self.schedule
        if schedule is not None and schedule.id != exported.id:
            raise SamplingError(
                f"these artifacts were exported for schedule {exported} (id {exported.id}), not "
                f"{schedule} (id {schedule.id}); re-export with {reexport_hint(schedule, self.manifest, self.root)}"
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

    @property
    def takes_prompts(self) -> bool:
        """Whether the graphs take prompt embeddings (a text-to-image export) rather than class ids."""
        return self.model.get("conditioning") == "prompts"

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
                f"only load in the torch release that built them: {rebuild_hint(self.root, self.manifest)}"
            )


def export_command(schedule: SamplingSchedule, manifest: dict[str, Any] | None = None, *, out: str | None = None,
                   overwrite: bool = False) -> str:
    """The ``flowturbo export`` command that reproduces ``schedule`` (notation, custom time grid, guidance scale
    and channels).

    With the ``manifest`` of an existing export, the command also carries over its model (the bundle folder; none
    for the embedded default; ``--model MODEL_DIR`` to fill in when the manifest names no folder that exists
    here), formats, batch profile, opset, precision, variant, kernels, encoder and device, and ends in ``--out
    OUT`` (``out``; default the placeholder ``NEW_DIR``) and, with ``overwrite``, ``--overwrite``: it runs as
    printed.
    """
    parts = ["flowturbo export"]
    model = (manifest or {}).get("model") or {}
    source = model.get("source") if isinstance(model.get("source"), str) else ""
    text = model.get("conditioning") == "prompts"  # a text-to-image export: --pipeline, its size and prompt length
    if text:
        parts.append(f"--pipeline {shlex.quote(source)}" if source and Path(source).is_dir() else "--pipeline DIR")
        parts += [f"--size {model.get('image_size')}", f"--max-sequence-length {model.get('max_sequence_length')}"]
        guidance = ((manifest or {}).get("key_fields") or {}).get("text", {}).get("guidance")
        if guidance is not None:  # exported with an explicit default guidance value
            parts.append(f"--guidance {guidance:g}")
    elif manifest is not None and source != "embedded default":
        parts.append(f"--model {shlex.quote(source)}" if source and Path(source).is_dir() else "--model MODEL_DIR")
    parts += [f"--schedule {schedule.notation}", f"--cfg {schedule.guidance_scale:g}"]
    if schedule.guidance_channels is not None:
        parts.append(f"--guidance-channels {schedule.guidance_channels}")
    if not text and tuple(schedule.timesteps) != uniform_timesteps(schedule.num_steps):  # text: the family's grid
        parts.append("--timesteps " + ",".join(repr(float(t)) for t in schedule.timesteps))
    if manifest is None:
        return " ".join(parts)
    batch = manifest.get("batch") or {}
    if isinstance(manifest.get("formats"), list):
        parts.append(f"--format {','.join(manifest['formats'])}")
    if all(k in batch for k in ("min", "opt", "max")):
        parts.append(f"--batch {batch['min']}:{batch['opt']}:{batch['max']}")
    opset = (manifest.get("key_fields") or {}).get("opset")
    if isinstance(opset, int):
        parts.append(f"--opset {opset}")
    for flag, key in (("--precision", "precision"), ("--variant", "variant")):
        if isinstance(manifest.get(key), str):
            parts.append(f"{flag} {manifest[key]}")
    if manifest.get("kernel_backend") not in (None, "reference"):
        parts.append(f"--kernels {manifest['kernel_backend']}")
    if str(manifest.get("device", "")).startswith("cuda"):
        parts.append("--device cuda")
    if manifest.get("with_encoder"):
        parts.append("--with-encoder")
    parts.append(f"--out {shlex.quote(out) if out is not None else 'NEW_DIR'}")
    if overwrite:
        parts.append("--overwrite")
    return " ".join(parts)


def new_export_folder(root: str | os.PathLike[str], tag: str) -> str:
    """A folder beside the export ``root`` for a re-export of it (``ROOT-TAG``, ``ROOT-TAG-2``, ...; the tag names
    what changes, e.g. the schedule): one that does not exist yet, so the printed command writes a new directory."""
    base = f"{os.path.normpath(root)}-{tag}"
    candidate, n = base, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def reexport_hint(schedule: SamplingSchedule, manifest: dict[str, Any] | None,
                  root: str | os.PathLike[str] | None = None) -> str:
    """``flowturbo export --schedule S --cfg C`` and, given the manifest of the export at ``root``, the full command
    that rebuilds it for ``schedule`` (model, formats, batch, precision, variant carried over) into a new folder
    beside it (:func:`new_export_folder`)."""
    short = f"`{export_command(schedule)}`"
    if manifest is None:
        return short
    out = new_export_folder(root, schedule.notation) if root is not None else None
    return f"{short} (in full, keeping this export's settings: `{export_command(schedule, manifest, out=out)}`)"


def rebuild_hint(root: str | os.PathLike[str], manifest: dict[str, Any] | None) -> str:
    """How to rebuild the damaged export ``root`` in place: its own settings (from its ``manifest``, when that is
    readable) with ``--out ROOT --overwrite``."""
    try:
        schedule = SamplingSchedule.from_dict(manifest["schedule"]) if isinstance(manifest, dict) else None
    except (FlowTurboError, KeyError, TypeError, ValueError):
        schedule = None
    if schedule is None:
        return REEXPORT
    return f"re-export it with `{export_command(schedule, manifest, out=str(root), overwrite=True)}`"


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


def _batch_text(batch: Any) -> str | None:
    if not isinstance(batch, dict) or not all(isinstance(batch.get(k), int) for k in ("min", "opt", "max")):
        return None
    return f"{batch['min']}:{batch['opt']}:{batch['max']}"


def check_consistent(path: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest that disagrees with itself (an edit re-sealed by a tool; see the module docstring).

    The key must be the key of ``key_fields``; the top-level values must equal the keyed ones; each graph's
    spec must have the manifest's batch range, a leading batch axis on every tensor, and the dtypes of the
    manifest's precision.
    """
    def refuse(what: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: {what}; the manifest was changed after export and re-sealed, so it cannot be trusted; "
            f"{rebuild_hint(path.parent, manifest)}"
        )

    fields = manifest.get("key_fields")
    if not isinstance(fields, dict):
        raise refuse("it has no key_fields")
    try:
        key = artifact_key(fields)
    except (TypeError, ValueError):
        raise refuse("its key_fields are not plain JSON") from None
    if manifest.get("key") != key:
        raise refuse(f"its key {manifest.get('key')!r} is not the key of its key_fields ({key!r})")
    batch = _batch_text(manifest.get("batch"))
    if batch is None:
        raise refuse(f"its batch range {manifest.get('batch')!r} is not {{min, opt, max}} integers")
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    formats = manifest.get("formats")
    same = [
        ("batch range", batch, fields.get("batch")),
        ("precision", manifest.get("precision"), fields.get("precision")),
        ("variant", manifest.get("variant"), fields.get("variant")),
        ("schedule_id", manifest.get("schedule_id"), fields.get("schedule_id")),
        ("formats", sorted(formats) if isinstance(formats, list) else formats, fields.get("formats")),
        ("weights_sha256", model.get("weights_sha256"), fields.get("weights_sha256")),
        ("kernel_backend", manifest.get("kernel_backend"), fields.get("kernel_backend")),
        ("with_encoder", bool(manifest.get("with_encoder")), bool(fields.get("with_encoder"))),
        ("tools", manifest.get("tools"), fields.get("tools")),
        ("device", manifest.get("device"), fields.get("device")),
    ]
    for what, have, keyed in same:
        if have != keyed:
            raise refuse(f"its {what} {have!r} differs from the {what} {keyed!r} it was exported (and keyed) with")
    dtype = PRECISION_DTYPE_NAMES.get(str(manifest.get("precision")))
    if dtype is None:
        raise refuse(f"its precision {manifest.get('precision')!r} is not one of {', '.join(PRECISION_DTYPE_NAMES)}")
    for artifact in manifest.get("artifacts") or []:
        spec = artifact.get("spec") if isinstance(artifact, dict) else None
        name = artifact.get("file") if isinstance(artifact, dict) else None
        if not isinstance(spec, dict):
            raise refuse(f"the entry of {name!r} has no spec")
        if _batch_text(spec.get("batch")) != batch:
            raise refuse(f"{name}'s spec has the batch range {_batch_text(spec.get('batch'))!r}, the manifest {batch!r}")
        for tensor in list(spec.get("inputs") or []) + list(spec.get("outputs") or []):
            shape = tensor.get("shape") if isinstance(tensor, dict) else None
            if not isinstance(shape, list) or not shape or shape[0] != BATCH_AXIS:
                raise refuse(f"{name}'s spec gives {tensor!r} no leading {BATCH_AXIS!r} axis")
            wanted = FIXED_DTYPES.get(tensor.get("name"), dtype)
            if tensor.get("dtype") != wanted:
                raise refuse(f"{name}'s spec gives {tensor.get('name')!r} the dtype {tensor.get('dtype')!r}, but "
                             f"the precision {manifest.get('precision')!r} needs {wanted!r}")


def check_refiner_dt(path: Path, manifest: dict[str, Any]) -> None:
    """Refuse refiner graphs that disagree with the manifest's ``refiner_dt_conditioning``: a dt-conditioned
    refiner's time-input graph must take a ``dt`` input and its per-step graphs must fold a ``dt``; a refiner
    without dt conditioning has neither. Running such graphs would give silently wrong images."""
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    conditioned = bool(model.get("refiner_dt_conditioning", False))
    for artifact in manifest.get("artifacts") or []:
        if not isinstance(artifact, dict) or artifact.get("role") != "refiner":
            continue
        spec = artifact.get("spec") if isinstance(artifact.get("spec"), dict) else {}
        names = [t.get("name") for t in spec.get("inputs") or [] if isinstance(t, dict)]
        has_dt = DT_INPUT in names if "t" in names else artifact.get("dt") is not None
        if has_dt != conditioned:
            what = ("has no dt input (time-input) / folded dt (per-step)" if conditioned else
                    "takes a dt its refiner does not have")
            raise CheckpointError(
                f"{path}: the refiner graph {artifact.get('file')} {what}, but the manifest says the refiner is "
                f"{'' if conditioned else 'not '}dt-conditioned: the graphs and the manifest come from different "
                f"exports or an older flowturbo; {REEXPORT}"
            )


def required_files(manifest: dict[str, Any], root: Path | None = None) -> list[str]:
    """The files an export directory must list, following from its variant, schedule and formats.

    Every format in ``formats`` needs one artifact per graph of the variant (``unrolled``: the whole schedule;
    ``time-input`` / ``per-step``: predictor and decoder graphs, and refiner graphs when the schedule has R
    steps); each artifact's file (and an ONNX graph's external ``.data`` file) must be listed in ``files``.
    ``root``: the directory, for the rebuild command in the messages.
    """
    path = MANIFEST_FILE if root is None else root / MANIFEST_FILE
    fix = REEXPORT if root is None else rebuild_hint(root, manifest)
    variant, formats = manifest.get("variant"), manifest.get("formats")
    if variant not in VARIANT_ROLES:
        raise CheckpointError(f"{path}: unknown variant {variant!r}; {fix}")
    if not isinstance(formats, list) or not formats or not all(isinstance(f, str) for f in formats):
        raise CheckpointError(f"{path}: no formats listed; {fix}")
    uses_refiner = SamplingSchedule.from_dict(manifest["schedule"]).uses_refiner
    roles = [r for r in VARIANT_ROLES[variant] if r != "refiner" or uses_refiner]
    if manifest.get("with_encoder"):  # `flowturbo export --with-encoder`: inpainting / editing need it
        roles.append("encoder")
    artifacts = manifest.get("artifacts")
    if not isinstance(artifacts, list):
        raise CheckpointError(f"{path}: no artifacts listed; {fix}")
    needed: list[str] = []
    for fmt in formats:
        have = {a.get("role") for a in artifacts if isinstance(a, dict) and a.get("format") == fmt}
        missing = [r for r in roles if r not in have]
        if missing:
            raise CheckpointError(
                f"{path}: a {variant} export needs {fmt} graphs for {', '.join(roles)}, but lists none for "
                f"{', '.join(missing)}; {fix}"
            )
    for a in artifacts:
        if not isinstance(a, dict) or not isinstance(a.get("file"), str):
            raise CheckpointError(f"{path}: an artifact entry has no file; {fix}")
        needed.append(a["file"])
        if a.get("format") == "onnx" and a.get("external_data"):
            needed.append(a["file"] + ONNX_EXTERNAL_DATA_SUFFIX)
    return needed


def verify_files(root: Path, manifest: dict[str, Any], *, checksums: bool = True) -> None:
    """Every required file is listed; every listed file exists with the recorded size (and SHA-256)."""
    files = manifest.get("files")
    fix = rebuild_hint(root, manifest)
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{root / MANIFEST_FILE} lists no files; {fix}")
    for rel in required_files(manifest, root):
        if rel not in files:
            raise CheckpointError(f"{root / MANIFEST_FILE} does not list {rel} with its size and SHA-256; {fix}")
    for rel, entry in sorted(files.items()):
        if (not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int)
                or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256")))):
            raise CheckpointError(f"{root / MANIFEST_FILE}: the entry of {rel} lacks its size or SHA-256; {fix}")
        path = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise CheckpointError(f"{root / MANIFEST_FILE} lists {rel}, outside the directory; {fix}")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in the manifest); {fix}")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(
                f"{path} has {size} bytes but the manifest records {entry.get('bytes')} (truncated or replaced); "
                f"{fix}"
            )
        if checksums and sha256_file(path) != entry.get("sha256"):
            raise CheckpointError(
                f"{path} does not match its SHA-256 in the manifest (corrupted or modified); {fix}"
            )


def read_manifest(root: Path) -> dict[str, Any]:
    """The sealed ``manifest.json`` of ``root``; a hand-edited or unsealed one is refused."""
    path = root / MANIFEST_FILE
    try:
        return read_sealed_json(path, fix=REEXPORT)
    except SealError as exc:
        raise CheckpointError(str(exc)) from None


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
            f"{root} has no {MANIFEST_FILE}: it is not an export directory, or its export did not finish; export "
            f"into it with `flowturbo export --out {shlex.quote(str(root))}` (add the --model, --schedule and other flags "
            "you want; a folder holding files flowturbo did not write is refused, not replaced)"
        )
    manifest = read_manifest(root)
    if manifest.get("format") != EXPORT_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{path} has format {found!r}; this flowturbo reads {EXPORT_FORMAT!r}")
    missing = [k for k in ("schedule", "schedule_id", "variant", "precision", "batch", "model", "artifacts", "files")
               if k not in manifest]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; {REEXPORT}")
    if SamplingSchedule.from_dict(manifest["schedule"]).id != manifest["schedule_id"]:
        raise CheckpointError(f"{path}: schedule and schedule_id disagree (edited by hand?); {REEXPORT}")
    check_consistent(path, manifest)
    check_refiner_dt(path, manifest)
    if expect:
        diffs = _differences(manifest, expect)
        if diffs:
            raise CheckpointError(
                f"{root} was exported for something else; re-export it (flowturbo export) or pick the right "
                "directory:\n  " + "\n  ".join(diffs)
            )
    verify_files(root, manifest, checksums=verify)
    if manifest.get("validation_failures"):  # only exports built with on_validation_failure="record" (GPU suite)
        warnings.warn(f"{root} was exported although its check against eager PyTorch failed: "
                      f"{manifest['validation_failures'][0]}", FlowTurboWarning, stacklevel=2)
    return ArtifactSet(root, manifest)


__all__ = ["EXPORT_FORMAT", "MANIFEST_FILE", "ArtifactEntry", "ArtifactSet", "check_consistent", "check_refiner_dt",
           "export_command", "load_artifacts", "new_export_folder", "read_manifest", "rebuild_hint", "reexport_hint",
           "required_files", "sha256_file", "verify_files"]
