"""flowturbo tune: candidates, grids, fronts, the search end to end on the embedded default (tiny settings),
resume after a kill, the refusals; custom grids through the schedule JSON, the C++ mirror and the exporter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowturbo.errors import FlowTurboError
from flowturbo.runtime.cli import main
from flowturbo.runtime.tune import Grid, SearchSpace, TuneConfig, nondominated_order, pareto_front
from flowturbo.runtime.tune_cli import state_path_for
from flowturbo.schedule import SamplingSchedule

# A tiny search on the embedded default: H1, H1P1, H2, H2P1 (their P-first spellings dropped) + 1 rule C.
TINY = ["tune", "--device", "cpu", "--num-samples", "40", "--allow-small-sample", "--min-samples", "20",
        "--batch", "20", "--heun", "1:2", "--pseudo", "0:1", "--refiner-steps", "0", "--euler", "",
        "--grids", "uniform", "--vnorm-c", "0.5", "--num-reference", "200", "--latency-batch", "4",
        "--latency-repeats", "1", "--no-progress", "--threads", "1"]
TIMEOUT_S = 240


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWTURBO_CACHE_DIR", str(tmp_path / "cache"))  # reference statistics go here too
    return tmp_path / "cache"


# --------------------------------------------------------------------------------------------- pieces
def test_grids_are_exact_at_both_ends_and_increasing():
    for text in ("uniform", "power:1.5", "power:0.75", "shift:2", "shift:0.5"):
        grid = Grid.parse(text)
        for n in (1, 3, 7):
            t = grid.timesteps(n)
            assert t[0] == 0.0 and t[-1] == 1.0 and all(b > a for a, b in zip(t, t[1:])), (text, t)
    assert Grid.parse("power:2").timesteps(2) == (0.0, 0.25, 1.0)
    assert Grid.parse("shift:3").timesteps(2) == pytest.approx((0.0, 0.75, 1.0))  # 3 * .5 / (1 + 2 * .5)
    for bad in ("power", "shift:-1", "warp:2", "power:nan"):
        with pytest.raises(FlowTurboError, match="unknown grid"):
            Grid.parse(bad)


def test_space_keeps_the_paper_order_and_one_spelling_of_each_schedule():
    space = SearchSpace.from_text(heun="0:1", pseudo="0:2", refiner="0:1", euler="4", grids="uniform",
                                  vnorm_c="", general_max_steps=2)
    strings = space.step_strings()
    assert "HPPR" in strings and "EEEE" in strings and "HR" in strings
    assert not [s for s in strings if s.startswith("P") or "EP" in s]  # a P with nothing carried is an H
    cands, notes = space.candidates(cfg=1.5, guidance_channels=None, has_refiner=True)
    names = {c.name for c in cands}
    assert "H1P2R1@uniform" in names and "E4@uniform" in names and notes == []
    assert not [c for c in cands if c.schedule.steps[0].value == "R"]  # invalid strings are dropped
    families = {c.name: c.family for c in cands}
    assert families["H1P2R1@uniform"] == "flowturbo" and families["H2@uniform"] == "heun"
    assert families["R1H1@uniform" if "R1H1@uniform" in families else "H1R1@uniform"] == "flowturbo"
    assert families["E1H1@uniform"] == "general"


def test_model_without_refiner_tunes_without_r():
    space = SearchSpace.from_text(heun="1", pseudo="0:1", refiner="0:2", euler="", grids="uniform", vnorm_c="")
    cands, notes = space.candidates(cfg=1.0, guidance_channels=None, has_refiner=False)
    assert notes and "no refiner" in notes[0]
    assert sorted(c.name for c in cands) == ["H1@uniform", "H1P1@uniform"]


def test_long_refiner_steps_are_flagged_not_dropped():
    space = SearchSpace.from_text(heun="1", pseudo="0", refiner="1", euler="", grids="uniform", vnorm_c="")
    (cand,), _ = space.candidates(cfg=1.0, guidance_channels=None, has_refiner=True)
    assert cand.name == "H1R1@uniform" and "0.500 > 0.12" in cand.flags[0]


def test_front_and_nondominated_order():
    points = [("a", 1.0, 5.0), ("b", 2.0, 4.0), ("c", 2.5, 4.5), ("d", 3.0, 3.0), ("e", 1.5, 6.0)]
    assert pareto_front(points) == ["a", "b", "d"]
    assert nondominated_order(points) == ["d", "b", "a", "c", "e"]


def test_rungs_grow_by_eta_in_whole_batches():
    assert TuneConfig(model="m", num_samples=2000, min_samples=100, eta=3, batch=100).rung_sizes() == \
        [100, 300, 700, 2000]
    assert TuneConfig(model="m", num_samples=2000, search="exhaustive").rung_sizes() == [2000]


def test_custom_grid_round_trips_through_json_cpp_and_the_exporter(tmp_path, capsys):
    from flowturbo import _C
    from flowturbo.training.bundle import make_random_bundle

    schedule = SamplingSchedule.parse("H1P2R1", guidance_scale=2.0, timesteps=Grid.parse("shift:2").timesteps(4))
    path = tmp_path / "schedule.json"
    path.write_text(schedule.to_json(indent=2))
    back = SamplingSchedule.from_file(str(path))
    assert back == schedule and back.id == schedule.id and back.timesteps == schedule.timesteps
    cpp = _C.Schedule.from_json(schedule.canonical_json())
    assert cpp.id == schedule.id and list(cpp.timesteps) == list(schedule.timesteps)
    bundle = tmp_path / "tiny"
    make_random_bundle(bundle, preset="SiT-T/2", input_size=8, in_channels=4, num_classes=10, seed=2,
                       with_refiner=True, decoder="identity")
    art = tmp_path / "art"
    assert main(["export", "--model", str(bundle), "--schedule", str(path), "--batch", "1:1:2", "--format", "onnx",
                 "--out", str(art)]) == 0
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["schedule_id"] == schedule.id and manifest["schedule"]["timesteps"] == list(schedule.timesteps)
    # the same grid given as --timesteps gives the same export key
    grid = ",".join(repr(t) for t in schedule.timesteps)
    assert main(["export", "--model", str(bundle), "--schedule", "H1P2R1", "--cfg", "2.0", "--timesteps", grid,
                 "--batch", "1:1:2", "--format", "onnx", "--out", str(art)]) == 0
    assert "up to date (reused)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- refusals
def test_too_few_samples_is_refused_with_the_minimum(tmp_path, capsys):
    assert main(["tune", "--budget-ms", "50", "--num-samples", "100", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "at least 500" in err and not (tmp_path / "o").exists()


def test_budget_below_the_cheapest_names_it(tmp_path, cache, capsys):
    assert main([*TINY, "--budget-ms", "0.01", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "below the cheapest candidate, H1@uniform at" in err[0] and "ms/image" in err[0]
    assert not (tmp_path / "o").exists()


def test_space_with_nothing_valid_is_refused(tmp_path, cache, capsys):
    args = list(TINY)
    args[args.index("--heun") + 1] = "0"
    args[args.index("--pseudo") + 1] = "0"
    args[args.index("--vnorm-c") + 1] = ""
    assert main([*args, "--budget-ms", "100", "--out", str(tmp_path / "o")]) == 2
    assert "holds no valid schedule" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_resume_without_a_run_is_refused(tmp_path, cache, capsys):
    assert main([*TINY, "--budget-ms", "100", "--resume", "--out", str(tmp_path / "o"),
                 "--cache", str(cache)]) == 2
    assert "no interrupted tune to resume" in capsys.readouterr().err and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- end to end
@pytest.mark.timeout(TIMEOUT_S)
def test_tune_end_to_end_then_resume_after_a_kill(tmp_path, cache, capsys):
    out = tmp_path / "tuned"
    args = [*TINY, "--budget-ms", "1000", "--baselines", "H3", "--cache", str(cache)]
    code = main([*args, "--out", str(out), "--export", str(tmp_path / "art")])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    printed = captured.out
    assert "recommended:" in printed
    report = json.loads((out / "tune.json").read_text())
    assert report["rungs"] == [20, 40] and report["front"]
    rows = {r["name"]: r for r in report["candidates"]}
    assert set(rows) == {"H1@uniform", "H1P1@uniform", "H2@uniform", "H2P1@uniform", "vnorm-C0.5", "H3@uniform"}
    assert rows["H3@uniform"]["baseline"] and rows["H3@uniform"]["num_samples"] == 40
    rec = rows[report["recommended"]]
    assert rec["within_budget"] and rec["num_samples"] == 40 and rec["measured_ms_per_image"] > 0
    finals = [r for r in rows.values() if r["num_samples"] == 40 and r["within_budget"]]
    assert rec["fid"] == min(r["fid"] for r in finals)
    assert rows["H2P1@uniform"]["predictor_calls"] == 5 and rows["vnorm-C0.5"]["predictor_calls"] > 0
    for name in report["front"]:
        assert rows[name]["measured_ms_per_image"] is not None and rows[name]["price_ms_per_image"] is not None
    first, last = report["history"]
    assert first["num_samples"] == 20 and len(first["candidates"]) == 5 and "H3@uniform" not in first["candidates"]
    assert "H3@uniform" in last["candidates"] and set(last["candidates"]) - {"H3@uniform"} <= set(first["candidates"])
    schedule = SamplingSchedule.from_file(str(out / "recommended_schedule.json"))
    assert schedule.id == rows[report["recommended_fixed"]]["id"]
    assert (out / "front.png").stat().st_size > 0 and "recommended >" in (out / "table.txt").read_text()
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["schedule_id"] == schedule.id
    assert not state_path_for(cache, str(out)).exists()  # complete: nothing to resume

    # A second tune into a new folder, killed after its 3rd scored evaluation (fresh cache: real work).
    fresh = tmp_path / "cache2"
    again = tmp_path / "again"
    cmd = [sys.executable, "-m", "flowturbo", *args[:-1], str(fresh), "--out", str(again)]
    env = {**os.environ, "FLOWTURBO_TEST_KILL_AT": "tune:scored#3", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert killed.returncode == -9 and not again.exists()
    state = json.loads(state_path_for(fresh, str(again)).read_text())
    assert sum(len(v) for v in state["scores"].values()) == 3
    # other settings: refused, naming the fields
    assert main([*args[:-1], str(fresh), "--out", str(again), "--resume", "--seed", "4"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "seed (0 -> 4)" in err and not again.exists()
    assert main([*args[:-1], str(fresh), "--out", str(again), "--resume"]) == 0
    resumed = json.loads((again / "tune.json").read_text())
    assert resumed["timings"]["evaluations"] == sum(len(r["fids"]) for r in report["candidates"]) - 3
    assert {r["name"]: r["fids"] for r in resumed["candidates"]} == {r["name"]: r["fids"] for r in report["candidates"]}
    assert resumed["front"] == report["front"] and resumed["recommended"] == report["recommended"]
