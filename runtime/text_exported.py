"""The conditioning of text-to-image exports: prompts or prompt embeddings -> the step graph's inputs.

A text-to-image export (``flowturbo export --pipeline``) has a predictor graph whose inputs are the prompt
embeddings (the negative prompt's for CFG, a distilled guidance value where the model embeds one); its manifest
records the pipeline folder whose text encoders make them. :func:`text_graph_inputs` turns a request into those
inputs, one row per image:

* ``prompts`` — encoded with the pipeline folder's text encoders in PyTorch (the family adapter without its
  transformer and VAE: :func:`flowturbo.runtime.pytorch_backend.load_prompt_encoder`), each distinct prompt once, the
  negative prompt's rules (default ``""`` for SD3's CFG) and the guidance value's the family's own;
* ``prompt_embeds`` / ``pooled_prompt_embeds`` (+ the negative ones) — given directly, checked against the graph's
  sequence length and widths.

Each mistake is one clear error: embeddings of another length than exported, missing negative embeddings for a CFG
export, a guidance value for a model without one, a wrong number of rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from flowturbo.errors import FlowTurboError, SamplingError
from flowturbo.runtime.artifacts import ArtifactSet

PROMPT_EMBEDS = "prompt_embeds"  # = flowturbo.export.specs (the runtime reads specs, it does not import export)
POOLED = "pooled_prompt_embeds"
NEGATIVE = "negative_prompt_embeds"
NEGATIVE_POOLED = "negative_pooled_prompt_embeds"
GUIDANCE = "guidance"


@dataclasses.dataclass(frozen=True)
class TextRequest:
    """One text-to-image request to an export: prompts (encoded here) or their embeddings, and options."""

    prompts: Sequence[str] | None = None
    negative_prompt: str | Sequence[str] | None = None
    guidance: float | None = None
    prompt_embeds: torch.Tensor | None = None  # (N, L, D)
    pooled_prompt_embeds: torch.Tensor | None = None  # (N, P)
    negative_prompt_embeds: torch.Tensor | None = None  # (N, L, D)
    negative_pooled_prompt_embeds: torch.Tensor | None = None  # (N, P)

    @property
    def given(self) -> bool:
        """Whether anything text-to-image was asked for."""
        return any(v is not None for v in dataclasses.astuple(self))


class PromptEncoder:
    """The text encoders of the pipeline folder an export's manifest records, loaded on first use (in PyTorch, on
    the CPU; :func:`flowturbo.runtime.pytorch_backend.load_prompt_encoder`)."""

    def __init__(self, artifacts: ArtifactSet) -> None:
        self.artifacts = artifacts
        self._family: Any = None

    def __call__(self) -> Any:
        if self._family is None:
            from flowturbo.runtime.pytorch_backend import load_prompt_encoder

            model = self.artifacts.model
            self._family = load_prompt_encoder(model["pipeline"], max_sequence_length=model.get("max_sequence_length"))
        return self._family


def asks_for_text(artifacts: ArtifactSet, classes: Any, request: TextRequest) -> bool:
    """Whether a sampling request to an export is a text-to-image one (prompts or embeddings) — the export's kind —
    or class ids; the wrong kind for the export (or nothing) is one clear error."""
    if artifacts.takes_prompts:
        if classes is not None:
            raise FlowTurboError(f"{artifacts.root} is a text-to-image export: it is conditioned on prompts, not class "
                                 "ids; pass prompts=[...] (--prompt TEXT) or prompt embeddings")
        return True
    if request.given:
        raise FlowTurboError(f"{artifacts.root} is conditioned on class ids, not text prompts: pass class ids "
                             "(--classes), or export a text-to-image pipeline folder (flowturbo export --pipeline)")
    if classes is None:
        raise SamplingError("no classes given: pass at least one class id")
    return False


def prompt_labels(request: TextRequest, n: int) -> tuple[list[int], list[str] | None]:
    """(labels, distinct prompts) of a request: each image's index among its distinct prompts, or 0..n-1 for
    embeddings given directly (no prompts)."""
    if request.prompts is None:
        return list(range(n)), None
    given = [request.prompts] if isinstance(request.prompts, str) else list(request.prompts)
    prompts = list(dict.fromkeys(given))
    index = {prompt: i for i, prompt in enumerate(prompts)}
    return [index[p] for p in given], prompts


def requested_rows(request: TextRequest) -> int | None:
    """How many results a request asks for, before anything is encoded: its prompts, or its prompt embeddings' rows
    (None when neither is given as it should be: :func:`text_graph_inputs` refuses that)."""
    if request.prompts is not None:
        return 1 if isinstance(request.prompts, str) else len(list(request.prompts))
    if isinstance(request.prompt_embeds, torch.Tensor) and request.prompt_embeds.dim() >= 1:
        return int(request.prompt_embeds.shape[0])
    return None


def predictor_inputs(artifacts: ArtifactSet) -> dict[str, list[Any]]:
    """The predictor graph's input names -> spec shapes (``"batch"`` first)."""
    for artifact in artifacts.manifest["artifacts"]:
        if artifact.get("role") == "predictor":
            return {t["name"]: list(t["shape"]) for t in artifact["spec"]["inputs"]}
    raise FlowTurboError(f"{artifacts.root} has no predictor graph")


