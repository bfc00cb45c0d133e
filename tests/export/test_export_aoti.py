"""AOTInductor: packages of the unrolled schedule of a micro model compiled, loaded and run end to end.

These are the suite's only AOTInductor compiles (~20-60 s each on 2 cores); they are marked slow but run in CI.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch
from tolerances import tol

from flowturbo.export.pipeline import ExportRequest, export_bundle
from flowturbo.export.specs import BatchProfile
from flowturbo.errors import SamplingError
from flowturbo.runtime.aoti_backend import AotiSampler
from flowturbo.runtime.cpp_backend import CppSampler, cpp_unavailable_reason
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.autoencoder import AutoencoderConfig, FlowTurboAutoencoderDecoder
from flowturbo.training.sampling import make_noise, sample_schedule


def _micro_bundle():
    path = Path(__file__).with_name("test_export_onnx.py")
    spec = importlib.util.spec_from_file_location("_export_onnx_helpers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_export_onnx_helpers", module)
    spec.loader.exec_module(module)
    return module.micro_bundle(seed=3)


@pytest.mark.slow
def test_aoti_unrolled_package_parity(tmp_path):
    bundle = _micro_bundle()
    schedule = SamplingSchedule.parse("H1R1", guidance_scale=1.5, guidance_channels=2)
    result = export_bundle(bundle, ExportRequest(schedule, BatchProfile(1, 2, 4), ("aoti",), "fp32", "unrolled"),
                           tmp_path / "aoti")
    entry = result.manifest["artifacts"][0]
    assert entry["format"] == "aoti" and entry["file"].endswith(".pt2") and entry["max_abs_error"] < 1e-4
    sampler = AotiSampler.from_artifacts(result.path)
    classes = [4, 1, 0]
    noise = make_noise(3, bundle.latent_shape, 21)
    with torch.no_grad():
        want = bundle.decoder.decode(sample_schedule(schedule, noise, torch.tensor(classes), bundle.predictor,
                                                     bundle.refiner, num_classes=5).latents)
    torch.testing.assert_close(sampler.sample(classes, seed=21).images, want, **tol("export_fp32"))
    one_by_one = sampler.sample(classes, seed=21, batch_size=1)  # same noise, three calls at batch 1
    torch.testing.assert_close(one_by_one.images, want, **tol("export_fp32"))
    with pytest.raises(SamplingError, match="outside the exported profile"):
        sampler.sample([0] * 5, batch_size=5)


def _conv_decoder_bundle():
    """The micro bundle with a tiny convolutional decoder (3x6x6 latents -> 1x12x12 images) instead of the identity."""
    torch.manual_seed(5)  # the decoder's default init
    config = AutoencoderConfig(image_channels=1, image_size=12, latent_channels=3, base_channels=4, channel_mult=(1, 2),
                               num_res_blocks=1, norm_groups=4)
    return dataclasses.replace(_micro_bundle(), decoder=FlowTurboAutoencoderDecoder(config, ("ema",)).eval())


@pytest.mark.slow
def test_aoti_unrolled_conv_decoder_stays_dynamic_when_traced_at_max_batch(tmp_path):
    """Regression: profile 1:16:16 (opt == max) is traced at batch 16, and for every stride-1 convolution
    Inductor's fake kernel asks ATen's CPU backend heuristic ``batch >= 16``; the guard collapsed the batch
    range to [16, 16], so the "dynamic" package was static at 16 and failed at batch 1 with "index out of
    bounds: 0 <= tmp3 < 6" in the label embedding (the bench's default-model H1P5R3 export, validate=False).
    """
    bundle = _conv_decoder_bundle()
    schedule = SamplingSchedule.parse("H1R1", guidance_scale=1.5, guidance_channels=2)
    request = ExportRequest(schedule, BatchProfile(1, 16, 16), ("aoti",), "fp32", "unrolled", validate=False)
    path = export_bundle(bundle, request, tmp_path / "aoti").path
    samplers = [AotiSampler.from_artifacts(path)]
    if cpp_unavailable_reason() is None:  # the C++ runner on the same unrolled package (one engine call)
        samplers.append(CppSampler.from_artifacts(path))
    for sampler, classes in itertools.product(samplers, ([3], [0, 4, 2], [k % 5 for k in range(16)])):
        noise = make_noise(len(classes), bundle.latent_shape, 8)
        with torch.no_grad():
            latents = sample_schedule(schedule, noise, torch.tensor(classes), bundle.predictor, bundle.refiner,
                                      num_classes=5).latents
            want = bundle.decoder.decode(latents)  # (B, 1, 12, 12)
        got = sampler.sample(classes, seed=8).images
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **tol("export_fp32"))


@pytest.mark.parametrize("mismatch", ["none", "dtype", "shape", "count"])
def test_aoti_package_outputs_read_back_against_the_manifest(tmp_path, monkeypatch, mismatch):
    """The first call of a package compares its outputs with the manifest spec (dtype = precision, shape,
    count) and refuses a package that does not match; a matching package runs on."""
    from flowturbo.errors import CheckpointError
    from flowturbo.runtime.aoti_backend import _AotiModule
    from flowturbo.runtime.artifacts import ArtifactEntry

    gen = torch.Generator().manual_seed(0)
    spec = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 3, 6, 6]}],
            "outputs": [{"name": "out", "dtype": "float32", "shape": ["batch", 3, 6, 6]}]}

    def fake_package(*args):
        (x,) = args
        y = x * 2.0  # (B, 3, 6, 6)
        return {"none": [y], "dtype": [y.half()], "shape": [y[:, :2]], "count": [y, y]}[mismatch]

    options = {}

    def fake_load(path, **kwargs):
        options.update(kwargs)
        return fake_package

    monkeypatch.setattr(torch._inductor, "aoti_load_package", fake_load)
    module = _AotiModule(ArtifactEntry("m", "predictor", "aoti", tmp_path / "m.pt2", spec, None), "cpu")
    # One model instance without per-call CUDA events: capturable into a CUDA graph (issue 18, fault 3).
    assert options == {"run_single_threaded": True}
    x = torch.randn(2, 3, 6, 6, generator=gen)
    if mismatch == "none":
        for _ in range(2):
            torch.testing.assert_close(module(x=x)[0], x * 2.0)
        return
    with pytest.raises(CheckpointError, match="m.pt2: the package does not match its manifest"):
        module(x=x)
