"""SIGKILL `flowturbo sample`, `export` and `train` subprocesses at several points; the target must then hold the
complete old state or the complete new one, and the next run must clean up every leftover.

The kill points are exact, not timed: ``$FLOWTURBO_TEST_KILL_AT`` makes the subprocess SIGKILL itself there
(:func:`flowturbo.fileio.crash_point`): with the target's lock held ("locked"), after an atomic file's data is
written but before its rename ("file-written"), with a complete staging folder not yet swapped in ("staged"),
with a checkpoint staged ("checkpoint-staged#2": the second one). One more run is killed from outside while it
holds the lock. Models are tiny (a depth-1 SiT; the tiny autoencoder on 8 Fashion-MNIST images).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowturbo import fileio
from flowturbo.runtime.artifacts import load_artifacts
from micro_models import save_tiny_bundle

KILLED = -signal.SIGKILL


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    """A depth-1, width-32 SiT + refiner on (3, 6, 6) latents with an identity decoder (exports in seconds)."""
    return save_tiny_bundle(tmp_path_factory.mktemp("crash") / "micro", seed=3)


def flowturbo(*args: str, kill_at: str | None = None, no_exchange: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (fileio.KILL_AT_ENV, fileio.NO_EXCHANGE_ENV)}
    if kill_at:
        env[fileio.KILL_AT_ENV] = kill_at
    if no_exchange:
        env[fileio.NO_EXCHANGE_ENV] = "1"
    return subprocess.run([sys.executable, "-m", "flowturbo.runtime.cli", *args], env=env, capture_output=True,
                          text=True, timeout=600)


def complete_output(folder: Path) -> dict:
    """The run record of a complete, untouched output folder (its ownership record lists exactly its files)."""
    record = fileio.read_ownership(folder)
    assert record is not None and set(fileio.list_files(folder)) - {fileio.OWNERSHIP_FILE} == set(record.files)
    return json.loads((folder / "run.json").read_text())


def only(folder: Path, *names: str) -> None:
    assert sorted(os.listdir(folder)) == sorted(names), os.listdir(folder)


# -------------------------------------------------------------------------------------------- sample
def test_killed_sample_keeps_the_old_output_and_the_next_run_cleans_up(bundle_dir, tmp_path):
    out = tmp_path / "out"
    sample = ["sample", "--model", str(bundle_dir), "--num-images", "3", "--device", "cpu", "--no-progress",
              "--out", str(out)]
    assert flowturbo(*sample, "--seed", "1").returncode == 0
    assert complete_output(out)["seed"] == 1
    for point in ("locked", "file-written", "staged"):
        result = flowturbo(*sample, "--seed", "2", kill_at=point)
        assert result.returncode == KILLED, (point, result.stderr)
        assert complete_output(out)["seed"] == 1, point  # the complete old state
    assert len(os.listdir(tmp_path)) > 1  # the killed runs left a lock file and staging folders
    assert flowturbo(*sample, "--seed", "3").returncode == 0
    assert complete_output(out)["seed"] == 3
    only(tmp_path, "out")


def test_sample_killed_between_the_renames_is_put_back_by_the_next_run(bundle_dir, tmp_path):
    """Without an atomic exchange (other file systems) the old folder is set aside first: a kill right then
    leaves it aside, complete, and the next run on the target puts it back before doing anything else."""
    out = tmp_path / "out"
    sample = ["sample", "--model", str(bundle_dir), "--num-images", "2", "--device", "cpu", "--no-progress",
              "--out", str(out)]
    assert flowturbo(*sample, "--seed", "1").returncode == 0
    result = flowturbo(*sample, "--seed", "2", kill_at="set-aside", no_exchange=True)
    assert result.returncode == KILLED, result.stderr
    aside = [p for p in tmp_path.iterdir() if ".flowturbo-old-" in p.name]
    assert not out.exists() and len(aside) == 1 and complete_output(aside[0])["seed"] == 1
    with fileio.lock_target(out):
        fileio.remove_stale_debris(out)
    assert complete_output(out)["seed"] == 1
    assert flowturbo(*sample, "--seed", "3").returncode == 0 and complete_output(out)["seed"] == 3
    only(tmp_path, "out")


def test_sample_killed_from_outside_while_holding_the_lock(bundle_dir, tmp_path):
    out = tmp_path / "out"
    sample = [sys.executable, "-m", "flowturbo.runtime.cli", "sample", "--model", str(bundle_dir), "--num-images",
              "2", "--device", "cpu", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(sample, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = fileio.lock_path_for(out)
    while proc.poll() is None and not lock.exists():
        os.sched_yield()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() or complete_output(out)  # nothing, or (if it was that fast) the complete new one
    assert flowturbo(*sample[3:]).returncode == 0 and complete_output(out)
    only(tmp_path, "out")


# -------------------------------------------------------------------------------------------- export
def test_killed_export_keeps_the_old_directory_and_the_next_run_cleans_up(bundle_dir, tmp_path):
    out = tmp_path / "art"
    common = ["export", "--model", str(bundle_dir), "--batch", "1:1:2", "--no-validate", "--out", str(out)]
    assert flowturbo(*common, "--schedule", "H2").returncode == 0
    old_id = load_artifacts(out).schedule.id
    for point in ("file-written", "staged"):  # manifest written / directory complete, not yet in place
        result = flowturbo(*common, "--schedule", "H3", "--overwrite", kill_at=point)
        assert result.returncode == KILLED, (point, result.stderr)
        assert load_artifacts(out).schedule.id == old_id, point  # complete old state: seal + checksums verify
    assert any(".art.flowturbo-tmp-" in p.name for p in tmp_path.iterdir())  # the debris the issue found
    done = flowturbo(*common, "--schedule", "H3", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert load_artifacts(out).schedule.notation == "H3"
    only(tmp_path, "art")


# --------------------------------------------------------------------------------------------- train
def test_killed_training_resumes_from_its_last_complete_checkpoint(tmp_path):
    out = tmp_path / "ae"
    train = ["train", "autoencoder", "--preset", "tiny", "--image-size", "32", "--limit", "8", "--steps", "4",
             "--ckpt-every", "2", "--no-finetune", "--batch-size", "4", "--latent-scale-images", "8",
             "--no-progress", "--out", str(out)]
    result = flowturbo(*train, kill_at="file-written")  # the very first write (config.json) is cut short
    assert result.returncode == KILLED, result.stderr
    result = flowturbo(*train, kill_at="checkpoint-staged#2")  # a fresh start; killed staging step 4
    assert result.returncode == KILLED, result.stderr
    stage = out / "autoencoder"
    latest = (stage / "checkpoints" / "latest").read_text()
    assert latest == "step_00000002"  # the complete old state: step 2, untouched
    torch.load(stage / "checkpoints" / latest / "state.pt", weights_only=False)
    assert any(".flowturbo-tmp-" in p.name for p in (stage / "checkpoints").iterdir())
    resumed = flowturbo(*train, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (stage / "checkpoints" / "latest").read_text() == "step_00000004"
    assert (out / "autoencoder.safetensors").is_file()
    leftovers = [p for p in out.rglob(".*") if p.name != fileio.OWNERSHIP_FILE]
    assert leftovers == [] and fileio.unknown_entries(out) == []
    only(tmp_path, "ae")
