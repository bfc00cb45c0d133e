"""Fused CFG + solver-update kernels against a float64 hand-written formula and their references."""

from __future__ import annotations

import pytest
import torch
from tolerances import tol

from flowturbo.errors import FlowTurboError
from flowturbo.kernels import (
    cfg_correct,
    cfg_correct_reference,
    cfg_correct_triton,
    cfg_guided_reference,
    cfg_predict,
    cfg_predict_reference,
    cfg_predict_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="bf16 is checked on a GPU only (the interpreter computes bf16 wrongly)"
)
H = 1.0 / 7.0  # not representable in float32: catches a float64 kernel that rounds h
SCALE = 4.0

# (B, C, C_out, H, W, guidance_channels, with CFG rows): official 3-of-4 guidance with learn_sigma, all
# channels, none, odd spatial sizes, and a conditional-only raw (B rows).
CASES = [
    (1, 4, 8, 4, 4, 3, True),
    (3, 4, 4, 5, 3, None, True),
    (2, 3, 6, 7, 5, 0, True),
    (2, 4, 4, 3, 3, 2, False),
    (1, 4, 8, 32, 33, None, True),  # more than one program of the elementwise kernel
]
DTYPES = [torch.float64, torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=requires_cuda)]


def _case(batch, channels, out_channels, height, width, cfg, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * batch if cfg else batch
    raw = torch.randn(rows, out_channels, height, width, generator=gen, dtype=torch.float64)
    state_shape = (batch, channels, height, width)
    x, d, base = (torch.randn(state_shape, generator=gen, dtype=torch.float64) + 0.25 for _ in range(3))
    return tuple(t.to(device=DEVICE, dtype=dtype) for t in (raw, x, d, base))


def _formula(raw, x, h, s, guided, base, d_prev=None):
    """DESIGN.md §2 in float64, written out per channel: cond rows first; unguided channels take c."""
    raw, x = raw.double().cpu(), x.double().cpu()
    batch, channels = x.shape[:2]
    velocity = torch.empty_like(x)
    for ch in range(channels):
        c = raw[:batch, ch]
        if raw.shape[0] == 2 * batch and ch < guided:
            u = raw[batch:, ch]
            velocity[:, ch] = u + s * (c - u)
        else:
            velocity[:, ch] = c
    if base is not None:
        velocity = base.double().cpu() + velocity
    if d_prev is None:
        return velocity, x + h * velocity  # (d, x_pred)
    return x + h / 2 * (d_prev.double().cpu() + velocity), velocity  # (x_new, d2)


def _assert_close(actual, expected, dtype):
    for a, e in zip(actual, expected):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double().cpu(), e.double().cpu(), **tol(dtype))


def _poisoned(like):
    return torch.full_like(like, float("nan"))


