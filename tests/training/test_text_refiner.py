"""The refiner for a diffusers text-to-image teacher (issue 21 item 4): the token refiner, the teacher's per-row
guided velocity, its trajectories, the objective, the CLI and sampling with R steps, and the bad inputs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowturbo.errors import CheckpointError, FlowTurboError, SamplingError
from flowturbo.integrator import refiner_call_plan
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.families import load_family
from flowturbo.training.models import sincos_pos_embed_2d
from flowturbo.training.token_refiner import (
    TokenRefiner,
    TokenRefinerConfig,
    TokenRefinerRecord,
    TrainedTokenRefiner,
    is_token_refiner,
    read_token_refiner,
    transformer_digest,
    write_token_refiner,
)
from flowturbo.training.trainers.common import LoopConfig, latest_checkpoint, load_checkpoint_state
from flowturbo.training.trainers.text_refiner import (
    TEXT_REFINER_TRAIN_PRESETS,
    TextRefinerTrainConfig,
    TrajectoryConfig,
    TrajectoryPool,
    teacher_trajectories,
    token_refiner_loss,
    trajectory_samples,
)
from cli_checks import one_error_line
from tolerances import tol

PROMPTS = ["a photo of a cat", "the red fox", "a blue car", "green hills"]


def _config(**changes) -> TokenRefinerConfig:
    return TokenRefinerConfig(**{**dict(latent_channels=4, patch_size=2, pooled_dim=6, hidden_size=16, num_heads=2),
                                 **changes})


def _perturbed(refiner: TokenRefiner, generator: torch.Generator) -> TokenRefiner:
    """Every weight random non-zero (the zero-initialised layers too), so tests see every path."""
    with torch.no_grad():
        for p in refiner.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return refiner


@pytest.fixture(scope="module")
def sd3(tiny_pipelines):
    torch.set_num_threads(1)
    return load_family(tiny_pipelines["sd3"], device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained_run(tiny_pipelines, prompts_file, tmp_path_factory) -> Path:
    """A short CLI run on the tiny SD3 (the `tiny` preset, fewer steps)."""
    out = tmp_path_factory.mktemp("runs") / "sd3_refiner"
    cmd = [sys.executable, "-m", "flowturbo", "train", "refiner", "--teacher", str(tiny_pipelines["sd3"]),
           "--prompts", str(prompts_file), "--preset", "tiny", "--steps", "40", "--trajectories-per-prompt", "2",
           "--fine-steps", "6", "--batch-size", "8", "--ema-decay", "0.8", "--ckpt-every", "20", "--out", str(out),
           "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


# ------------------------------------------------------------------------------------------- the model
def test_fresh_refiner_offset_is_exactly_zero(seeded):
    refiner = TokenRefiner(_config())
    x, v = torch.randn(2, 4, 8, 6, generator=seeded), torch.randn(2, 4, 8, 6, generator=seeded)
    out = refiner(x, torch.rand(2, generator=seeded), v, torch.randn(2, 6, generator=seeded), torch.rand(2))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0


def test_refiner_reads_every_input_on_rectangular_grids(seeded):
    refiner = _perturbed(TokenRefiner(_config()), seeded)
    x, v = torch.randn(2, 4, 8, 6, generator=seeded), torch.randn(2, 4, 8, 6, generator=seeded)
    t, pooled, dt = torch.rand(2, generator=seeded), torch.randn(2, 6, generator=seeded), torch.rand(2, generator=seeded)
    base = refiner(x, t, v, pooled, dt)
    for changed in [(x + 0.1, t, v, pooled, dt), (x, t + 0.1, v, pooled, dt), (x, t, v + 0.1, pooled, dt),
                    (x, t, v, pooled + 0.1, dt), (x, t, v, pooled, dt + 0.1)]:
        assert not torch.allclose(refiner(*changed), base)
    # rows are independent: row 0 alone gives row 0's offset
    torch.testing.assert_close(refiner(x[:1], t[:1], v[:1], pooled[:1], dt[:1]), base[:1], **tol(torch.float32))


def test_rectangular_position_embedding_extends_the_square_one():
    square = sincos_pos_embed_2d(16, 3)
    torch.testing.assert_close(sincos_pos_embed_2d(16, 3, grid_width=3), square, **tol(torch.float32))
    wide = sincos_pos_embed_2d(16, 2, grid_width=5).view(2, 5, 16)
    tall = sincos_pos_embed_2d(16, 5, grid_width=2).view(5, 2, 16)
    assert not torch.allclose(wide[1, 4], tall[4, 1])  # (row 1, col 4) is not (row 4, col 1)
    torch.testing.assert_close(wide[1, 1], square.view(3, 3, 16)[1, 1], **tol(torch.float32))


def test_refiner_refuses_bad_inputs(seeded):
    refiner = TokenRefiner(_config())
    x = torch.randn(1, 4, 8, 8, generator=seeded)
    with pytest.raises(FlowTurboError, match="multiples of 2"):
        refiner(torch.randn(1, 4, 7, 8), torch.rand(1), torch.randn(1, 4, 7, 8), torch.randn(1, 6), torch.rand(1))
    with pytest.raises(FlowTurboError, match="carried velocity"):
        refiner(x, torch.rand(1), torch.randn(2, 4, 8, 8), torch.randn(1, 6), torch.rand(1))
    with pytest.raises(FlowTurboError, match="pooled"):
        refiner(x, torch.rand(1), x, torch.randn(1, 5), torch.rand(1))
    with pytest.raises(FlowTurboError, match="pass dt"):
        refiner(x, torch.rand(1), x, torch.randn(1, 6))
    with pytest.raises(FlowTurboError, match="no dt input"):
        TokenRefiner(_config(dt_conditioning=False))(x, torch.rand(1), x, torch.randn(1, 6), torch.rand(1))
    with pytest.raises(FlowTurboError, match="multiple of num_heads"):
        _config(hidden_size=18, num_heads=4)


def test_weights_round_trip_with_their_record(tmp_path, seeded):
    refiner = _perturbed(TokenRefiner(_config()), seeded)
    record = TokenRefinerRecord("StableDiffusion3Pipeline", "abc", "/x", 7.0, None, "32x32")
    from flowturbo.training.trainers.text_refiner import TEXT_REFINER_DT

    write_token_refiner(tmp_path / "refiner.safetensors", refiner, record, TEXT_REFINER_DT)
    assert is_token_refiner(tmp_path) and is_token_refiner(tmp_path / "refiner.safetensors")
    back = read_token_refiner(tmp_path)
    assert back.record == record and back.config == refiner.config and back.dt == TEXT_REFINER_DT
    x = torch.randn(1, 4, 4, 4, generator=seeded)
    args = (x, torch.rand(1), x * 0.5, torch.randn(1, 6, generator=seeded), torch.rand(1))
    torch.testing.assert_close(back.build()(*args), refiner(*args), **tol(torch.float32))


def test_a_sit_refiner_file_is_not_a_token_refiner(tmp_path):
    from flowturbo.training.checkpoints import atomic_save_safetensors

    atomic_save_safetensors({"w": torch.ones(2)}, tmp_path / "refiner.safetensors", {"refiner_config": "{}"})
    assert not is_token_refiner(tmp_path)
    with pytest.raises(CheckpointError, match="not a text-to-image"):
        read_token_refiner(tmp_path)
    with pytest.raises(CheckpointError, match="no refiner.safetensors"):
        read_token_refiner(tmp_path / "missing_run")


# --------------------------------------------------------------------------------------- the teacher
def test_per_row_guided_velocity_equals_the_sampler_calls(sd3, seeded):
    """guided_velocity at per-row times = the integrator's predictor call at each time, CFG-combined."""
    schedule = SamplingSchedule.parse("H2", guidance_scale=4.0)
    cond = sd3.condition(PROMPTS[:2], schedule)
    x = torch.randn(2, *sd3.latent_shape(), generator=seeded)
    t = torch.tensor([0.3, 0.7])
    rows = sd3.guided_velocity(x, t, cond, 4.0)
    for i in range(2):
        calls = sd3.model_calls(cond.rows(slice(i, i + 1)), schedule)
        raw = calls.predictor(x[i:i + 1], float(t[i]))  # (2, C, h, w): [cond; uncond]
        expected = raw[1:] + 4.0 * (raw[:1] - raw[1:])
        torch.testing.assert_close(rows[i:i + 1], expected, **tol("diffusers_batched_fp32"))
    unguided = sd3.guided_velocity(x, t, cond, 1.0)
    assert not torch.allclose(unguided, rows)


