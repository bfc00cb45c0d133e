"""Text-to-image bundles: a token refiner + sampling defaults that point at a diffusers pipeline folder.

``flowturbo train package --refiner RUN --out BUNDLE`` with a refiner trained for a diffusers teacher
(``train refiner --teacher PIPELINE --prompts FILE``) writes a bundle that does **not** copy the pipeline (tens of
GB for SD3.5 / FLUX.1): its ``config.json`` names the folder (resolved, absolute) and the teacher's identity, and the
bundle holds the refiner's weights. ``flowturbo sample --model BUNDLE --prompt ...`` and ``Sampler.from_bundle``
load the folder it points at with the refiner and the bundle's default schedule; a folder that moved, or now holds
another model (the transformer config digest differs), is refused naming what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.fileio import OutputFolder, check_kind
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.token_refiner import TOKEN_REFINER_FILE, is_token_refiner, read_token_refiner

TEXT_BUNDLE_FORMAT = "flowturbo-text-bundle-1"
CONFIG_FILE = "config.json"
PACKAGE_COMMAND = "train package"


@dataclasses.dataclass(frozen=True)
class TextBundle:
    """A text bundle as read back: where the pipeline is, the refiner's weights, the sampling defaults."""

    folder: Path
    pipeline: Path
    refiner: Path  # the bundle's refiner.safetensors
    schedule: str
    cfg: float
    guidance: float | None
    inpaint_schedule: str | None = None  # inpainting's default (None: ``schedule``)


def is_text_bundle(folder: str | Path | None) -> bool:
    """Whether ``folder`` holds a text bundle's ``config.json`` (cheap: reads one small file)."""
    if folder is None:
        return False
    config = Path(folder) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == TEXT_BUNDLE_FORMAT


def package_text_bundle(out: str | Path, *, refiner: str | Path, schedule: str | None = None,
                        inpaint_schedule: str | None = None, overwrite: bool = False,
                        wait: bool = False) -> TextBundle:
    """Write a text bundle for a token refiner (a ``train refiner --teacher PIPELINE`` run or its weights file):
    ``schedule`` is the default (None: ``H1P1R2``, checked to have R steps or not, as any notation),
    ``inpaint_schedule`` inpainting's (None: ``schedule``); the CFG and guidance are the refiner's own (it corrects
    the velocity of that setting)."""
    trained = read_token_refiner(refiner)
    record = trained.record
    pipeline = Path(record.pipeline)
    if not (pipeline / "model_index.json").is_file():
        raise CheckpointError(f"--refiner {refiner} was trained for the pipeline folder {pipeline}, which is not there "
                              "any more; a text bundle points at the folder (it does not copy it)")
    spec = schedule or "H1P1R2"
    for notation in (spec, inpaint_schedule or spec):  # a bad notation is refused before anything is written
        SamplingSchedule.parse(notation, guidance_scale=record.cfg)
    target = Path(out)
    check_kind(target, command=PACKAGE_COMMAND)
    if target.exists() and not overwrite:
        raise FlowTurboError(f"{target} already exists; pass --overwrite to replace it")
    config = {"format": TEXT_BUNDLE_FORMAT, "kind": "text-to-image", "pipeline": str(pipeline.resolve()),
              "trained_for": record.to_dict(), "refiner_config": trained.config.to_dict(),
              "refiner_dt": None if trained.dt is None else trained.dt.to_dict(),
              "defaults": {"schedule": spec, "cfg": record.cfg, "guidance": record.guidance,
                           "inpaint_schedule": inpaint_schedule}}
    source = Path(refiner) / TOKEN_REFINER_FILE if Path(refiner).is_dir() else Path(refiner)
    with OutputFolder(target, command=PACKAGE_COMMAND, what="bundle", wait=wait) as folder, \
            folder.staging() as staging:
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(source, staging / TOKEN_REFINER_FILE)
    return read_text_bundle(target)


def read_text_bundle(folder: str | Path) -> TextBundle:
    """A text bundle's settings; the pipeline it points at must still be there (named if not)."""
    folder = Path(folder)
    try:
        data = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{folder} is not a readable text bundle ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != TEXT_BUNDLE_FORMAT:
        raise CheckpointError(f"{folder}/{CONFIG_FILE} is not a text bundle's ({TEXT_BUNDLE_FORMAT})")
    try:
        pipeline, defaults = Path(data["pipeline"]), data["defaults"]
        schedule, cfg, guidance = str(defaults["schedule"]), float(defaults["cfg"]), defaults.get("guidance")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder}/{CONFIG_FILE} misses {exc}") from None
    if not (pipeline / "model_index.json").is_file():
        raise CheckpointError(f"the text bundle {folder} points at the diffusers pipeline folder {pipeline}, which is "
                              "not there; put the folder back, or package the refiner again (`flowturbo train package "
                              f"--refiner {folder} --out NEW`) after training it for the folder's new place")
    refiner = folder / TOKEN_REFINER_FILE
    if not is_token_refiner(refiner):
        raise CheckpointError(f"the text bundle {folder} has no readable {TOKEN_REFINER_FILE}")
    inpaint = defaults.get("inpaint_schedule")
    return TextBundle(folder, pipeline, refiner, schedule, cfg, None if guidance is None else float(guidance),
                      None if inpaint is None else str(inpaint))


def bundle_defaults(bundle: TextBundle) -> dict[str, Any]:
    """The family defaults a text bundle overrides (schedule, CFG, distilled guidance, inpainting's schedule)."""
    return {"schedule": bundle.schedule, "cfg": bundle.cfg, "guidance": bundle.guidance,
            "inpaint_schedule": bundle.inpaint_schedule}


__all__ = ["TEXT_BUNDLE_FORMAT", "TextBundle", "bundle_defaults", "is_text_bundle", "package_text_bundle",
           "read_text_bundle"]
