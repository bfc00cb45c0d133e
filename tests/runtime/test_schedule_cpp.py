"""The C++ schedule struct (flowturbo._C.Schedule) agrees with the Python SamplingSchedule."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from flowturbo.errors import ScheduleError
from flowturbo.schedule import SamplingSchedule

_C = pytest.importorskip("flowturbo._C", reason="the C++ extension is not built (pip install failed to compile it?)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_schedule import _random_schedule  # noqa: E402

from flowturbo.integrator import carries_halves  # noqa: E402


def test_parity_on_many_random_schedules():
    rng = random.Random(1)
    for _ in range(500):
        py = _random_schedule(rng)
        cpp = _C.Schedule.parse(py.step_string, py.guidance_scale, py.guidance_channels, list(py.timesteps))
        assert cpp.canonical_json() == py.canonical_json()
        assert cpp.id == py.id
        assert cpp.describe_json() == py.to_json()
        assert (cpp.predictor_calls, cpp.refiner_calls) == (py.predictor_calls, py.refiner_calls)
        assert cpp.step_calls() == [tuple(c) for c in py.step_calls()]
        assert cpp.notation == py.notation
        for channels in (1, 3, 4, 8):  # the carry rule of flowturbo.integrator, mirrored
            assert cpp.carries_halves(channels) == carries_halves(py, channels)
        back = _C.Schedule.from_json(py.to_json())
        assert back.id == py.id and back.timesteps == list(py.timesteps)
        assert SamplingSchedule.from_json(cpp.describe_json()) == py


@pytest.mark.parametrize("spec", ["R3", "E1R1", "H1X2", "", "H0", "1H", "H5000", "HPQ", "h2x"])
def test_same_refusals_same_messages(spec):
    with pytest.raises(ScheduleError) as py_err:
        SamplingSchedule.parse(spec)
    with pytest.raises(ScheduleError) as cpp_err:
        _C.Schedule.parse(spec)
    assert str(cpp_err.value) == str(py_err.value)


def test_json_refusals():
    with pytest.raises(ScheduleError, match="strictly increasing"):
        _C.Schedule.from_json('{"steps": "H3", "timesteps": [0, 0.5, 0.5, 1]}')
    with pytest.raises(ScheduleError, match="predictor_calls"):
        _C.Schedule.from_json('{"steps": "H2", "predictor_calls": 3}')
    with pytest.raises(ScheduleError, match="unknown keys"):
        _C.Schedule.from_json('{"steps": "H2", "bogus": 1}')
    with pytest.raises(ScheduleError, match="does not parse"):
        _C.Schedule.from_json("{not json")


@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 1 / 3, 1e-5, 0.0001, 1e16, 1e15, 123456.789, 2.5e-300, 7.0])
def test_float_repr_matches_python(value):
    assert _C.python_float_repr(value) == repr(value)
