"""Model families (the predictor protocol of :mod:`flowturbo.families`): one adapter module per family, and the
registry that recognises a diffusers pipeline folder and loads the adapter for it (docs/predictor_protocol.md).

* ``sit.py`` — class-conditional SiT (+ FlowTurbo refiners): our bundles and the official checkpoints.
* ``flow_match.py`` — what the adapters of diffusers' flow-matching text-to-image pipelines share.
* ``sd3.py``, ``flux.py`` — one adapter each, registered in :data:`PIPELINE_FAMILIES` below.

A new diffusers family is one adapter module (a :class:`~flowturbo.training.families.flow_match.FlowMatchFamily`
subclass) plus its line here; nothing else in the runtime names it (``tests/training/test_families.py`` pins that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowturbo.errors import CheckpointError
from flowturbo.training.families.flow_match import FlowMatchFamily, PipelineFolder
from flowturbo.training.families.flux import FluxFamily
from flowturbo.training.families.sd3 import SD3Family

# model_index.json's _class_name -> the adapter that runs it
PIPELINE_FAMILIES: dict[str, type[FlowMatchFamily]] = {
    family.pipeline_class: family for family in (SD3Family, FluxFamily)
}


def supported_pipelines() -> str:
    """``StableDiffusion3Pipeline (Stable Diffusion 3) and FluxPipeline (FLUX.1)``: for messages."""
    return " and ".join(f"{name} ({family.description})" for name, family in PIPELINE_FAMILIES.items())


def recognize_pipeline(folder: str | Path, flag: str = "--pipeline") -> tuple[PipelineFolder, type[FlowMatchFamily]]:
    """The folder and the adapter class for it; a folder that is not a supported flow-matching pipeline (an SD 1.5
    UNet folder, a single model folder, a missing text encoder file, ...) is one CheckpointError naming what was found
    and what is supported."""
    found = PipelineFolder.read(folder, flag)
    family = PIPELINE_FAMILIES.get(found.class_name)
    if family is None:
        raise CheckpointError(f"{flag} {found.path} is a {found.class_name} ({found.describe_models()}), not a "
                              f"flow-matching transformer pipeline; flowturbo samples {supported_pipelines()} folders")
    family.check_folder(found)
    return found, family


def load_family(folder: str | Path, *, device: Any, dtype: Any, max_sequence_length: int | None = None,
                flag: str = "--pipeline", before_weights: Any = None) -> FlowMatchFamily:
    """Recognise and load a diffusers pipeline folder as its family's adapter on ``device`` in ``dtype``;
    ``before_weights(family)`` runs before any weights load (:meth:`FlowMatchFamily.load`)."""
    found, family = recognize_pipeline(folder, flag)
    return family.load(found, device=device, dtype=dtype, max_sequence_length=max_sequence_length,
                       before_weights=before_weights)


__all__ = ["PIPELINE_FAMILIES", "load_family", "recognize_pipeline", "supported_pipelines"]
