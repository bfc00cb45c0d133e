"""Reference samplers: readable PyTorch, any dtype (float64 included), CPU or CUDA.

Everything here is the ground truth the fast paths (fused kernels, exported graphs, the C++ runner) are
tested against. DESIGN.md §2 gives the equations; the comments below cite them.

* :func:`run_schedule` runs a fixed :class:`~flowturbo.schedule.SamplingSchedule` (E / H / P / R steps) with any
  model family's calls (:mod:`flowturbo.families`), so Euler and Heun baselines are schedules too (``"E8"``,
  ``"H8"``), through the one step loop :func:`flowturbo.integrator.integrate` (reference or fused solver ops);
  :func:`sample_schedule` is the same for class-conditional SiT models and their labels.
* :func:`sample_adaptive` is an error-controlled solver (torchdiffeq: ``dopri5`` or the embedded
  Heun–Euler pair ``adaptive_heun``) with atol/rtol, counting the calls it really made.
* :func:`sample_velocity_norm_rule` is the seed report's rule ``dt = C / ||f(x, t)||``.

Every sampler returns a :class:`SampleResult` with the final latents and the numbers of predictor and
refiner calls (one call = one batched forward of the doubled CFG batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from flowturbo.errors import SamplingError
from flowturbo.integrator import IntegratorState, ModelCalls, StepHooks, StepInfo, carries_halves, integrate
from flowturbo.kernels import KernelBackend, SolverOps
from flowturbo.noise import make_noise  # the one per-image noise rule (seed + image index), re-exported
from flowturbo.schedule import SamplingSchedule, StepKind

# The SiT family's model calls and label check (flowturbo.training.families.sit), re-exported: the reference
# samplers below are the class-conditional family's.
from flowturbo.training.families.sit import (
    CFGModelCalls,
    PredictorFn,
    RefinerFn,
    check_labels,
    check_refiner_present,
)
# Optional per-step callback: (step index, kind, t_start, t_end, x after the step).
StepCallback = Callable[[int, StepKind, float, float, torch.Tensor], None]


@dataclasses.dataclass(frozen=True)
class SampleResult:
    """Final latents plus the work done to get them."""

    latents: torch.Tensor  # (B, C, H, W)
    predictor_calls: int
    refiner_calls: int
    timesteps: tuple[float, ...] = ()  # the grid walked (fixed schedules, the velocity-norm rule); () for torchdiffeq


def combine_guidance(
    cond: torch.Tensor, uncond: torch.Tensor, scale: float, guidance_channels: int | None
) -> torch.Tensor:
    """Classifier-free guidance ``u + s (c - u)`` on the first ``guidance_channels`` channels.

    cond, uncond: (B, C, H, W). Channels past ``guidance_channels`` keep the conditional value, as the
    official SiT/FlowTurbo ``forward_with_cfg`` does for the 4th latent channel (the per-half carry of
    partial guidance, :mod:`flowturbo.integrator`, keeps the unconditional half's own values too).
    """
    guided = uncond + scale * (cond - uncond)  # (B, C, H, W)
    if guidance_channels is None or guidance_channels >= cond.shape[1]:
        return guided
    return torch.cat([guided[:, :guidance_channels], cond[:, guidance_channels:]], dim=1)


class GuidedVelocity:
    """The CFG-guided velocity ``f(x, t)`` of one label batch (for the adaptive solvers and tests).

    With ``scale == 1`` guidance is the identity, so the unconditional half is skipped (one call on B rows);
    otherwise every call runs the doubled batch ``[x; x]`` with labels ``[y; null]`` (DESIGN.md §2).
    """

    def __init__(
        self,
        labels: torch.Tensor,
        null_label: int,
        guidance_scale: float,
        guidance_channels: int | None,
    ) -> None:
        self.labels = labels  # (B,)
        self.null_label = null_label
        self.scale = float(guidance_scale)
        self.guidance_channels = guidance_channels
        self.guided = self.scale != 1.0

    def _combine(self, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        if not self.guided:
            return raw[:, :channels]
        cond, uncond = raw[:, :channels].chunk(2, dim=0)  # (B, C, H, W) each
        return combine_guidance(cond, uncond, self.scale, self.guidance_channels)

    def predictor(self, model: PredictorFn, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Guided predictor velocity at (x, t). x: (B, C, H, W) -> (B, C, H, W)."""
        calls = CFGModelCalls(model, None, self.labels, self.null_label, self.guided)
        return self._combine(calls.predictor(x, t), x)

    def refiner(self, refiner: RefinerFn, x: torch.Tensor, t: float, v: torch.Tensor, dt: float) -> torch.Tensor:
        """Guided refiner offset at (x, t) conditioned on the carried velocity v (B, C, H, W) of age dt."""
        calls = CFGModelCalls(None, refiner, self.labels, self.null_label, self.guided)
        return self._combine(calls.refiner(x, t, v, dt), x)


def non_finite_message(step: StepInfo, notation: str = "") -> str:
    """The message naming the first step that produced NaN/Inf."""
    where = f" of {notation}" if notation else ""
    return (f"NaN/Inf in the latents after step {step.index + 1} ({step.kind.value}, {step.kind.label}, "
            f"t {step.t_start:.4g} -> {step.t_end:.4g}){where}; check the checkpoint, the dtype (try float32) and "
            "the guidance scale")


class FiniteCheck(StepHooks):
    """Raise :class:`SamplingError` naming the step as soon as the latents hold NaN/Inf (one host sync a step)."""

    def __init__(self, notation: str = "") -> None:
        self.notation = notation

    def after_step(self, step: StepInfo, state: IntegratorState) -> None:
        if not bool(torch.isfinite(state.x).all()):
            raise SamplingError(non_finite_message(step, self.notation))


class _CallbackHook(StepHooks):
    """Adapts a :data:`StepCallback` to the integrator's hooks."""

    def __init__(self, callback: StepCallback) -> None:
        self.callback = callback

    def after_step(self, step: StepInfo, state: IntegratorState) -> None:
        self.callback(step.index, step.kind, step.t_start, step.t_end, state.x)


def solver_ops_for(schedule: SamplingSchedule, latent_channels: int,
                   kernel_backend: KernelBackend | str = KernelBackend.REFERENCE) -> SolverOps:
    """The solver ops a schedule needs on raw (CFG-doubled) model outputs: its guidance settings, the
    per-half velocity layout when guidance is partial (:func:`flowturbo.integrator.carries_halves`)."""
    return SolverOps(schedule.guidance_scale, schedule.guidance_channels,
                     halves=carries_halves(schedule, latent_channels), backend=kernel_backend)


def run_schedule(
    schedule: SamplingSchedule,
    noise: torch.Tensor,
    calls: ModelCalls,
    *,
    check_finite: bool = True,
    callback: StepCallback | None = None,
    hooks: Sequence[StepHooks] = (),
    kernel_backend: KernelBackend | str = KernelBackend.REFERENCE,
    timesteps: Sequence[float] | None = None,
) -> SampleResult:
    """Integrate from ``noise`` (B, C, H, W) at t=0 to t=1 with a fixed schedule and a family's model calls.

    The family-independent half of every PyTorch sampling path: ``calls`` come from a model family
    (:meth:`flowturbo.families.ModelFamily.model_calls`; SiT: :class:`CFGModelCalls`), the loop is
    :func:`flowturbo.integrator.integrate` with the solver ops of ``kernel_backend`` (``reference``: plain PyTorch,
    the ground truth, any dtype incl. float64; ``triton``: the fused CFG + update kernels) for the schedule's
    guidance. The state keeps ``noise``'s dtype. ``hooks`` run around every step (after the finite check and the
    ``callback``); ``timesteps`` replaces the schedule's grid (e.g. a sub-interval). ``check_finite`` costs a host
    sync per step: turn it off inside CUDA-graph capture.
    """
    if noise.ndim != 4:
        raise SamplingError(f"noise must be (B, C, H, W), got shape {tuple(noise.shape)}")
    ops = solver_ops_for(schedule, noise.shape[1], kernel_backend)
    ops.check_device(noise.device)
    all_hooks: list[StepHooks] = [FiniteCheck(schedule.notation)] if check_finite else []
    if callback is not None:
        all_hooks.append(_CallbackHook(callback))
    all_hooks.extend(hooks)
    result = integrate(schedule, noise, calls, ops, hooks=all_hooks, timesteps=timesteps)
    return SampleResult(result.x, result.predictor_calls, result.refiner_calls, result.timesteps)


def sample_schedule(
    schedule: SamplingSchedule,
    noise: torch.Tensor,
    labels: torch.Tensor,
    predictor: PredictorFn,
    refiner: RefinerFn | None = None,
    *,
    num_classes: int,
    check_finite: bool = True,
    check_inputs: bool = True,
    callback: StepCallback | None = None,
    hooks: Sequence[StepHooks] = (),
    kernel_backend: KernelBackend | str = KernelBackend.REFERENCE,
    timesteps: Sequence[float] | None = None,
) -> SampleResult:
    """Integrate the velocity ODE of a class-conditional (SiT) model from noise (t=0) to data (t=1).

    noise: (B, C, H, W) initial latents x_0; labels: (B,) class ids in [0, num_classes) (the null label
    used for guidance is ``num_classes``). :func:`run_schedule` with the SiT family's :class:`CFGModelCalls`;
    model inputs are cast to each model's parameter dtype. ``check_finite`` and ``check_inputs`` cost host syncs:
    turn them off inside CUDA-graph capture. Returns the final latents and the calls made.
    """
    check_refiner_present(schedule, refiner, "no refiner was given; load a bundle with a refiner or use a schedule "
                          "without R (e.g. 'H8')")
    if noise.ndim != 4:
        raise SamplingError(f"noise must be (B, C, H, W), got shape {tuple(noise.shape)}")
    if check_inputs:  # a host sync: callers that capture CUDA graphs check the labels beforehand
        check_labels(labels, num_classes, noise.shape[0])
    calls = CFGModelCalls(predictor, refiner, labels, num_classes, schedule.guidance_scale != 1.0)
    return run_schedule(schedule, noise, calls, check_finite=check_finite, callback=callback, hooks=hooks,
                        kernel_backend=kernel_backend, timesteps=timesteps)


ADAPTIVE_METHODS = ("dopri5", "adaptive_heun", "bosh3")


def sample_adaptive(
    noise: torch.Tensor,
    labels: torch.Tensor,
    predictor: PredictorFn,
    *,
    num_classes: int,
    guidance_scale: float = 1.0,
    guidance_channels: int | None = None,
    method: str = "dopri5",
    atol: float = 1e-3,
    rtol: float = 1e-3,
) -> SampleResult:
    """Error-controlled adaptive solver via torchdiffeq (``dopri5`` or the Heun–Euler pair ``adaptive_heun``).

    Counts every predictor call the solver made, rejected steps included.
    """
    try:
        from torchdiffeq import odeint
    except ImportError:
        raise SamplingError("the adaptive solver needs torchdiffeq: pip install torchdiffeq") from None
    if method not in ADAPTIVE_METHODS:
        raise SamplingError(f"unknown adaptive method {method!r}; choose one of {ADAPTIVE_METHODS}")
    check_labels(labels, num_classes, noise.shape[0])
    f = GuidedVelocity(labels, num_classes, guidance_scale, guidance_channels)
    calls = 0

    def rhs(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return f.predictor(predictor, x, float(t))

    span = torch.tensor([0.0, 1.0], dtype=noise.dtype, device=noise.device)
    options = {"dtype": noise.dtype if noise.dtype == torch.float64 else torch.float32}
    try:
        path = odeint(rhs, noise, span, method=method, atol=atol, rtol=rtol, options=options)
    except AssertionError as exc:  # torchdiffeq signals underflow of the step size this way
        raise SamplingError(f"adaptive solver {method} failed: {exc}; loosen atol/rtol") from None
    x = path[-1]
    if not bool(torch.isfinite(x).all()):
        raise SamplingError(f"NaN/Inf in the latents from the adaptive solver {method}")
    return SampleResult(x, calls, 0)


def sample_velocity_norm_rule(
    noise: torch.Tensor,
    labels: torch.Tensor,
    predictor: PredictorFn,
    *,
    num_classes: int,
    c: float,
    dt_min: float = 0.01,
    dt_max: float = 0.25,
    guidance_scale: float = 1.0,
    guidance_channels: int | None = None,
) -> SampleResult:
    """The seed report's rule: Heun steps with ``dt = C / ||f(x, t)||``, clipped to [dt_min, dt_max].

    ``||f||`` is the root-mean-square of the guided velocity over the whole batch (one step size for the
    batch keeps it a single batched ODE). The last step is shortened to land exactly on t = 1. The velocity
    at the end of each step is reused as the next step's ``d`` (FSAL, as the P step does), so a step costs
    one call after the first.
    """
    if not (c > 0 and 0 < dt_min <= dt_max <= 1):
        raise SamplingError(f"need C > 0 and 0 < dt_min <= dt_max <= 1, got C={c}, dt_min={dt_min}, dt_max={dt_max}")
    check_labels(labels, num_classes, noise.shape[0])
    f = GuidedVelocity(labels, num_classes, guidance_scale, guidance_channels)
    x, t = noise, 0.0
    d = f.predictor(predictor, x, t)
    calls = 1
    times = [0.0]
    while t < 1.0:
        norm = float(d.float().pow(2).mean().sqrt())
        dt = min(max(c / max(norm, 1e-12), dt_min), dt_max)
        t_next = 1.0 if t + dt >= 1.0 - 1e-9 else t + dt  # land exactly on 1
        h = t_next - t
        x_pred = x + h * d
        d_next = f.predictor(predictor, x_pred, t_next)
        calls += 1
        x = x + 0.5 * h * (d + d_next)
        d, t = d_next, t_next
        times.append(t)
        if not bool(torch.isfinite(x).all()):
            raise SamplingError(f"NaN/Inf in the latents at t={t:.4g} (velocity-norm rule, C={c})")
    return SampleResult(x, calls, 0, tuple(times))


__all__ = [
    "ADAPTIVE_METHODS",
    "CFGModelCalls",
    "FiniteCheck",
    "GuidedVelocity",
    "SampleResult",
    "check_labels",
    "combine_guidance",
    "make_noise",
    "run_schedule",
    "sample_adaptive",
    "sample_schedule",
    "sample_velocity_norm_rule",
    "solver_ops_for",
]
