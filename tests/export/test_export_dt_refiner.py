"""A dt-conditioned refiner through every export variant and runtime: its graphs take (time-input) or fold (per-step,
unrolled) the velocity age dt, and ONNX Runtime, AOTInductor's Python loop and the C++ runner give the PyTorch
path's images; a manifest / graph mismatch is refused at load; a schedule beyond the trained range warns once.

The micro models (tests/micro_models.py) have a strong dt path, so a graph fed the step size instead of the age,
or no dt at all, fails these parity tests.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
from micro_models import MICRO_LATENT, SENSITIVITY_FACTOR, rewrite_manifest
from tolerances import tol

from flowturbo.errors import CheckpointError
from flowturbo.export.pipeline import ExportRequest, export_bundle
from flowturbo.export.specs import BatchProfile
from flowturbo.integrator import refiner_call_plan
from flowturbo.refiner_dt import DtDistribution, RefinerRangeWarning
from flowturbo.runtime.artifacts import load_artifacts
from flowturbo.runtime.onnx_backend import OnnxRuntimeSampler
from flowturbo.schedule import SamplingSchedule

NUM_CLASSES = 5
# Partial guidance (per-half carry); R after P (ages 0, h) and R after R (h, 2h); uneven steps.
SCHEDULE = SamplingSchedule.parse("H1P1R2", guidance_scale=1.7, guidance_channels=2,
                                  timesteps=(0.0, 0.3, 0.55, 0.8, 1.0))
RECORD = DtDistribution(max_dt=0.5, small_share=0.3, small_max=0.1)  # every call of SCHEDULE is inside it
PROFILE = BatchProfile(1, 2, 4)
CLASSES = [4, 0, 2]


def _onnx_test_helpers():
    """tests/export/test_export_onnx.py as a module (its micro bundle and PyTorch reference images)."""
    module = sys.modules.get("_export_onnx_helpers")
    if module is None:
        spec = importlib.util.spec_from_file_location("_export_onnx_helpers",
                                                      Path(__file__).parent / "test_export_onnx.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["_export_onnx_helpers"] = module
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bundle():
    return _onnx_test_helpers().micro_bundle(seed=21, dt_conditioning=True, refiner_dt=RECORD)


def _reference(bundle, schedule, classes, seed):
    """The PyTorch path's images (sample_schedule on the eager models, then the decoder)."""
    return _onnx_test_helpers()._reference_images(bundle, schedule, classes, seed)


def _export(bundle, tmp_path_factory, variant, formats=("onnx",), schedule=SCHEDULE):
    out = tmp_path_factory.mktemp("dt") / f"{variant}-{'-'.join(formats)}"
    return export_bundle(bundle, ExportRequest(schedule, PROFILE, formats, "fp32", variant), out, source="micro",
                         progress=False)


@pytest.fixture(scope="module")
def time_input(bundle, tmp_path_factory):
    return _export(bundle, tmp_path_factory, "time-input", ("onnx", "aoti"))


def test_the_micro_dt_refiner_depends_strongly_on_dt(bundle):
    gen = torch.Generator().manual_seed(3)
    x, v = torch.randn(2, *MICRO_LATENT, generator=gen), torch.randn(2, *MICRO_LATENT, generator=gen)
    t, y = torch.full((2,), 0.6), torch.tensor([1, 4])
    with torch.no_grad():
        gap = bundle.refiner(x, t, y, v, torch.zeros(2)) - bundle.refiner(x, t, y, v, torch.full((2,), 0.25))
    assert gap.abs().max() >= SENSITIVITY_FACTOR * tol("export_fp32")["atol"]


def test_time_input_refiner_graph_takes_dt_and_records_it(time_input):
    manifest = time_input.manifest
    refiner = next(a for a in manifest["artifacts"] if a["role"] == "refiner" and a["format"] == "onnx")
    assert [t["name"] for t in refiner["spec"]["inputs"]] == ["latents", "v", "t", "dt", "labels"]
    assert manifest["model"]["refiner_dt_conditioning"] is True and manifest["model"]["refiner_dt"] == RECORD.to_dict()
    assert load_artifacts(time_input.path).refiner_dt == RECORD


def test_onnx_time_input_equals_the_pytorch_path(bundle, time_input):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RefinerRangeWarning)  # inside the trained range: no warning
        images = OnnxRuntimeSampler.from_artifacts(time_input.path).sample(CLASSES, seed=3).images
    want = _reference(bundle, SCHEDULE, CLASSES, 3)
    assert float(want.abs().mean()) > 0.1
    torch.testing.assert_close(images, want, **tol("export_fp32"))


def test_aoti_loop_and_cpp_runner_equal_the_pytorch_path(bundle, time_input):
    from flowturbo.runtime.aoti_backend import AotiSampler
    from flowturbo.runtime.cpp_backend import CppSampler, cpp_unavailable_reason

    aoti = AotiSampler.from_artifacts(time_input.path).sample(CLASSES, seed=4).images
    torch.testing.assert_close(aoti, _reference(bundle, SCHEDULE, CLASSES, 4), **tol("export_fp32"))
    if cpp_unavailable_reason() is not None:
        pytest.skip(str(cpp_unavailable_reason()))
    cpp = CppSampler.from_artifacts(time_input.path).sample(CLASSES, seed=4).images
    assert torch.equal(cpp, aoti)  # same packages, same dt buffers, same op order: the same bits


