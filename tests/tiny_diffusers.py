"""Tiny random diffusers pipelines built offline, for the text-to-image family tests.

Every component comes from a config (no hub access): a byte-level CLIP BPE tokenizer and a T5 Unigram tokenizer
built in memory (transformers >= 5 constructors: neither sentencepiece nor protobuf needed), CLIP / T5 text
encoders of a few thousand parameters, a two-level ``AutoencoderKL`` (VAE factor 2) and one- or two-block
transformers. Each folder is written with ``save_pretrained`` exactly as the Hub lays a pipeline out
(``model_index.json`` + one sub-folder per component), so loaders read them like downloaded weights.

* :func:`build_sd3` — ``StableDiffusion3Pipeline`` (two CLIP-with-projection encoders + T5, static shift 3).
* :func:`build_flux` — ``FluxPipeline``; ``dev=True``: guidance embedding + resolution-dependent shift (FLUX.1-dev),
  ``dev=False``: neither (FLUX.1-schnell).
* :func:`build_sd15` — a ``StableDiffusionPipeline`` (UNet + PNDM, epsilon prediction): the folder flowturbo refuses.

Sizes: images of ``IMAGE_SIZE`` (32) pixels are 16x16 latents with 16 channels: 64 transformer tokens. Prompts go
through a T5 of ``MAX_SEQUENCE_LENGTH`` (16) tokens. One sampling step costs a few milliseconds on one core.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

IMAGE_SIZE = 32  # pixels; the tiny VAE halves it: 16x16 latents
MAX_SEQUENCE_LENGTH = 16  # T5 tokens (the real pipelines use 256 / 512)
REFINER_CFG = 4.0  # the CFG the tests' random SD3 token refiner (the sd3_refiner fixture) records
LATENT_CHANNELS = 16
SD3_VAE = (1.5305, 0.0609)  # (scaling_factor, shift_factor) of the SD3 / SD3.5 VAE
FLUX_VAE = (0.3611, 0.1159)  # ... of the FLUX.1 VAE
T5_WIDTH = 64  # the transformers' joint_attention_dim
CLIP_WIDTH = 32  # CLIP hidden size = projection dim


# --------------------------------------------------------------------------------------------- tokenizers
def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of the byte-level BPE (GPT-2 / CLIP ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def clip_tokenizer():
    """A CLIP BPE tokenizer that encodes any text: the byte symbols, their word-final ``</w>`` forms, a few merges,
    ``<|startoftext|>`` = 0 and ``<|endoftext|>`` = 1 (eos and pad); 77 tokens as the real one."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for symbol in symbols:
            vocab[symbol + suffix] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>")]  # tuples, as tokenizers wants
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer():
    """A T5 Unigram tokenizer (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2) over letters, digits and punctuation."""
    from transformers import T5TokenizerFast

    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in alphabet] + [("▁" + c, -4.0) for c in alphabet]
    pieces += [("▁the", -3.0), ("▁cat", -3.0), ("▁photo", -3.0)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


# ----------------------------------------------------------------------------------------------- encoders
def clip_encoder(tokenizer, projection: bool):
    """A two-layer CLIP text encoder (SD3 reads ``hidden_states[-2]``) with the tokenizer's special ids."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=CLIP_WIDTH, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            projection_dim=CLIP_WIDTH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_encoder(tokenizer):
    """A two-layer gated-GELU T5 encoder (as t5-v1_1-xxl) of width :data:`T5_WIDTH`."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return T5EncoderModel(config)


def vae(scaling_factor: float, shift_factor: float | None, latent_channels: int = LATENT_CHANNELS,
        quant_convs: bool = False):
    """A two-level ``AutoencoderKL`` (VAE factor 2); without quant convs, as the SD3 / FLUX VAEs (SD 1.5 has them)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=IMAGE_SIZE,
                         scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=quant_convs, use_post_quant_conv=quant_convs)


# ---------------------------------------------------------------------------------------------- pipelines
def build_sd3(seed: int = 0):
    """A ``StableDiffusion3Pipeline`` of patch-2 transformer blocks on 16-channel latents, shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tokenizer, tokenizer_3 = clip_tokenizer(), t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=2, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=T5_WIDTH,
        caption_projection_dim=32, pooled_projection_dim=2 * CLIP_WIDTH, pos_embed_max_size=16)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae(*SD3_VAE), text_encoder=clip_encoder(tokenizer, True), tokenizer=tokenizer,
        text_encoder_2=clip_encoder(tokenizer, True), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(tokenizer_3), tokenizer_3=tokenizer_3)


