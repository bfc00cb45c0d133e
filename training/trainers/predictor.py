"""Train a class-conditional SiT predictor by flow matching on the linear path.

With data latent ``x1``, noise ``x0`` and ``t ~ U(0, 1)``: ``x_t = t x1 + (1 - t) x0`` and the velocity target
is ``x1 - x0`` (DESIGN.md §2); the loss is the MSE between the first C output channels and the target.
Labels are replaced by the null id (``num_classes``) with probability ``label_dropout`` so the model also
learns the unconditional velocity that classifier-free guidance needs.

Latents come from a given autoencoder (ours or a diffusers VAE), encoded once into memory by default.
Result: ``out_dir/predictor.safetensors`` (EMA weights, official key layout; metadata ``sit_config`` and
``class_names``) beside the checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flowturbo.errors import FlowTurboError
from flowturbo.training.models import SIT_PRESETS, SiT, SiTConfig, sit_config
from flowturbo.training.checkpoints import atomic_save_safetensors
from flowturbo.training.trainers.common import (
    LoopConfig,
    check_run_folder,
    read_trained_weights,
    run_training,
    setup_distributed,
)
from flowturbo.training.trainers.data import ImageDataConfig, LatentDataConfig, prepare_latent_data

PREDICTOR_FILE = "predictor.safetensors"
SIT_CONFIG_METADATA_KEY = "sit_config"
CLASS_NAMES_METADATA_KEY = "class_names"
DEFAULT_LABEL_DROPOUT = 0.1


@dataclass(frozen=True)
class PredictorTrainConfig:
    """Everything ``train predictor`` needs. The latent size, channels and class count come from the data."""

    model: str = "SiT-M/2"  # a SIT_PRESETS name
    learn_sigma: bool = False
    label_dropout: float = DEFAULT_LABEL_DROPOUT
    data: LatentDataConfig = LatentDataConfig()
    loop: LoopConfig = LoopConfig(steps=50_000, batch_size=128, lr=1e-4, ema_decay=0.9999, ckpt_every=5000)

    def __post_init__(self) -> None:
        if self.model not in SIT_PRESETS:
            raise FlowTurboError(f"unknown SiT preset {self.model!r}; valid names: {', '.join(SIT_PRESETS)}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise FlowTurboError(f"label_dropout must be in [0, 1), got {self.label_dropout}")


PREDICTOR_TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "fashion-mnist": dict(model="SiT-M/2"),
    "tiny": dict(
        model="SiT-T/2",
        data=LatentDataConfig(images=ImageDataConfig(limit=64, random_flip=False)),
        loop=LoopConfig(steps=4, batch_size=8, lr=1e-3, ema_decay=0.5, progress=False),
    ),
}


def drop_labels(labels: torch.Tensor, probability: float, null_class: int) -> torch.Tensor:
    """Replace each label by ``null_class`` with ``probability`` (global torch RNG; resumable)."""
    if probability <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < probability  # (N,)
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def flow_matching_loss(model: nn.Module, x1: torch.Tensor, labels: torch.Tensor, channels: int) -> torch.Tensor:
    """Linear-path flow matching: MSE of ``model(x_t, t, y)[:, :C]`` against ``x1 - x0``."""
    x0 = torch.randn_like(x1)  # (N, C, H, W) noise
    t = torch.rand(x1.shape[0], device=x1.device)  # (N,) ~ U(0, 1)
    t_ = t.view(-1, 1, 1, 1)
    x_t = t_ * x1 + (1.0 - t_) * x0
    velocity = model(x_t, t, labels)[:, :channels]  # (N, C, H, W)
    return F.mse_loss(velocity.float(), (x1 - x0).float())


def train_predictor(config: PredictorTrainConfig, out_dir: str | Path, *, resume: bool = False,
                    force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Train a SiT predictor on encoded latents into ``out_dir``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    check_run_folder(out_dir, config, resume=resume, force=force, log=lambda _m: None)
    ctx = setup_distributed(config.loop.device)
    try:
        data = prepare_latent_data(config.data, global_batch=config.loop.batch_size, ctx=ctx, seed=config.loop.seed,
                                   cache_dir=out_dir, num_workers=config.loop.num_workers, log=log)
        channels, size, _ = data.latent_shape
        model_config = sit_config(config.model, input_size=size, in_channels=channels, num_classes=data.num_classes,
                                  learn_sigma=config.learn_sigma,
                                  class_dropout_prob=config.label_dropout or 0.0)
        torch.manual_seed(config.loop.seed)
        model = SiT(model_config)
        encoder = data.encode_on_the_fly
        null_class, dropout = model_config.num_classes, config.label_dropout

        def step(net: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            x1, labels = batch
            if encoder is not None:
                x1 = encoder.encode(x1)  # images -> latents (N, C, H, W)
            return flow_matching_loss(net, x1, drop_labels(labels, dropout, null_class), channels)

        result = run_training(
            out_dir=out_dir, config=config, loop=config.loop, model=model, step_fn=step, batches=data.batches,
            ctx=ctx, resume=resume, force=force, title=f"predictor {config.model}", log=log,
            extra_state={"sit_config": model_config.to_dict(), "class_names": data.class_names},
        )
        if result.finished and ctx.is_main:
            write_predictor(out_dir / PREDICTOR_FILE, result.ema, data.class_names,  # type: ignore[arg-type]
                            record=out_dir)
            log(f"wrote {out_dir / PREDICTOR_FILE}")
        ctx.barrier()
        return out_dir
    finally:
        ctx.close()


def write_predictor(path: Path, model: SiT, class_names: list[str] | None, *, record: Path | None = None) -> None:
    """Save a predictor's weights with its config (and class names) as safetensors metadata."""
    metadata = {SIT_CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())}
    if class_names is not None:
        metadata[CLASS_NAMES_METADATA_KEY] = json.dumps(list(class_names))
    atomic_save_safetensors(model.state_dict(), path, metadata, record=record)


def read_trained_predictor(path: str | Path) -> tuple[dict[str, torch.Tensor], SiTConfig, list[str] | None] | None:
    """EMA weights, config and class names of one of *our* predictors, or None for other checkpoints.

    Accepts a ``train predictor`` run folder (its ``predictor.safetensors``, else its latest checkpoint's
    EMA), a checkpoint folder, or a ``predictor.safetensors`` file.
    """
    found = read_trained_weights(path, file_name=PREDICTOR_FILE, config_key="sit_config",
                                 metadata_key=SIT_CONFIG_METADATA_KEY, what="predictor")
    if found is None:
        return None
    tensors, config, extras = found
    names = extras.get(CLASS_NAMES_METADATA_KEY)  # same key in checkpoint extras and file metadata
    if isinstance(names, str):  # safetensors metadata holds JSON text
        names = json.loads(names) if names else None
    return tensors, SiTConfig.from_dict(config), names