def _check_rows(name: str, tensor: torch.Tensor, shape: list[Any], rows: int | None, artifacts: ArtifactSet) -> int:
    """Refuse ``tensor`` unless it is (rows, *shape[1:]); the sequence length mismatch names the export's."""
    want = [int(d) for d in shape[1:]]
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != len(shape):
        raise FlowTurboError(f"{name} must be a tensor of shape (N, {', '.join(map(str, want))}), got "
                             f"{tuple(getattr(tensor, 'shape', ())) or type(tensor).__name__}")
    if len(want) == 2 and tensor.shape[1] != want[0]:
        length = artifacts.model.get("max_sequence_length")
        raise FlowTurboError(f"{name} has {tensor.shape[1]} tokens, but {artifacts.root} was exported for "
                             f"{want[0]} (--max-sequence-length {length}): encode the prompts with "
                             f"max_sequence_length={length}, or re-export with the length you use")
    if list(tensor.shape[1:]) != want:
        raise FlowTurboError(f"{name} has shape {tuple(tensor.shape)}, but the export takes (N, "
                             f"{', '.join(map(str, want))}): embeddings of another model?")
    if rows is not None and tensor.shape[0] != rows:
        raise FlowTurboError(f"{name} has {tensor.shape[0]} rows, the prompt embeddings {rows}: one row per image")
    return int(tensor.shape[0])


def text_graph_inputs(artifacts: ArtifactSet, request: TextRequest, encoder: Any, *, dtype: torch.dtype,
                      device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The predictor graph's conditioning inputs for ``request`` (N rows each) and what the run record says about it.

    ``encoder()``: the prompt encoder (called only when prompts are given)."""
    inputs = predictor_inputs(artifacts)
    schedule = artifacts.schedule
    record: dict[str, Any] = {"family": artifacts.model.get("family"), "image_size": artifacts.model.get("image_size"),
                              "max_sequence_length": artifacts.model.get("max_sequence_length"),
                              "negative_prompt": None, "guidance": None}
    if request.prompts is not None:
        if request.prompt_embeds is not None or request.negative_prompt_embeds is not None:
            raise FlowTurboError("give prompts or prompt embeddings, not both")
        prompts = [request.prompts] if isinstance(request.prompts, str) else list(request.prompts)
        family = encoder()
        guidance = request.guidance
        if GUIDANCE in inputs and guidance is None:  # the export's recorded default (flowturbo export --guidance)
            guidance = (artifacts.model.get("defaults") or {}).get("guidance")
        conditioning = family.condition(prompts, schedule, negative=request.negative_prompt, guidance=guidance)
        prompt, negative, guidance = conditioning.prompt, conditioning.negative, conditioning.guidance
        given = {PROMPT_EMBEDS: prompt.embeds, POOLED: prompt.pooled}
        if negative is not None:
            given.update({NEGATIVE: negative.embeds, NEGATIVE_POOLED: negative.pooled})
        record["negative_prompt"] = request.negative_prompt if request.negative_prompt is None or isinstance(
            request.negative_prompt, str) else list(request.negative_prompt)
    else:
        if request.prompt_embeds is None or request.pooled_prompt_embeds is None:
            raise FlowTurboError("this export is conditioned on text: pass prompts=[...] (--prompt), or both "
                                 "prompt_embeds and pooled_prompt_embeds")
        if request.negative_prompt is not None:
            raise FlowTurboError("negative_prompt is text: with embeddings, pass negative_prompt_embeds and "
                                 "negative_pooled_prompt_embeds")
        given = {PROMPT_EMBEDS: request.prompt_embeds, POOLED: request.pooled_prompt_embeds}
        negatives = (request.negative_prompt_embeds, request.negative_pooled_prompt_embeds)
        if NEGATIVE in inputs:
            if any(n is None for n in negatives):
                raise FlowTurboError(f"this export guides with CFG {schedule.guidance_scale:g}: pass "
                                     "negative_prompt_embeds and negative_pooled_prompt_embeds (the unconditional "
                                     "half)")
            given.update({NEGATIVE: negatives[0], NEGATIVE_POOLED: negatives[1]})
        elif any(n is not None for n in negatives):
            raise FlowTurboError("negative prompt embeddings act through CFG, but this export has none (exported with "
                                 "--cfg 1): re-export with --cfg S to use them")
        guidance = request.guidance
        if GUIDANCE in inputs and guidance is None:
            guidance = (artifacts.model.get("defaults") or {}).get("guidance")
    rows = None
    for name in (PROMPT_EMBEDS, POOLED, NEGATIVE, NEGATIVE_POOLED):
        if name in given:
            rows = _check_rows(name, given[name], inputs[name], rows, artifacts)
    if rows == 0:
        raise SamplingError("no prompts given: pass at least one prompt")
    tensors = {name: value.to(device=device, dtype=dtype) for name, value in given.items()}
    if GUIDANCE in inputs:
        if guidance is None or not math.isfinite(float(guidance)) or float(guidance) < 0:
            raise FlowTurboError(f"guidance must be a finite number >= 0, got {guidance}")
        tensors[GUIDANCE] = torch.full((int(rows),), float(guidance), dtype=torch.float32, device=device)  # (N,)
        record["guidance"] = float(guidance)
    elif guidance is not None:
        raise FlowTurboError(f"guidance {guidance:g}: this {artifacts.model.get('description', 'model')} export has "
                             "no guidance embedding (use CFG: export with --cfg S)")
    return tensors, record


__all__ = ["PromptEncoder", "TextRequest", "asks_for_text", "predictor_inputs", "prompt_labels", "requested_rows",
           "text_graph_inputs"]
