"""Train a FlowTurbo refiner for a diffusers text-to-image teacher on the teacher's own trajectories.

``flowturbo train refiner --teacher PIPELINE_FOLDER --prompts FILE``: no image dataset is needed.

1. **Trajectories** (:func:`teacher_trajectories`): every prompt of ``--prompts`` is encoded once (the family's
   text encoders), then the teacher samples it ``trajectories.per_prompt`` times from fixed-seed noise on a fine
   Heun grid (``H{fine_steps}`` on the model's own shifted time grid, through :func:`flowturbo.integrator.integrate`
   with the CFG / guidance the refiner is trained for); the state after every step is kept: a trajectory is
   ``fine_steps + 1`` latents at the grid's times. Each process computes its share and saves it in the run folder
   (``trajectories/part-RANK-of-WORLD.pt``), so a resumed run (and every other rank) reads them back instead.
2. **The objective** (the SiT trainer's, :mod:`flowturbo.training.trainers.refiner`, on trajectory states): per
   sample a trajectory, ``dt`` from the dt distribution, ``t ~ U(0, 1 - dt)``, ``x_t`` the trajectory's state at t
   (linear between the two grid states around t: O(h^2) of the ODE, h the fine grid's step), then
   ``v_t = teacher(x_t, t)`` (guided), ``x' = x_t + dt v_t``, ``target = teacher(x', t + dt)`` and the loss
   ``MSE(v_t + r(x', t + dt, v_t, pooled [, dt]), target)``. The teacher cache of the SiT trainer
   (:class:`~flowturbo.training.trainers.refiner.TeacherSampleBatches`) reuses teacher samples the same way.
3. The loop, checkpoints, exact resume, EMA, torchrun data parallelism and the loss curve are
   :func:`~flowturbo.training.trainers.common.run_training`'s. Result: ``out_dir/refiner.safetensors`` (EMA
   weights of a :class:`~flowturbo.training.token_refiner.TokenRefiner` with its teacher record and trained dt).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flowturbo import fileio
from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.families import ImageSize, TextConditioning, read_prompts
from flowturbo.integrator import StepHooks, integrate
from flowturbo.refiner_dt import REFINER_DT_KEY, DtDistribution
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.token_refiner import (
    TOKEN_REFINER_FILE,
    TokenRefiner,
    TokenRefinerConfig,
    TokenRefinerRecord,
    call_flops,
    transformer_digest,
    write_token_refiner,
)
from flowturbo.training.trainers.common import (
    DistContext,
    LoopConfig,
    TensorBatches,
    atomic_torch_save,
    autocast_context,
    check_run_folder,
    run_training,
    setup_distributed,
)
from flowturbo.training.trainers.refiner import (
    T_MAX,
    TeacherCacheConfig,
    TeacherSampleBatches,
    TeacherSamples,
    draw_dt,
)

TRAJECTORY_DIR = "trajectories"
TEXT_REFINER_KIND = "text-to-image"  # config.json says which refiner trainer wrote a run (resume dispatch)


@dataclass(frozen=True)
class TrajectoryConfig:
    """The teacher's own trajectories the refiner learns from (module docstring)."""

    fine_steps: int = 32  # Heun steps of the teacher's fine grid (on its own shifted grid)
    per_prompt: int = 4  # trajectories (noise draws) per prompt
    batch: int = 8  # trajectories the teacher samples at once

    def __post_init__(self) -> None:
        for name in ("fine_steps", "per_prompt", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FlowTurboError(f"trajectories.{name} must be a positive integer, got {value!r}")
        if self.fine_steps < 2:
            raise FlowTurboError(f"--fine-steps must be >= 2 (a fine Heun grid), got {self.fine_steps}")


# The dt range of the text refiner: the shifted grids of SD3 / FLUX give their last steps the longest dt (SD3 at
# shift 3, 4 steps: t = 0, 0.1, 0.25, 0.5, 1, so an R step after an R step asks for dt = 0.25 + 0.5 = 0.75), so the
# default covers dt up to 0.8, with a third of the draws short and a few at 0 (the first R call after an H/P step).
TEXT_REFINER_DT = DtDistribution(max_dt=0.8, small_share=0.3, small_max=0.1, zero_share=0.05)


@dataclass(frozen=True)
class TextRefinerTrainConfig:
    """Everything ``train refiner --teacher PIPELINE_FOLDER --prompts FILE`` needs.

    ``cfg`` / ``guidance``: the guidance the refiner corrects (None: the family's default, e.g. SD3 CFG 7,
    FLUX.1-dev guidance 3.5); ``size``: the image size of the trajectories (None: the model's default).
    ``hidden_size`` / ``num_heads`` (None: the teacher transformer's width and heads).
    """

    teacher: str = ""
    prompts: str = ""
    negative_prompt: str | None = None
    size: str | None = None
    cfg: float | None = None
    guidance: float | None = None
    max_sequence_length: int | None = None
    trajectories: TrajectoryConfig = TrajectoryConfig()
    hidden_size: int | None = None
    num_heads: int | None = None
    refiner_depth: int = 1
    dt: DtDistribution = TEXT_REFINER_DT
    dt_conditioning: bool = True
    cache: TeacherCacheConfig = TeacherCacheConfig()
    kind: str = TEXT_REFINER_KIND
    loop: LoopConfig = LoopConfig(steps=20_000, batch_size=32, lr=1e-4, ema_decay=0.9999, grad_clip=0.0,
                                  ckpt_every=2000)

    def __post_init__(self) -> None:
        if not self.teacher:
            raise FlowTurboError("the refiner needs a teacher: --teacher PIPELINE_FOLDER")
        if not self.prompts:
            raise FlowTurboError("a text-to-image teacher samples its own training states from prompts: pass "
                                 "--prompts FILE (one prompt per line)")
        if self.kind != TEXT_REFINER_KIND:
            raise FlowTurboError(f"kind must be {TEXT_REFINER_KIND!r}, got {self.kind!r}")
        if self.size is not None:
            ImageSize.parse(self.size)
        if self.cfg is not None and not self.cfg >= 1.0:
            raise FlowTurboError(f"--cfg must be >= 1 (1: no guidance), got {self.cfg}")
        if self.refiner_depth < 1:
            raise FlowTurboError(f"refiner_depth must be >= 1, got {self.refiner_depth}")
        for name in ("trajectories", "dt", "cache", "loop"):
            want = {"trajectories": TrajectoryConfig, "dt": DtDistribution, "cache": TeacherCacheConfig,
                    "loop": LoopConfig}[name]
            if not isinstance(getattr(self, name), want):
                raise FlowTurboError(f"{name} must be a {want.__name__}, got {type(getattr(self, name)).__name__}")


TEXT_REFINER_TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # One H100/H200 (README: the plan): 1000 prompts x 4 trajectories on H32, batch 32, teacher samples reused 4x.
    "default": dict(cache=TeacherCacheConfig(batches=16, reuse=4)),
    # The CPU run of QUALITY.md on a tiny random pipeline (tests/tiny_diffusers.py): minutes on 2 cores.
    "tiny": dict(trajectories=TrajectoryConfig(fine_steps=16, per_prompt=8, batch=16),
                 hidden_size=32, num_heads=4, cache=TeacherCacheConfig(batches=8, reuse=4),
                 loop=LoopConfig(steps=400, batch_size=32, lr=1e-3, ema_decay=0.99, grad_clip=0.0, ckpt_every=200,
                                 log_every=20)),
}


