"""Reference samplers: convergence order, exact H/P/R semantics, CFG, call counts, errors."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import tol

from flowturbo.errors import SamplingError
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.sampling import (
    combine_guidance,
    make_noise,
    sample_adaptive,
    sample_schedule,
    sample_velocity_norm_rule,
)

NUM_CLASSES = 5
SHAPE = (3, 4, 5, 3)  # (B, C, H, W): odd sizes on purpose


class DecayODE:
    """dx/dt = -cos(t) x, closed form x(1) = x(0) exp(-sin 1); ignores labels. Counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return -torch.cos(t)[:, None, None, None] * x


class StubPredictor:
    """A label-dependent nonlinear velocity field that records every call (t values and batch size)."""

    def __init__(self, generator: torch.Generator, out_channels: int = 8) -> None:
        c = SHAPE[1]
        self.a = torch.randn(c, generator=generator, dtype=torch.float64)
        self.b = torch.randn(NUM_CLASSES + 1, out_channels, generator=generator, dtype=torch.float64)
        self.out_channels = out_channels
        self.calls: list[tuple[tuple[float, ...], int]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append((tuple(sorted(set(t.tolist()))), x.shape[0]))
        vel = torch.tanh(x) * self.a[None, :, None, None] + (1 + t)[:, None, None, None] * x.sin()
        extra = torch.ones(x.shape[0], self.out_channels - x.shape[1], *x.shape[2:], dtype=x.dtype)
        out = torch.cat([vel, extra], dim=1)  # (M, 8, H, W): learn_sigma-like extra channels
        return out + self.b[y][:, :, None, None]


class StubRefiner:
    """A refiner offset depending on x, t, y and the carried velocity v — mixing channels, as a real refiner's
    patch embedding does (so the velocity one CFG half carries changes every output channel); records calls."""

    def __init__(self, generator: torch.Generator) -> None:
        self.w = torch.randn(NUM_CLASSES + 1, SHAPE[1], generator=generator, dtype=torch.float64)
        self.calls: list[tuple[float, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.calls.append((float(t[0]), v.clone()))
        mixed = v.mean(dim=1, keepdim=True) * (1 + t)[:, None, None, None]  # (M, 1, H, W), every channel sees it
        return 0.3 * torch.tanh(x - v) * t[:, None, None, None] + 0.1 * self.w[y][:, :, None, None] * v.cos() + mixed


def _official_velocity(model, x2, t, y2, scale, channels, v2=None):
    """The released sampler's CFG step (``forward_with_cfg`` / ``VelocityRefinerBlock._forward``), written out:
    the model sees ``[half; half]`` with half = the conditional rows of the doubled x, the first ``channels``
    channels are guided and copied to both halves, the rest keep each half's own output."""
    half = x2[: x2.shape[0] // 2]
    combined = torch.cat([half, half])
    tt = torch.full((combined.shape[0],), t, dtype=x2.dtype)
    out = model(combined, tt, y2, v2)[:, : x2.shape[1]] if v2 is not None else model(combined, tt, y2)[:, : x2.shape[1]]
    g = x2.shape[1] if channels is None else channels
    eps, rest = out[:, :g], out[:, g:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)  # (2B, C): a doubled velocity


def _hand_loop(steps: str, x, y, pred, ref, scale, channels):
    """DESIGN.md §2 written out as the released FlowTurbo sampler runs it: x, every velocity and the carried
    one are *doubled* (one row per CFG half, updated per half); the result is the conditional half."""
    n = len(steps)
    ts = [k / n for k in range(n + 1)]
    x2 = torch.cat([x, x])
    y2 = torch.cat([y, torch.full_like(y, NUM_CLASSES)])
    carried = None
    for k, kind in enumerate(steps):
        h = ts[k + 1] - ts[k]
        if kind == "H" or (kind == "P" and carried is None):
            d = _official_velocity(pred, x2, ts[k], y2, scale, channels)
            xt = x2 + h * d
            d2 = _official_velocity(pred, xt, ts[k + 1], y2, scale, channels)
            x2, carried = x2 + h / 2 * (d + d2), d2
        elif kind == "P":
            d = carried
            xt = x2 + h * d
            d2 = _official_velocity(pred, xt, ts[k + 1], y2, scale, channels)
            x2, carried = x2 + h / 2 * (d + d2), d2
        elif kind == "R":
            v = carried
            d = _official_velocity(ref, x2, ts[k], y2, scale, channels, v) + v
            xt = x2 + h * d
            d2 = _official_velocity(ref, xt, ts[k + 1], y2, scale, channels, v) + d
            x2, carried = x2 + h / 2 * (d + d2), d
        else:  # E
            d = _official_velocity(pred, x2, ts[k], y2, scale, channels)
            x2, carried = x2 + h * d, None
    return x2[: x.shape[0]]


def _inputs(seeded: torch.Generator):
    x0 = torch.randn(SHAPE, generator=seeded, dtype=torch.float64)
    y = torch.tensor([0, 3, 4])
    return x0, y


@pytest.mark.parametrize("steps", ["HPPPPPRRR", "HHPPRR", "PPPRR", "EEHPR", "HPRPR", "E"])
@pytest.mark.parametrize("scale,channels", [(4.0, None), (2.5, 3), (4.0, 1), (1.0, None), (1.0, 3)])
def test_schedule_matches_the_released_samplers_loop(seeded, steps, scale, channels):
    """Bit-level semantics (float64) of every step kind against the released sampler's doubled-batch loop,
    including partial guidance, where the carried velocity differs per CFG half (issue 10, item 1b)."""
    x0, y = _inputs(seeded)
    pred, ref = StubPredictor(seeded), StubRefiner(seeded)
    schedule = SamplingSchedule.parse(steps, guidance_scale=scale, guidance_channels=channels)
    result = sample_schedule(schedule, x0, y, pred, ref, num_classes=NUM_CLASSES)
    expected = _hand_loop(steps, x0, y, pred, ref, scale, channels)
    torch.testing.assert_close(result.latents, expected, **tol(torch.float64))
    assert result.predictor_calls == schedule.predictor_calls
    assert result.refiner_calls == schedule.refiner_calls


def test_h1p5r3_calls_times_and_carried_velocity(seeded):
    x0, y = _inputs(seeded)
    pred, ref = StubPredictor(seeded), StubRefiner(seeded)
    schedule = SamplingSchedule.parse("H1P5R3", guidance_scale=3.0)
    result = sample_schedule(schedule, x0, y, pred, ref, num_classes=NUM_CLASSES)
    assert (result.predictor_calls, result.refiner_calls) == (7, 6)
    assert (len(pred.calls), len(ref.calls)) == (7, 6)
    ts = schedule.timesteps
    # H evaluates t0 and t1; each P evaluates only its end point t_{k+1}.
    assert [c[0][0] for c in pred.calls] == [ts[0], ts[1], ts[2], ts[3], ts[4], ts[5], ts[6]]
    assert all(batch == 2 * SHAPE[0] for _, batch in pred.calls)  # doubled CFG batch every call
    assert [t for t, _ in ref.calls] == [ts[6], ts[7], ts[7], ts[8], ts[8], ts[9]]
    # Both refiner calls of a step see the *incoming* carried velocity (models_assemble.py semantics).
    for step in range(3):
        torch.testing.assert_close(ref.calls[2 * step][1], ref.calls[2 * step + 1][1], **tol(torch.float64))
    # ... and consecutive R steps see different velocities (d is carried, not v).
    assert not torch.equal(ref.calls[0][1], ref.calls[2][1])


def test_schedule_of_first_p_costs_two_calls(seeded):
    x0, y = _inputs(seeded)
    pred = StubPredictor(seeded)
    result = sample_schedule(SamplingSchedule.parse("P3"), x0, y, pred, num_classes=NUM_CLASSES)
    assert result.predictor_calls == len(pred.calls) == 4


def _global_error(spec: str) -> float:
    x0 = torch.linspace(0.5, 2.0, 12, dtype=torch.float64).reshape(1, 3, 2, 2)
    exact = x0 * math.exp(-math.sin(1.0))
    result = sample_schedule(SamplingSchedule.parse(spec), x0, torch.zeros(1, dtype=torch.long), DecayODE(),
                             num_classes=1)
    return float((result.latents - exact).abs().max())


@pytest.mark.parametrize("letter,order", [("E", 1), ("H", 2)])
def test_order_of_convergence(letter, order):
    errors = [_global_error(f"{letter}{n}") for n in (16, 32, 64)]
    for coarse, fine in zip(errors, errors[1:]):
        assert coarse / fine == pytest.approx(2**order, rel=0.08)


def test_combine_guidance_channels(seeded):
    cond = torch.randn(2, 4, 3, 3, generator=seeded)
    uncond = torch.randn(2, 4, 3, 3, generator=seeded)
    full = combine_guidance(cond, uncond, 4.0, None)
    torch.testing.assert_close(full, uncond + 4.0 * (cond - uncond), **tol(torch.float32))
    part = combine_guidance(cond, uncond, 4.0, 3)
    torch.testing.assert_close(part[:, :3], full[:, :3], **tol(torch.float32))
    torch.testing.assert_close(part[:, 3:], cond[:, 3:], **tol(torch.float32))


def test_refiner_required_for_r_steps(seeded):
    x0, y = _inputs(seeded)
    with pytest.raises(SamplingError, match="no refiner"):
        sample_schedule(SamplingSchedule.parse("H1R1"), x0, y, StubPredictor(seeded), num_classes=NUM_CLASSES)


@pytest.mark.parametrize("labels", [[0, 1, 5], [-1, 0, 0]])
def test_class_ids_out_of_range_refused(seeded, labels):
    x0, _ = _inputs(seeded)
    with pytest.raises(SamplingError, match=r"outside \[0, 5\)"):
        sample_schedule(SamplingSchedule.parse("H2"), x0, torch.tensor(labels), StubPredictor(seeded),
                        num_classes=NUM_CLASSES)


def test_nan_names_the_step(seeded):
    x0, y = _inputs(seeded)
    pred = StubPredictor(seeded)

    def poisoned(x, t, yy):
        out = pred(x, t, yy)
        return out * float("nan") if float(t[0]) > 0.6 else out

    with pytest.raises(SamplingError, match=r"after step 3 \(H"):
        sample_schedule(SamplingSchedule.parse("H4"), x0, y, poisoned, num_classes=NUM_CLASSES)


@pytest.mark.parametrize("method", ["dopri5", "adaptive_heun"])
def test_adaptive_solver_accuracy_and_counted_calls(method):
    x0 = torch.linspace(0.5, 2.0, 12, dtype=torch.float64).reshape(1, 3, 2, 2)
    ode = DecayODE()
    result = sample_adaptive(x0, torch.zeros(1, dtype=torch.long), ode, num_classes=1, method=method,
                             atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(result.latents, x0 * math.exp(-math.sin(1.0)), atol=1e-6, rtol=1e-6)
    assert result.predictor_calls == ode.calls > 4
    loose = sample_adaptive(x0, torch.zeros(1, dtype=torch.long), DecayODE(), num_classes=1, method=method,
                            atol=1e-3, rtol=1e-3)
    assert loose.predictor_calls < result.predictor_calls


def test_velocity_norm_rule_lands_on_one_and_counts(seeded):
    x0, y = _inputs(seeded)
    pred = StubPredictor(seeded)
    result = sample_velocity_norm_rule(x0, y, pred, num_classes=NUM_CLASSES, c=0.2, dt_min=0.05, dt_max=0.2,
                                       guidance_scale=2.0)
    times = result.timesteps
    assert times[0] == 0.0 and times[-1] == 1.0
    steps = [b - a for a, b in zip(times, times[1:])]
    assert all(0.05 - 1e-12 <= s <= 0.2 + 1e-12 for s in steps[:-1]) and 0 < steps[-1] <= 0.2 + 1e-12
    assert result.predictor_calls == len(pred.calls) == len(times)
    smaller = sample_velocity_norm_rule(x0, y, StubPredictor(seeded), num_classes=NUM_CLASSES, c=0.05,
                                        dt_min=0.01, dt_max=0.2, guidance_scale=2.0)
    assert smaller.predictor_calls > result.predictor_calls


def test_noise_is_seeded_and_dtype_independent():
    a = make_noise(2, (4, 3, 3), seed=7)
    b = make_noise(2, (4, 3, 3), seed=7, dtype=torch.float64)
    assert torch.equal(a, b.float()) and not torch.equal(a, make_noise(2, (4, 3, 3), seed=8))


def test_partial_guidance_carries_each_halfs_own_unguided_channels(seeded):
    """Pin the per-half rule itself: the refiner's unconditional rows receive the unconditional half's channel 3.

    The rule: with guidance on channels :3 only, a carried velocity is doubled — guided channels equal in both
    halves, channel 3 each half's own output — and the refiner's unconditional branch sees that half. Feeding
    ``cat([v, v])`` of the conditional velocity (the old behaviour) changes the final latents.
    """
    x0, y = _inputs(seeded)
    pred, ref = StubPredictor(seeded), StubRefiner(seeded)
    schedule = SamplingSchedule.parse("H1P1R2", guidance_scale=4.0, guidance_channels=3)
    result = sample_schedule(schedule, x0, y, pred, ref, num_classes=NUM_CLASSES)
    batch = x0.shape[0]
    first_t, v_doubled = ref.calls[0]  # the first R step's first call: (2B, C) velocity rows
    assert first_t == schedule.timesteps[2]
    cond_half, uncond_half = v_doubled[:batch], v_doubled[batch:]
    torch.testing.assert_close(cond_half[:, :3], uncond_half[:, :3], **tol(torch.float64))  # guided: equal
    assert (cond_half[:, 3] - uncond_half[:, 3]).abs().min() > 1e-6  # unguided: each half its own
    expected = _hand_loop("HPRR", x0, y, pred, ref, 4.0, 3)  # the released sampler's doubled loop
    torch.testing.assert_close(result.latents, expected, **tol(torch.float64))
    # And the alternative rule really differs (so this test can tell them apart).
    same_v = sample_schedule(SamplingSchedule.parse("H1P1R2", guidance_scale=4.0, guidance_channels=3),
                             x0, y, pred, _SameHalvesRefiner(ref), num_classes=NUM_CLASSES)
    assert (same_v.latents - result.latents).abs().max() > 1e-4


class _SameHalvesRefiner:
    """Feeds the refiner ``cat([v_cond, v_cond])``: the rule the released code does *not* use."""

    def __init__(self, inner: StubRefiner) -> None:
        self.inner = inner

    def __call__(self, x, t, y, v):
        half = v.shape[0] // 2
        return self.inner(x, t, y, torch.cat([v[:half], v[:half]]))
