"""The one step loop (flowturbo.integrator): hooks, what each step carries, grids, call times."""

from __future__ import annotations

import pytest
import torch
from tolerances import tol

from flowturbo.errors import ScheduleError
from flowturbo.integrator import IntegratorState, StepHooks, StepInfo, call_times, carries_halves, integrate
from flowturbo.kernels import SolverOps
from flowturbo.schedule import SamplingSchedule, StepKind


class FieldCalls:
    """Already-guided (B-row) velocities of a smooth field; records every call as (kind, t)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, float]] = []

    def predictor(self, x: torch.Tensor, t: float) -> torch.Tensor:
        self.log.append(("p", t))
        return torch.sin(x) * (1.0 + t) - 0.5 * x

    def refiner(self, x: torch.Tensor, t: float, v: torch.Tensor) -> torch.Tensor:
        self.log.append(("r", t))
        return 0.1 * torch.tanh(x - v) * t


class Recorder(StepHooks):
    def __init__(self) -> None:
        self.events: list[tuple[str, int, StepKind, float, float, bool]] = []

    def before_step(self, step: StepInfo, state: IntegratorState) -> None:
        self.events.append(("before", step.index, step.kind, step.t_start, step.t_end, state.carried is None))

    def after_step(self, step: StepInfo, state: IntegratorState) -> None:
        self.events.append(("after", step.index, step.kind, step.t_start, step.t_end, state.carried is None))


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.3


def test_hooks_run_once_per_step_in_order_and_see_what_is_carried():
    schedule = SamplingSchedule.parse("EPHPRR")
    first, second = Recorder(), Recorder()
    integrate(schedule, _x(), FieldCalls(), SolverOps(), hooks=[first, second])
    assert first.events == second.events
    expected = []
    for k, kind in enumerate(schedule.steps):
        t0, t1 = schedule.timesteps[k], schedule.timesteps[k + 1]
        carried_before = k == 0 or schedule.steps[k - 1] is StepKind.EULER
        expected.append(("before", k, kind, t0, t1, carried_before))
        expected.append(("after", k, kind, t0, t1, kind is StepKind.EULER))  # E carries nothing, others do
    assert first.events == expected


def test_p_after_e_evaluates_its_own_d_and_calls_match_the_schedule():
    schedule = SamplingSchedule.parse("EPPRH")
    calls = FieldCalls()
    result = integrate(schedule, _x(), calls, SolverOps())
    assert result.predictor_calls == schedule.predictor_calls == 1 + 2 + 1 + 2
    assert result.refiner_calls == schedule.refiner_calls == 2
    t = schedule.timesteps
    assert calls.log[:4] == [("p", t[0]), ("p", t[1]), ("p", t[2]), ("p", t[3])]  # E, then P (2 calls), P (1)
    assert calls.log[4:6] == [("r", t[3]), ("r", t[4])]  # R at t_k and t_k+1


class Paste(StepHooks):
    """Replaces x after every step (what inpainting does), recording what the next step started from."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value
        self.starts: list[torch.Tensor] = []
        self.carried: list[torch.Tensor | None] = []

    def before_step(self, step: StepInfo, state: IntegratorState) -> None:
        self.starts.append(state.x)
        self.carried.append(state.carried)

    def after_step(self, step: StepInfo, state: IntegratorState) -> None:
        self.carried_after = state.carried
        state.x = self.value * (step.index + 1)


def test_a_hook_replacing_x_moves_the_next_step_and_keeps_the_carried_velocity():
    schedule = SamplingSchedule.parse("HPR")
    paste = Paste(_x(1))
    result = integrate(schedule, _x(), FieldCalls(), SolverOps(), hooks=[paste])
    torch.testing.assert_close(paste.starts[1], paste.value * 1, **tol(torch.float64))
    torch.testing.assert_close(paste.starts[2], paste.value * 2, **tol(torch.float64))
    torch.testing.assert_close(result.x, paste.value * 3, **tol(torch.float64))
    # The P step reuses the H step's d' unchanged: its x update from the pasted x equals a hand computation.
    plain = integrate(SamplingSchedule.parse("H"), _x(), FieldCalls(), SolverOps(), timesteps=[0.0, 1 / 3])
    torch.testing.assert_close(paste.carried[1], plain.carried, **tol(torch.float64))


def test_custom_grid_is_walked_and_bad_grids_are_refused():
    schedule = SamplingSchedule.parse("H2P1")
    grid = (0.4, 0.55, 0.8, 1.0)  # e.g. editing: the grid rescaled onto [0.4, 1]
    calls = FieldCalls()
    result = integrate(schedule, _x(), calls, SolverOps(), timesteps=grid)
    assert result.timesteps == grid and calls.log[0] == ("p", 0.4)
    with pytest.raises(ScheduleError, match="needs 4 times"):
        integrate(schedule, _x(), calls, SolverOps(), timesteps=(0.0, 1.0))
    with pytest.raises(ScheduleError, match="strictly increasing"):
        integrate(schedule, _x(), calls, SolverOps(), timesteps=(0.0, 0.5, 0.5, 1.0))


@pytest.mark.parametrize("spec", ["H1P5R3", "EPPH", "E3P2", "PPR", "HRPR"])
def test_call_times_are_the_times_the_loop_calls(spec):
    schedule = SamplingSchedule.parse(spec)
    calls = FieldCalls()
    integrate(schedule, _x(), calls, SolverOps())
    pred, ref = call_times(schedule)
    assert pred == tuple(sorted({t for kind, t in calls.log if kind == "p"}))
    assert ref == tuple(sorted({t for kind, t in calls.log if kind == "r"}))


@pytest.mark.parametrize("scale,channels,spec,latent,expected", [
    (4.0, 3, "H1P5R3", 4, True),    # official checkpoints: partial guidance with R steps
    (4.0, 3, "H8", 4, False),       # no R step reads the second half
    (4.0, None, "H1P5R3", 4, False),  # all channels guided: both halves equal
    (4.0, 4, "H1P5R3", 4, False),
    (1.0, 3, "H1P5R3", 4, False),   # no guidance
])
def test_carry_rule(scale, channels, spec, latent, expected):
    schedule = SamplingSchedule.parse(spec, guidance_scale=scale, guidance_channels=channels)
    assert carries_halves(schedule, latent) is expected