def test_trajectories_are_the_same_whatever_the_split(sd3):
    config = TextRefinerTrainConfig(teacher="x", prompts="y", trajectories=TrajectoryConfig(fine_steps=3, per_prompt=2,
                                                                                            batch=3))
    schedule = SamplingSchedule.parse("H2", guidance_scale=2.0)
    cond = sd3.condition(PROMPTS[:2], schedule)
    rows = [(p, d) for p in range(2) for d in range(2)]
    shape = sd3.latent_shape()
    whole = teacher_trajectories(sd3, cond, rows, config, shape, 2.0, seed=5, progress=False)
    assert whole.states.shape == (4, 4, *shape)
    halves = [teacher_trajectories(sd3, cond, rows[r::2], config, shape, 2.0, seed=5, progress=False) for r in (0, 1)]
    torch.testing.assert_close(halves[0].states, whole.states[0::2], **tol("diffusers_batched_fp32"))
    torch.testing.assert_close(halves[1].states, whole.states[1::2], **tol("diffusers_batched_fp32"))
    assert whole.times[0] == 0.0 and whole.times[-1] == 1.0 and torch.all(whole.times[1:] > whole.times[:-1])
    # the times are the teacher's shifted grid, not a uniform one
    assert not torch.allclose(whole.times, torch.linspace(0, 1, 4, dtype=torch.float64))
    # a different seed gives different trajectories
    other = teacher_trajectories(sd3, cond, rows[:1], config, shape, 2.0, seed=6, progress=False)
    assert not torch.allclose(other.states[0, 0], whole.states[0, 0])


