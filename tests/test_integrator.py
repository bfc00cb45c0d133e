"""The one step loop (flowturbo.integrator): hooks, what each step carries, grids, call times, the refiner's dt
(the age of its velocity), and every step kind's arithmetic against a float64 reference on the micro models."""

from __future__ import annotations

import pytest
import torch
from micro_models import MICRO_LATENT, SENSITIVITY_FACTOR, micro_models
from tolerances import tol

from flowturbo.errors import ScheduleError
from flowturbo.integrator import (
    IntegratorState,
    RefinerCall,
    StepHooks,
    StepInfo,
    call_times,
    carries_halves,
    integrate,
    refiner_call_plan,
)
from flowturbo.kernels import SolverOps
from flowturbo.schedule import SamplingSchedule, StepKind
from flowturbo.training.sampling import CFGModelCalls, solver_ops_for


class FieldCalls:
    """Already-guided (B-row) velocities of a smooth field; records every call as (kind, t) and the refiner's dts."""

    def __init__(self) -> None:
        self.log: list[tuple[str, float]] = []
        self.dts: list[float] = []

    def predictor(self, x: torch.Tensor, t: float) -> torch.Tensor:
        self.log.append(("p", t))
        return torch.sin(x) * (1.0 + t) - 0.5 * x

    def refiner(self, x: torch.Tensor, t: float, v: torch.Tensor, dt: float) -> torch.Tensor:
        self.log.append(("r", t))
        self.dts.append(dt)
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


# ------------------------------------------------------------------------------------------ the refiner's dt
GRID = (0.0, 0.1, 0.25, 0.45, 0.7, 0.85, 1.0)  # uneven, so every step size differs


def test_the_refiner_gets_the_age_of_its_velocity():
    """After an H or P step the velocity was evaluated at t_k (the predicted point): the R step's calls get dt = 0
    and h. After an R step it estimates t_k of that step: h_prev and h_prev + h. The plan lists the same."""
    schedule = SamplingSchedule.parse("HRRPRR", timesteps=GRID)
    calls = FieldCalls()
    integrate(schedule, _x(), calls, SolverOps())
    t = GRID
    want = [  # (step, t, dt, t_v)
        (1, t[1], 0.0, t[1]), (1, t[2], t[2] - t[1], t[1]),  # R after H
        (2, t[2], t[2] - t[1], t[1]), (2, t[3], t[3] - t[1], t[1]),  # R after R: its velocity estimates t_1
        (4, t[4], 0.0, t[4]), (4, t[5], t[5] - t[4], t[4]),  # R after P
        (5, t[5], t[5] - t[4], t[4]), (5, t[6], t[6] - t[4], t[4]),
    ]
    assert [r for kind, r in calls.log if kind == "r"] == [w[1] for w in want]
    assert calls.dts == [w[2] for w in want]  # exactly: the same float subtraction
    assert refiner_call_plan(schedule) == tuple(RefinerCall(*w) for w in want)
    assert all(c.dt == c.t - c.velocity_time for c in refiner_call_plan(schedule))


def test_the_carried_time_is_part_of_the_state():
    seen = []

    class Look(StepHooks):
        def after_step(self, step: StepInfo, state: IntegratorState) -> None:
            seen.append(state.carried_time)

    integrate(SamplingSchedule.parse("EHRPE", timesteps=(0.0, 0.2, 0.3, 0.6, 0.8, 1.0)), _x(), FieldCalls(),
              SolverOps(), hooks=[Look()])
    assert seen == [None, 0.3, 0.3, 0.8, None]  # E: none; H/P: t_k+1; R: t_k


