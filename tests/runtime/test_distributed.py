"""torchrun: sample / eval split over 2 gloo processes on the CPU.

Same seed -> byte-identical PNGs for 1 and 2 processes; eval's FID from gathered features equals one process's;
a rank killed mid-run fails the run cleanly (the previous --out stays whole, no debris).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowturbo.errors import FlowTurboError
from flowturbo.runtime.distributed import RankFailure, Ranks

TIMEOUT_S = 240
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SAMPLE = ["sample", "--num-images", "11", "--batch", "4", "--seed", "5", "--device", "cpu", "--no-progress"]


def _torchrun(args: list[str], **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "flowturbo",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env={**ENV, **env})


def _flowturbo(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowturbo", *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=ENV)


def test_shards_are_whole_batches_in_order():
    for n, batch, world in [(11, 4, 2), (3, 4, 2), (16, 4, 3), (1, 1, 4)]:
        shards = [Ranks(rank=r, world_size=world).shard(n, batch) for r in range(world)]
        assert shards[0][0] == 0 and shards[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))  # contiguous, no gaps or overlap
        assert all(start % batch == 0 for start, stop in shards if stop > start)  # batches never straddle ranks


def test_single_process_run_all_raises_the_error_itself():
    ranks = Ranks()
    assert ranks.run_all(lambda: 3, "x") == 3 and ranks.broadcast(7) == 7 and ranks.gather(1) == [1]
    with pytest.raises(FlowTurboError, match="boom"):
        ranks.run_all(lambda: (_ for _ in ()).throw(FlowTurboError("boom")), "x")


@pytest.mark.timeout(TIMEOUT_S)
def test_two_processes_write_the_same_pngs_as_one(tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    single = _flowturbo([*SAMPLE, "--out", str(one)])  # python -m flowturbo (the __main__ entry point)
    assert single.returncode == 0, single.stderr[-2000:]
    run = _torchrun([*SAMPLE, "--out", str(two)])
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    pngs = sorted(p.name for p in one.glob("*.png"))
    assert len(pngs) == 12 and pngs == sorted(p.name for p in two.glob("*.png"))  # 11 images + grid
    for name in pngs:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    record = json.loads((two / "run.json").read_text())
    assert record["world_size"] == 2 and [r["images"] for r in record["ranks"]] == [4, 7]
    assert record["labels"] == json.loads((one / "run.json").read_text())["labels"]
    assert run.stdout.count("wrote ") == 1  # only rank 0 reports
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders or locks left


@pytest.mark.timeout(TIMEOUT_S)
def test_a_killed_rank_fails_the_run_and_leaves_the_old_output(tmp_path: Path):
    out = tmp_path / "out"
    first = _torchrun([*SAMPLE, "--out", str(out)])
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    run = _torchrun([*SAMPLE, "--seed", "6", "--out", str(out)], FLOWTURBO_TEST_KILL_AT="rank1:images-written")
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("flowturbo sample: error:")]
    assert errors and "nothing was written" in errors[0], run.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous output, byte for byte
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.timeout(TIMEOUT_S)
def test_eval_gathers_features_on_rank_zero(tmp_path: Path):
    from flowturbo.runtime.cli import main

    args = ["eval", "--num-samples", "24", "--batch", "8", "--allow-small-sample", "--device", "cpu",
            "--num-reference", "200", "--seed", "2"]
    env_cache = {"FLOWTURBO_CACHE_DIR": str(tmp_path / "cache")}
    run = _torchrun([*args, "--out", str(tmp_path / "two.json")], **env_cache)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    os.environ["FLOWTURBO_CACHE_DIR"] = env_cache["FLOWTURBO_CACHE_DIR"]
    try:
        assert main([*args, "--out", str(tmp_path / "one.json")]) == 0
    finally:
        del os.environ["FLOWTURBO_CACHE_DIR"]
    one = json.loads((tmp_path / "one.json").read_text())
    shown = {k: (one.get(k), two.get(k)) for k in ("num_samples", "fid", "class_accuracy", "precision", "recall")}
    assert two["world_size"] == 2 and two["num_samples"] == one["num_samples"] == 24, shown
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-4), shown
    assert two["class_accuracy"] == one["class_accuracy"], shown
    assert two["precision"] == pytest.approx(one["precision"]) and two["recall"] == pytest.approx(one["recall"]), shown


def test_rank_failure_is_a_flowturbo_error():
    assert issubclass(RankFailure, FlowTurboError)


@pytest.mark.timeout(TIMEOUT_S)
def test_tune_under_torchrun_scores_like_one_process(tmp_path: Path):
    args = ["tune", "--device", "cpu", "--num-samples", "40", "--allow-small-sample", "--min-samples", "20",
            "--batch", "20", "--heun", "1:2", "--pseudo", "0", "--refiner-steps", "0", "--euler", "", "--grids",
            "uniform", "--vnorm-c", "0.5", "--num-reference", "200", "--latency-batch", "4", "--latency-repeats", "1",
            "--no-progress", "--threads", "1", "--budget-ms", "1000"]
    env = {"FLOWTURBO_CACHE_DIR": str(tmp_path / "refs")}
    two = _torchrun([*args, "--cache", str(tmp_path / "c2"), "--out", str(tmp_path / "two")], **env)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "flowturbo", *args, "--cache", str(tmp_path / "c1"), "--out",
                          str(tmp_path / "one")], capture_output=True, text=True, timeout=TIMEOUT_S, env={**ENV, **env})
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "tune.json").read_text()) for d in ("one", "two"))
    assert b["world_size"] == 2 and a["world_size"] == 1
    fids_a = {r["name"]: r["scores"] for r in a["candidates"]}
    fids_b = {r["name"]: r["scores"] for r in b["candidates"]}
    assert fids_a.keys() == fids_b.keys() == {"H1@uniform", "H2@uniform", "vnorm-C0.5"}
    for name, per_rung in fids_a.items():
        assert per_rung.keys() == fids_b[name].keys()
        for n, fid in per_rung.items():
            assert fids_b[name][n] == pytest.approx(fid, rel=1e-4), (name, n)
    assert a["front"] == b["front"] and two.stdout.count("recommended:") == 1


@pytest.mark.timeout(TIMEOUT_S)
def test_two_processes_sample_a_text_model_as_one(tiny_pipelines, tmp_path: Path):
    """`torchrun ... sample --pipeline`: image i is prompt i of the cycled list from seed + i on whichever rank, so the
    PNGs (named by prompt) and the run record's prompts, labels and conditioning equal one process's."""
    from tiny_diffusers import IMAGE_SIZE, MAX_SEQUENCE_LENGTH

    args = ["sample", "--pipeline", str(tiny_pipelines["sd3"]), "--prompt", "a cat", "--prompt", "a red car",
            "--prompt", "a cat", "--num-images", "5", "--batch", "2", "--size", str(IMAGE_SIZE),
            "--max-sequence-length", str(MAX_SEQUENCE_LENGTH), "--schedule", "H1P1", "--cfg", "3", "--seed", "2",
            "--device", "cpu", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    single = subprocess.run([sys.executable, "-m", "flowturbo", *args, "--out", str(one)], capture_output=True,
                            text=True, timeout=TIMEOUT_S, env={**ENV, **offline})
    assert single.returncode == 0, single.stderr[-2000:]
    run = _torchrun([*args, "--out", str(two)], **offline)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    pngs = sorted(p.name for p in one.glob("*.png"))
    assert len(pngs) == 6 and pngs == sorted(p.name for p in two.glob("*.png")) and {"3_a_cat.png", "4_a_red_car.png"} <= set(pngs)
    for name in pngs:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    a, b = (json.loads((d / "run.json").read_text()) for d in (one, two))
    assert b["world_size"] == 2 and [r["images"] for r in b["ranks"]] == [2, 3]
    assert (b["prompts"], b["labels"], b["conditioning"]) == (a["prompts"], a["labels"], a["conditioning"])