def test_state_at_interpolates_between_grid_states(seeded):
    states = torch.randn(2, 3, 1, 2, 2, generator=seeded)
    pool = TrajectoryPool(states, torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64), torch.tensor([0, 1]))
    rows, t = torch.tensor([0, 1, 1]), torch.tensor([0.25, 0.125, 0.625])
    got = pool.state_at(rows, t)
    torch.testing.assert_close(got[0], states[0, 1], **tol(torch.float32))
    torch.testing.assert_close(got[1], (states[1, 0] + states[1, 1]) / 2, **tol(torch.float32))
    torch.testing.assert_close(got[2], (states[1, 1] + states[1, 2]) / 2, **tol(torch.float32))


def test_objective_matches_a_hand_computation(sd3, seeded):
    """x' = x_t + dt v_t, target = teacher(x', t + dt), loss = MSE(v_t + r(x', t + dt, v_t, pooled, dt), target)."""
    schedule = SamplingSchedule.parse("H2", guidance_scale=3.0)
    cond = sd3.condition(PROMPTS[:2], schedule)
    shape = sd3.latent_shape()
    states = torch.randn(2, 3, *shape, generator=seeded)
    pool = TrajectoryPool(states, torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64), torch.tensor([1, 0]))
    from flowturbo.refiner_dt import DtDistribution

    torch.manual_seed(3)
    samples = trajectory_samples(sd3, pool, cond, torch.tensor([0, 1]), DtDistribution(max_dt=0.3), 3.0)
    x_next, t_next, dt, v_t, target, labels = samples
    assert torch.all(dt > 0) and torch.all(dt <= 0.3) and torch.all(t_next <= 1.0)
    t = t_next - dt
    x_t = pool.state_at(torch.tensor([0, 1]), t)
    prompt_rows = cond.rows(torch.tensor([1, 0]))  # trajectory 0 is prompt 1
    torch.testing.assert_close(v_t, sd3.guided_velocity(x_t, t, prompt_rows, 3.0), **tol(torch.float32))
    torch.testing.assert_close(x_next, x_t + dt.view(-1, 1, 1, 1) * v_t, **tol(torch.float32))
    torch.testing.assert_close(target, sd3.guided_velocity(x_next, t_next, prompt_rows, 3.0), **tol(torch.float32))
    refiner = _perturbed(TokenRefiner(_config(latent_channels=shape[0], pooled_dim=cond.prompt.pooled.shape[1])),
                         seeded)
    pooled = prompt_rows.prompt.pooled
    loss = token_refiner_loss(refiner, samples, pooled, dt_input=True)
    hand = ((v_t + refiner(x_next, t_next, v_t, pooled, dt) - target) ** 2).mean()
    torch.testing.assert_close(loss, hand, **tol(torch.float32))