# ------------------------------------------------------------------------------- arithmetic vs float64 reference
class Reference:
    """Every step kind written out on the micro models in float64, independently of the library's CFG code: the
    guided velocity per CFG half (guided channels shared, unguided channels each half's own), the per-half carry,
    and the refiner's dt = the age of its velocity. Records the velocity ages it passes and x after every step."""

    def __init__(self, predictor, refiner, labels, scale, channels, age_rule=None):
        self.predictor, self.refiner, self.labels = predictor, refiner, labels
        self.scale, self.channels = scale, channels
        self.age_rule = age_rule or (lambda t, t_v, h: t - t_v)  # a test can swap in a wrong rule
        self.null = torch.full_like(labels, predictor.config.num_classes)

    def _halves(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) guided velocities, (B, C, H, W) each."""
        b, c = self.labels.shape[0], MICRO_LATENT[0]
        if self.scale == 1.0:
            return raw[:, :c], raw[:, :c]
        cond, uncond = raw[:b, :c], raw[b:, :c]
        g = c if self.channels is None else self.channels
        mixed = uncond[:, :g] + self.scale * (cond[:, :g] - uncond[:, :g])  # u + s (c - u)
        return torch.cat([mixed, cond[:, g:]], 1), torch.cat([mixed, uncond[:, g:]], 1)

    def _rows(self, *tensors):
        if self.scale == 1.0:
            return tensors[0], self.labels
        return torch.cat(tensors), torch.cat([self.labels, self.null])

    def pred(self, x, t):
        xx, yy = self._rows(x, x)
        return self._halves(self.predictor(xx, torch.full((xx.shape[0],), t, dtype=x.dtype), yy))

    def ref(self, x, t, v, dt):
        xx, yy = self._rows(x, x)
        vv, _ = self._rows(v[0], v[1])
        tt = torch.full((xx.shape[0],), t, dtype=x.dtype)
        age = (torch.full_like(tt, dt),) if self.refiner.takes_dt else ()
        return self._halves(self.refiner(xx, tt, yy, vv, *age))

    def run(self, schedule: SamplingSchedule, x: torch.Tensor):
        carried, t_v, xs, self.ages = None, None, [], []
        grid = schedule.timesteps
        for k, kind in enumerate(schedule.steps):
            t0, t1 = grid[k], grid[k + 1]
            h = t1 - t0
            if kind is StepKind.EULER:
                x = x + h * self.pred(x, t0)[0]
                carried = t_v = None
            elif kind is StepKind.REFINER:
                ages = (self.age_rule(t0, t_v, h), self.age_rule(t1, t_v, h))
                self.ages += ages
                r1 = self.ref(x, t0, carried, ages[0])
                d = (carried[0] + r1[0], carried[1] + r1[1])  # d = v + r(x, t_k, v), per half
                x_pred = x + h * d[0]
                d2 = d[0] + self.ref(x_pred, t1, carried, ages[1])[0]  # d' = d + r(x~, t_k+1, v): the incoming v
                x = x + h / 2 * (d[0] + d2)
                carried, t_v = d, t0
            else:
                d = carried if kind is StepKind.PSEUDO and carried is not None else self.pred(x, t0)
                x_pred = x + h * d[0]
                d2 = self.pred(x_pred, t1)
                x = x + h / 2 * (d[0] + d2[0])
                carried, t_v = d2, t1
            xs.append(x)
        return xs


class EveryX(StepHooks):
    def __init__(self):
        self.xs = []

    def after_step(self, step: StepInfo, state: IntegratorState) -> None:
        self.xs.append(state.x)


# E, P without a carry (after E), H, P with a carry, R after P, R after R, R after H; and the same on uneven grids.
SCHEDULES = [("EPHPRR", None), ("HRRPR", None), ("HRPRR", GRID[:1] + GRID[2:])]
GUIDANCE = [(1.7, 2), (1.7, None), (1.0, None)]  # partial (per-half carry), full, none


@pytest.mark.parametrize("dt_conditioning", [True, False], ids=["dt-refiner", "official-refiner"])
@pytest.mark.parametrize("scale,channels", GUIDANCE, ids=["partial-cfg", "full-cfg", "no-cfg"])
@pytest.mark.parametrize("spec,grid", SCHEDULES, ids=[s for s, _ in SCHEDULES])
def test_every_step_kind_matches_the_float64_reference(spec, grid, scale, channels, dt_conditioning):
    predictor, refiner = micro_models(3, dt_conditioning=dt_conditioning, dtype=torch.float64)
    schedule = SamplingSchedule.parse(spec, guidance_scale=scale, guidance_channels=channels, timesteps=grid)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(3, *MICRO_LATENT, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 4])
    calls = CFGModelCalls(predictor, refiner, labels, predictor.config.num_classes, scale != 1.0)
    steps = EveryX()
    with torch.no_grad():
        result = integrate(schedule, x0, calls, solver_ops_for(schedule, MICRO_LATENT[0]), hooks=[steps])
        reference = Reference(predictor, refiner, labels, scale, channels)
        want = reference.run(schedule, x0)
    assert carries_halves(schedule, MICRO_LATENT[0]) is (channels is not None and scale != 1.0)
    for k, (got, expected) in enumerate(zip(steps.xs, want)):
        torch.testing.assert_close(got, expected, **tol(torch.float64), msg=lambda m, k=k: f"step {k + 1}: {m}")
    assert reference.ages == [c.dt for c in refiner_call_plan(schedule)]


def test_the_reference_comparison_bites():
    """The micro models are strong enough that a wrong dt (the step size instead of the velocity's age) or the
    refiner's CFG halves swapped move the result far beyond the float64 tolerance: the test above would fail."""
    predictor, refiner = micro_models(3, dt_conditioning=True, dtype=torch.float64)
    schedule = SamplingSchedule.parse("HRR", guidance_scale=1.7, guidance_channels=2)
    x0 = torch.randn(2, *MICRO_LATENT, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    labels = torch.tensor([1, 2])
    floor = SENSITIVITY_FACTOR * tol("export_fp32")["atol"]
    with torch.no_grad():
        right = Reference(predictor, refiner, labels, 1.7, 2).run(schedule, x0)[-1]
        step_size = Reference(predictor, refiner, labels, 1.7, 2, age_rule=lambda t, t_v, h: h).run(schedule, x0)[-1]
        swapped = Reference(predictor, refiner, labels, 1.7, 2)
        ref = swapped.ref
        swapped.ref = lambda x, t, v, dt: ref(x, t, (v[1], v[0]), dt)  # unconditional half to the conditional rows
        assert (right - step_size).abs().max() >= floor
        assert (right - swapped.run(schedule, x0)[-1]).abs().max() >= floor
