"""Reference samplers: readable PyTorch, any dtype (float64 included), CPU or CUDA.

Everything here is the ground truth the fast paths (fused kernels, exported graphs, the C++ runner) are
tested against. DESIGN.md §2 gives the equations; the comments below cite them.

* :func:`sample_schedule` runs a fixed :class:`~flowturbo.schedule.SamplingSchedule` (E / H / P / R steps),
  so Euler and Heun baselines are schedules too (``"E8"``, ``"H8"``).
* :func:`sample_adaptive` is an error-controlled solver (torchdiffeq: ``dopri5`` or the embedded
  Heun–Euler pair ``adaptive_heun``) with atol/rtol, counting the calls it really made.
* :func:`sample_velocity_norm_rule` is the seed report's rule ``dt = C / ||f(x, t)||``.

Every sampler returns a :class:`SampleResult` with the final latents and the numbers of predictor and
refiner calls (one call = one batched forward of the doubled CFG batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from flowturbo.errors import SamplingError
from flowturbo.schedule import SamplingSchedule, StepKind

# model(x (M, C, H, W), t (M,), y (M,)) -> (M, >=C, H, W); the first C channels are the velocity.
PredictorFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# refiner(x (M, C, H, W), t (M,), y (M,), v (M, C, H, W)) -> velocity offset (M, C, H, W).
RefinerFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# Optional per-step hook: (step index, kind, t_start, t_end, x after the step).
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
    official SiT/FlowTurbo ``forward_with_cfg`` does for the 4th latent channel.
    """
    guided = uncond + scale * (cond - uncond)  # (B, C, H, W)
    if guidance_channels is None or guidance_channels >= cond.shape[1]:
        return guided
    return torch.cat([guided[:, :guidance_channels], cond[:, guidance_channels:]], dim=1)


class GuidedVelocity:
    """The CFG-guided velocity ``f(x, t)`` of one label batch, counting its calls.

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
        self.scale = float(guidance_scale)
        self.guidance_channels = guidance_channels
        self.guided = self.scale != 1.0
        null = torch.full_like(labels, null_label)
        self.doubled_labels = torch.cat([labels, null]) if self.guided else labels  # (2B,) or (B,)

    def _times(self, t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor) and t.ndim == 1:  # per-sample times (B,)
            return torch.cat([t, t]) if self.guided else t
        rows = self.doubled_labels.shape[0]
        return torch.full((rows,), float(t), dtype=x.dtype, device=x.device)

    def _combine(self, out: torch.Tensor, channels: int) -> torch.Tensor:
        out = out[:, :channels]
        if not self.guided:
            return out
        cond, uncond = out.chunk(2, dim=0)  # (B, C, H, W) each
        return combine_guidance(cond, uncond, self.scale, self.guidance_channels)

    def predictor(self, model: PredictorFn, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Guided predictor velocity at (x, t). x: (B, C, H, W) -> (B, C, H, W)."""
        xx = torch.cat([x, x]) if self.guided else x
        return self._combine(model(xx, self._times(t, x), self.doubled_labels), x.shape[1])

    def refiner(self, refiner: RefinerFn, x: torch.Tensor, t: float, v: torch.Tensor) -> torch.Tensor:
        """Guided refiner offset at (x, t) conditioned on the carried velocity v. (B, C, H, W)."""
        xx, vv = (torch.cat([x, x]), torch.cat([v, v])) if self.guided else (x, v)
        return self._combine(refiner(xx, self._times(t, x), self.doubled_labels, vv), x.shape[1])


