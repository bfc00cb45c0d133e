"""SamplingSchedule: parsing, validation, call counts, JSON round trip, stable id."""

from __future__ import annotations

import json
import random

import pytest

from flowturbo.errors import ScheduleError
from flowturbo.schedule import PRESETS, SamplingSchedule, StepKind, parse_steps


@pytest.mark.parametrize(
    "spec,steps,predictor,refiner",
    [
        ("H1P5R3", "HPPPPPRRR", 7, 6),
        ("HPPPPPRRR", "HPPPPPRRR", 7, 6),
        ("H2P4R2", "HHPPPPRR", 8, 4),
        ("H8P9R5", "H" * 8 + "P" * 9 + "R" * 5, 25, 10),
        ("H8", "H" * 8, 16, 0),
        ("E10", "E" * 10, 10, 0),
        ("P3", "PPP", 4, 0),  # a leading P has nothing carried: it costs 2 calls
        ("E2P2", "EEPP", 5, 0),  # Euler carries nothing either
        ("h1p2r1", "HPPR", 4, 2),
        (" H2 ", "HH", 4, 0),
        ("H0P2", "PP", 3, 0),
    ],
)
def test_parse_and_counts(spec, steps, predictor, refiner):
    schedule = SamplingSchedule.parse(spec)
    assert schedule.step_string == steps
    assert (schedule.predictor_calls, schedule.refiner_calls) == (predictor, refiner)
    assert sum(p for p, _ in schedule.step_calls()) == predictor
    assert schedule.timesteps == tuple(k / len(steps) for k in range(len(steps) + 1))


def test_notation_is_run_length():
    assert SamplingSchedule.parse("HPPPPPRRR").notation == "H1P5R3"
    assert SamplingSchedule.parse("HPRPR").notation == "H1P1R1P1R1"


@pytest.mark.parametrize(
    "spec,message",
    [
        ("R3", "step 1 is R"),
        ("E1R1", "step 2 is R .* E \\(Euler\\)"),
        ("H1X2", "unknown step letter 'X' at position 2"),
        ("", "empty schedule"),
        ("H0", "zero steps"),
        ("1H", "unknown step letter '1'"),
        ("H5000", "more than 4096 steps"),
    ],
)
def test_bad_specs_refused(spec, message):
    with pytest.raises(ScheduleError, match=message):
        SamplingSchedule.parse(spec)


@pytest.mark.parametrize(
    "grid,message",
    [
        ([0.0, 0.5, 0.5, 1.0], "strictly increasing"),
        ([0.0, 0.7, 0.3, 1.0], "strictly increasing"),
        ([0.1, 0.4, 0.7, 1.0], "start at 0 and end at 1"),
        ([0.0, 0.4, 1.0], "needs 4 timesteps"),
        ([0.0, float("nan"), 0.6, 1.0], "finite"),
        ("0123", "sequence of numbers"),
    ],
)
def test_bad_grids_refused(grid, message):
    with pytest.raises(ScheduleError, match=message):
        SamplingSchedule.parse("H3", timesteps=grid)


def test_custom_grid_and_guidance():
    schedule = SamplingSchedule.parse("H2P1", timesteps=[0, 0.2, 0.65, 1], guidance_scale=4, guidance_channels=3)
    assert schedule.timesteps == (0.0, 0.2, 0.65, 1.0)
    assert schedule.guidance_scale == 4.0 and schedule.guidance_channels == 3
    with pytest.raises(ScheduleError, match="guidance_scale"):
        schedule.with_guidance(-1.0)
    with pytest.raises(ScheduleError, match="guidance_channels"):
        schedule.with_guidance(2.0, 0)


def _random_schedule(rng: random.Random) -> SamplingSchedule:
    n_h, n_p, n_r = rng.randint(0, 4), rng.randint(0, 6), rng.randint(0, 4)
    if n_h + n_p == 0:
        n_p = 1
    spec = f"H{n_h}P{n_p}R{n_r}" if rng.random() < 0.5 else rng.choice("EHP") + "".join(
        rng.choice("EHPR") for _ in range(rng.randint(0, 8)))
    spec = spec.replace("ER", "EH")
    n = len(parse_steps(spec))
    grid = None
    if rng.random() < 0.5:
        inner = sorted(rng.sample(range(1, 10_000), n - 1))
        grid = [0.0] + [i / 10_000 for i in inner] + [1.0]
    return SamplingSchedule.parse(
        spec, timesteps=grid, guidance_scale=rng.choice([1.0, 1.5, 4.0, 0.1 + rng.random() * 9]),
        guidance_channels=rng.choice([None, 3, 4]),
    )


def test_json_round_trip_and_stable_id():
    rng = random.Random(0)
    for _ in range(200):
        schedule = _random_schedule(rng)
        again = SamplingSchedule.from_json(schedule.to_json())
        assert again == schedule and again.id == schedule.id
        assert SamplingSchedule.from_json(schedule.canonical_json()) == schedule
    a = SamplingSchedule.parse("H1P5R3", guidance_scale=4.0)
    assert a.id == SamplingSchedule.parse("HPPPPPRRR", guidance_scale=4).id
    assert a.id != SamplingSchedule.parse("H1P5R3", guidance_scale=4.5).id
    assert len(a.id) == 16 and int(a.id, 16) >= 0


def test_describe_has_the_cli_fields():
    info = json.loads(SamplingSchedule.parse("H1P5R3").to_json())
    assert info["predictor_calls"] == 7 and info["refiner_calls"] == 6
    assert info["steps"] == "HPPPPPRRR" and len(info["timesteps"]) == 10 and info["id"]


def test_inconsistent_json_refused():
    data = json.loads(SamplingSchedule.parse("H2").to_json())
    data["predictor_calls"] = 3
    with pytest.raises(ScheduleError, match="predictor_calls"):
        SamplingSchedule.from_dict(data)
    with pytest.raises(ScheduleError, match="unknown keys"):
        SamplingSchedule.from_dict({"steps": "H2", "bogus": 1})
    with pytest.raises(ScheduleError, match="does not parse"):
        SamplingSchedule.from_json("{not json")


def test_presets_parse():
    for name, spec in PRESETS.items():
        assert SamplingSchedule.parse(name) == SamplingSchedule.parse(spec)
    assert StepKind("R").label == "refiner"