# ----------------------------------------------------------------------------------------- trajectories
@dataclass
class TrajectoryPool:
    """Teacher trajectories: ``states`` (N, K + 1, C, h, w) at ``times`` (K + 1,), each of prompt ``prompt_index``."""

    states: torch.Tensor
    times: torch.Tensor  # (K + 1,) float64, increasing from 0 to 1
    prompt_index: torch.Tensor  # (N,) int64 into the prompt list

    def state_at(self, rows: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The states of trajectories ``rows`` (B,) at times ``t`` (B,): linear between the grid states around t."""
        times = self.times.to(t.device)
        k = (torch.searchsorted(times, t.double(), right=True) - 1).clamp(0, times.numel() - 2)  # (B,)
        t0, t1 = times[k], times[k + 1]
        w = ((t.double() - t0) / (t1 - t0)).float().view(-1, 1, 1, 1)  # (B, 1, 1, 1) in [0, 1]
        traj = self.states[rows.to(self.states.device)]  # (B, K + 1, C, h, w)
        pick = torch.arange(rows.numel(), device=traj.device)
        k = k.to(traj.device)
        a, b = traj[pick, k].float(), traj[pick, k + 1].float()  # (B, C, h, w) each
        return (a + w.to(a.device) * (b - a)).to(t.device)


class _KeepStates(StepHooks):
    def __init__(self, x: torch.Tensor) -> None:
        self.states = [x.detach().to("cpu", copy=True)]

    def after_step(self, step: Any, state: Any) -> None:
        self.states.append(state.x.detach().to("cpu", copy=True))


def _fine_schedule(family: Any, config: TextRefinerTrainConfig, latent_shape: tuple[int, int, int],
                   cfg: float) -> SamplingSchedule:
    steps = config.trajectories.fine_steps
    schedule = SamplingSchedule.parse(f"H{steps}", guidance_scale=cfg)
    grid = family.timesteps(steps, latent_shape)
    return schedule if grid is None else dataclasses.replace(schedule, timesteps=grid)


def teacher_trajectories(family: Any, conditioning: TextConditioning, rows: list[tuple[int, int]],
                         config: TextRefinerTrainConfig, latent_shape: tuple[int, int, int], cfg: float,
                         seed: int, progress: bool = True) -> TrajectoryPool:
    """The teacher's fine-grid trajectories of ``rows`` = (prompt index, draw) pairs; the noise of a pair comes
    from ``seed`` and the pair alone (any split over processes gives the same trajectories)."""
    from tqdm.auto import tqdm

    from flowturbo.kernels.solver import SolverOps

    schedule = _fine_schedule(family, config, latent_shape, cfg)
    ops = SolverOps(scale=cfg)
    per_prompt = config.trajectories.per_prompt
    states: list[torch.Tensor] = []
    batch = config.trajectories.batch
    bar = tqdm(total=len(rows), desc="teacher trajectories", disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            noise = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(
                seed * 1_000_003 + p * per_prompt + d)) for p, d in chunk])  # (b, C, h, w)
            index = torch.tensor([p for p, _ in chunk])
            cond = conditioning.rows(index.to(conditioning.prompt.embeds.device))
            x = noise.to(device=family.device, dtype=torch.float32)
            keep = _KeepStates(x)
            with torch.no_grad():
                integrate(schedule, x, family.model_calls(cond, schedule), ops, hooks=[keep])
            states.append(torch.stack(keep.states, dim=1))  # (b, K + 1, C, h, w)
            bar.update(len(chunk))
    finally:
        bar.close()
    return TrajectoryPool(torch.cat(states), torch.tensor(schedule.timesteps, dtype=torch.float64),
                          torch.tensor([p for p, _ in rows], dtype=torch.long))


def _shared_trajectories(family: Any, conditioning: TextConditioning, num_prompts: int,
                         config: TextRefinerTrainConfig, latent_shape: tuple[int, int, int], cfg: float,
                         out_dir: Path, ctx: DistContext, log: Callable[[str], None]) -> TrajectoryPool:
    """Every process's share of the trajectories, computed once (saved in the run folder), then all of them."""
    rows = [(p, d) for p in range(num_prompts) for d in range(config.trajectories.per_prompt)]
    folder = out_dir / TRAJECTORY_DIR
    part_files = [folder / f"part-{r}-of-{ctx.world_size}.pt" for r in range(ctx.world_size)]  # one per rank
    part = part_files[ctx.rank]
    if not part.is_file():
        mine = rows[ctx.rank::ctx.world_size]
        if ctx.is_main:
            log(f"sampling {len(rows)} teacher trajectories ({num_prompts} prompts x {config.trajectories.per_prompt}) "
                f"on H{config.trajectories.fine_steps}, {ctx.world_size} process(es)")
        pool = teacher_trajectories(family, conditioning, mine, config, latent_shape, cfg, config.loop.seed,
                                    progress=config.loop.progress and ctx.is_main)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"states": pool.states.half(), "times": pool.times, "prompt_index": pool.prompt_index,
                           "rows": mine}, part)  # states in fp16: half the host memory
    ctx.barrier()
    if ctx.is_main:  # one writer of the ownership record: ranks adding their parts at once would lose an update
        fileio.add_owned(out_dir, part_files)
    parts = [torch.load(path, map_location="cpu", weights_only=True) for path in part_files]
    if any(p["rows"] != rows[r::ctx.world_size] for r, p in enumerate(parts)):
        raise CheckpointError(f"{folder} holds trajectories of other prompts or settings; start a new run folder")
    return TrajectoryPool(torch.cat([p["states"] for p in parts]), parts[0]["times"],
                          torch.cat([p["prompt_index"] for p in parts]))


