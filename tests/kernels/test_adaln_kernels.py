"""Fused adaLN kernels (Triton; the interpreter on CPU) against their float32 PyTorch references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import tol

import flowturbo.kernels._common as common
from flowturbo.errors import FlowTurboError
from flowturbo.kernels import (
    KernelBackend,
    gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_reference,
    gated_residual_layernorm_modulate_triton,
    layernorm_modulate,
    layernorm_modulate_reference,
    layernorm_modulate_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="bf16 is checked on a GPU only (the interpreter computes bf16 wrongly)"
)

# (B, T, D): odd widths (masked loads), one and several rows, SiT-XL's 1152 with tiny T, a long thin case.
SHAPES = [(1, 1, 72), (3, 7, 72), (1, 7, 1151), (3, 1, 1151), (1, 2, 1152), (1, 256, 40)]
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=requires_cuda)]


def _inputs(batch, tokens, width, dtype, seed=0):
    """Random non-zero x, y and chunk views of one (B, 6D) adaLN projection, as the model passes them."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, width, generator=gen) * 2 + 0.5
    y = torch.randn(batch, tokens, width, generator=gen)
    mods = torch.randn(batch, 6 * width, generator=gen) * 0.5  # (B, 6D)
    x, y, mods = (t.to(device=DEVICE, dtype=dtype) for t in (x, y, mods))
    gate, shift, scale = mods.chunk(6, dim=1)[:3]  # (B, D) views with row stride 6D
    return x, y, gate, shift, scale


