"""Train a FlowTurbo velocity refiner against a frozen predictor (the teacher).

The objective (paper §3.2 / App. C, DESIGN.md §2), per batch of data latents ``x1`` with labels ``y``:

    y      <- null (num_classes) with probability label_dropout; the same y for teacher and refiner
    dt     ~ the dt distribution (DtDistribution: U(0, max_dt], optionally mixed with U(0, small_max] and 0)
    t      ~ U(0, 1 - dt)            (so t + dt <= 1: no clamping, every draw is a real step of size dt)
    x0 ~ N(0, I),  x_t = t x1 + (1 - t) x0
    v_t    = teacher(x_t, t, y)                                  (frozen, no grad)
    x'     = x_t + dt v_t
    target = teacher(x', t + dt, y)
    pred   = v_t + r(x', t + dt, y, v_t [, dt])                  (dt only for a dt-conditioned refiner)
    loss   = MSE(pred, target)

``dt`` here is exactly what the sampler passes a dt-conditioned refiner: the age of the velocity it corrects
(``flowturbo.integrator``, *The refiner's dt*; ``docs/refiner_dt.md``). The paper draws ``t ~ U(0, 1)`` and
``dt ~ U(0, 0.12]`` (its ``paper`` preset here keeps that range; t is drawn below ``1 - dt`` in every preset).

**Teacher cache** (:class:`TeacherCacheConfig`): the two teacher calls cost far more than the refiner's
forward and backward (a whole predictor vs one block), so their results can be reused: a pool of
``batches`` batches of teacher samples ``(x', t + dt, dt, v_t, target, y)`` on the training device, one batch
of it recomputed from fresh data every ``reuse`` steps (a ring), each step drawing its batch from the whole
pool without repetition. Each teacher sample then serves ``reuse`` steps on average. The pool is part of every
checkpoint, so a resume stays exact.

AdamW with constant lr and an EMA of the weights. The teacher is our ``train predictor`` output or an official
SiT checkpoint (``SiT-XL-2-256x256.pt``); its architecture must match ``teacher_model`` when that is given, and
its latent shape and class count must match the data. ``init_from`` starts from an existing refiner's weights
(ours or an official ``.pt``); a refiner without dt conditioning initialises a dt-conditioned one exactly (its
dt embedding starts at zero output). Result: ``out_dir/refiner.safetensors`` (EMA weights; metadata
``refiner_config``, ``teacher`` and ``refiner_dt``, the trained dt distribution that ``train package`` carries
into the bundle's ``config.json`` and ``flowturbo tune`` / ``sample`` check schedules against).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.refiner_dt import PAPER_MAX_DT, REFINER_DT_KEY, DtDistribution, read_dt_record
from flowturbo.training.checkpoints import (
    DT_EMBEDDER_PREFIX,
    REFINER_DEFAULT_ENTRY,
    atomic_save_safetensors,
    extract_state_dict,
    has_dt_embedder,
    infer_sit_config,
    load_checkpoint_file,
    load_sit_checkpoint,
    strict_load,
)
from flowturbo.training.models import SIT_PRESETS, RefinerConfig, SiT, SiTConfig, VelocityRefiner, refiner_takes_dt
from flowturbo.training.trainers.common import (
    BatchSource,
    DistContext,
    LoopConfig,
    autocast_context,
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
DEFAULT_MAX_DT = PAPER_MAX_DT  # paper App. C: dt ~ U(0, 0.12]
DEFAULT_REFINER_LR = 5e-5  # the released recipe (with 30k steps: the "paper" preset)
T_MAX = 1.0


@dataclass(frozen=True)
class TeacherCacheConfig:
    """Reuse of teacher samples (module docstring). ``batches`` = 0: no pool, every step calls the teacher for its
    own fresh batch (``reuse`` must then be 1)."""

    batches: int = 0  # pool size, in batches (per process)
    reuse: int = 1  # steps per recomputed batch = average uses of each teacher sample

    def __post_init__(self) -> None:
        for name in ("batches", "reuse"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise FlowTurboError(f"cache.{name} must be an integer, got {value!r}")
        if self.batches < 0:
            raise FlowTurboError(f"--teacher-cache-batches must be >= 0 (0: no cache), got {self.batches}")
        if self.reuse < 1:
            raise FlowTurboError(f"--teacher-reuse must be >= 1, got {self.reuse}")
        if self.reuse > 1 and self.batches == 0:
            raise FlowTurboError(f"--teacher-reuse {self.reuse} reuses cached teacher samples: give the cache a size "
                                 "with --teacher-cache-batches N (N >= 1), or use --teacher-reuse 1")


@dataclass(frozen=True)
class RefinerTrainConfig:
    """Everything ``train refiner`` needs.

    ``teacher``: a ``train predictor`` run folder / ``predictor.safetensors``, or an official SiT ``.pt``.
    ``teacher_model``: the preset the teacher must be (e.g. ``"SiT-XL/2"``); None accepts any architecture.
    ``dt``: how the velocity age is drawn (its ``max_dt`` is the trained range recorded with the weights).
    ``dt_conditioning``: the refiner takes dt as an input (beyond the paper). ``cache``: teacher-sample reuse.
    ``init_from``: start from this refiner's weights (a ``train refiner`` run / file or an official ``.pt``).
    """

    teacher: str = ""
    teacher_model: str | None = None
    trust_pickle: bool = False  # allow full unpickling of teacher .pt files you trust
    refiner_depth: int = 1
    label_dropout: float = DEFAULT_LABEL_DROPOUT
    dt: DtDistribution = DtDistribution()
    dt_conditioning: bool = False
    cache: TeacherCacheConfig = TeacherCacheConfig()
    init_from: str | None = None
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
        if self.refiner_depth < 1:
            raise FlowTurboError(f"refiner_depth must be >= 1, got {self.refiner_depth}")
        if not isinstance(self.dt, DtDistribution):
            raise FlowTurboError(f"dt must be a DtDistribution, got {type(self.dt).__name__}")
        if not isinstance(self.dt_conditioning, bool):
            raise FlowTurboError(f"dt_conditioning must be true or false, got {self.dt_conditioning!r}")
        if not isinstance(self.cache, TeacherCacheConfig):
            raise FlowTurboError(f"cache must be a TeacherCacheConfig, got {type(self.cache).__name__}")


# The dt refiner of the embedded default on 2 CPU cores: batch 256 at lr 1e-4 (the setting of the outside experiment
# that trained a dt refiner in ~7 CPU minutes). bench/bench_refiner_training.py, two runs on a loaded 2-core machine
# (load 3.5-5): 0.68-0.82 steps/s with teacher samples reused 4x, 2.4-4.1x the 0.20-0.28 steps/s without the cache
# (reuse 8: 1.2-1.4 steps/s), ~1.5-2 minutes to fill the 32-batch pool: 1000 steps take ~22-27 minutes under that
# load (about half on idle cores, estimated; --teacher-reuse 8 or --init-from an existing refiner to go faster).
_FASHION_DT_LOOP = LoopConfig(steps=1000, batch_size=256, lr=1e-4, ema_decay=0.999, grad_clip=0.0, ckpt_every=250)

REFINER_TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(),  # SiT-XL/2 teacher: 30k steps, batch 18, lr 5e-5, dt ~ U(0, 0.12] (paper App. C)
    "fashion-mnist": dict(loop=LoopConfig(steps=10_000, batch_size=64, lr=DEFAULT_REFINER_LR, ema_decay=0.999,
                                          grad_clip=0.0, ckpt_every=2000)),
    # The embedded default's refiner for long R steps on a CPU: dt-conditioned, dt up to 0.5 with a third of the
    # draws below 0.1 and a few at exactly 0 (the first R call after an H/P step), teacher samples reused 4x.
    "fashion-mnist-dt": dict(
        dt=DtDistribution(max_dt=0.5, small_share=0.3, small_max=0.1, zero_share=0.05),
        dt_conditioning=True,
        cache=TeacherCacheConfig(batches=32, reuse=4),
        loop=_FASHION_DT_LOOP,
    ),
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
class TeacherSamples(NamedTuple):
    """One batch of the refiner's training inputs and targets (module docstring)."""

    x_next: torch.Tensor  # (N, C, H, W) x' = x_t + dt v_t
    t_next: torch.Tensor  # (N,) t + dt
    dt: torch.Tensor  # (N,) the velocity age
    v_t: torch.Tensor  # (N, C, H, W) teacher(x_t, t)
    target: torch.Tensor  # (N, C, H, W) teacher(x', t + dt)
    labels: torch.Tensor  # (N,) after label dropout


