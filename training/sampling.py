"""Reference samplers: readable PyTorch, any dtype (float64 included), CPU or CUDA.

Everything here is the ground truth the fast paths (fused kernels, exported graphs, the C++ runner) are
tested against. DESIGN.md §2 gives the equations; the comments below cite them.

* :func:`sample_schedule` runs a fixed :class:`~flowturbo.schedule.SamplingSchedule` (E / H / P / R steps),
  so Euler and Heun baselines are schedules too (``"E8"``, ``"H8"``), through the one step loop
  :func:`flowturbo.integrator.integrate` (reference or fused solver ops).
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
from flowturbo.integrator import IntegratorState, StepHooks, StepInfo, carries_halves, integrate
from flowturbo.kernels import KernelBackend, SolverOps
from flowturbo.noise import make_noise  # the one per-image noise rule (seed + image index), re-exported
from flowturbo.schedule import SamplingSchedule, StepKind
from flowturbo.training.models import refiner_takes_dt

# model(x (M, C, H, W), t (M,), y (M,)) -> (M, >=C, H, W); the first C channels are the velocity.
PredictorFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# refiner(x (M, C, H, W), t (M,), y (M,), v (M, C, H, W)[, dt (M,)]) -> velocity offset (M, C, H, W); dt (the age
# of v, flowturbo.integrator) is passed only to refiners that take it (models.refiner_takes_dt).
RefinerFn = Callable[..., torch.Tensor]
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


def _parameter_dtype(model: object) -> torch.dtype | None:
    """The dtype of a module's first floating-point parameter (None for plain callables)."""
    parameters = getattr(model, "parameters", None)
    if parameters is None:
        return None
    for p in parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _cast(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return x if dtype is None or x.dtype == dtype else x.to(dtype)


class CFGModelCalls:
    """:class:`flowturbo.integrator.ModelCalls` over PyTorch models for one label batch.

    With guidance every call runs the doubled batch ``[x; x]`` with labels ``[y; null]`` (DESIGN.md §2) and
    returns the raw output (2B rows) for the solver ops to combine; with ``guided=False`` (scale 1) only the
    conditional rows run. The refiner gets the carried velocity per CFG half: a (B, 2C, H, W) per-half
    velocity is split into its halves, a (B, C, H, W) one is used for both; a dt-conditioned refiner also gets
    the velocity's age ``dt`` (one value for every row), others are called exactly as the released code does.
    """

    def __init__(self, predictor: PredictorFn | None, refiner: RefinerFn | None, labels: torch.Tensor,
                 null_label: int, guided: bool) -> None:
        self.predictor_model = predictor
        self.refiner_model = refiner
        self.guided = bool(guided)
        null = torch.full_like(labels, null_label)
        self.labels = torch.cat([labels, null]) if self.guided else labels  # (M,) M = 2B or B
        # Models may run narrower than the solver state (bf16 weights, float32 state): inputs are cast to the
        # model's parameter dtype, outputs go to the solver ops as they are (the ops widen them).
        self.predictor_dtype = _parameter_dtype(predictor)
        self.refiner_dtype = _parameter_dtype(refiner)
        self.refiner_takes_dt = refiner_takes_dt(refiner)

    def _times(self, t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and t.ndim == 1:  # per-sample times (B,)
            return torch.cat([t, t]) if self.guided else t
        return torch.full((self.labels.shape[0],), float(t), dtype=x.dtype, device=x.device)

    def predictor(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Raw predictor output at (x, t): (M, C_out, H, W)."""
        if self.predictor_model is None:
            raise SamplingError("no predictor was given")
        xx = torch.cat([x, x]) if self.guided else x  # (M, C, H, W)
        return self.predictor_model(_cast(xx, self.predictor_dtype), self._times(t, x), self.labels)

    def refiner(self, x: torch.Tensor, t: float, v: torch.Tensor, dt: float) -> torch.Tensor:
        """Raw refiner offset at (x, t) given the carried velocity v of age dt: (M, C, H, W)."""
        if self.refiner_model is None:
            raise SamplingError("an R step needs a refiner; load a bundle with one or use a schedule without R")
        channels, dtype = x.shape[1], self.refiner_dtype
        age = (self._times(dt, x),) if self.refiner_takes_dt else ()  # (M,) for dt-conditioned refiners only
        if not self.guided:
            return self.refiner_model(_cast(x, dtype), self._times(t, x), self.labels, _cast(v[:, :channels], dtype),
                                      *age)
        halves = (v[:, :channels], v[:, channels:]) if v.shape[1] == 2 * channels else (v, v)
        return self.refiner_model(_cast(torch.cat([x, x]), dtype), self._times(t, x), self.labels,
                                  _cast(torch.cat(halves), dtype), *age)


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


def check_labels(labels: torch.Tensor, num_classes: int, batch: int) -> None:
    """Refuse class ids outside ``[0, num_classes)`` or a label batch that does not match the noise."""
    if labels.ndim != 1 or labels.shape[0] != batch:
        raise SamplingError(f"labels must have shape ({batch},) to match the noise batch, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise SamplingError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if batch and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)].tolist()
        raise SamplingError(f"class ids {bad[:5]} are outside [0, {num_classes}); this model has {num_classes} classes")


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
    """Integrate the velocity ODE from noise (t=0) to data (t=1) with a fixed schedule.

    noise: (B, C, H, W) initial latents x_0; labels: (B,) class ids in [0, num_classes) (the null label
    used for guidance is ``num_classes``). The loop is :func:`flowturbo.integrator.integrate` with
    :class:`CFGModelCalls` and the solver ops of ``kernel_backend`` (``reference``: plain PyTorch, the ground
    truth, any dtype incl. float64; ``triton``: the fused CFG + update kernels). The state keeps ``noise``'s
    dtype; model inputs are cast to each model's parameter dtype. ``hooks`` run around every step (after the
    finite check); ``timesteps`` replaces the schedule's grid (e.g. a sub-interval). ``check_finite`` and
    ``check_inputs`` cost host syncs: turn them off inside CUDA-graph capture. Returns the final latents and
    the calls made.
    """
    if schedule.uses_refiner and refiner is None:
        raise SamplingError(
            f"schedule {schedule.notation} has R steps but no refiner was given; load a bundle with a refiner "
            "or use a schedule without R (e.g. 'H8')"
        )
    if noise.ndim != 4:
        raise SamplingError(f"noise must be (B, C, H, W), got shape {tuple(noise.shape)}")
    if check_inputs:  # a host sync: callers that capture CUDA graphs check the labels beforehand
        check_labels(labels, num_classes, noise.shape[0])
    ops = solver_ops_for(schedule, noise.shape[1], kernel_backend)
    ops.check_device(noise.device)
    calls = CFGModelCalls(predictor, refiner, labels, num_classes, schedule.guidance_scale != 1.0)
    all_hooks: list[StepHooks] = [FiniteCheck(schedule.notation)] if check_finite else []
    if callback is not None:
        all_hooks.append(_CallbackHook(callback))
    all_hooks.extend(hooks)
    result = integrate(schedule, noise, calls, ops, hooks=all_hooks, timesteps=timesteps)
    return SampleResult(result.x, result.predictor_calls, result.refiner_calls, result.timesteps)


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
    "sample_adaptive",
    "sample_schedule",
    "sample_velocity_norm_rule",
    "solver_ops_for",
]