# ------------------------------------------------------------------------------------------- objective
@torch.no_grad()
def trajectory_samples(family: Any, pool: TrajectoryPool, conditioning: TextConditioning, rows: torch.Tensor,
                       distribution: DtDistribution, cfg: float) -> TeacherSamples:
    """The teacher's half of the objective for trajectories ``rows`` (B,) (module docstring); ``labels`` holds the
    trajectory rows (the step looks their pooled embeddings up)."""
    device = family.device
    n = rows.shape[0]
    dt = draw_dt(n, distribution, device)  # (B,)
    t = torch.rand(n, device=device) * (T_MAX - dt)  # (B,) ~ U(0, 1 - dt)
    x_t = pool.state_at(rows, t).to(device)  # (B, C, h, w)
    cond = conditioning.rows(pool.prompt_index[rows.cpu()].to(conditioning.prompt.embeds.device))
    v_t = family.guided_velocity(x_t, t, cond, cfg)  # (B, C, h, w)
    x_next = x_t + dt.view(-1, 1, 1, 1) * v_t
    t_next = t + dt
    target = family.guided_velocity(x_next, t_next, cond, cfg)
    return TeacherSamples(x_next, t_next, dt, v_t, target, rows.to(device))


def token_refiner_loss(refiner: nn.Module, samples: TeacherSamples, pooled: torch.Tensor, *,
                       dt_input: bool) -> torch.Tensor:
    """MSE of ``v_t + r(x', t + dt, v_t, pooled [, dt])`` against the teacher's target; ``pooled`` (B, P)."""
    x_next, t_next, dt, v_t, target, _ = samples
    prediction = v_t + refiner(x_next, t_next, v_t, pooled, dt if dt_input else None).float()
    return F.mse_loss(prediction, target)


