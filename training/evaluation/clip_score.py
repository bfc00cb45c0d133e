"""CLIP score of text-to-image samples: how well each image matches its prompt.

The score of an image and its prompt is ``100 * max(cos(image embedding, text embedding), 0)`` with a CLIP model's
projected embeddings (Hessel et al. 2021, "CLIPScore", with the weight 100 that torchmetrics and most papers
report; ViT-L/14 is the usual model). The model is a transformers ``CLIPModel`` folder as the Hub downloads it
(``openai/clip-vit-large-patch14``: ``config.json``, weights, tokenizer and ``preprocessor_config.json``); the
images are preprocessed by its own ``CLIPProcessor`` (resize, centre crop, normalise) and the prompts truncated to its
77 tokens (the generating pipelines' CLIP encoders read as many, and warn when they truncate).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from flowturbo.errors import CheckpointError, FlowTurboError

CLIP_SCORE_WEIGHT = 100.0
DEFAULT_CLIP_BATCH = 32


class ClipScore:
    """A CLIP model folder that scores (image, prompt) pairs; see the module docstring."""

    def __init__(self, folder: str | os.PathLike[str], device: str | torch.device = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        from flowturbo.training.families.flow_match import quiet_diffusers

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise CheckpointError(f"--clip {self.folder}: no config.json; pass a transformers CLIPModel folder (e.g. "
                                  "openai/clip-vit-large-patch14 as the Hub downloads it)")
        try:
            with quiet_diffusers():  # transformers' loading bar and notes off
                self.model = CLIPModel.from_pretrained(self.folder, torch_dtype=torch.float32).to(device).eval()
                self.processor = CLIPProcessor.from_pretrained(self.folder)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"--clip {self.folder} is not a loadable CLIPModel folder with its tokenizer and "
                                  f"image processor ({type(exc).__name__}: {exc})") from None
        self.device = torch.device(device)
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)

    @property
    def name(self) -> str:
        """What the result JSON records as the scoring model (the folder's name)."""
        return self.folder.resolve().name

    @torch.inference_mode()
    def scores(self, images: torch.Tensor, prompts: Sequence[str], *, batch_size: int = DEFAULT_CLIP_BATCH,
               progress: bool = False) -> np.ndarray:
        """Per-image CLIP scores (N,) float64 of ``images`` (N, 3, H, W) in [-1, 1] against ``prompts`` (N)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise FlowTurboError(f"CLIP score needs RGB images (N, 3, H, W), got shape {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise FlowTurboError(f"CLIP score needs one prompt per image: {images.shape[0]} images, "
                                 f"{len(prompts)} prompts")
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # what the PNGs hold
        out = []
        starts = range(0, images.shape[0], batch_size)
        for start in tqdm(starts, desc="CLIP score", disable=not progress, unit="batch"):
            chunk = [p.permute(1, 2, 0).cpu().numpy() for p in pixels[start:start + batch_size]]  # (H, W, 3) uint8
            inputs = self.processor(text=list(prompts[start:start + batch_size]), images=chunk, return_tensors="pt",
                                    padding=True, truncation=True, max_length=self.max_tokens)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            image = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            text = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            cosine = torch.nn.functional.cosine_similarity(_embedding(image), _embedding(text), dim=-1)
            out.append((CLIP_SCORE_WEIGHT * cosine.clamp(min=0)).double().cpu())
        return torch.cat(out).numpy()


def _embedding(output: object) -> torch.Tensor:
    """The projected embedding of ``get_*_features``: a tensor, or (newer transformers) an output's pooled tensor."""
    if isinstance(output, torch.Tensor):
        return output.float()
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled.float()
    raise FlowTurboError(f"unexpected CLIP features of type {type(output).__name__}")


__all__ = ["CLIP_SCORE_WEIGHT", "ClipScore"]
