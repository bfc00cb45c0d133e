"""Exportable step graphs of text-to-image (diffusers flow-matching) models, built through the predictor protocol.

The graph of one predictor call takes the prompt embeddings as inputs (the text encoders stay in PyTorch: they run
once per prompt) and returns the *guided* velocity on flowturbo's time axis, exactly what the PyTorch path's
:class:`~flowturbo.training.families.flow_match.FlowMatchCalls` + the solver ops' CFG rule compute:

* ``sigma = 1 - t`` (the time is a graph input, one value per row), ``v = -model_output``;
* CFG (``guidance_scale != 1``): the batch is doubled inside the graph, ``[x; x]`` with ``[prompt; negative]``
  embeddings, and combined as ``u + s (c - u)`` (:func:`flowturbo.kernels.cfg_guided_reference`, the solver ops'
  rule), so callers pass B images;
* a distilled guidance value (``GuidanceRule.EMBEDDED``) is the graph input ``guidance`` (B,);
* everything model-specific — the transformer's keyword inputs, packing into tokens and unpacking, position ids
  (constants of the graph), the timestep built from sigma — is the family adapter's own ``transformer_inputs`` /
  ``transformer_output``, which takes the rows' sigmas as a tensor (M,) here (the PyTorch path passes one float).
  Export validates the result against the adapter's own calls at a grid time (``export/text_export.py``), so a wrong
  mapping cannot pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from flowturbo.errors import FlowTurboError
from flowturbo.families import GuidanceRule, PromptEmbeddings, TextConditioning
from flowturbo.kernels import cfg_guided_reference

class TextPredictorStep(nn.Module):
    """One guided predictor call of a text-to-image family: the inputs of
    :func:`flowturbo.export.specs.text_predictor_step_spec` -> guided velocity (B, C, h, w).

    Subclasses fix ``forward``'s signature (its parameter names are the graph's input names)."""

    def __init__(self, family: Any, guidance_scale: float) -> None:
        super().__init__()
        self.family = family
        self.transformer = family.transformer  # registers the transformer's weights with this module
        self.scale = float(guidance_scale)
        self.guided = self.scale != 1.0
        self.embedded_guidance = family.guidance_rule is GuidanceRule.EMBEDDED

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, prompt: PromptEmbeddings,
                 negative: PromptEmbeddings | None, guidance: torch.Tensor | None) -> torch.Tensor:
        """``latents`` (B, C, h, w), ``t`` (B,) float32 -> guided velocity (B, C, h, w)."""
        batch = latents.shape[0]
        if self.guided and negative is None:
            raise FlowTurboError("a CFG graph needs the negative prompt's embeddings")
        # The adapter's own conditioning inputs; a placeholder guidance value, replaced by the input rows below.
        conditioning = TextConditioning(prompt, negative if self.guided else None,
                                        1.0 if self.embedded_guidance else None)
        inputs = self.family.transformer_inputs(conditioning, self.guided)
        if self.embedded_guidance:
            if guidance is None:
                raise FlowTurboError("this model embeds a guidance value: the graph needs the guidance input")
            inputs["guidance"] = torch.cat([guidance, guidance]) if self.guided else guidance  # (M,) float32
        xx = torch.cat([latents, latents]) if self.guided else latents  # (M, C, h, w)
        sigma = 1.0 - t.float()  # (B,) flowturbo's t = 1 - sigma
        sigma = torch.cat([sigma, sigma]) if self.guided else sigma  # (M,)
        out = self.family.transformer_output(xx, sigma, inputs).neg()  # (M, C, h, w) v = -model_output
        if not self.guided:
            return out
        return cfg_guided_reference(out, batch, out.shape[1], self.scale, None, False).to(out.dtype)  # (B, C, h, w)


class PromptStep(TextPredictorStep):
    """``(latents, t, prompt_embeds, pooled_prompt_embeds) -> velocity``."""

    def forward(self, latents: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                pooled_prompt_embeds: torch.Tensor) -> torch.Tensor:
        return self.velocity(latents, t, PromptEmbeddings(prompt_embeds, pooled_prompt_embeds), None, None)


class PromptGuidanceStep(TextPredictorStep):
    """``(latents, t, prompt_embeds, pooled_prompt_embeds, guidance) -> velocity`` (a distilled guidance value)."""

    def forward(self, latents: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                pooled_prompt_embeds: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        return self.velocity(latents, t, PromptEmbeddings(prompt_embeds, pooled_prompt_embeds), None, guidance)


class CFGPromptStep(TextPredictorStep):
    """``(latents, t, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds)
    -> guided velocity`` (the doubled batch inside)."""

    def forward(self, latents: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                pooled_prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor,
                negative_pooled_prompt_embeds: torch.Tensor) -> torch.Tensor:
        return self.velocity(latents, t, PromptEmbeddings(prompt_embeds, pooled_prompt_embeds),
                             PromptEmbeddings(negative_prompt_embeds, negative_pooled_prompt_embeds), None)


class CFGPromptGuidanceStep(TextPredictorStep):
    """CFG on a doubled batch and a distilled guidance value (FLUX.1-dev's "true CFG")."""

    def forward(self, latents: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                pooled_prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor,
                negative_pooled_prompt_embeds: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        return self.velocity(latents, t, PromptEmbeddings(prompt_embeds, pooled_prompt_embeds),
                             PromptEmbeddings(negative_prompt_embeds, negative_pooled_prompt_embeds), guidance)


class TextRefinerStep(nn.Module):
    """A text family's token refiner as a graph: ``(latents, v, t, [dt], pooled_prompt_embeds) -> offset`` (B rows:
    the offset of the guided velocity, :mod:`flowturbo.training.token_refiner`)."""

    def __init__(self, refiner: nn.Module) -> None:
        super().__init__()
        self.refiner = refiner

    def forward(self, latents: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
                pooled_prompt_embeds: torch.Tensor) -> torch.Tensor:
        return self.refiner(latents, t, v, pooled_prompt_embeds)


class TextDtRefinerStep(TextRefinerStep):
    """The same with the velocity age ``dt`` (B,) as an input (a dt-conditioned refiner)."""

    def forward(self, latents: torch.Tensor, v: torch.Tensor, t: torch.Tensor,  # type: ignore[override]
                dt: torch.Tensor, pooled_prompt_embeds: torch.Tensor) -> torch.Tensor:
        return self.refiner(latents, t, v, pooled_prompt_embeds, dt)


def text_refiner_step(refiner: nn.Module) -> TextRefinerStep:
    """The refiner graph wrapper: with a dt input exactly when the refiner takes one."""
    return (TextDtRefinerStep if refiner.takes_dt else TextRefinerStep)(refiner)


def text_predictor_step(family: Any, guidance_scale: float) -> TextPredictorStep:
    """The predictor graph wrapper for ``family`` at ``guidance_scale``: CFG or not, guidance input or not."""
    guided = float(guidance_scale) != 1.0
    embedded = family.guidance_rule is GuidanceRule.EMBEDDED
    cls = {(False, False): PromptStep, (False, True): PromptGuidanceStep, (True, False): CFGPromptStep,
           (True, True): CFGPromptGuidanceStep}[(guided, embedded)]
    return cls(family, guidance_scale)


__all__ = ["CFGPromptGuidanceStep", "CFGPromptStep", "PromptGuidanceStep", "PromptStep", "TextDtRefinerStep",
           "TextPredictorStep", "TextRefinerStep", "text_predictor_step", "text_refiner_step"]