# -------------------------------------------------------------------------------------------- training
def refiner_config_for(family: Any, config: TextRefinerTrainConfig, pooled_dim: int) -> TokenRefinerConfig:
    """The refiner's architecture for ``family``'s transformer (width and heads default to the teacher's)."""
    tc = family.transformer_config
    width = int(tc.get("num_attention_heads", 1)) * int(tc.get("attention_head_dim", 64))
    heads = int(tc.get("num_attention_heads", 1))
    return TokenRefinerConfig(latent_channels=family.latent_channels, patch_size=family.patch, pooled_dim=pooled_dim,
                              hidden_size=config.hidden_size or width, num_heads=config.num_heads or heads,
                              depth=config.refiner_depth, dt_conditioning=config.dt_conditioning)


def flops_ratio(family: Any, refiner: TokenRefiner, conditioning: TextConditioning,
                latent_shape: tuple[int, int, int]) -> dict[str, float]:
    """FLOPs of one refiner call and one teacher transformer call (one row, no CFG doubling) and their ratio."""
    x = torch.zeros((1, *latent_shape), device=family.device)
    cond = conditioning.rows(slice(0, 1))
    inputs = family.transformer_inputs(cond, False)
    teacher = call_flops(lambda: family.transformer_output(x, 0.5, inputs))
    weight = next(refiner.parameters())
    mine = call_flops(refiner, x.to(weight.dtype), torch.full((1,), 0.5, device=x.device), x.to(weight.dtype),
                      cond.prompt.pooled.to(weight.dtype),
                      torch.zeros(1, device=x.device) if refiner.takes_dt else None)
    return {"teacher_flops": float(teacher), "refiner_flops": float(mine), "ratio": mine / max(teacher, 1)}


