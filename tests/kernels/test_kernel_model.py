"""A whole small SiT with the fused Triton adaLN kernels agrees with the reference backend."""

from __future__ import annotations

import torch
from tolerances import tol

import flowturbo.kernels.adaln as adaln

from flowturbo.kernels import KernelBackend
from flowturbo.training.models import SiT, perturb_zero_initialized, sit_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_sit_triton_backend_matches_reference_backend(monkeypatch):
    config = sit_config("SiT-T/2", input_size=8, in_channels=4, num_classes=10)
    gen = torch.Generator().manual_seed(0)
    model = SiT(config, kernel_backend=KernelBackend.REFERENCE)
    model.initialize_weights(gen)
    perturb_zero_initialized(model, std=0.2, generator=gen)  # non-zero gates / shifts / scales
    model = model.to(DEVICE).eval()
    batch = 3
    x = torch.randn(batch, 4, 8, 8, generator=gen).to(DEVICE)
    t = torch.rand(batch, generator=gen).to(DEVICE)
    y = torch.tensor([1, 7, config.num_classes], device=DEVICE)  # includes the null label
    launches = []
    real_run = adaln._run  # (x, y, gate, shift, scale, ...): y is None for the plain LayerNorm+modulate

    def spy(*args, **kwargs):
        launches.append(args[1] is not None)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(adaln, "_run", spy)
    with torch.no_grad():
        reference = model(x, t, y)
        assert not launches
        fused = model.set_kernel_backend(KernelBackend.TRITON)(x, t, y)
    # every block: norm1 (plain for block 0, fused with the previous MLP residual after) and the fused
    # attention residual + norm2; then the last MLP residual fused into the final layer's norm.
    assert launches == [False] + [True] * (2 * config.depth)
    assert fused.shape == (batch, config.out_channels, 8, 8)
    assert reference.abs().mean() > 1e-3  # the comparison is not between two near-zero outputs
    torch.testing.assert_close(fused, reference, **tol("model_fp32"))