def draw_dt(n: int, distribution: DtDistribution, device: torch.device | str) -> torch.Tensor:
    """(N,) step sizes from ``distribution`` (global torch RNG: resumable)."""
    choice = torch.rand(n, device=device)
    small = (1.0 - torch.rand(n, device=device)) * distribution.small_max  # U(0, small_max]
    large = (1.0 - torch.rand(n, device=device)) * distribution.max_dt  # U(0, max_dt]
    zero_below, small_below = distribution.zero_share, distribution.zero_share + distribution.small_share
    return torch.where(choice < zero_below, torch.zeros_like(large), torch.where(choice < small_below, small, large))


@torch.no_grad()
def teacher_samples(teacher: nn.Module, x1: torch.Tensor, labels: torch.Tensor,
                    distribution: DtDistribution) -> TeacherSamples:
    """The teacher's half of the objective for data latents ``x1`` (N, C, H, W) and (already dropped) labels."""
    n = x1.shape[0]
    x0 = torch.randn_like(x1)  # (N, C, H, W)
    dt = draw_dt(n, distribution, x1.device)  # (N,)
    t = torch.rand(n, device=x1.device) * (T_MAX - dt)  # (N,) ~ U(0, 1 - dt): t + dt <= 1
    t_ = t.view(-1, 1, 1, 1)
    x_t = t_ * x1 + (1.0 - t_) * x0
    v_t = teacher.velocity(x_t, t, labels).float()  # (N, C, H, W)
    x_next = x_t + dt.view(-1, 1, 1, 1) * v_t
    t_next = t + dt
    target = teacher.velocity(x_next, t_next, labels).float()
    return TeacherSamples(x_next, t_next, dt, v_t, target, labels)


