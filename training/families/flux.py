"""The FLUX.1 family: a diffusers ``FluxPipeline`` folder (FLUX.1-dev or -schnell) as a model family.

* Conditioning: T5 per-token embeddings (``max_sequence_length`` tokens, 512 by default) and CLIP's pooled output
  — the pipeline's own ``encode_prompt``, once per distinct prompt; text position ids are zeros.
* Guidance: FLUX.1-dev is guidance-distilled (``guidance_embeds`` in the transformer config): the guidance value
  (``--guidance``, 3.5 by default) is a model input — one transformer call per step, no doubled batch
  (:attr:`GuidanceRule.EMBEDDED`). FLUX.1-schnell takes none (:attr:`GuidanceRule.NONE`). Either runs "true CFG" on
  a doubled batch when given a negative prompt and ``--cfg`` (the pipeline's ``true_cfg_scale``).
* Time: the scheduler's grid on ``sigmas = linspace(1, 1/N, N)``, shifted by ``mu`` from the image's token count
  when the scheduler shifts dynamically (FLUX.1-dev: resolution-dependent), unshifted for schnell; the transformer
  takes ``timestep / 1000`` in its own dtype (it multiplies by 1000 again).
* Latents: the solver state is (16, H/8, W/8); the transformer reads 2x2 patches packed into tokens (B, h/2 * w/2,
  64) with image position ids ``(0, row, col)``. The adapter packs on the way in and unpacks the output (exact
  permutations), so the step loop, the solver ops and the hooks see ordinary (B, C, h, w) latents. Sizes must be
  multiples of the VAE factor times 2 (16). Decode: ``latents / 0.3611 + 0.1159`` through the VAE.
* Defaults: FLUX.1-dev ``E28`` (the pipeline's default) at guidance 3.5; FLUX.1-schnell ``E4`` (its model card's
  four steps).
"""

from __future__ import annotations

from typing import Any

import torch

from flowturbo.families import FamilyDefaults, GuidanceRule, PromptEmbeddings, TextConditioning
from flowturbo.training.families.flow_match import FlowMatchFamily, PipelineFolder

PACK = 2  # latent pixels per token side
DEFAULT_LATENT_SIDE = 128  # the pipeline's default_sample_size: 1024 px with the 8x VAE
DEV_GUIDANCE = 3.5  # the pipeline's default guidance_scale


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each token a 2x2 patch, channel-major, as ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of ``height`` x ``width``: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, channels = tokens.shape
    x = tokens.view(b, height // PACK, width // PACK, channels // (PACK * PACK), PACK, PACK)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels // (PACK * PACK), height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids ``(0, row, col)`` of the packed tokens of (height, width) latents: (h/2 * w/2, 3)."""
    rows, cols = height // PACK, width // PACK
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(rows)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


class FluxFamily(FlowMatchFamily):
    """One loaded ``FluxPipeline`` (module docstring)."""

    name = "flux"
    pipeline_class = "FluxPipeline"
    description = "FLUX.1"
    transformer_class = "FluxTransformer2DModel"
    default_max_sequence_length = 512  # the pipeline's default
    linspace_sigmas = True

    def __init__(self, folder: PipelineFolder, *, max_sequence_length: int | None = None) -> None:
        super().__init__(folder, max_sequence_length=max_sequence_length)
        config = self.transformer_config
        self.patch = PACK * int(config["patch_size"])
        self.latent_channels = int(config["in_channels"]) // (PACK * PACK)
        self.default_latent_side = DEFAULT_LATENT_SIDE
        distilled = bool(config["guidance_embeds"])
        self.guidance_rule = GuidanceRule.EMBEDDED if distilled else GuidanceRule.NONE
        self.description = "FLUX.1-dev" if distilled else "FLUX.1-schnell"
        dynamic = self.scheduler_config.get("use_dynamic_shifting")
        time_shift = "resolution-dependent (mu from the image tokens)" if dynamic else \
            f"static shift {self.scheduler_config.get('shift', 1.0):g} (the scheduler's)"
        self.defaults = FamilyDefaults(schedule="E28" if distilled else "E4", cfg=1.0,
                                       guidance=DEV_GUIDANCE if distilled else None, time_shift=time_shift)
        self._ids: dict[tuple[int, int], torch.Tensor] = {}

    def tokenizers(self) -> list[tuple[str, Any, int]]:
        pipe = self.pipe
        return [("CLIP", pipe.tokenizer, pipe.tokenizer_max_length),
                ("T5", pipe.tokenizer_2, self.max_sequence_length)]

    def encode(self, prompts: list[str]) -> PromptEmbeddings:
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
        return PromptEmbeddings(embeds, pooled)  # (B, L, D), (B, P)

    def transformer_inputs(self, conditioning: TextConditioning, doubled: bool) -> dict[str, Any]:
        prompt, negative = conditioning.prompt, conditioning.negative
        embeds = torch.cat([prompt.embeds, negative.embeds]) if doubled else prompt.embeds  # (M, L, D)
        pooled = torch.cat([prompt.pooled, negative.pooled]) if doubled else prompt.pooled  # (M, P)
        inputs: dict[str, Any] = {
            "encoder_hidden_states": embeds, "pooled_projections": pooled,
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=embeds.dtype),  # (L, 3)
            "guidance": None,
        }
        if self.guidance_rule is GuidanceRule.EMBEDDED:  # one value per row, float32 as the pipeline's
            inputs["guidance"] = torch.full((embeds.shape[0],), conditioning.guidance, dtype=torch.float32,
                                            device=embeds.device)
        return inputs

    def transformer_output(self, x: torch.Tensor, sigma: float | torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        _, _, height, width = x.shape
        ids = self._ids.get((height, width))
        if ids is None:
            ids = self._ids[(height, width)] = image_ids(height, width, x.device, self.dtype)  # (h/2 * w/2, 3)
        timestep = (self.sigma_rows(sigma, x) * self.num_train_timesteps).float()  # (M,) float32(sigma * 1000)
        timestep = timestep.to(self.dtype) / 1000  # the pipeline's t.to(dtype) / 1000
        out = self.transformer(hidden_states=pack_latents(x.to(self.dtype)), timestep=timestep, img_ids=ids,
                               return_dict=False, **inputs)[0]  # (M, h/2 * w/2, 4C)
        return unpack_latents(out, height, width)  # (M, C, h, w)


__all__ = ["FluxFamily", "image_ids", "pack_latents", "unpack_latents"]