def train_text_refiner(config: TextRefinerTrainConfig, out_dir: str | Path, *, resume: bool = False,
                       force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Train a token refiner for ``config.teacher`` (a diffusers pipeline folder) into ``out_dir``."""
    from flowturbo.training.families import load_family

    out_dir = Path(out_dir)
    check_run_folder(out_dir, config, resume=resume, force=force, log=lambda _m: None)
    prompts = read_prompts(config.prompts)
    ctx = setup_distributed(config.loop.device)
    try:
        family = load_family(config.teacher, device=ctx.device, dtype=torch.float32,
                             max_sequence_length=config.max_sequence_length, flag="--teacher")
        family.transformer.requires_grad_(False).eval()
        size = ImageSize.parse(config.size) if config.size is not None else None
        latent_shape = family.latent_shape(size)
        cfg = family.defaults.cfg if config.cfg is None else float(config.cfg)
        probe = SamplingSchedule.parse("H2", guidance_scale=cfg)
        family.check_request(probe, size=size, negative=config.negative_prompt, guidance=config.guidance)
        conditioning = family.condition(prompts, probe, negative=config.negative_prompt, guidance=config.guidance)
        pool = _shared_trajectories(family, conditioning, len(prompts), config, latent_shape, cfg, out_dir, ctx, log)
        pooled_all = conditioning.prompt.pooled.float()  # (num_prompts, P)
        refiner_config = refiner_config_for(family, config, int(pooled_all.shape[1]))
        torch.manual_seed(config.loop.seed)
        refiner = TokenRefiner(refiner_config)
        cost = flops_ratio(family, refiner, conditioning, latent_shape)
        if ctx.is_main:
            log(f"{refiner_config.describe()}: {sum(p.numel() for p in refiner.parameters()):,} parameters, "
                f"{cost['ratio']:.1%} of a teacher call's FLOPs ({cost['refiner_flops']:.3g} vs "
                f"{cost['teacher_flops']:.3g} per image)")
        autocast = autocast_context(config.loop.precision, ctx.device)

        def make(batch: tuple[torch.Tensor, ...]) -> TeacherSamples:
            with autocast:
                return trajectory_samples(family, pool, conditioning, batch[0], config.dt, cfg)

        indices = TensorBatches([torch.arange(pool.states.shape[0])], config.loop.batch_size, ctx, config.loop.seed,
                                device=torch.device("cpu"))
        batches = TeacherSampleBatches(indices, make, config.cache, ctx.device)
        dt_input = refiner_config.dt_conditioning
        pooled_rows = pooled_all[pool.prompt_index].to(ctx.device)  # (N, P) per trajectory

        def step(net: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            samples = TeacherSamples(*batch)
            return token_refiner_loss(net, samples, pooled_rows[samples.labels], dt_input=dt_input)

        record = TokenRefinerRecord(pipeline_class=family.folder.class_name,
                                    transformer_digest=transformer_digest(family.transformer_config),
                                    pipeline=str(Path(config.teacher).resolve()), cfg=cfg,
                                    guidance=family._guidance_value(config.guidance),
                                    size=str(family.image_size(latent_shape)))
        result = run_training(
            out_dir=out_dir, config=config, loop=config.loop, model=refiner, step_fn=step, batches=batches,  # type: ignore[arg-type]
            ctx=ctx, resume=resume, force=force, title="text refiner", log=log,
            extra_state={"token_refiner_config": refiner_config.to_dict(), "teacher": record.to_dict(),
                         REFINER_DT_KEY: config.dt.to_dict(), "flops": cost},
        )
        if result.finished and ctx.is_main:
            write_token_refiner(out_dir / TOKEN_REFINER_FILE, result.ema, record, config.dt,  # type: ignore[arg-type]
                                record_folder=out_dir)
            log(f"wrote {out_dir / TOKEN_REFINER_FILE} (for {record.pipeline_class} at CFG {cfg:g}"
                f"{'' if record.guidance is None else f', guidance {record.guidance:g}'}, {record.size}; trained on "
                f"{config.dt.describe()})")
        ctx.barrier()
        return out_dir
    finally:
        ctx.close()


__all__ = [
    "TEXT_REFINER_TRAIN_PRESETS",
    "TextRefinerTrainConfig",
    "TrajectoryConfig",
    "TrajectoryPool",
    "flops_ratio",
    "refiner_config_for",
    "teacher_trajectories",
    "token_refiner_loss",
    "train_text_refiner",
    "trajectory_samples",
]