def _poisoned(like):
    return torch.full_like(like, float("nan"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layernorm_modulate_matches_reference(shape, dtype):
    x, _, _, shift, scale = _inputs(*shape, dtype)
    out = _poisoned(x)
    result = layernorm_modulate_triton(x, shift, scale, out=out)
    assert result is out
    expected = layernorm_modulate_reference(x, shift, scale)
    torch.testing.assert_close(out, expected, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_residual_layernorm_modulate_matches_reference(shape, dtype):
    x, y, gate, shift, scale = _inputs(*shape, dtype, seed=1)
    x_out, out = _poisoned(x), _poisoned(x)
    result = gated_residual_layernorm_modulate_triton(x, y, gate, shift, scale, x_out=x_out, out=out)
    assert result[0] is x_out and result[1] is out
    x_expected, expected = gated_residual_layernorm_modulate_reference(x, y, gate, shift, scale)
    torch.testing.assert_close(x_out, x_expected, **tol(dtype))
    torch.testing.assert_close(out, expected, **tol(dtype))


def test_reference_is_the_sit_formula():
    """The reference itself against nn.LayerNorm(affine=False) + modulate (independent float64 oracle)."""
    x, y, gate, shift, scale = (t.double().cpu() for t in _inputs(2, 5, 72, torch.float32, seed=2))
    ln = torch.nn.LayerNorm(72, elementwise_affine=False, eps=1e-6).double()
    expected = ln(x) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(layernorm_modulate_reference(x.float(), shift.float(), scale.float()).double(),
                               expected, **tol(torch.float32))
    residual = x + gate[:, None] * y
    x_new, modulated = gated_residual_layernorm_modulate_reference(x.float(), y.float(), gate.float(),
                                                                   shift.float(), scale.float())
    torch.testing.assert_close(x_new.double(), residual, **tol(torch.float32))
    torch.testing.assert_close(modulated.double(), ln(residual) * (1 + scale[:, None]) + shift[:, None],
                               **tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dispatchers_agree_across_backends(dtype):
    x, y, gate, shift, scale = _inputs(3, 7, 72, dtype, seed=3)
    torch.testing.assert_close(
        layernorm_modulate(x, shift, scale, backend=KernelBackend.TRITON),
        layernorm_modulate(x, shift, scale, backend="reference"),
        **tol(dtype),
    )
    fused = gated_residual_layernorm_modulate(x, y, gate, shift, scale, backend="triton")
    plain = gated_residual_layernorm_modulate(x, y, gate, shift, scale, backend=KernelBackend.REFERENCE)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, **tol(dtype))


def test_contiguous_modulation_and_non_default_eps():
    x, _, _, shift, scale = _inputs(2, 3, 72, torch.float32, seed=4)
    shift, scale = shift.contiguous(), scale.contiguous()
    eps = 1e-2  # large enough to matter: catches an eps that is ignored or applied outside the sqrt
    out = layernorm_modulate_triton(x, shift, scale, eps)
    torch.testing.assert_close(out, layernorm_modulate_reference(x, shift, scale, eps), **tol(torch.float32))
    assert not torch.allclose(out, layernorm_modulate_reference(x, shift, scale), **tol(torch.float32))


def test_cpu_op_falls_back_to_reference_without_interpreter(monkeypatch):
    """Without the interpreter the registered op's CPU kernel is the reference (never a crash)."""
    x, y, gate, shift, scale = (t.cpu() for t in _inputs(2, 3, 72, torch.float32, seed=5))
    monkeypatch.setattr(common, "_InterpretedFunction", type("NeverInterpreted", (), {}))
    out = torch.ops.flowturbo.layernorm_modulate(x, shift, scale, 1e-6)
    torch.testing.assert_close(out, layernorm_modulate_reference(x, shift, scale), **tol(torch.float32))
    x_new, modulated = torch.ops.flowturbo.gated_residual_layernorm_modulate(x, y, gate, shift, scale, 1e-6)
    torch.testing.assert_close(modulated, gated_residual_layernorm_modulate_reference(x, y, gate, shift, scale)[1],
                               **tol(torch.float32))


# ------------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs_raise_clear_errors():
    x, y, gate, shift, scale = _inputs(2, 3, 72, torch.float32, seed=6)
    with pytest.raises(FlowTurboError, match="dtype mismatch"):
        layernorm_modulate(x, shift.half(), scale, backend="triton")
    with pytest.raises(FlowTurboError, match="must be contiguous"):
        layernorm_modulate(x.transpose(0, 1).contiguous().transpose(0, 1), shift, scale, backend="triton")
    with pytest.raises(FlowTurboError, match="contiguous along its last dim"):
        layernorm_modulate(x, torch.randn(72, 2, device=DEVICE).T, scale, backend="triton")
    with pytest.raises(FlowTurboError, match=r"shift must have shape \(B, D\)"):
        layernorm_modulate(x, torch.randn(2, 73, device=DEVICE), scale, backend="triton")
    with pytest.raises(FlowTurboError, match=r"x must be \(B, T, D\)"):
        layernorm_modulate(x[0], shift, scale, backend="triton")
    with pytest.raises(FlowTurboError, match="supported: float32, float16, bfloat16"):
        layernorm_modulate(x.double(), shift.double(), scale.double(), backend="triton")
    with pytest.raises(FlowTurboError, match=r"y must have shape \(B, T, D\)"):
        gated_residual_layernorm_modulate(x, y[:, :2], gate, shift, scale, backend="triton")
    with pytest.raises(FlowTurboError, match="out must be"):
        layernorm_modulate_triton(x, shift, scale, out=torch.empty_like(x, dtype=torch.float16))
    with pytest.raises(FlowTurboError, match="unknown kernel backend"):
        layernorm_modulate(x, shift, scale, backend="cuda-magic")


def test_triton_backend_explains_unusable_devices(monkeypatch):
    x, _, _, shift, scale = (t.cpu() for t in _inputs(1, 2, 72, torch.float32, seed=7))
    monkeypatch.setattr(common, "_InterpretedFunction", type("NeverInterpreted", (), {}))
    with pytest.raises(FlowTurboError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        layernorm_modulate(x, shift, scale, backend="triton")
    monkeypatch.setattr(common, "TRITON_AVAILABLE", False)
    with pytest.raises(FlowTurboError, match="needs Triton"):
        gated_residual_layernorm_modulate(x, x, shift, shift, scale, backend="triton")
    # the reference backend is unaffected
    torch.testing.assert_close(layernorm_modulate(x, shift, scale),
                               F.layer_norm(x, (72,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None],
                               **tol(torch.float32))


def test_adaln_eps_is_one_pinned_constant():
    """Models and kernels use one LayerNorm eps, the official 1e-6 (nn.LayerNorm(..., eps=1e-6) in SiT/DiT)."""
    import inspect

    from flowturbo.kernels import adaln
    from flowturbo.training import models

    assert adaln.ADALN_EPS == 1e-6
    assert models.ADALN_EPS is adaln.ADALN_EPS
    for fn in (adaln.layernorm_modulate_reference, adaln.gated_residual_layernorm_modulate_reference,
               adaln.layernorm_modulate, adaln.gated_residual_layernorm_modulate):
        assert inspect.signature(fn).parameters["eps"].default == adaln.ADALN_EPS


def test_float64_reference_stays_float64():
    """The float64 reference path keeps float64 through LayerNorm + modulate (no float32 round trip)."""
    x, y, gate, shift, scale = (t.double().cpu() for t in _inputs(2, 5, 72, torch.float32, seed=4))
    x = x * 1e3 + 7.0  # a large mean: float32 statistics would lose ~1e-7 relative
    ln = torch.nn.LayerNorm(72, elementwise_affine=False, eps=1e-6).double()
    out = layernorm_modulate_reference(x, shift, scale)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ln(x) * (1 + scale[:, None]) + shift[:, None], **tol(torch.float64))
    residual, modulated = gated_residual_layernorm_modulate_reference(x, y, gate, shift, scale)
    torch.testing.assert_close(residual, x + gate[:, None] * y, **tol(torch.float64))
    torch.testing.assert_close(modulated, ln(residual) * (1 + scale[:, None]) + shift[:, None], **tol(torch.float64))
