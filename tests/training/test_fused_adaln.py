"""Our fused adaLN kernel inside diffusers' SD3 / FLUX transformers (training/families/fused_adaln.py): the swapped
norms give the transformer's own outputs (Triton through the CPU interpreter here), the report says what was fused
and what was not, and ``reference`` leaves diffusers' modules untouched."""

from __future__ import annotations

import pytest
import torch
from tolerances import tol

from flowturbo.families import ImageSize
from flowturbo.training.families import load_family
from flowturbo.training.families.fused_adaln import FUSED_MARK, fuse_adaln


@pytest.fixture(scope="module", params=["sd3", "flux_dev"])
def family(request, tiny_pipelines):
    torch.set_num_threads(1)
    return load_family(tiny_pipelines[request.param], device=torch.device("cpu"), dtype=torch.float32)


def _output(family, seeded_inputs):
    x, cond, sigma = seeded_inputs
    with torch.no_grad():
        return family.transformer_output(x, sigma, family.transformer_inputs(cond, False))


@pytest.fixture
def inputs(family):
    from flowturbo.schedule import SamplingSchedule

    torch.manual_seed(3)
    cond = family.condition(["a photo of the cat", "a dog"], SamplingSchedule.parse("E2"))
    return torch.randn(2, *family.latent_shape(ImageSize(32, 32))), cond, 0.4  # (B, C, h, w), 32x32 images


def test_fused_norms_give_the_transformers_own_output(family, inputs):
    want = _output(family, inputs)
    try:
        report = fuse_adaln(family.transformer, "triton")
        got = _output(family, inputs)
    finally:
        fuse_adaln(family.transformer, "reference")
    assert sum(report.fused.values()) >= 2, report
    assert report.backend == "triton"
    torch.testing.assert_close(got, want, **tol("model_fp32"))
    # the last norm (AdaLayerNormContinuous) is another pattern: said, not fused
    assert "AdaLayerNormContinuous" in report.not_fused and "scale, shift" in report.not_fused["AdaLayerNormContinuous"]


def test_reference_swaps_nothing_and_undoes_a_fusion(family):
    fuse_adaln(family.transformer, "triton")
    report = fuse_adaln(family.transformer, "reference")
    assert report.fused == {} and not any(hasattr(m, FUSED_MARK) for m in family.transformer.modules())
    assert all("forward" not in vars(m) for m in family.transformer.modules())


def test_a_wrong_modulation_would_be_caught(family, inputs, monkeypatch):
    """The comparison above bites: a fused forward that swaps shift and scale differs from diffusers'."""
    import flowturbo.training.families.fused_adaln as fused

    want = _output(family, inputs)
    real = fused.layernorm_modulate
    monkeypatch.setattr(fused, "layernorm_modulate", lambda x, shift, scale, eps, backend: real(x, scale, shift, eps,
                                                                                                backend=backend))
    try:
        fuse_adaln(family.transformer, "triton")
        got = _output(family, inputs)
    finally:
        fuse_adaln(family.transformer, "reference")
    assert not torch.allclose(got, want, **tol("model_fp32"))


def test_the_reference_path_records_that_nothing_is_fused(tiny_pipelines):
    from flowturbo.runtime.sampler import Sampler

    reference = Sampler.from_pipeline(str(tiny_pipelines["sd3"]), device="cpu", dtype="float32")
    fusion = reference.pipeline.family.describe()["adaln_fusion"]
    assert fusion["backend"] == "reference" and fusion["fused"] == {}
    assert "AdaLayerNormContinuous" in fusion["not_fused"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the runtime runs Triton kernels on CUDA only (the CPU "
                                                           "interpreter check is the module-level test above)")
def test_the_fast_path_samples_as_the_reference_and_records_the_fusion(tiny_pipelines):
    """``Sampler.from_pipeline(device="cuda")`` (Triton kernels by default) fuses the norms and gives the reference
    path's images; run.json's model record says what was fused."""
    from flowturbo.runtime.sampler import Sampler

    prompts, size = ["a photo of the cat"], ImageSize(32, 32)
    fast = Sampler.from_pipeline(str(tiny_pipelines["sd3"]), device="cuda", dtype="float32", kernel_backend="triton")
    fusion = fast.pipeline.family.describe()["adaln_fusion"]
    assert fusion["backend"] == "triton" and fusion["fused"]["AdaLayerNormZero"] >= 2
    got = fast.sample(prompts=prompts, schedule="H2", size=size, seed=1, progress=False)
    reference = Sampler.from_pipeline(str(tiny_pipelines["sd3"]), device="cuda", dtype="float32",
                                      kernel_backend="reference")
    want = reference.sample(prompts=prompts, schedule="H2", size=size, seed=1, progress=False)
    torch.testing.assert_close(got.images.cpu(), want.images.cpu(), **tol("sampler_fp32"))
