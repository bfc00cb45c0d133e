"""The one FlowTurbo step loop (DESIGN.md §2): what E / H / P / R compute and what each step carries.

Every sampler in flowturbo walks a schedule through :func:`integrate`: the PyTorch sampler (reference
ops or fused Triton ops, eager or inside a CUDA graph), the Python loops of the exported backends (ONNX
Runtime, AOTInductor, TensorRT) and the ``unrolled`` export (traced once into a graph). The C++ runner
(``runtime/csrc/runner.cpp``) is a mirror of this loop, its parity pinned by tests.

This module is torch-free: tensors are whatever the two injected objects work on.

* ``calls`` (:class:`ModelCalls`) runs the models: ``predictor(x, t) -> raw`` and
  ``refiner(x, t, v, dt) -> raw`` (``dt``: the age of ``v``, see *The refiner's dt* below). ``raw`` is either the model output on the CFG-doubled batch ``[x; x]`` with
  labels ``[y; null]`` (2B rows, combined by the ops) or an already guided velocity (B rows, e.g. from an
  exported graph with the guidance inside).
* ``ops`` (:class:`SolverOps`) does the arithmetic, guidance combination included:
  ``predict(raw, x, h, base) -> (d, x + h d)`` with ``d = base + g(raw)``,
  ``correct(raw, x, d, h, base) -> (x + h/2 (d + d2), d2)`` with ``d2 = base + g(raw)``, and
  ``advance(x, d, h) -> x + h d``. Reference torch ops and fused Triton ops
  (``flowturbo.kernels.solver``) implement it; ``h`` is a Python float.

Steps, with ``h = t_{k+1} - t_k`` (DESIGN.md §2):

* **E** (Euler, 1 predictor call): ``x <- x + h v(x, t_k)``. Carries **nothing**: a following P evaluates
  its own ``d`` (2 calls), an R after E is refused by schedule validation.
* **H** (Heun, 2 calls): ``d = v(x, t_k)``, ``x~ = x + h d``, ``d' = v(x~, t_{k+1})``,
  ``x <- x + h/2 (d + d')``. Carries ``d'``.
* **P** (pseudo corrector, 1 call): as H with ``d`` = the carried ``d'`` (evaluated at the previous step's
  *predicted* point). Nothing carried (first step, or after E): evaluates ``d`` itself (2 calls). Carries ``d'``.
* **R** (refiner, 2 refiner calls): with the carried ``v``: ``d = v + r(x, t_k, v)``, ``x~ = x + h d``,
  ``d' = d + r(x~, t_{k+1}, v)`` (the second call sees the *incoming* v, as the released
  ``models_assemble.py``), ``x <- x + h/2 (d + d')``. Carries ``d``.

**The refiner's dt** (``docs/refiner_dt.md``). Every carried velocity has a time ``t_v``: the time it estimates
the flow at. An H or P step on ``[t_k, t_{k+1}]`` carries ``d' = v(x~, t_{k+1})``, so ``t_v = t_{k+1}``; an R step
on ``[t_k, t_{k+1}]`` carries ``d = v + r(x, t_k, v)``, an estimate at ``t_k``, so ``t_v = t_k``; E carries
nothing. The refiner's ``dt`` input is the *age* of the velocity it is given, the time from ``t_v`` to its
query time: an R step calls ``r(x, t_k, v, dt = t_k - t_v)`` and ``r(x~, t_{k+1}, v, dt = t_{k+1} - t_v)`` (``v``
the incoming velocity in both). After an H/P step that is ``0`` and ``h``; after an R step ``h_prev`` and
``h_prev + h``. This is exactly the training objective (``x' = x_t + dt v_t``, queried at ``t + dt``, target the
teacher there), and the dt values are plain floats fixed by the schedule's grid
(:func:`refiner_call_plan` lists them), so CUDA graphs and exported graphs stay valid. A refiner without a dt
input ignores it (its calls are the released code's). The state's ``carried_time`` is ``t_v``.

**Velocity layout.** A carried velocity is (B, C, H, W) — or, with *partial* guidance (CFG on only the
first G < C channels, as the official checkpoints) in a schedule with R steps, (B, 2C, H, W): channels
``:C`` are the conditional half (guided channels, then the conditional unguided ones: what moves x) and
``C:`` the unconditional half (the same guided channels, then the unconditional half's own unguided
channels). The refiner's unconditional branch sees that second half, exactly as the released sampler
carries a doubled velocity per CFG half. See :func:`carries_halves`; the ops and the model calls follow it.

**Hooks** (:class:`StepHooks`) see every step before and after it runs, through the mutable
:class:`IntegratorState` (``x``, ``carried`` and its ``carried_time``). A hook may replace ``state.x`` (inpainting
pastes the known region at each step): the next step then starts from the new ``x`` while the carried velocity
stays what the models said at the old point — a following P or R step reuses it unchanged (it is an estimate of
the flow there, not a function of x; its time, hence the refiner's dt, is unchanged too), and H / E steps
re-evaluate the predictor at the new ``x``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

from flowturbo.errors import ScheduleError
from flowturbo.schedule import SamplingSchedule, StepKind

Tensor = Any  # a torch.Tensor (this module does not import torch)


class ModelCalls(Protocol):
    """The model evaluations a step needs; see the module docstring for what ``raw`` is."""

    def predictor(self, x: Tensor, t: float) -> Tensor: ...

    def refiner(self, x: Tensor, t: float, v: Tensor, dt: float) -> Tensor:
        """The refiner's raw offset at (x, t) for the carried velocity ``v`` of age ``dt`` (module docstring);
        a refiner without a dt input ignores ``dt``."""
        ...


class SolverOps(Protocol):
    """The arithmetic of a step, guidance combination included (reference torch or fused Triton)."""

    def predict(self, raw: Tensor, x: Tensor, h: float, base: Tensor | None = None) -> tuple[Tensor, Tensor]: ...

    def correct(self, raw: Tensor, x: Tensor, d: Tensor, h: float,
                base: Tensor | None = None) -> tuple[Tensor, Tensor]: ...

    def advance(self, x: Tensor, d: Tensor, h: float) -> Tensor: ...


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """One step as hooks see it: its index, kind, time interval and the calls it makes."""

    index: int
    kind: StepKind
    t_start: float
    t_end: float
    predictor_calls: int
    refiner_calls: int


@dataclasses.dataclass
class IntegratorState:
    """The loop's state between steps: latents ``x`` (B, C, H, W), the carried velocity (or None) and the time
    it estimates the flow at (``t_v``, None when nothing is carried; see *The refiner's dt*)."""

    x: Tensor
    carried: Tensor | None = None
    carried_time: float | None = None


@dataclasses.dataclass(frozen=True)
class RefinerCall:
    """One refiner call of a schedule: the step (index) it belongs to, its query time ``t``, the time ``t_v`` its
    velocity estimates the flow at and that velocity's age ``dt = t - t_v`` (module docstring)."""

    step: int
    t: float
    dt: float
    velocity_time: float


class StepHooks:
    """Per-step hooks; subclass and override what you need (the defaults do nothing)."""

    def before_step(self, step: StepInfo, state: IntegratorState) -> None:
        """Called before ``step`` runs; may replace ``state.x``."""

    def after_step(self, step: StepInfo, state: IntegratorState) -> None:
        """Called after ``step`` ran; may replace ``state.x``."""


@dataclasses.dataclass(frozen=True)
class IntegrationResult:
    """Final latents, the velocity carried out of the last step, and the calls made."""

    x: Tensor
    carried: Tensor | None
    predictor_calls: int
    refiner_calls: int
    timesteps: tuple[float, ...]


def carries_halves(schedule: SamplingSchedule, latent_channels: int) -> bool:
    """True when the carried velocity has the per-CFG-half layout (B, 2C, H, W) (module docstring).

    That is: guidance is on (scale != 1), it covers only some channels (``guidance_channels < C``) and the
    schedule has R steps (only the refiner reads the unconditional half). Otherwise both halves would be
    equal, and the velocity is (B, C, H, W).
    """
    channels = schedule.guidance_channels
    return (schedule.guidance_scale != 1.0 and channels is not None and channels < latent_channels
            and schedule.uses_refiner)


def step_infos(schedule: SamplingSchedule, timesteps: Sequence[float] | None = None) -> tuple[StepInfo, ...]:
    """The schedule's steps as :class:`StepInfo` over its grid (or ``timesteps``, N + 1 increasing floats)."""
    grid = tuple(schedule.timesteps if timesteps is None else timesteps)
    if len(grid) != schedule.num_steps + 1:
        raise ScheduleError(f"{schedule.notation} has {schedule.num_steps} steps and needs {schedule.num_steps + 1} "
                            f"times, got {len(grid)}")
    if any(not b > a for a, b in zip(grid, grid[1:])):
        raise ScheduleError(f"timesteps must be strictly increasing, got {list(grid)}")
    return tuple(StepInfo(k, kind, float(grid[k]), float(grid[k + 1]), p, r)
                 for k, (kind, (p, r)) in enumerate(zip(schedule.steps, schedule.step_calls())))


def integrate(
    schedule: SamplingSchedule,
    x: Tensor,
    calls: ModelCalls,
    ops: SolverOps,
    *,
    hooks: Sequence[StepHooks] = (),
    timesteps: Sequence[float] | None = None,
) -> IntegrationResult:
    """Integrate from ``x`` (B, C, H, W) at ``t_0`` to ``t_N`` with the schedule's steps (module docstring).

    ``timesteps`` replaces the schedule's grid (same length; e.g. the grid rescaled onto ``[t0, 1]`` for
    editing). ``hooks`` run in order before and after every step. Returns the final latents, the carried
    velocity and the calls made (which equal the schedule's counts).
    """
    steps = step_infos(schedule, timesteps)
    state = IntegratorState(x)
    predictor_calls = refiner_calls = 0
    for step in steps:
        for hook in hooks:
            hook.before_step(step, state)
        x, carried, carried_time, kind = state.x, state.carried, state.carried_time, step.kind
        t0, t1 = step.t_start, step.t_end
        h = t1 - t0
        if kind is StepKind.EULER:
            _, x = ops.predict(calls.predictor(x, t0), x, h)
            predictor_calls += 1
            carried = carried_time = None  # Euler carries nothing
        elif kind is StepKind.REFINER:
            if carried is None or carried_time is None:
                raise ScheduleError(f"step {step.index + 1} is R but no velocity is carried into it")
            v = carried  # estimates the flow at carried_time: its age at t is t - carried_time
            d, x_pred = ops.predict(calls.refiner(x, t0, v, t0 - carried_time), x, h, base=v)  # d = v + r(x, t_k, v)
            x, _ = ops.correct(calls.refiner(x_pred, t1, v, t1 - carried_time), x, d, h,
                               base=d)  # d' = d + r(x~, t_k+1, v)
            refiner_calls += 2
            carried, carried_time = d, t0  # d estimates the flow at t_k
        else:  # H, or P (reuses the carried d' when there is one)
            if kind is StepKind.PSEUDO and carried is not None:
                d = carried
                x_pred = ops.advance(x, d, h)
            else:
                d, x_pred = ops.predict(calls.predictor(x, t0), x, h)
                predictor_calls += 1
            x, carried = ops.correct(calls.predictor(x_pred, t1), x, d, h)
            predictor_calls += 1
            carried_time = t1  # d' = v(x~, t_k+1)
        state.x, state.carried, state.carried_time = x, carried, carried_time
        for hook in hooks:
            hook.after_step(step, state)
    grid = (steps[0].t_start, *(s.t_end for s in steps))
    return IntegrationResult(state.x, state.carried, predictor_calls, refiner_calls, grid)


class _RecordingCalls(StepHooks):
    """Model calls that only note when they are made, in order (for :func:`call_times` and
    :func:`refiner_call_plan`); a hook too, to know the step each call belongs to."""

    def __init__(self) -> None:
        self.step, self.velocity_time = -1, None
        self.predictor_times: list[float] = []
        self.refiner_calls: list[RefinerCall] = []

    def before_step(self, step: StepInfo, state: IntegratorState) -> None:
        self.step, self.velocity_time = step.index, state.carried_time

    def predictor(self, x: Tensor, t: float) -> Tensor:
        self.predictor_times.append(t)
        return x

    def refiner(self, x: Tensor, t: float, v: Tensor, dt: float) -> Tensor:
        self.refiner_calls.append(RefinerCall(self.step, t, dt, self.velocity_time))
        return x


class _SymbolicOps:
    """Solver ops over placeholders: the loop's control flow without arithmetic."""

    def predict(self, raw: Tensor, x: Tensor, h: float, base: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return raw, x

    def correct(self, raw: Tensor, x: Tensor, d: Tensor, h: float, base: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x, raw

    def advance(self, x: Tensor, d: Tensor, h: float) -> Tensor:
        return x


def _record(schedule: SamplingSchedule, timesteps: Sequence[float] | None) -> _RecordingCalls:
    calls = _RecordingCalls()
    integrate(schedule, object(), calls, _SymbolicOps(), hooks=[calls], timesteps=timesteps)
    return calls


def call_times(schedule: SamplingSchedule,
               timesteps: Sequence[float] | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The distinct times at which the predictor / refiner are evaluated (sorted), found by walking
    :func:`integrate` itself — so per-time graphs (the ``per-step`` export) follow the loop's rule."""
    calls = _record(schedule, timesteps)
    return tuple(sorted(set(calls.predictor_times))), tuple(sorted({c.t for c in calls.refiner_calls}))


def refiner_call_plan(schedule: SamplingSchedule, timesteps: Sequence[float] | None = None) -> tuple[RefinerCall, ...]:
    """Every refiner call of the schedule in loop order, with its step, time and dt (the age of its velocity),
    found by walking :func:`integrate` itself: the one source of the dt values that exported graphs fold, the
    tuner flags and ``sample`` checks against a refiner's trained range."""
    return tuple(_record(schedule, timesteps).refiner_calls)


__all__ = [
    "IntegrationResult",
    "IntegratorState",
    "ModelCalls",
    "RefinerCall",
    "SolverOps",
    "StepHooks",
    "StepInfo",
    "call_times",
    "carries_halves",
    "integrate",
    "refiner_call_plan",
    "step_infos",
]