# Three R steps in a row: t_4 = 0.8 is called with two dts (0.8 - t_2 by the first R-after-R step's second call,
# 0.8 - t_3 by the next step's first call), so graphs keyed by t alone would fold the wrong one.
FOLDED = SamplingSchedule.parse("HPRRR", guidance_scale=1.7, guidance_channels=2, timesteps=(0, 0.2, 0.4, 0.6, 0.8, 1))


@pytest.mark.parametrize("variant", ["per-step", "unrolled"])
def test_folded_variants_equal_the_pytorch_path(bundle, tmp_path_factory, variant):
    """per-step: one refiner graph per (t, dt) the schedule calls it at (the stem names t's and t_v's grid
    indices); unrolled: both folded inside the one graph."""
    result = _export(bundle, tmp_path_factory, variant, schedule=FOLDED)
    refiners = [a for a in result.manifest["artifacts"] if a["role"] == "refiner"]
    if variant == "per-step":
        keys = sorted({(c.t, c.dt) for c in refiner_call_plan(FOLDED)})
        assert sorted((a["time"], a["dt"]) for a in refiners) == keys and len(keys) == 5
        assert sorted(a["module"] for a in refiners) == ["refiner_step_t002_v002", "refiner_step_t003_v002",
                                                          "refiner_step_t004_v002", "refiner_step_t004_v003",
                                                          "refiner_step_t005_v003"]
    images = OnnxRuntimeSampler.from_artifacts(result.path).sample(CLASSES, seed=6).images
    torch.testing.assert_close(images, _reference(bundle, FOLDED, CLASSES, 6), **tol("export_fp32"))


def test_cpp_runner_per_step_graphs_keyed_by_t_and_dt(bundle, tmp_path_factory):
    from flowturbo.runtime.aoti_backend import AotiSampler
    from flowturbo.runtime.cpp_backend import CppSampler, cpp_unavailable_reason

    if cpp_unavailable_reason() is not None:
        pytest.skip(str(cpp_unavailable_reason()))
    schedule = SamplingSchedule.parse("H1R2", guidance_scale=1.7, guidance_channels=2)  # (t, dt) keys: 3 graphs
    result = _export(bundle, tmp_path_factory, "per-step", ("aoti",), schedule)
    cpp = CppSampler.from_artifacts(result.path).sample(CLASSES, seed=8).images
    torch.testing.assert_close(cpp, _reference(bundle, schedule, CLASSES, 8), **tol("export_fp32"))
    assert torch.equal(cpp, AotiSampler.from_artifacts(result.path).sample(CLASSES, seed=8).images)


# ------------------------------------------------------------------------------------------------ bad input
def test_a_dt_export_without_its_dt_input_is_refused(time_input, tmp_path):
    """The manifest says dt-conditioned but the refiner graph takes no dt (a graph from another export): refused at
    load by the Python reader and the C++ runner, never run without its dt."""
    import shutil

    from flowturbo.runtime.cpp_backend import CppSampler, cpp_unavailable_reason

    broken = tmp_path / "no-dt"
    shutil.copytree(time_input.path, broken)

    def drop_dt(manifest):
        for artifact in manifest["artifacts"]:
            if artifact["role"] == "refiner":
                artifact["spec"]["inputs"] = [t for t in artifact["spec"]["inputs"] if t["name"] != "dt"]

    rewrite_manifest(broken, drop_dt)
    with pytest.raises(CheckpointError, match="has no dt input .* says the refiner is dt-conditioned"):
        OnnxRuntimeSampler.from_artifacts(broken)
    if cpp_unavailable_reason() is None:
        with pytest.raises(CheckpointError, match="has no dt input .* says the refiner is dt-conditioned"):
            CppSampler.from_artifacts(broken)
    undeclared = tmp_path / "undeclared"
    shutil.copytree(time_input.path, undeclared)
    rewrite_manifest(undeclared, lambda m: m["model"].update(refiner_dt_conditioning=False))
    with pytest.raises(CheckpointError, match="takes a dt its refiner does not have"):
        load_artifacts(undeclared)


def test_r_steps_beyond_the_trained_range_warn_once(bundle, tmp_path_factory):
    """H1R2 on a uniform grid (h = 1/3) asks for dt up to 2/3 > 0.5 in its second R step (its velocity is the first
    R step's estimate at t = 1/3): one warning, at a sampler's first request with that schedule (not per batch, not
    again for the next request), on every backend."""
    from flowturbo.runtime.sampler import Sampler
    from flowturbo.runtime.pytorch_backend import TorchPipeline

    schedule = SamplingSchedule.parse("H1R2", guidance_scale=1.7, guidance_channels=2)
    pipe = TorchPipeline(bundle.predictor, bundle.refiner, bundle.decoder, NUM_CLASSES, MICRO_LATENT, None,
                         bundle.defaults, "micro", torch.device("cpu"), torch.float32, refiner_dt=RECORD)
    exported = OnnxRuntimeSampler.from_artifacts(_export(bundle, tmp_path_factory, "time-input", schedule=schedule).path)
    torch_sampler = Sampler(pipe)
    for sample in (lambda: torch_sampler.sample([1, 2], schedule=schedule, progress=False, batch_size=1),
                   lambda: exported.sample([1, 2], batch_size=1)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sample()
        ours = [w for w in caught if issubclass(w.category, RefinerRangeWarning)]
        assert len(ours) == 1, [str(w.message) for w in ours]
        assert "dt up to 0.667 in R step(s) 3," in str(ours[0].message)
        assert "its trained range dt <= 0.5" in str(ours[0].message)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RefinerRangeWarning)
            sample()  # said once: the next request with the same schedule is quiet