def build_flux(dev: bool = True, seed: int = 0):
    """A ``FluxPipeline``: FLUX.1-dev's guidance embedding and resolution-dependent shift (``dev``), or neither
    (FLUX.1-schnell's timestep-distilled layout)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=dev, axes_dims_rope=(4, 4, 8))
    shift = dict(shift=3.0, use_dynamic_shifting=True) if dev else dict(shift=1.0, use_dynamic_shifting=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, **shift)
    return FluxPipeline(scheduler=scheduler, vae=vae(*FLUX_VAE), text_encoder=clip_encoder(tokenizer, False),
                        tokenizer=tokenizer, text_encoder_2=t5_encoder(tokenizer_2), tokenizer_2=tokenizer_2,
                        transformer=transformer)


def build_sd15(seed: int = 0):
    """A ``StableDiffusionPipeline`` (UNet2DConditionModel + PNDMScheduler, epsilon prediction)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CLIP_WIDTH,
                                norm_num_groups=4, attention_head_dim=2)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=vae(0.18215, None, latent_channels=4, quant_convs=True),
                                   text_encoder=clip_encoder(tokenizer, False),
                                   tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


BUILDERS = {
    "sd3": build_sd3,
    "flux_dev": lambda: build_flux(dev=True),
    "flux_schnell": lambda: build_flux(dev=False),
    "sd15": build_sd15,
}


def save_tiny_pipelines(root: Path, names=tuple(BUILDERS)) -> dict[str, Path]:
    """Build and ``save_pretrained`` each named pipeline into ``root/NAME``; returns name -> folder."""
    folders = {}
    for name in names:
        folder = Path(root) / name
        BUILDERS[name]().save_pretrained(folder)
        folders[name] = folder
    return folders


def load_diffusers(folder: Path):
    """The saved pipeline loaded back by diffusers itself (the reference the parity tests compare against)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_random_token_refiner(folder: Path, path: Path, cfg: float, *, seed: int = 7, scale: float = 0.05) -> Path:
    """A token refiner for the tiny pipeline at ``folder`` (trained-for record at CFG ``cfg``, size ``IMAGE_SIZE``),
    every weight random non-zero: not a trained refiner, but one whose every input changes its output, so a dropped
    refiner call or a wrong input shows in the samples."""
    from flowturbo.schedule import SamplingSchedule
    from flowturbo.training.families import load_family
    from flowturbo.training.token_refiner import (
        TokenRefiner,
        TokenRefinerConfig,
        TokenRefinerRecord,
        transformer_digest,
        write_token_refiner,
    )
    from flowturbo.training.trainers.text_refiner import TEXT_REFINER_DT

    family = load_family(folder, device=torch.device("cpu"), dtype=torch.float32,
                         max_sequence_length=MAX_SEQUENCE_LENGTH)
    pooled = family.condition(["x"], SamplingSchedule.parse("E1")).prompt.pooled.shape[1]
    generator = torch.Generator().manual_seed(seed)
    refiner = TokenRefiner(TokenRefinerConfig(latent_channels=family.latent_channels, patch_size=family.patch,
                                              pooled_dim=int(pooled), hidden_size=16, num_heads=2))
    with torch.no_grad():
        for p in refiner.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    record = TokenRefinerRecord(family.folder.class_name, transformer_digest(family.transformer_config), str(folder),
                                cfg, None, f"{IMAGE_SIZE}x{IMAGE_SIZE}")
    write_token_refiner(path, refiner, record, TEXT_REFINER_DT)
    return path


def save_tiny_clip_model(folder: Path, seed: int = 0) -> Path:
    """A random transformers ``CLIPModel`` (text + vision towers, 32x32 images in 8x8 patches) with its tokenizer
    and image processor, saved as a Hub folder is laid out: the `--clip` model of the CLIP-score tests."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    towers = dict(hidden_size=CLIP_WIDTH, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1, **towers),
                        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, **towers), projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
