"""AOTInductor: one package (the unrolled schedule of a micro model) compiled, loaded and run end to end.

This is the suite's only AOTInductor compile (~20-60 s on 2 cores); it is marked slow but runs in CI.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from tolerances import tol

from flowturbo.export.pipeline import ExportRequest, export_bundle
from flowturbo.export.specs import BatchProfile
from flowturbo.errors import SamplingError
from flowturbo.runtime.aoti_backend import AotiSampler
from flowturbo.schedule import SamplingSchedule
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
