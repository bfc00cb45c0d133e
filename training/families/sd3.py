"""The Stable Diffusion 3 / 3.5 family: a diffusers ``StableDiffusion3Pipeline`` folder as a model family.

* Conditioning: two CLIP text encoders (penultimate hidden states, concatenated and zero-padded to the T5 width;
  their projected pooled outputs concatenated) and T5 (``max_sequence_length`` tokens, 256 by default), stacked
  along the sequence: (B, 77 + L, D) + pooled (B, P) — the pipeline's own ``encode_prompt``, run once per distinct
  prompt.
* Guidance: CFG on a doubled batch (:attr:`GuidanceRule.CFG`); the negative prompt defaults to ``""`` (its
  embeddings, not zeros), as the pipeline's. Skip-layer guidance (SD3.5-medium's optional recipe) is not applied.
* Time: the scheduler's static shift (``shift`` in ``scheduler_config.json``, 3.0 for SD3 / SD3.5); the transformer
  takes ``sigma * 1000``.
* Latents: (16, H/8, W/8), unpacked (the transformer patchifies them itself); sizes must be multiples of the VAE
  factor times the patch size (16 for the released models). Decode: ``latents / 1.5305 + 0.0609`` through the VAE
  (the folder's ``scaling_factor`` / ``shift_factor``).
* Defaults: the pipeline's own — ``E28`` (28 Euler steps, its default scheduler exactly) at CFG 7.0; ``H27E1`` for a
  folder saved with ``FlowMatchHeunDiscreteScheduler`` (its 28 steps: 27 Heun + a last Euler step).
"""

from __future__ import annotations

from typing import Any

import torch

from flowturbo.families import FamilyDefaults, GuidanceRule, PromptEmbeddings, TextConditioning
from flowturbo.training.families.flow_match import FlowMatchFamily, PipelineFolder


class SD3Family(FlowMatchFamily):
    """One loaded ``StableDiffusion3Pipeline`` (module docstring)."""

    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    description = "Stable Diffusion 3"
    transformer_class = "SD3Transformer2DModel"
    schedulers = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
    default_max_sequence_length = 256  # the pipeline's default
    guidance_rule = GuidanceRule.CFG

    def __init__(self, folder: PipelineFolder, *, max_sequence_length: int | None = None) -> None:
        super().__init__(folder, max_sequence_length=max_sequence_length)
        config = self.transformer_config
        self.patch = int(config["patch_size"])
        self.latent_channels = int(config["in_channels"])
        self.default_latent_side = int(config["sample_size"])
        if config["pos_embed_max_size"]:  # the embedding is cropped to the image: larger images have none
            self.max_latent_side = int(config["pos_embed_max_size"]) * self.patch
        shift = self.scheduler_config.get("shift", 1.0)
        time_shift = "resolution-dependent (mu from the image tokens)" if self.scheduler_config.get(
            "use_dynamic_shifting") else f"static shift {shift:g} (the scheduler's)"
        # The pipeline's default: 28 steps of its scheduler (Heun: 27 Heun steps and a last Euler step, 55 calls).
        heun = folder.component_class("scheduler") == "FlowMatchHeunDiscreteScheduler"
        self.defaults = FamilyDefaults(schedule="H27E1" if heun else "E28", cfg=7.0, time_shift=time_shift)

    def tokenizers(self) -> list[tuple[str, Any, int]]:
        pipe = self.pipe
        found = [("CLIP", pipe.tokenizer, pipe.tokenizer_max_length),
                 ("CLIP", pipe.tokenizer_2, pipe.tokenizer_max_length)]
        if pipe.tokenizer_3 is not None:
            found.append(("T5", pipe.tokenizer_3, self.max_sequence_length))
        return found

    def encode(self, prompts: list[str]) -> PromptEmbeddings:
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                       device=self.device, do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return PromptEmbeddings(embeds, pooled)  # (B, 77 + L, D), (B, P)

    def transformer_inputs(self, conditioning: TextConditioning, doubled: bool) -> dict[str, Any]:
        prompt, negative = conditioning.prompt, conditioning.negative
        embeds = torch.cat([prompt.embeds, negative.embeds]) if doubled else prompt.embeds  # (M, 77 + L, D)
        pooled = torch.cat([prompt.pooled, negative.pooled]) if doubled else prompt.pooled  # (M, P)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def transformer_output(self, x: torch.Tensor, sigma: float | torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        timestep = self.sigma_rows(sigma, x) * self.num_train_timesteps  # (M,) float64
        timestep = timestep.float()  # float32(sigma * 1000), as the scheduler's timesteps
        return self.transformer(hidden_states=x.to(self.dtype), timestep=timestep, return_dict=False,
                                **inputs)[0]  # (M, C, h, w)


__all__ = ["SD3Family"]