# --------------------------------------------------------------------------------------- training runs
def test_training_lowers_the_objective_on_fresh_samples(trained_run, sd3):
    """The trained refiner's loss on fresh teacher samples (t, dt and states it did not see) is clearly below the
    fresh, zero-offset refiner's (measured 0.69x after these 40 steps)."""
    from flowturbo.families import read_prompts

    trained = read_token_refiner(trained_run)
    part = torch.load(trained_run / "trajectories" / "part-0-of-1.pt", weights_only=True)
    pool = TrajectoryPool(part["states"], part["times"], part["prompt_index"])
    prompts = read_prompts(json.loads((trained_run / "config.json").read_text())["config"]["prompts"])
    cond = sd3.condition(prompts, SamplingSchedule.parse("H2", guidance_scale=7.0))
    torch.manual_seed(123)
    rows = torch.arange(pool.states.shape[0]).repeat(4)
    samples = trajectory_samples(sd3, pool, cond, rows, trained.dt, 7.0)
    pooled = cond.prompt.pooled[pool.prompt_index[rows]]
    with torch.no_grad():
        learned = token_refiner_loss(trained.build(), samples, pooled, dt_input=True)
        zero = token_refiner_loss(TokenRefiner(trained.config), samples, pooled, dt_input=True)
    assert learned < 0.85 * zero, (float(learned), float(zero))


def test_trained_weights_carry_their_record(trained_run, tiny_pipelines):
    state = load_checkpoint_state(latest_checkpoint(trained_run))
    assert len(state["losses"]) == 40
    trained = read_token_refiner(trained_run)
    assert trained.record.pipeline_class == "StableDiffusion3Pipeline" and trained.record.cfg == 7.0
    assert trained.record.transformer_digest == transformer_digest(
        json.loads((tiny_pipelines["sd3"] / "transformer" / "config.json").read_text()))
    assert trained.config.dt_conditioning and trained.dt.max_dt == 0.8
    flops = state["extra"]["flops"]
    assert 0 < flops["refiner_flops"] < flops["teacher_flops"] and flops["ratio"] == pytest.approx(
        flops["refiner_flops"] / flops["teacher_flops"])


