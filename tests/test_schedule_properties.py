"""Property-based tests (hypothesis) of the schedule parser: any input gives a schedule or a ScheduleError.

Example counts are small and derandomized (fixed seed): this runs in seconds and never flakes.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from flowturbo.errors import ScheduleError
from flowturbo.schedule import SamplingSchedule

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True)
# Text that is often almost a schedule: step letters (any case), counts, presets, separators, odd characters.
SCHEDULE_LIKE = st.one_of(
    st.text(),
    st.text(alphabet="EHPRehpr0123456789 _-,.+:\t\n\u00e9\u0661", max_size=16),
    st.sampled_from(["H1P5R3", "flowturbo-fast", "heun24", "R3", "H0", "H99999999999999999999", "P1", "E", ""]),
)


def _parse(text: str, **kwargs) -> SamplingSchedule | None:
    try:
        schedule = SamplingSchedule.parse(text, **kwargs)
    except ScheduleError as exc:
        assert str(exc), "a ScheduleError must say what is wrong"
        return None
    return schedule


@SETTINGS
@given(SCHEDULE_LIKE)
def test_any_string_is_a_schedule_or_a_schedule_error(text):
    schedule = _parse(text)
    if schedule is not None:  # a parsed schedule is consistent and round-trips
        assert len(schedule.timesteps) == len(schedule.steps) + 1
        assert schedule.timesteps[0] == 0.0 and schedule.timesteps[-1] == 1.0
        assert SamplingSchedule.from_json(schedule.to_json()) == schedule
        assert SamplingSchedule.parse(schedule.notation) == schedule


@SETTINGS
@given(
    SCHEDULE_LIKE,
    st.floats(allow_nan=True, allow_infinity=True),
    st.one_of(st.none(), st.integers(min_value=-3, max_value=2**70)),
    st.one_of(st.none(), st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=12)),
)
def test_any_guidance_and_grid_is_a_schedule_or_a_schedule_error(text, scale, channels, grid):
    schedule = _parse(text, guidance_scale=scale, guidance_channels=channels, timesteps=grid)
    if schedule is not None:
        assert math.isfinite(schedule.guidance_scale)
        assert all(a < b for a, b in zip(schedule.timesteps, schedule.timesteps[1:]))
        assert SamplingSchedule.from_json(schedule.to_json()) == schedule


@SETTINGS
@given(st.text(max_size=200))
def test_any_json_text_is_a_schedule_or_a_schedule_error(text):
    try:
        SamplingSchedule.from_json(text)
    except ScheduleError:
        pass
