"""The ONNX Runtime backend on the embedded default model: whole-schedule parity with the PyTorch sampler."""

from __future__ import annotations

import pytest
import torch
from tolerances import tol

from flowturbo.export.pipeline import ExportRequest, export_bundle
from flowturbo.export.specs import BatchProfile
from flowturbo.runtime.onnx_backend import OnnxRuntimeSampler, make_noise
from flowturbo.runtime.pytorch_backend import DEFAULT_BUNDLE_DIR
from flowturbo.runtime.results import Samples
from flowturbo.runtime.sampler import Sampler
from flowturbo.training.bundle import load_bundle
from flowturbo.training.sampling import make_noise as reference_make_noise


def test_noise_matches_reference_make_noise():
    for dtype in (torch.float32, torch.float16):
        torch.testing.assert_close(make_noise(3, (4, 5, 5), 17, dtype), reference_make_noise(3, (4, 5, 5), 17, dtype=dtype),
                                   rtol=0, atol=0)


@pytest.mark.slow
def test_default_model_whole_schedule_parity(tmp_path):
    """The default's own schedule (H1R3 with its dt-conditioned refiner, CFG 1.5) on ONNX Runtime == Sampler
    (PyTorch reference) for the same seed, decoded images."""
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    schedule = bundle.defaults.sampling_schedule()
    result = export_bundle(bundle, ExportRequest(schedule, BatchProfile(1, 2, 4), ("onnx",), "fp32", "time-input"),
                           tmp_path / "default", source="embedded default")
    exported = OnnxRuntimeSampler.from_artifacts(result.path, expect={"schedule_id": schedule.id})
    classes = [3, 7, 1]
    got = exported.sample(classes, seed=4)
    want = Sampler.from_bundle(None, device="cpu").sample(classes, schedule=schedule, seed=4, progress=False)
    assert isinstance(got, Samples) and got.images.shape == want.images.shape == (3, 1, 32, 32)
    torch.testing.assert_close(got.images, want.images, **tol("export_fp32"))
    assert (got.predictor_calls, got.refiner_calls) == (want.predictor_calls, want.refiner_calls) == (2, 6)
    assert bundle.refiner_dt is not None and bundle.refiner.config.dt_conditioning  # the default since issue 20
    assert got.labels == want.labels and got.record()["schedule"]["id"] == schedule.id
