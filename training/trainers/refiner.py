"""Train a FlowTurbo velocity refiner against a frozen predictor (the teacher).

The objective (paper §3.2 / App. C, DESIGN.md §2), per batch of data latents ``x1`` with labels ``y``:

    y      <- null (num_classes) with probability label_dropout; the same y for teacher and refiner
    x0 ~ N(0, I),  t ~ U(0, 1),  x_t = t x1 + (1 - t) x0
    v_t    = teacher(x_t, t, y)                                  (frozen, no grad)
    dt ~ U(0, max_dt]   (max_dt = 0.12)
    x'     = x_t + dt v_t,   t' = min(t + dt, 1)
    pred   = v_t + r(x', t', y, v_t)
    target = teacher(x', t', y)
    loss   = MSE(pred, target)

AdamW with constant lr 5e-5 and an EMA of the weights by default. The teacher is our ``train predictor``
output or an official SiT checkpoint (``SiT-XL-2-256x256.pt``); its architecture must match
``teacher_model`` when that is given, and its latent shape and class count must match the data.
Result: ``out_dir/refiner.safetensors`` (EMA weights; metadata ``refiner_config``, ``teacher``).
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

from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.training.checkpoints import (
    atomic_save_safetensors,
    extract_state_dict,
    infer_sit_config,
    load_checkpoint_file,
    load_sit_checkpoint,
)
from flowturbo.training.models import SIT_PRESETS, RefinerConfig, SiT, SiTConfig, VelocityRefiner
from flowturbo.training.trainers.common import (
    LoopConfig,
    check_run_folder,
    read_trained_weights,
    run_training,
    setup_distributed,
)
from flowturbo.training.trainers.data import ImageDataConfig, LatentDataConfig, prepare_latent_data
from flowturbo.training.trainers.predictor import DEFAULT_LABEL_DROPOUT, drop_labels, read_trained_predictor

REFINER_FILE = "refiner.safetensors"
REFINER_CONFIG_METADATA_KEY = "refiner_config"
TEACHER_METADATA_KEY = "teacher"
DEFAULT_MAX_DT = 0.12  # paper App. C: dt ~ U(0, 0.12]
DEFAULT_REFINER_LR = 5e-5
T_MAX = 1.0


@dataclass(frozen=True)
class RefinerTrainConfig:
    """Everything ``train refiner`` needs.

    ``teacher``: a ``train predictor`` run folder / ``predictor.safetensors``, or an official SiT ``.pt``.
    ``teacher_model``: the preset the teacher must be (e.g. ``"SiT-XL/2"``); None accepts any architecture.
    """

    teacher: str = ""
    teacher_model: str | None = None
    trust_pickle: bool = False  # allow full unpickling of teacher .pt files you trust
    refiner_depth: int = 1
    label_dropout: float = DEFAULT_LABEL_DROPOUT
    max_dt: float = DEFAULT_MAX_DT
    data: LatentDataConfig = LatentDataConfig()
    loop: LoopConfig = LoopConfig(steps=30_000, batch_size=18, lr=DEFAULT_REFINER_LR, ema_decay=0.9999,
                                  grad_clip=0.0, ckpt_every=5000)

    def __post_init__(self) -> None:
        if not self.teacher:
            raise FlowTurboError("the refiner needs a teacher: --teacher <predictor run folder or SiT .pt>")
        if self.teacher_model is not None and self.teacher_model not in SIT_PRESETS:
            raise FlowTurboError(f"unknown teacher_model {self.teacher_model!r}; valid names: {', '.join(SIT_PRESETS)}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise FlowTurboError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if not 0.0 < self.max_dt <= T_MAX:
            raise FlowTurboError(f"max_dt must be in (0, 1], got {self.max_dt}")
        if self.refiner_depth < 1:
            raise FlowTurboError(f"refiner_depth must be >= 1, got {self.refiner_depth}")


REFINER_TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(),  # SiT-XL/2 teacher: 30k steps, batch 18, lr 5e-5 (paper App. C)
    "fashion-mnist": dict(loop=LoopConfig(steps=10_000, batch_size=64, lr=DEFAULT_REFINER_LR, ema_decay=0.999,
                                          grad_clip=0.0, ckpt_every=2000)),
    "tiny": dict(
        data=LatentDataConfig(images=ImageDataConfig(limit=64, random_flip=False)),
        loop=LoopConfig(steps=4, batch_size=8, lr=1e-3, ema_decay=0.5, grad_clip=0.0, progress=False),
    ),
}


# -------------------------------------------------------------------------------------------- teacher
def _arch(config: SiTConfig) -> dict[str, Any]:
    return {k: getattr(config, k) for k in ("hidden_size", "depth", "num_heads", "patch_size")}


def load_teacher(config: RefinerTrainConfig, latent_shape: tuple[int, int, int], num_classes: int,
                 device: torch.device) -> SiT:
    """Load the frozen teacher and check it against ``teacher_model`` and the data; clear errors otherwise."""
    source = Path(config.teacher)
    if not source.exists():
        raise CheckpointError(f"teacher checkpoint {source} does not exist")
    ours = read_trained_predictor(source)
    if ours is not None:
        state, teacher_config, _ = ours
    else:
        if source.is_dir():
            raise CheckpointError(f"{source} is a folder but not a predictor run; pass the teacher checkpoint file")
        state = extract_state_dict(load_checkpoint_file(source, trust_pickle=config.trust_pickle))
        heads = None
        embed = state.get("x_embedder.proj.weight")
        if config.teacher_model is not None and embed is not None:
            preset = SIT_PRESETS[config.teacher_model]
            heads = preset["num_heads"] if embed.shape[0] == preset["hidden_size"] else None
        teacher_config = infer_sit_config(state, num_heads=heads)
    if config.teacher_model is not None:
        want = SIT_PRESETS[config.teacher_model]
        have = _arch(teacher_config)
        if have != want:
            diffs = ", ".join(f"{k} {have[k]} (expected {want[k]})" for k in want if have[k] != want[k])
            raise CheckpointError(
                f"teacher {source} is {teacher_config.describe()}, not {config.teacher_model}: {diffs}. "
                "Pass the right checkpoint or --teacher-model"
            )
    expected_latents = (teacher_config.in_channels, teacher_config.input_size, teacher_config.input_size)
    if expected_latents != tuple(latent_shape):
        raise FlowTurboError(
            f"teacher {source} works on {expected_latents} latents but the data encodes to {tuple(latent_shape)}; "
            "encode with the autoencoder / VAE (and image size) the teacher was trained with"
        )
    if teacher_config.num_classes != num_classes:
        raise FlowTurboError(
            f"teacher {source} has {teacher_config.num_classes} classes but the data has {num_classes}; "
            "train on the class folders the teacher was trained on (ImageNet: all 1000 synset folders)"
        )
    if config.label_dropout > 0 and not teacher_config.has_null_class:
        raise FlowTurboError(f"teacher {source} has no null class; train with --label-dropout 0")
    teacher = load_sit_checkpoint(state, teacher_config, device=device)
    return teacher.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ objective
def refiner_loss(refiner: nn.Module, teacher: SiT, x1: torch.Tensor, labels: torch.Tensor,
                 max_dt: float) -> torch.Tensor:
    """The FlowTurbo refiner objective (module docstring) for one batch; labels already dropped."""
    n = x1.shape[0]
    x0 = torch.randn_like(x1)  # (N, C, H, W)
    t = torch.rand(n, device=x1.device)  # (N,) ~ U(0, 1)
    dt = (1.0 - torch.rand(n, device=x1.device)) * max_dt  # (N,) ~ U(0, max_dt]
    t_ = t.view(-1, 1, 1, 1)
    x_t = t_ * x1 + (1.0 - t_) * x0
    with torch.no_grad():
        v_t = teacher.velocity(x_t, t, labels).float()  # (N, C, H, W)
        x_next = x_t + dt.view(-1, 1, 1, 1) * v_t
        t_next = (t + dt).clamp(max=T_MAX)
        target = teacher.velocity(x_next, t_next, labels).float()
    prediction = v_t + refiner(x_next, t_next, labels, v_t).float()
    return F.mse_loss(prediction, target)


def train_refiner(config: RefinerTrainConfig, out_dir: str | Path, *, resume: bool = False,
                  force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Train a velocity refiner for ``config.teacher`` into ``out_dir``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    check_run_folder(out_dir, config, resume=resume, force=force, log=lambda _m: None)
    ctx = setup_distributed(config.loop.device)
    try:
        data = prepare_latent_data(config.data, global_batch=config.loop.batch_size, ctx=ctx, seed=config.loop.seed,
                                   cache_dir=out_dir, num_workers=config.loop.num_workers, log=log)
        teacher = load_teacher(config, data.latent_shape, data.num_classes, ctx.device)
        refiner_config = RefinerConfig.for_predictor(teacher.config, depth=config.refiner_depth)
        torch.manual_seed(config.loop.seed)
        refiner = VelocityRefiner(refiner_config)
        encoder = data.encode_on_the_fly
        null_class, dropout, max_dt = teacher.config.num_classes, config.label_dropout, config.max_dt

        def step(net: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            x1, labels = batch
            if encoder is not None:
                x1 = encoder.encode(x1)  # images -> latents
            return refiner_loss(net, teacher, x1, drop_labels(labels, dropout, null_class), max_dt)

        result = run_training(
            out_dir=out_dir, config=config, loop=config.loop, model=refiner, step_fn=step, batches=data.batches,
            ctx=ctx, resume=resume, force=force, title="refiner", log=log,
            extra_state={"refiner_config": refiner_config.to_dict(), "teacher_config": teacher.config.to_dict()},
        )
        if result.finished and ctx.is_main:
            write_refiner(out_dir / REFINER_FILE, result.ema, teacher.config,  # type: ignore[arg-type]
                          record=out_dir)
            log(f"wrote {out_dir / REFINER_FILE}")
        ctx.barrier()
        return out_dir
    finally:
        ctx.close()


def write_refiner(path: Path, refiner: VelocityRefiner, teacher_config: SiTConfig, *,
                 record: Path | None = None) -> None:
    """Save refiner weights with its config and its teacher's config as safetensors metadata."""
    metadata = {
        REFINER_CONFIG_METADATA_KEY: json.dumps(refiner.config.to_dict()),
        TEACHER_METADATA_KEY: json.dumps(teacher_config.to_dict()),
    }
    atomic_save_safetensors(refiner.state_dict(), path, metadata, record=record)


def read_trained_refiner(path: str | Path) -> tuple[dict[str, torch.Tensor], RefinerConfig] | None:
    """EMA weights and config of one of *our* refiners (run folder, checkpoint folder or file), else None."""
    found = read_trained_weights(path, file_name=REFINER_FILE, config_key="refiner_config",
                                 metadata_key=REFINER_CONFIG_METADATA_KEY, what="refiner")
    if found is None:
        return None
    tensors, config, _ = found
    return tensors, RefinerConfig.from_dict(config)
