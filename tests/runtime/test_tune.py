"""flowturbo tune: candidates, grids, fronts, the search end to end on the embedded default (tiny settings),
resume after a kill, the refusals; custom grids through the schedule JSON, the C++ mirror and the exporter."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from flowturbo.errors import FlowTurboError
from flowturbo.refiner_dt import DtDistribution
from flowturbo.runtime.cli import main
from flowturbo.runtime import tune as tune_module
from flowturbo.runtime.distributed import Ranks
from flowturbo.runtime.tune import (
    CallCosts,
    Grid,
    SearchSpace,
    TuneConfig,
    Tuner,
    apply_measured_budget,
    check_metric_samples,
    nondominated_order,
    pareto_front,
    weights_digest,
)
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
    # Explicit R counts only (no 0 among them): mapped to R = 0 with one note, not "no valid schedule".
    space = SearchSpace.from_text(heun="1", pseudo="0:1", refiner="1:2", euler="", grids="uniform", vnorm_c="")
    cands, notes = space.candidates(cfg=1.0, guidance_channels=None, has_refiner=False)
    assert len(notes) == 1 and "no refiner" in notes[0] and "1, 2 -> 0" in notes[0]
    assert sorted(c.name for c in cands) == ["H1@uniform", "H1P1@uniform"]
    cands, notes = space.candidates(cfg=1.0, guidance_channels=None, has_refiner=True)  # with a refiner: R kept
    assert notes == [] and sorted(c.name for c in cands) == ["H1P1R1@uniform", "H1P1R2@uniform", "H1R1@uniform",
                                                              "H1R2@uniform"]


def test_long_refiner_steps_are_flagged_not_dropped():
    space = SearchSpace.from_text(heun="1", pseudo="0", refiner="1", euler="", grids="uniform", vnorm_c="")
    (cand,), _ = space.candidates(cfg=1.0, guidance_channels=None, has_refiner=True)
    assert cand.name == "H1R1@uniform"
    (flag,) = cand.flags(None)  # no record: the paper's range, said to be assumed
    assert "R step(s) 2 call the refiner at dt up to 0.500" in flag and "the paper's dt <= 0.12 (assumed" in flag
    assert cand.flags(DtDistribution(max_dt=0.5)) == []  # inside a recorded range of 0.5


def test_flags_follow_the_refiner_calls_dt_not_the_step_length():
    """The flag is about the age of the velocity each refiner call gets (flowturbo.integrator): in H2R2 (steps of
    0.25) the second R step's calls are at dt 0.25 and 0.5, so a refiner trained to 0.3 flags only step 4."""
    schedule = SamplingSchedule.parse("H2R2")
    cand = tune_module.Candidate("H2R2@uniform", "flowturbo", schedule)
    (flag,) = cand.flags(DtDistribution(max_dt=0.3))
    assert flag.startswith("R step(s) 4 call the refiner at dt up to 0.500") and "its trained range dt <= 0.3" in flag
    assert cand.flags(DtDistribution(max_dt=0.5)) == []
    assert len(cand.flags(DtDistribution(max_dt=0.2))) == 1 and "R step(s) 3,4" in cand.flags(DtDistribution(0.2))[0]


def test_price_is_pinned_with_a_refiner_cost():
    """CallCosts.price is (P c_pred + R c_ref + N c_step + c_decode) / batch exactly, with a non-zero refiner cost:
    an R schedule costs its refiner calls, not nothing."""
    costs = CallCosts(4, predictor_ms=8.0, refiner_ms=1.5, decode_ms=3.0, step_ms=0.25, device="cpu")
    assert costs.price(7, 6, 9) == (7 * 8.0 + 6 * 1.5 + 9 * 0.25 + 3.0) / 4  # H1P5R3: 7 + 6 calls, 9 steps
    assert costs.calls_equivalent(7, 6) == 7 + 6 * 1.5 / 8.0
    free_steps = dataclasses.replace(costs, step_ms=0.0)  # so only the refiner calls tell the two apart
    with_r, without_r = SamplingSchedule.parse("H1P1R2"), SamplingSchedule.parse("H1P1")
    priced = [free_steps.price(s.predictor_calls, s.refiner_calls, s.num_steps) for s in (with_r, without_r)]
    assert priced[0] > priced[1] and priced[0] - priced[1] == 4 * 1.5 / 4


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