def check_labels(labels: torch.Tensor, num_classes: int, batch: int) -> None:
    """Refuse class ids outside ``[0, num_classes)`` or a label batch that does not match the noise."""
    if labels.ndim != 1 or labels.shape[0] != batch:
        raise SamplingError(f"labels must have shape ({batch},) to match the noise batch, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise SamplingError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if batch and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)].tolist()
        raise SamplingError(f"class ids {bad[:5]} are outside [0, {num_classes}); this model has {num_classes} classes")


def _check_finite(x: torch.Tensor, step: int, kind: StepKind, t0: float, t1: float) -> None:
    if not bool(torch.isfinite(x).all()):
        raise SamplingError(
            f"NaN/Inf in the latents after step {step + 1} ({kind.value}, {kind.label}, t {t0:.4g} -> {t1:.4g}); "
            "check the checkpoint, the dtype (try float32) and the guidance scale"
        )


def sample_schedule(
    schedule: SamplingSchedule,
    noise: torch.Tensor,
    labels: torch.Tensor,
    predictor: PredictorFn,
    refiner: RefinerFn | None = None,
    *,
    num_classes: int,
    check_finite: bool = True,
    callback: StepCallback | None = None,
) -> SampleResult:
    """Integrate the velocity ODE from noise (t=0) to data (t=1) with a fixed schedule.

    noise: (B, C, H, W) initial latents x_0; labels: (B,) class ids in [0, num_classes) (the null label
    used for guidance is ``num_classes``). Returns the latents at t=1 and the calls made.
    """
    if schedule.uses_refiner and refiner is None:
        raise SamplingError(
            f"schedule {schedule.notation} has R steps but no refiner was given; load a bundle with a refiner "
            "or use a schedule without R (e.g. 'H8')"
        )
    if noise.ndim != 4:
        raise SamplingError(f"noise must be (B, C, H, W), got shape {tuple(noise.shape)}")
    check_labels(labels, num_classes, noise.shape[0])
    f = GuidedVelocity(labels, num_classes, schedule.guidance_scale, schedule.guidance_channels)
    times = schedule.timesteps
    x = noise  # (B, C, H, W)
    carried: torch.Tensor | None = None  # the velocity carried between steps
    predictor_calls = refiner_calls = 0
    for k, kind in enumerate(schedule.steps):
        t0, t1 = times[k], times[k + 1]
        h = t1 - t0
        if kind is StepKind.EULER:
            d = f.predictor(predictor, x, t0)
            predictor_calls += 1
            x = x + h * d
            carried = None  # Euler carries nothing: a following P evaluates its own d
        elif kind is StepKind.REFINER:
            # R (§2): d = v + r(x, t_k, v); x~ = x + h d; d' = d + r(x~, t_{k+1}, v); carry d.
            assert carried is not None and refiner is not None  # guaranteed by schedule validation above
            v = carried
            d = v + f.refiner(refiner, x, t0, v)
            x_pred = x + h * d
            d_next = d + f.refiner(refiner, x_pred, t1, v)
            refiner_calls += 2
            x = x + 0.5 * h * (d + d_next)
            carried = d
        else:
            # H (§2): d = v(x, t_k). P: reuse the carried d' (evaluated at the previous *predicted* point).
            if kind is StepKind.PSEUDO and carried is not None:
                d = carried
            else:
                d = f.predictor(predictor, x, t0)
                predictor_calls += 1
            x_pred = x + h * d
            d_next = f.predictor(predictor, x_pred, t1)
            predictor_calls += 1
            x = x + 0.5 * h * (d + d_next)
            carried = d_next
        if check_finite:
            _check_finite(x, k, kind, t0, t1)
        if callback is not None:
            callback(k, kind, t0, t1, x)
    return SampleResult(x, predictor_calls, refiner_calls, times)


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


def make_noise(
    batch: int, latent_shape: tuple[int, int, int], seed: int, *, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Initial noise x_0 ~ N(0, I), (batch, C, H, W), from a CPU generator seeded with ``seed``.

    Drawn in float32 on the CPU and then moved/cast, so the same seed gives the same noise on every device
    and dtype (the C++ runner reproduces exactly this).
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn((batch, *latent_shape), generator=generator, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


__all__ = [
    "ADAPTIVE_METHODS",
    "GuidedVelocity",
    "SampleResult",
    "check_labels",
    "combine_guidance",
    "make_noise",
    "sample_adaptive",
    "sample_schedule",
    "sample_velocity_norm_rule",
]
