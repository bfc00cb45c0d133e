"""torchrun: two CPU processes (gloo) train the tiny autoencoder; the ranks' models must stay identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowturbo.training.trainers.common import latest_checkpoint, load_checkpoint_state

NUM_PROCESSES = 2
TIMEOUT_S = 240


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (16, 17), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.mark.timeout(TIMEOUT_S)
def test_two_gloo_processes_train_in_lockstep(tmp_path: Path) -> None:
    data = _folder(tmp_path / "images")
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NUM_PROCESSES}",
        "-m", "flowturbo.training.train_cli", "train", "autoencoder", "--preset", "tiny",
        "--dataset", str(data), "--image-size", "16", "--image-channels", "1", "--device", "cpu",
        "--steps", "3", "--ckpt-every", "2", "--finetune-steps", "2", "--out", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage, steps in (("autoencoder", 3), ("decoder_mse", 2)):
        folder = latest_checkpoint(out / stage)
        state = load_checkpoint_state(folder)
        assert state["step"] == steps and state["world_size"] == NUM_PROCESSES
        assert len(state["losses"]) == steps and all(np.isfinite(state["losses"]))
        prints = state["rank_fingerprints"]
        assert len(prints) == NUM_PROCESSES and len(set(prints)) == 1  # identical parameters on both ranks
        assert len(state["rng"]) == NUM_PROCESSES
        assert json.loads((folder / "config.json").read_text())["world_size"] == NUM_PROCESSES
    assert (out / "autoencoder.safetensors").is_file()
    assert proc.stdout.count("done:") == 1  # only rank 0 reports


@pytest.mark.timeout(TIMEOUT_S)
def test_two_gloo_processes_train_a_text_refiner_in_lockstep(tiny_pipelines, tmp_path: Path) -> None:
    """The text-to-image refiner under torchrun: each rank samples its share of the teacher's trajectories, rank 0
    alone records them all (two writers of one ownership record would lose one), the ranks stay identical."""
    from flowturbo.fileio import read_ownership

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nthe red fox\na blue car\n", encoding="utf-8")  # odd: ranks' shares differ
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NUM_PROCESSES}",
        "-m", "flowturbo", "train", "refiner", "--teacher", str(tiny_pipelines["sd3"]), "--prompts", str(prompts),
        "--preset", "tiny", "--steps", "4", "--trajectories-per-prompt", "1", "--fine-steps", "4",
        "--batch-size", "2", "--ckpt-every", "2", "--device", "cpu", "--no-progress", "--out", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = {f"trajectories/part-{r}-of-{NUM_PROCESSES}.pt" for r in range(NUM_PROCESSES)}
    assert parts <= read_ownership(out).files
    state = load_checkpoint_state(latest_checkpoint(out))
    assert state["step"] == 4 and state["world_size"] == NUM_PROCESSES
    assert len(set(state["rank_fingerprints"])) == 1
    assert (out / "refiner.safetensors").is_file() and proc.stdout.count("done:") == 1
