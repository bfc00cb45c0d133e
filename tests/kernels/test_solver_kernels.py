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
        cfg_predict(raw.half(), x, H, SCALE, backend="triton")
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