@pytest.mark.parametrize("with_base", [False, True], ids=["no_base", "base"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_cfg_predict(case, dtype, with_base):
    batch, channels, out_channels, height, width, guidance, cfg = case
    raw, x, _, base = _case(batch, channels, out_channels, height, width, cfg, dtype)
    base = base if with_base else None
    d_out, x_out = _poisoned(x), _poisoned(x)
    result = cfg_predict_triton(raw, x, H, SCALE, guidance, base, d_out=d_out, x_out=x_out)
    assert result[0] is d_out and result[1] is x_out
    reference = cfg_predict_reference(raw, x, H, SCALE, guidance, base)
    _assert_close(result, reference, dtype)
    if dtype == torch.float64:  # both against the hand-written formula at float64 precision
        formula = _formula(raw, x, H, SCALE, channels if guidance is None else guidance, base)
        _assert_close(result, formula, dtype)
        _assert_close(reference, formula, dtype)


@pytest.mark.parametrize("with_base", [False, True], ids=["no_base", "base"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_cfg_correct(case, dtype, with_base):
    batch, channels, out_channels, height, width, guidance, cfg = case
    raw, x, d, base = _case(batch, channels, out_channels, height, width, cfg, dtype, seed=1)
    base = base if with_base else None
    x_out, d_out = _poisoned(x), _poisoned(x)
    result = cfg_correct_triton(raw, x, d, H, SCALE, guidance, base, x_out=x_out, d_out=d_out)
    assert result[0] is x_out and result[1] is d_out
    reference = cfg_correct_reference(raw, x, d, H, SCALE, guidance, base)
    _assert_close(result, reference, dtype)
    if dtype == torch.float64:
        formula = _formula(raw, x, H, SCALE, channels if guidance is None else guidance, base, d_prev=d)
        _assert_close(result, formula, dtype)
        _assert_close(reference, formula, dtype)


def test_unguided_channels_take_the_conditional_half_and_sigma_is_ignored():
    """Official SiT/FlowTurbo forward_with_cfg: channels >= 3 are the conditional rows' values."""
    raw, x, _, _ = _case(2, 4, 8, 3, 5, True, torch.float32, seed=2)
    raw[:, 4:] = float("nan")  # learn_sigma channels must never be read
    for backend in ("reference", "triton"):
        d, _ = cfg_predict(raw, x, H, SCALE, 3, backend=backend)
        assert torch.isfinite(d).all()
        torch.testing.assert_close(d[:, 3], raw[:2, 3], **tol(torch.float32))
        cond, uncond = raw[:2, :3], raw[2:, :3]
        torch.testing.assert_close(d[:, :3], uncond + SCALE * (cond - uncond), **tol(torch.float32))
        assert not torch.allclose(d[:, 3], raw[2:, 3])


def test_strided_raw_view_is_read_in_place():
    """``raw[:, :C]`` of a learn_sigma output (batch/channel strides of the full tensor) needs no copy."""
    full, x, d, base = _case(3, 4, 8, 5, 3, True, torch.float32, seed=3)
    view = full[:, :4]
    assert not view.is_contiguous()
    _assert_close(cfg_correct_triton(view, x, d, H, SCALE, 3, base),
                  cfg_correct_reference(full, x, d, H, SCALE, 3, base), torch.float32)


def test_refiner_step_composes_from_the_two_ops():
    """DESIGN.md §2 R step: d = v + r1, x~ = x + h d, d' = d + r2, x <- x + h/2 (d + d'); carry d."""
    raw1, x, v, _ = _case(2, 4, 4, 3, 3, True, torch.float64, seed=4)
    raw2 = _case(2, 4, 4, 3, 3, True, torch.float64, seed=5)[0]
    d, x_tilde = cfg_predict(raw1, x, H, SCALE, None, base=v, backend="triton")
    x_new, d_prime = cfg_correct(raw2, x, d, H, SCALE, None, base=d, backend="triton")
    g1 = cfg_guided_reference(raw1, 2, 4, SCALE)
    g2 = cfg_guided_reference(raw2, 2, 4, SCALE)
    torch.testing.assert_close(d, v + g1, **tol(torch.float64))
    torch.testing.assert_close(x_tilde, x + H * (v + g1), **tol(torch.float64))
    torch.testing.assert_close(d_prime, v + g1 + g2, **tol(torch.float64))
    torch.testing.assert_close(x_new, x + H / 2 * (2 * (v + g1) + g2), **tol(torch.float64))


def test_dispatchers_agree_across_backends():
    raw, x, d, base = _case(2, 4, 8, 5, 5, True, torch.float32, seed=6)
    for backend_result, reference_result in (
        (cfg_predict(raw, x, H, SCALE, 3, base, backend="triton"), cfg_predict(raw, x, H, SCALE, 3, base)),
        (cfg_correct(raw, x, d, H, SCALE, None, backend="triton"), cfg_correct(raw, x, d, H, SCALE, None)),
    ):
        _assert_close(backend_result, reference_result, torch.float32)


def test_bad_inputs_raise_clear_errors():
    raw, x, d, base = _case(2, 4, 8, 3, 3, True, torch.float32, seed=7)
    with pytest.raises(FlowTurboError, match="dtype mismatch"):
        cfg_correct(raw, x, d.half(), H, SCALE, backend="triton")  # the state shares one dtype (raw may differ)
    with pytest.raises(FlowTurboError, match=r"raw must be \(2B, C_out, H, W\) with B = 2"):
        cfg_predict(raw[:3], x, H, SCALE, backend="triton")
    with pytest.raises(FlowTurboError, match=r"C_out >= 4"):
        cfg_predict(raw[:, :2].contiguous(), x, H, SCALE, backend="triton")
    with pytest.raises(FlowTurboError, match="guidance_channels must be in"):
        cfg_predict(raw, x, H, SCALE, 5, backend="triton")
    with pytest.raises(FlowTurboError, match="guidance_channels must be in"):
        cfg_correct(raw, x, d, H, SCALE, -1)
    with pytest.raises(FlowTurboError, match="d must be contiguous"):
        cfg_correct(raw, x, d.transpose(2, 3), H, SCALE, backend="triton")
    with pytest.raises(FlowTurboError, match=r"base must have shape"):
        cfg_correct(raw, x, d, H, SCALE, base=base[:1], backend="triton")
    with pytest.raises(FlowTurboError, match=r"contiguous \(H, W\) planes"):
        cfg_predict(raw.transpose(2, 3), x, H, SCALE, backend="triton")
    with pytest.raises(FlowTurboError, match="supported: float64"):
        cfg_predict(raw.int(), x.int(), H, SCALE, backend="triton")
    with pytest.raises(FlowTurboError, match="d_out must be"):
        cfg_predict_triton(raw, x, H, SCALE, d_out=torch.empty(2, 4, 3, 4, device=DEVICE))


# ----------------------------------------------------------------------------- per-CFG-half velocities


def _halves_formula(raw, x, h, s, guided, base, d_prev=None):
    """The per-half rule of flowturbo.integrator in float64, channel by channel: the second half of the
    velocity keeps the unconditional rows' own unguided channels; x moves with the first half."""
    raw, x = raw.double().cpu(), x.double().cpu()
    batch, channels = x.shape[:2]
    velocity = torch.empty(batch, 2 * channels, *x.shape[2:], dtype=torch.float64)
    for ch in range(channels):
        c, u = raw[:batch, ch], raw[batch:, ch]
        g = u + s * (c - u)
        velocity[:, ch] = g if ch < guided else c
        velocity[:, channels + ch] = g if ch < guided else u
    if base is not None:
        velocity = base.double().cpu() + velocity
    first = velocity[:, :channels]
    if d_prev is None:
        return velocity, x + h * first
    return x + h / 2 * (d_prev.double().cpu()[:, :channels] + first), velocity


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_half_velocity_predict_and_correct(backend, dtype):
    """(B, 2C, H, W) velocities: unguided channels differ per half, guided ones are equal; x uses half 1."""
    batch, channels, height, width, guided = 2, 4, 5, 3, 3
    gen = torch.Generator().manual_seed(11)
    raw = torch.randn(2 * batch, 8, height, width, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    x = (torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64) + 0.25).to(DEVICE, dtype)
    base, d_prev = ((torch.randn(batch, 2 * channels, height, width, generator=gen, dtype=torch.float64) - 0.5)
                    .to(DEVICE, dtype) for _ in range(2))
    d, x_pred = cfg_predict(raw, x, H, SCALE, guided, base, backend=backend, halves=True)
    assert d.shape == (batch, 2 * channels, height, width)
    _assert_close((d, x_pred), _halves_formula(raw, x, H, SCALE, guided, base), dtype)
    g, _ = cfg_predict(raw, x, H, SCALE, guided, backend=backend, halves=True)  # no base: the guided velocity
    assert not torch.allclose(g[:, guided:channels], g[:, channels + guided:])  # unguided channels differ per half
    torch.testing.assert_close(g[:, :guided], g[:, channels:channels + guided], **tol(dtype))  # guided ones agree
    x_new, d2 = cfg_correct(raw, x, d_prev, H, SCALE, guided, base, backend=backend, halves=True)
    _assert_close((x_new, d2), _halves_formula(raw, x, H, SCALE, guided, base, d_prev=d_prev), dtype)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_per_half_velocity_from_already_guided_rows(backend):
    """B-row raw in the per-half layout (an exported graph's output): d = base + raw, both halves kept."""
    gen = torch.Generator().manual_seed(12)
    raw = torch.randn(3, 8, 4, 4, generator=gen).to(DEVICE)
    x = torch.randn(3, 4, 4, 4, generator=gen).to(DEVICE)
    base = torch.randn(3, 8, 4, 4, generator=gen).to(DEVICE)
    d, x_pred = cfg_predict(raw, x, H, SCALE, 3, base, backend=backend, halves=True)
    torch.testing.assert_close(d, base + raw, **tol(torch.float32))
    torch.testing.assert_close(x_pred, x + H * (base + raw)[:, :4], **tol(torch.float32))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_narrow_model_output_feeds_a_float32_state(backend):
    """A float16 raw output with a float32 state: read and widened in place of a separate cast."""
    raw, x, d, base = _case(2, 4, 8, 3, 5, True, torch.float32, seed=13)
    got = cfg_correct(raw.half(), x, d, H, SCALE, 3, base, backend=backend)
    want = cfg_correct_reference(raw.half().float(), x, d, H, SCALE, 3, base)
    assert got[0].dtype == torch.float32
    _assert_close(got, want, torch.float32)


def test_launch_config_covers_every_pixel_once():
    """One program per (plane, pixel block): blocks are powers of two within the bounds, warps grow with them."""
    from flowturbo.kernels._common import SOLVER_MAX_BLOCK, SOLVER_MIN_BLOCK
    from flowturbo.kernels.solver import solver_launch_config

    for hw in (1, 15, 64, 1023, 1024, 4096, 16384):
        block, warps = solver_launch_config(hw)
        assert SOLVER_MIN_BLOCK <= block <= SOLVER_MAX_BLOCK and block & (block - 1) == 0
        assert 1 <= warps <= 4 and (block >= min(hw, SOLVER_MAX_BLOCK))