class _FakeRanks(Ranks):
    """A rank of a 2-process group without the group: collectives hand out what rank 0 would send."""

    def __init__(self, rank: int, from_rank0: object = None):
        super().__init__(rank=rank, world_size=2)
        self.from_rank0 = from_rank0
        self.collectives: list[str] = []

    def run_all(self, fn, what):
        self.collectives.append(what)
        return fn()

    def broadcast(self, obj, what="a broadcast"):
        self.collectives.append(what)
        return obj if self.is_main else self.from_rank0


def _bare_tuner(ranks: Ranks, **kwargs) -> Tuner:
    """A Tuner over a stand-in CPU pipeline (only the cost step runs)."""
    tuner = Tuner.__new__(Tuner)
    tuner.config = TuneConfig(model="m", latency_batch=4, budget_ms=3.0)
    tuner.pipe = SimpleNamespace(device=torch.device("cpu"))
    tuner.ranks, tuner.state, tuner.requests = ranks, {}, tune_module.TuneRequests()
    tuner.measure_threads = kwargs.get("measure_threads")
    return tuner


def test_costs_are_measured_by_rank_zero_alone_with_a_single_process_threads(monkeypatch):
    """Under torchrun only rank 0 measures, with the threads one process would use (not torchrun's 1 per
    process, which doubled the prices), and every rank prices with rank 0's costs: same within-budget set."""
    measured: list[int] = []
    rank0_costs = CallCosts(4, predictor_ms=4.0, refiner_ms=None, decode_ms=0.0, step_ms=0.0, device="cpu")

    def fake_measure(pipe, batch, cfg, channels, requests):
        measured.append(torch.get_num_threads())
        return dataclasses.replace(rank0_costs, threads=torch.get_num_threads())

    monkeypatch.setattr(tune_module, "measure_call_costs", fake_measure)
    monkeypatch.setattr(tune_module, "single_process_threads", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # what torchrun gives every process (OMP_NUM_THREADS=1)
    try:
        zero = _bare_tuner(_FakeRanks(0))
        costs0 = zero._call_costs()
        assert measured == [2] and costs0.threads == 2 and torch.get_num_threads() == 1  # restored after
        one = _bare_tuner(_FakeRanks(1, from_rank0=costs0))
        costs1 = one._call_costs()
        assert measured == [2], "rank 1 measured too"
        assert costs1 == costs0 and one.state["costs"] == zero.state["costs"]
        # --threads wins over the single-process default
        assert _bare_tuner(_FakeRanks(0), measure_threads=1)._call_costs().threads == 1 and measured == [2, 1]
    finally:
        torch.set_num_threads(before)
    # A tight budget (3 ms/image at 1 ms per predictor call per image): both ranks search the same candidates.
    space = SearchSpace.from_text(heun="1:2", pseudo="0", refiner="0", euler="", grids="uniform", vnorm_c="")
    cands, _ = space.candidates(cfg=1.5, guidance_channels=None, has_refiner=False)
    searched0, _ = zero._within_budget(cands, costs0)
    searched1, _ = one._within_budget(cands, costs1)
    assert [c.name for c in searched0] == [c.name for c in searched1] == ["H1@uniform"]  # H2 (4 calls) is out
    # single process: nothing is changed (the process's own thread count is used)
    assert _bare_tuner(Ranks())._measuring_threads() is None


def _report(budget_value: float, unit: str = "ms/image") -> dict:
    def row(name, fid, price, measured, fixed=True):
        return {"name": name, "score": fid, "price_ms_per_image": price, "measured_ms_per_image": measured,
                "num_samples": 40, "schedule": {"steps": name} if fixed else None}

    return {"budget": {"value": budget_value, "unit": unit}, "rungs": [20, 40], "metric": "domain-fid",
            "recommended": "vnorm-C0.3", "recommended_fixed": "H3@uniform",
            "candidates": [row("H1@uniform", 9.0, 1.0, 1.1), row("H2@uniform", 5.0, 2.0, 2.4),
                           row("H3@uniform", 3.0, 2.9, 3.6), row("vnorm-C0.3", 2.0, 2.8, 3.9, fixed=False),
                           row("H4@uniform", 1.0, 4.0, None)]}


def test_measured_latency_over_the_budget_is_flagged_and_replaced():
    report = _report(3.0)
    apply_measured_budget(report)
    check = report["latency_check"]
    assert check["checked"] and check["budget_ms"] == 3.0 and check["within_budget"] is True
    # both recommendations measured over 3 ms: the best measured that fits (H2, 2.4 ms) replaces them
    assert report["recommended"] == report["recommended_fixed"] == "H2@uniform"
    assert check["replaced"]["recommended"] == {"priced": "vnorm-C0.3", "measured_ms_per_image": 3.9,
                                                "replaced_by": "H2@uniform"}
    assert check["replaced"]["recommended_fixed"]["priced"] == "H3@uniform"
    assert len(check["warnings"]) == 2 and "measured 3.90 ms/image, over the budget of 3 ms/image" in \
        check["warnings"][0]
    rows = {r["name"]: r for r in report["candidates"]}
    assert rows["H3@uniform"]["measured_within_budget"] is False and rows["H4@uniform"]["measured_within_budget"] is None
    # nothing measured fits: the recommendation stays, loudly
    report = _report(1.0)
    apply_measured_budget(report)
    assert report["recommended"] == "vnorm-C0.3" and report["latency_check"]["within_budget"] is False
    assert "no measured candidate fits" in report["latency_check"]["warnings"][0]
    # within the budget: nothing changes, no warning
    report = _report(5.0)
    apply_measured_budget(report)
    assert report["recommended"] == "vnorm-C0.3" and report["latency_check"]["warnings"] == []
    # a budget in predictor calls is not a latency: not checked
    report = _report(3.0, unit="predictor-call equivalents")
    apply_measured_budget(report)
    assert not report["latency_check"]["checked"] and report["recommended"] == "vnorm-C0.3"


@pytest.fixture(scope="module")
def default_pipe():
    from flowturbo.runtime.pytorch_backend import load_pipeline

    return load_pipeline(None, device="cpu")


def _stub_extractor():
    return SimpleNamespace(identity=lambda: "stub-features", dim=128)


def test_weights_digest_covers_every_byte_and_resume_with_other_weights_is_refused(tmp_path, default_pipe):
    tuner = Tuner(TuneConfig(model="m"), default_pipe, _stub_extractor(), cache_dir=tmp_path,
                  state_path=tmp_path / "state.json", progress=False)
    tuner._load_or_start_state(None)
    tuner._save_state()
    name, tensor = max(default_pipe.predictor.state_dict().items(), key=lambda kv: kv[1].numel())
    assert tensor.numel() * tensor.element_size() > 4096
    before = tensor.reshape(-1)[-1].item()
    try:
        with torch.no_grad():
            tensor.reshape(-1)[-1] += 1.0  # beyond the first 4096 bytes
        assert weights_digest(default_pipe) != tuner.weights_digest
        other = Tuner(TuneConfig(model="m"), default_pipe, _stub_extractor(), cache_dir=tmp_path,
                      state_path=tmp_path / "state.json", resume=True, progress=False)
        assert other.cache != tuner.cache  # features of other weights are never reused
        with pytest.raises(FlowTurboError, match=r"other settings: weights \("):
            other._load_or_start_state(None)
    finally:
        with torch.no_grad():
            tensor.reshape(-1)[-1] = before
    assert weights_digest(default_pipe) == tuner.weights_digest


def test_latency_on_cuda_runs_the_samplers_graph_path(tmp_path, default_pipe):
    """On CUDA the front's latency is measured on `flowturbo sample`'s default path (one CUDA graph for the
    schedule + decode); here with the capture stand-in, on the CPU. The rule is not capturable: eager."""
    from micro_models import counting_graph_backend

    backend = counting_graph_backend()
    config = TuneConfig(model="m", latency_batch=2, latency_repeats=1)
    space = SearchSpace.from_text(heun="1", pseudo="0", refiner="0", euler="", grids="uniform", vnorm_c="0.5")
    cands, _ = space.candidates(cfg=1.5, guidance_channels=None, has_refiner=True)
    report = {"front": ["H1@uniform", "vnorm-C0.5"], "family_fronts": {}, "recommended": "H1@uniform",
              "recommended_fixed": "H1@uniform",
              "candidates": [{"name": c.name, "baseline": False, "score": 1.0} for c in cands]}
    tuner = Tuner(config, default_pipe, _stub_extractor(), cache_dir=tmp_path, progress=False, cuda_graph=True,
                  graph_backend=backend)
    tuner._measure_latencies(report, cands)
    rows = {r["name"]: r for r in report["candidates"]}
    assert rows["H1@uniform"]["measured_path"] == "cuda-graph" and backend.captures == 1
    assert rows["vnorm-C0.5"]["measured_path"] == "eager"
    assert rows["H1@uniform"]["measured_ms_per_image"] > 0 and rows["vnorm-C0.5"]["measured_ms_per_image"] > 0
    eager = Tuner(config, default_pipe, _stub_extractor(), cache_dir=tmp_path, progress=False)  # CPU default
    eager._measure_latencies(report, cands)
    assert {r["measured_path"] for r in report["candidates"]} == {"eager"}


# ------------------------------------------------------------------------------------------- refusals
def test_too_few_samples_is_refused_with_the_minimum(tmp_path, capsys):
    assert main(["tune", "--budget-ms", "50", "--num-samples", "100", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "at least 500" in err and not (tmp_path / "o").exists()


def test_inception_fid_needs_more_samples_than_its_feature_dimensions(tmp_path, capsys):
    from flowturbo.training.evaluation import MIN_METRIC_SAMPLES
    from flowturbo.training.evaluation.features import INCEPTION_DIM

    assert main(["tune", "--budget-ms", "50", "--metric", "inception-fid", "--num-samples", "1000",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: --metric inception-fid needs" in err[0] and f"at least {INCEPTION_DIM + 1} samples" in err[0]
    assert not (tmp_path / "o").exists()
    with pytest.raises(FlowTurboError, match=f"at least {INCEPTION_DIM + 1}"):
        check_metric_samples(INCEPTION_DIM, "inception-fid", allow_small_sample=False)
    assert check_metric_samples(INCEPTION_DIM + 1, "inception-fid", allow_small_sample=False) is None
    assert "WARNING" in check_metric_samples(100, "inception-fid", allow_small_sample=True)
    # domain-fid keeps the evaluation's general rule
    assert check_metric_samples(MIN_METRIC_SAMPLES, "domain-fid", allow_small_sample=False) is None
    with pytest.raises(FlowTurboError, match=f"at least {MIN_METRIC_SAMPLES}"):
        check_metric_samples(MIN_METRIC_SAMPLES - 1, "domain-fid", allow_small_sample=False)


def _rule_only(*extra: str) -> list[str]:
    args = list(TINY)
    args[args.index("--heun") + 1] = "0"
    args[args.index("--pseudo") + 1] = "0"  # no fixed schedule: only the velocity-norm rule
    return [*args, *extra]


def test_rule_only_space_below_its_fewest_calls_is_refused(tmp_path, cache, capsys):
    # the rule takes at least ceil(1/0.25) = 4 steps = 5 predictor calls: a 3-call budget cannot fit
    assert main([*_rule_only("--budget-calls", "3"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "below the cheapest candidate, vnorm-C0.5 at 5.00 predictor-call equivalents or more" \
        in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.timeout(TIMEOUT_S)
def test_rule_only_space_that_fits_nothing_after_the_search_is_refused(tmp_path, cache, capsys):
    # C = 0.01 clips dt to 0.02 (50 steps, ~51 calls): its fewest calls (5) fit 6, what it takes does not
    args = _rule_only("--budget-calls", "6")
    args[args.index("--vnorm-c") + 1] = "0.01"
    assert main([*args, "--out", str(tmp_path / "o"), "--cache", str(cache)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert ("error: no candidate fits the budget of 6 predictor-call equivalents: the cheapest scored, "
            "vnorm-C0.01, costs") in err[-1], err[-1]
    assert not (tmp_path / "o").exists()


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
def test_tune_end_to_end_then_resume_after_a_kill(tmp_path, cache, capsys, default_pipe):
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
    assert rec["score"] == min(r["score"] for r in finals)
    assert rows["H2P1@uniform"]["predictor_calls"] == 5 and rows["vnorm-C0.5"]["predictor_calls"] > 0
    for name in report["front"]:
        assert rows[name]["measured_ms_per_image"] is not None and rows[name]["price_ms_per_image"] is not None
        assert rows[name]["measured_path"] == "eager"  # CPU
    check = report["latency_check"]  # a 1000 ms budget: the measured latency fits, nothing replaced
    assert check["checked"] and check["within_budget"] and check["replaced"] == {} and "over the budget" not in printed
    assert report["settings"]["weights"] == weights_digest(default_pipe)
    assert report["costs"]["threads"] == 1 and report["costs"]["path"] == "eager"  # --threads 1
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
    assert resumed["timings"]["evaluations"] == sum(len(r["scores"]) for r in report["candidates"]) - 3
    assert {r["name"]: r["scores"] for r in resumed["candidates"]} == {r["name"]: r["scores"] for r in report["candidates"]}
    assert resumed["front"] == report["front"] and resumed["recommended"] == report["recommended"]