def test_resume_continues_a_text_run_from_out_alone(trained_run, tmp_path):
    """`train refiner --resume --out RUN --steps N` finds the text trainer from the run's own settings."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    done = subprocess.run([sys.executable, "-m", "flowturbo", "train", "refiner", "--resume", "--out", str(run),
                           "--steps", "45", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stdout and len(load_checkpoint_state(latest_checkpoint(run))["losses"]) == 45


def test_sampling_with_the_refiner_calls_it_as_the_plan_says(trained_run, tiny_pipelines, sd3):
    """The family's refiner call sees the carried guided velocity, the schedule's times and dts, the prompts' pooled
    embeddings; the trained refiner changes the result, a zero one gives the stale-velocity R step."""
    from flowturbo.runtime.sampler import Sampler

    sampler = Sampler.from_pipeline(str(tiny_pipelines["sd3"]), device="cpu", dtype="float32",
                                    refiner=str(trained_run))
    family = sampler.pipeline.family
    schedule = sampler.default_schedule("H1P1R2")
    seen = []
    real = family.refiner

    class Recording(torch.nn.Module):
        takes_dt = True

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, v, pooled, dt):
            seen.append((float(t[0]), float(dt[0]), pooled.clone()))
            return real(x, t, v, pooled, dt)

    family.refiner = Recording()
    try:
        out = sampler.sample(prompts=PROMPTS[:2], schedule=schedule, seed=0, progress=False)
    finally:
        family.refiner = real
    plan = refiner_call_plan(schedule)
    assert len(seen) == len(plan) == 4
    assert [v for c in plan for v in (c.t, c.dt)] == pytest.approx([v for s in seen for v in s[:2]], abs=1e-6)
    cond = family.condition(PROMPTS[:2], schedule)
    for _, _, pooled in seen:
        torch.testing.assert_close(pooled, cond.prompt.pooled, **tol(torch.float32))
    again = sampler.sample(prompts=PROMPTS[:2], schedule=schedule, seed=0, progress=False)
    torch.testing.assert_close(again.images, out.images, **tol(torch.float32))
    trained = read_token_refiner(trained_run)
    family.attach_refiner(TrainedTokenRefiner(TokenRefiner(trained.config).state_dict(), trained.config,
                                              trained.record, trained.dt))
    try:
        zero = sampler.sample(prompts=PROMPTS[:2], schedule=schedule, seed=0, progress=False)
    finally:
        family.attach_refiner(trained)
    assert not torch.allclose(zero.images, out.images)


def test_sample_cli_with_a_refiner_writes_images(trained_run, tiny_pipelines, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "flowturbo", "sample", "--pipeline", str(tiny_pipelines["sd3"]),
                           "--refiner", str(trained_run), "--prompt", "a cat", "--schedule", "H1P1R2", "--out",
                           str(out), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "run.json").read_text())
    assert "H1P1R2" in json.dumps(record) and "trained_for" in json.dumps(record)
    assert len(list(out.glob("*.png"))) >= 1


# ------------------------------------------------------------------------------------------ bad input
def _error(capsys, argv: list[str], *needles: str) -> str:
    """``flowturbo ARGV`` in this process exits 2 with one `error:` line holding ``needles``."""
    from flowturbo.runtime.cli import main

    with pytest.raises(SystemExit) as exit_info:
        code = main(argv)
        raise SystemExit(code)
    assert exit_info.value.code == 2, exit_info.value.code
    return one_error_line(capsys, *needles)


def test_refiner_of_another_model_or_guidance_is_refused(trained_run, tiny_pipelines, tmp_path, capsys):
    sd3, flux = str(tiny_pipelines["sd3"]), str(tiny_pipelines["flux_dev"])
    _error(capsys, ["sample", "--pipeline", flux, "--refiner", str(trained_run), "--prompt", "a cat", "--size", "32",
                    "--schedule", "H1R2", "--out", str(tmp_path / "a")], "trained for a StableDiffusion3Pipeline")
    _error(capsys, ["sample", "--pipeline", sd3, "--refiner", str(trained_run), "--prompt", "a cat", "--schedule",
                    "H1R2", "--cfg", "3", "--out", str(tmp_path / "b")], "at CFG 7", "--cfg 7")
    _error(capsys, ["sample", "--pipeline", sd3, "--prompt", "a cat", "--schedule", "H1R2", "--out",
                    str(tmp_path / "c")], "need a velocity refiner", "--refiner")
    (tmp_path / "not_a_run").mkdir()
    _error(capsys, ["sample", "--pipeline", sd3, "--refiner", str(tmp_path / "not_a_run"), "--prompt", "a cat",
                    "--out", str(tmp_path / "d")], "no refiner.safetensors")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_train_refiner_bad_inputs(tiny_pipelines, prompts_file, tmp_path, capsys):
    sd3 = str(tiny_pipelines["sd3"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [
        (["--teacher", sd3], "pass --prompts FILE"),
        (["--teacher", sd3, "--prompts", str(prompts_file), "--dataset", "fashion-mnist"], "--dataset does not apply"),
        (["--teacher", sd3, "--prompts", str(prompts_file), "--label-dropout", "0.1"], "--label-dropout does not"),
        (["--teacher", str(tiny_pipelines["sd15"]), "--prompts", str(prompts_file)], "StableDiffusionPipeline"),
        (["--teacher", sd3, "--prompts", str(prompts_file), "--preset", "fashion-mnist"], "SiT-teacher preset"),
        (["--teacher", sd3, "--prompts", str(prompts_file), "--size", "30"], "nearest valid sizes"),
        (["--teacher", sd3, "--prompts", str(empty)], "holds no prompt"),
    ]
    for i, (args, message) in enumerate(cases):
        _error(capsys, ["train", "refiner", *args, "--out", str(tmp_path / f"run{i}"), "--steps", "1", "--no-progress"],
               message)
        assert not (tmp_path / f"run{i}" / "refiner.safetensors").exists()


def test_sit_teacher_refuses_text_flags(tmp_path, capsys):
    (tmp_path / "teacher").mkdir()
    _error(capsys, ["train", "refiner", "--teacher", str(tmp_path / "teacher"), "--prompts", str(tmp_path / "p.txt"),
                    "--out", str(tmp_path / "run")], "--prompts does not apply to a SiT teacher")


def test_config_validation():
    with pytest.raises(FlowTurboError, match="--prompts"):
        TextRefinerTrainConfig(teacher="x")
    with pytest.raises(FlowTurboError, match="--fine-steps"):
        TrajectoryConfig(fine_steps=1)
    with pytest.raises(FlowTurboError, match="--cfg must be >= 1"):
        TextRefinerTrainConfig(teacher="x", prompts="y", cfg=0.5)
    with pytest.raises(FlowTurboError, match="WIDTHxHEIGHT"):
        TextRefinerTrainConfig(teacher="x", prompts="y", size="big")
    assert set(TEXT_REFINER_TRAIN_PRESETS) == {"default", "tiny"}
    assert dataclasses.replace(TextRefinerTrainConfig(teacher="x", prompts="y"), loop=LoopConfig(steps=2)).loop.steps == 2


def test_r_steps_need_a_refiner(sd3):
    with pytest.raises(SamplingError, match="need a velocity refiner"):
        sd3.check_schedule(SamplingSchedule.parse("H1R2", guidance_scale=7.0))