def refiner_samples_loss(refiner: nn.Module, samples: TeacherSamples, *, dt_input: bool) -> torch.Tensor:
    """MSE of ``v_t + r(x', t + dt, y, v_t [, dt])`` against the teacher's target (``dt_input``: pass dt)."""
    x_next, t_next, dt, v_t, target, labels = samples
    age = (dt,) if dt_input else ()
    prediction = v_t + refiner(x_next, t_next, labels, v_t, *age).float()
    return F.mse_loss(prediction, target)


def refiner_loss(refiner: nn.Module, teacher: nn.Module, x1: torch.Tensor, labels: torch.Tensor,
                 distribution: DtDistribution, *, dt_input: bool | None = None) -> torch.Tensor:
    """The FlowTurbo refiner objective (module docstring) on one fresh batch; labels already dropped.
    ``dt_input`` (default: whether the refiner takes dt, :func:`refiner_takes_dt`) passes the velocity age."""
    samples = teacher_samples(teacher, x1, labels, distribution)
    return refiner_samples_loss(refiner, samples, dt_input=refiner_takes_dt(refiner) if dt_input is None else dt_input)


class TeacherSampleBatches:
    """The batch source ``run_training`` draws from: :class:`TeacherSamples` for the data batches of ``data``,
    fresh every step or from the reuse pool of ``cache`` (module docstring). Exactly resumable: its state (the
    data position, the pool, the ring position) goes into every checkpoint."""

    def __init__(self, data: BatchSource, make: Callable[[tuple[torch.Tensor, ...]], TeacherSamples],
                 cache: TeacherCacheConfig, device: torch.device) -> None:
        self.data = data
        self.make = make
        self.cache = cache
        self.device = device
        self.pool: list[torch.Tensor] | None = None  # TeacherSamples fields, (batches * local_batch, ...) each
        self.steps = 0  # batches handed out
        self.slot = 0  # the next pool batch to recompute (ring)

    def _write(self, slot: int) -> None:
        fresh = self.make(self.data.next_batch())
        rows = slice(slot * self.data.local_batch, (slot + 1) * self.data.local_batch)
        if self.pool is None:
            size = self.cache.batches * self.data.local_batch
            self.pool = [torch.empty((size, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in fresh]
        for stored, value in zip(self.pool, fresh):
            stored[rows] = value

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        if self.cache.batches == 0:
            self.steps += 1
            return tuple(self.make(self.data.next_batch()))
        if self.pool is None:
            for slot in range(self.cache.batches):
                self._write(slot)
        elif self.steps % self.cache.reuse == 0:
            self._write(self.slot)
            self.slot = (self.slot + 1) % self.cache.batches
        self.steps += 1
        assert self.pool is not None
        rows = torch.randperm(self.pool[0].shape[0])[: self.data.local_batch].to(self.device)  # no repeats
        return tuple(stored[rows] for stored in self.pool)

    def state_dict(self) -> dict[str, Any]:
        pool = None if self.pool is None else [t.to("cpu", copy=True) for t in self.pool]  # a snapshot
        return {"data": self.data.state_dict(), "pool": pool, "steps": self.steps, "slot": self.slot}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "pool" not in state:  # a checkpoint written before the cache existed: only the data position
            self.data.load_state_dict(state)
            self.pool, self.steps, self.slot = None, 0, 0
            return
        self.data.load_state_dict(state["data"])
        self.pool = None if state["pool"] is None else [t.to(self.device) for t in state["pool"]]
        self.steps, self.slot = int(state["steps"]), int(state["slot"])


# -------------------------------------------------------------------------------------------- training
def initial_refiner(config: RefinerTrainConfig, refiner_config: RefinerConfig) -> VelocityRefiner:
    """A fresh refiner, or one started from ``config.init_from``'s weights (a refiner without dt conditioning
    initialises a dt-conditioned one exactly: its dt embedding keeps its zero-output initialisation)."""
    torch.manual_seed(config.loop.seed)
    refiner = VelocityRefiner(refiner_config)
    if config.init_from is None:
        return refiner
    source = Path(config.init_from)
    if not source.exists():
        raise CheckpointError(f"--init-from {source} does not exist; pass a `train refiner` run folder or a refiner "
                              "checkpoint file")
    ours = read_trained_refiner(source)
    state = ours.state if ours is not None else extract_state_dict(
        load_checkpoint_file(source, trust_pickle=config.trust_pickle), prefer=REFINER_DEFAULT_ENTRY)
    if has_dt_embedder(state) and not refiner_config.dt_conditioning:
        raise CheckpointError(f"--init-from {source} is a dt-conditioned refiner; train with --dt-conditioning to "
                              "start from it")
    if refiner_config.dt_conditioning and not has_dt_embedder(state):  # keep the fresh (zero-output) dt embedding
        state = {**state, **{k: v for k, v in refiner.state_dict().items() if k.startswith(DT_EMBEDDER_PREFIX)}}
    strict_load(refiner, state, f"the refiner to train ({refiner_config.describe()}), from --init-from {source}")
    return refiner


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
        refiner_config = RefinerConfig.for_predictor(teacher.config, depth=config.refiner_depth,
                                                     dt_conditioning=config.dt_conditioning)
        refiner = initial_refiner(config, refiner_config)
        batches = _teacher_batches(config, data, teacher, ctx)
        dt_input = refiner_config.dt_conditioning

        def step(net: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return refiner_samples_loss(net, TeacherSamples(*batch), dt_input=dt_input)

        result = run_training(
            out_dir=out_dir, config=config, loop=config.loop, model=refiner, step_fn=step, batches=batches,  # type: ignore[arg-type]
            ctx=ctx, resume=resume, force=force, title="refiner", log=log,
            extra_state={"refiner_config": refiner_config.to_dict(), "teacher_config": teacher.config.to_dict(),
                         REFINER_DT_KEY: config.dt.to_dict()},
        )
        if result.finished and ctx.is_main:
            write_refiner(out_dir / REFINER_FILE, result.ema, teacher.config, config.dt,  # type: ignore[arg-type]
                          record=out_dir)
            log(f"wrote {out_dir / REFINER_FILE} (trained on {config.dt.describe()}"
                f"{', dt-conditioned' if dt_input else ''})")
        ctx.barrier()
        return out_dir
    finally:
        ctx.close()


def _teacher_batches(config: RefinerTrainConfig, data: Any, teacher: SiT, ctx: DistContext) -> TeacherSampleBatches:
    """The batch source of :func:`train_refiner`: data batches (encoded when streamed) -> teacher samples."""
    encoder = data.encode_on_the_fly
    null_class, dropout, distribution = teacher.config.num_classes, config.label_dropout, config.dt
    autocast = autocast_context(config.loop.precision, ctx.device)

    def make(batch: tuple[torch.Tensor, ...]) -> TeacherSamples:
        x1, labels = batch
        with torch.no_grad(), autocast:
            if encoder is not None:
                x1 = encoder.encode(x1)  # images -> latents
            return teacher_samples(teacher, x1.float(), drop_labels(labels, dropout, null_class), distribution)

    return TeacherSampleBatches(data.batches, make, config.cache, ctx.device)


def write_refiner(path: Path, refiner: VelocityRefiner, teacher_config: SiTConfig,
                  distribution: DtDistribution | None = None, *, record: Path | None = None) -> None:
    """Save refiner weights with its config, its teacher's config and the dt distribution it was trained on
    (:data:`~flowturbo.refiner_dt.REFINER_DT_KEY`) as safetensors metadata."""
    metadata = {
        REFINER_CONFIG_METADATA_KEY: json.dumps(refiner.config.to_dict()),
        TEACHER_METADATA_KEY: json.dumps(teacher_config.to_dict()),
    }
    if distribution is not None:
        metadata[REFINER_DT_KEY] = json.dumps(distribution.to_dict())
    atomic_save_safetensors(refiner.state_dict(), path, metadata, record=record)


@dataclass(frozen=True)
class TrainedRefiner:
    """One of our refiners as ``train refiner`` left it: EMA weights, config, trained dt (None: not recorded)."""

    state: dict[str, torch.Tensor] = field(repr=False)
    config: RefinerConfig
    dt: DtDistribution | None


def read_trained_refiner(path: str | Path) -> TrainedRefiner | None:
    """EMA weights, config and trained dt distribution of one of *our* refiners (run folder, checkpoint folder or
    file), else None."""
    found = read_trained_weights(path, file_name=REFINER_FILE, config_key="refiner_config",
                                 metadata_key=REFINER_CONFIG_METADATA_KEY, what="refiner")
    if found is None:
        return None
    tensors, config, extras = found
    record = extras.get(REFINER_DT_KEY)
    try:
        dt = read_dt_record(json.loads(record) if isinstance(record, str) else record)
    except (FlowTurboError, ValueError) as exc:
        raise CheckpointError(f"the refiner in {path} carries an unreadable {REFINER_DT_KEY} record: {exc}") from None
    return TrainedRefiner(tensors, RefinerConfig.from_dict(config), dt)
