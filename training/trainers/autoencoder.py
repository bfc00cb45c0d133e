"""Train our small KL autoencoder, then fine-tune its decoder on pixel MSE (the "mse" decoder variant).

Stage 1 (``out_dir/autoencoder/``): reconstruction loss (L1 or MSE) of a posterior sample plus
``kl_weight`` times the KL to N(0, I), AdamW, EMA. Its EMA weights are the ``"ema"`` variant.
Then the latent scale is measured on data (``1 / std`` of the EMA encoder's posterior means).
Stage 2 (``out_dir/decoder_mse/``): the EMA encoder is frozen and a copy of the EMA decoder is trained
further on pixel MSE only; its EMA weights are the ``"mse"`` variant (as sd-vae-ft-mse relates to
sd-vae-ft-ema in the seed report's decoder comparison).

Result: ``out_dir/autoencoder.safetensors`` (keys ``encoder.*``, ``decoder.*`` = "ema", ``decoder_mse.*``;
metadata ``autoencoder_config`` = the :class:`AutoencoderConfig` JSON including ``latent_scale``) and
``out_dir/autoencoder_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowturbo import fileio
from flowturbo.cliargs import rank_from_env
from flowturbo.errors import FlowTurboError
from flowturbo.training.autoencoder import (
    AutoencoderConfig,
    Decoder,
    FlowTurboAutoencoder,
    FlowTurboAutoencoderDecoder,
    compute_latent_scale,
    kl_divergence,
)
from flowturbo.training.checkpoints import atomic_save_safetensors
from flowturbo.training.encoders import AUTOENCODER_FILE, AUTOENCODER_METADATA_KEY
from flowturbo.training.trainers.common import (
    CONFIG_FILE,
    SECONDS_PER_MINUTE,
    DatasetBatches,
    LoopConfig,
    check_run_folder,
    atomic_write_json,
    config_to_dict,
    latest_checkpoint,
    run_training,
    setup_distributed,
)
from flowturbo.training.trainers.data import (
    ImageDataConfig,
    load_images,
    unflipped_tensors,
)

RECON_LOSSES = ("l1", "mse")
STAGE1_DIR = "autoencoder"
STAGE2_DIR = "decoder_mse"
AUTOENCODER_CONFIG_FILE = "autoencoder_config.json"


@dataclass(frozen=True)
class AutoencoderTrainConfig:
    """Everything ``train autoencoder`` needs; ``model.latent_scale`` is ignored (measured after stage 1)."""

    model: AutoencoderConfig = AutoencoderConfig()
    data: ImageDataConfig = ImageDataConfig()
    loop: LoopConfig = LoopConfig(steps=20_000, batch_size=128, lr=2e-4, ema_decay=0.999, ckpt_every=2000)
    recon_loss: str = "l1"
    kl_weight: float = 1e-4  # on the per-element mean KL, relative to the per-pixel reconstruction loss
    finetune_decoder: bool = True
    finetune: LoopConfig = LoopConfig(steps=5_000, batch_size=128, lr=1e-4, ema_decay=0.999, ckpt_every=1000)
    latent_scale_images: int = 10_000  # images used to measure the latent scale

    def __post_init__(self) -> None:
        if self.recon_loss not in RECON_LOSSES:
            raise FlowTurboError(f"recon_loss must be one of {RECON_LOSSES}, got {self.recon_loss!r}")
        if self.kl_weight < 0:
            raise FlowTurboError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.latent_scale_images < 1:
            raise FlowTurboError(f"latent_scale_images must be positive, got {self.latent_scale_images}")


# Named presets (plain data; applied as dataclasses.replace overrides of the defaults).
AUTOENCODER_TRAIN_PRESETS: dict[str, dict] = {
    "fashion-mnist": dict(),
    "tiny": dict(
        model=AutoencoderConfig(image_channels=1, image_size=16, latent_channels=4, base_channels=8,
                                channel_mult=(1, 2), norm_groups=4),
        loop=LoopConfig(steps=4, batch_size=4, lr=1e-3, ema_decay=0.5, progress=False, ckpt_every=2),
        finetune=LoopConfig(steps=2, batch_size=4, lr=1e-3, ema_decay=0.5, progress=False),
        latent_scale_images=16,
    ),
}


def _recon(kind: str, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(recon, images) if kind == "l1" else F.mse_loss(recon, images)


class _FrozenEncoderDecoder(nn.Module):
    """Stage 2 module: a frozen encoder (posterior samples) feeding a trainable decoder."""

    def __init__(self, autoencoder: FlowTurboAutoencoder, decoder: Decoder) -> None:
        super().__init__()
        self.autoencoder = autoencoder.requires_grad_(False)
        self.decoder = decoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            mean, logvar = self.autoencoder.moments(images)
            z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)  # (N, L, s, s)
        return self.decoder(z)


def _check_image_fit(model: AutoencoderConfig, channels: int, size: int) -> None:
    if (model.image_channels, model.image_size) != (channels, size):
        raise FlowTurboError(
            f"the autoencoder is configured for {model.image_channels}x{model.image_size}x{model.image_size} images "
            f"but the data gives {channels}x{size}x{size}; pass --image-size {size} --image-channels {channels} "
            "(they set the model's input size too), or use data of the model's size"
        )


def train_autoencoder(config: AutoencoderTrainConfig, out_dir: str | Path, *, resume: bool = False,
                      force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Train the autoencoder (both stages) into ``out_dir``; returns ``out_dir``.

    Works under ``torchrun`` (DDP). With ``resume`` a stopped run continues exactly where it stopped.
    """
    out_dir = Path(out_dir)
    fileio.check_kind(out_dir, kind=fileio.KIND_TRAINING_RUN)  # never into a bundle, an export, ... (kinds rule)
    main_rank = rank_from_env() == 0  # the folder is rank 0's to judge (other ranks would see its writes in flight)
    if main_rank and not resume and out_dir.is_dir() and latest_checkpoint(out_dir / STAGE1_DIR) is None:
        fileio.check_replaceable(out_dir, "training run folder")  # a new run: nothing of the user's in it
    check_run_folder(out_dir / STAGE1_DIR, config, resume=resume, force=force, log=lambda _m: None)
    ctx = setup_distributed(config.loop.device)
    try:
        say = log if ctx.is_main else (lambda _m: None)
        start = time.monotonic()
        source = load_images(config.data, seed=config.loop.seed)
        _check_image_fit(config.model, source.image_channels, source.image_size)
        torch.manual_seed(config.loop.seed)
        model = FlowTurboAutoencoder(dataclasses.replace(config.model, latent_scale=1.0))
        kind, kl_weight = config.recon_loss, config.kl_weight

        def stage1_step(net: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            images = batch[0]  # (n, C, S, S)
            recon, mean, logvar = net(images)
            return _recon(kind, recon.float(), images) + kl_weight * kl_divergence(mean.float(), logvar.float())

        batches = DatasetBatches(source.dataset, config.loop.batch_size, ctx, config.loop.seed, config.loop.num_workers)
        result = run_training(
            out_dir=out_dir / STAGE1_DIR, config=config, loop=config.loop, model=model, step_fn=stage1_step,
            batches=batches, ctx=ctx, resume=resume, force=force, title="autoencoder", log=log,
            extra_state={"autoencoder_config": config_to_dict(config.model)},
        )
        if not result.finished:
            return out_dir
        ema_model: FlowTurboAutoencoder = result.ema  # type: ignore[assignment]
        images, _ = unflipped_tensors(source)
        scale = compute_latent_scale(ema_model, images[: config.latent_scale_images])
        ae_config = dataclasses.replace(config.model, latent_scale=scale)
        say(f"latent scale {scale:.5f} (1 / std of {min(len(images), config.latent_scale_images)} latents)")
        decoders = {"ema": ema_model.decoder.state_dict()}

        if config.finetune_decoder:
            finetune_loop = config.finetune
            if config.loop.max_minutes is not None and not config.loop.budget_ends_run:
                left = config.loop.max_minutes - (time.monotonic() - start) / SECONDS_PER_MINUTE
                if left <= 0:
                    say("max_minutes used up before the decoder fine-tune; run again with --resume to continue")
                    return out_dir
                finetune_loop = dataclasses.replace(finetune_loop, max_minutes=left)
            decoder = Decoder(ae_config)
            decoder.load_state_dict(ema_model.decoder.state_dict())
            stage2 = _FrozenEncoderDecoder(ema_model, decoder)

            def stage2_step(net: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
                images = batch[0]
                return F.mse_loss(net(images).float(), images)

            batches2 = DatasetBatches(source.dataset, finetune_loop.batch_size, ctx, finetune_loop.seed + 1,
                                      finetune_loop.num_workers)
            result2 = run_training(
                out_dir=out_dir / STAGE2_DIR, config=config, loop=finetune_loop, model=stage2, step_fn=stage2_step,
                batches=batches2, ctx=ctx, resume=resume, force=force, title="decoder MSE fine-tune", log=log,
                extra_state={"autoencoder_config": ae_config.to_dict()},
            )
            if not result2.finished:
                return out_dir
            decoders["mse"] = result2.ema.decoder.state_dict()  # type: ignore[union-attr]

        if ctx.is_main:
            write_autoencoder(out_dir / AUTOENCODER_FILE, ae_config, ema_model.encoder.state_dict(), decoders,
                              record=out_dir)
            atomic_write_json(out_dir / AUTOENCODER_CONFIG_FILE, ae_config.to_dict(), record=out_dir)
            atomic_write_json(out_dir / CONFIG_FILE,
                              {"config": config_to_dict(config), "autoencoder": ae_config.to_dict()}, record=out_dir)
            say(f"wrote {out_dir / AUTOENCODER_FILE}")
        ctx.barrier()
        return out_dir
    finally:
        ctx.close()


def write_autoencoder(path: Path, config: AutoencoderConfig, encoder: dict, decoders: dict[str, dict], *,
                      record: Path | None = None) -> None:
    """Save ``autoencoder.safetensors``: ``encoder.*``, ``decoder.*`` (the "ema" variant), ``decoder_<v>.*``."""
    tensors = {f"encoder.{k}": v for k, v in encoder.items()}
    for variant, state in decoders.items():
        prefix = "decoder." if variant == "ema" else f"decoder_{variant}."
        tensors.update({prefix + k: v for k, v in state.items()})
    atomic_save_safetensors(tensors, path, {AUTOENCODER_METADATA_KEY: json.dumps(config.to_dict())}, record=record)


def autoencoder_decoder(path: str | Path, variant: str = "ema") -> FlowTurboAutoencoderDecoder:
    """The bundle decoder (both variants when present, ``variant`` active) of a trained autoencoder."""
    from flowturbo.training.trainers.data import load_autoencoder

    model, extra = load_autoencoder(path)
    decoders = {"ema": model.decoder.state_dict(), **extra}
    return FlowTurboAutoencoderDecoder.from_weights(model.config, decoders, variant)
