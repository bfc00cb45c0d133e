"""The shared training loop (trainers/common.py) on a toy model: exact resume, refusals, NaN stop, budget."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from flowturbo.errors import FlowTurboError
from flowturbo.training.trainers.common import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LOSS_CURVE_FILE,
    DistContext,
    LoopConfig,
    TensorBatches,
    config_from_dict,
    config_to_dict,
    latest_checkpoint,
    load_checkpoint_state,
    run_training,
)

NUM_ITEMS = 11  # odd: the tail of every epoch is dropped
IN_FEATURES, OUT_FEATURES = 5, 3
CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@dataclass(frozen=True)
class ToyConfig:
    loop: LoopConfig = LoopConfig(steps=7, batch_size=4, lr=1e-2, ema_decay=0.9, ckpt_every=100, progress=False)
    width: int = OUT_FEATURES


def toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(NUM_ITEMS, IN_FEATURES, generator=g), torch.randn(NUM_ITEMS, OUT_FEATURES, generator=g)


def toy_step(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    noise = 0.1 * torch.randn_like(y)  # global RNG: must be restored on resume
    return ((model(x) - y - noise) ** 2).mean()


def train_toy(out: Path, config: ToyConfig, *, resume: bool = False, force: bool = False, step_fn=toy_step):
    torch.manual_seed(0)
    model = nn.Linear(IN_FEATURES, config.width)
    batches = TensorBatches(toy_data(), config.loop.batch_size, CPU, config.loop.seed)
    return run_training(out_dir=out, config=config, loop=config.loop, model=model, step_fn=step_fn, batches=batches,
                        ctx=CPU, resume=resume, force=force, title="toy", log=lambda _m: None)


def test_resume_reproduces_the_uninterrupted_loss_curve_exactly(tmp_path: Path) -> None:
    full = train_toy(tmp_path / "full", ToyConfig())
    short = ToyConfig(loop=replace(ToyConfig().loop, steps=3))
    first = train_toy(tmp_path / "split", short)
    assert first.step == 3 and len(first.losses) == 3
    resumed = train_toy(tmp_path / "split", ToyConfig(), resume=True)
    assert resumed.step == 7
    assert resumed.losses == full.losses  # bit-for-bit, across an epoch boundary (2 batches per epoch)
    assert len(set(full.losses)) == 7
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    # The EMA really lags the model.
    assert not torch.equal(full.ema.weight, full.model.weight)


def test_checkpoint_layout_is_complete_and_atomic(tmp_path: Path) -> None:
    config = ToyConfig(loop=replace(ToyConfig().loop, ckpt_every=2, keep_checkpoints=2))
    train_toy(tmp_path, config)
    root = tmp_path / CHECKPOINTS_DIR
    steps = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert steps == ["step_00000006", "step_00000007"]  # keep_checkpoints=2 pruned 2 and 4
    # no temp files or folders left behind (only flowturbo's ownership record, which lists every file)
    assert [p.name for p in tmp_path.rglob(".*")] == [".flowturbo-owned.json"]
    assert latest_checkpoint(tmp_path) == root / "step_00000007"
    beside = json.loads((root / "step_00000007" / CONFIG_FILE).read_text())
    assert beside["config"] == config_to_dict(config)
    assert beside["precision"] == "fp32" and beside["world_size"] == 1
    state = load_checkpoint_state(root / "step_00000007")
    assert state["step"] == 7 and len(state["losses"]) == 7 and state["data"] == {"epoch": 3, "batch": 1}
    with Image.open(tmp_path / LOSS_CURVE_FILE) as png:
        assert png.format == "PNG" and png.size[0] > 100
    assert config_from_dict(ToyConfig, config_to_dict(config)) == config


def test_existing_run_needs_resume_and_changed_config_needs_force(tmp_path: Path) -> None:
    short = ToyConfig(loop=replace(ToyConfig().loop, steps=2))
    train_toy(tmp_path, short)
    with pytest.raises(FlowTurboError, match="--resume"):
        train_toy(tmp_path, short)
    changed = ToyConfig(loop=replace(short.loop, lr=5e-2, steps=3), width=OUT_FEATURES)
    with pytest.raises(FlowTurboError, match=r"loop\.lr: 0\.01 -> 0\.05") as info:
        train_toy(tmp_path, changed, resume=True)
    assert "loop.steps" not in str(info.value)  # extending a run is always allowed
    assert "--force" in str(info.value)
    result = train_toy(tmp_path, changed, resume=True, force=True)
    assert result.step == 3


@dataclass(frozen=True)
class ToyConfigWithOption(ToyConfig):
    """ToyConfig with a field added later whose None keeps the old behaviour (as LatentDataConfig.encoder_bundle)."""

    option: str | None = None


def test_a_field_added_later_at_none_does_not_block_resume(tmp_path: Path) -> None:
    short = ToyConfig(loop=replace(ToyConfig().loop, steps=2))
    train_toy(tmp_path, short)
    later = ToyConfigWithOption(loop=replace(short.loop, steps=3))
    assert train_toy(tmp_path, later, resume=True).step == 3  # "option: (absent) -> null" is no change
    with pytest.raises(FlowTurboError, match=r'option: null -> "x"'):
        train_toy(tmp_path, replace(later, option="x", loop=replace(later.loop, steps=4)), resume=True)


def test_nan_loss_stops_keeps_last_good_checkpoint_and_names_the_step(tmp_path: Path) -> None:
    calls = {"n": 0}

    def step(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        calls["n"] += 1
        loss = toy_step(model, batch)
        return loss * float("nan") if calls["n"] == 5 else loss

    config = ToyConfig(loop=replace(ToyConfig().loop, ckpt_every=2))
    with pytest.raises(FlowTurboError, match=r"step 5") as info:
        train_toy(tmp_path, config, step_fn=step)
    assert "step_00000004" in str(info.value)
    good = latest_checkpoint(tmp_path)
    assert good is not None and good.name == "step_00000004"
    state = load_checkpoint_state(good)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_time_budget_stops_cleanly_and_resume_finishes_identically(tmp_path: Path) -> None:
    full = train_toy(tmp_path / "full", ToyConfig())
    budget = ToyConfig(loop=replace(ToyConfig().loop, max_minutes=1e-9))
    stopped = train_toy(tmp_path / "budget", budget)
    assert not stopped.finished and stopped.step == 1
    assert latest_checkpoint(tmp_path / "budget").name == "step_00000001"
    resumed = train_toy(tmp_path / "budget", ToyConfig(), resume=True)  # max_minutes may change on resume
    assert resumed.finished and resumed.losses == full.losses


def test_batches_are_the_same_global_batches_for_any_number_of_ranks() -> None:
    data = (torch.arange(NUM_ITEMS * 2).view(NUM_ITEMS, 2),)
    single = TensorBatches(data, 4, CPU, seed=3)
    ranks = [
        TensorBatches(data, 4, DistContext(rank=r, world_size=2, local_rank=r, device=torch.device("cpu")), seed=3)
        for r in range(2)
    ]
    for _ in range(5):
        whole = single.next_batch()[0]
        parts = torch.cat([src.next_batch()[0] for src in ranks])
        assert torch.equal(whole, parts)
    with pytest.raises(FlowTurboError, match="does not split"):
        TensorBatches(data, 3, DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu")), seed=0)
    with pytest.raises(FlowTurboError, match="fewer than one batch"):
        TensorBatches(data, NUM_ITEMS + 1, CPU, seed=0)


def test_loop_config_validates() -> None:
    with pytest.raises(FlowTurboError, match="precision"):
        LoopConfig(precision="fp8")
    with pytest.raises(FlowTurboError, match="steps"):
        LoopConfig(steps=0)


def test_only_rank_zero_judges_and_tidies_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun rank 0 writes the run folder's ownership record while the other ranks check the same folder:
    they must not take rank 0's write in flight (its temp file) for the user's file and refuse, nor remove it."""
    from flowturbo.fileio import TEMP_FILE_SUFFIX
    from flowturbo.training.trainers.common import check_run_folder

    out = tmp_path / "run"
    out.mkdir()
    in_flight = out / f"..flowturbo-owned.json.{os.getpid()}.a9b05fa4{TEMP_FILE_SUFFIX}"  # a live writer's temp
    in_flight.write_text("{}")
    monkeypatch.setenv("RANK", "1")
    assert check_run_folder(out, ToyConfig(), resume=False, force=False, log=lambda _m: None) is False
    assert in_flight.is_file() and not (out / ".flowturbo-owned.json").exists()  # rank 1 wrote and removed nothing
    monkeypatch.setenv("RANK", "0")  # rank 0 still refuses a folder holding a file flowturbo does not know
    with pytest.raises(FlowTurboError, match="refusing to replace"):
        check_run_folder(out, ToyConfig(), resume=False, force=False, log=lambda _m: None)
