"""The C++ ScheduleRunner (flowturbo._runner) against the Python reference sampler.

One module-scoped AOTInductor export (time-input variant: predictor step, refiner step, decoder) of the
micro bundle serves every test. Time-input graphs do not depend on the step string, so the H-only and
P-only schedules run the *same* packages through copies of the directory whose manifest names another
schedule with the same guidance (``_retarget``): the runner executes whatever schedule the manifest holds.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from micro_models import rewrite_manifest
from tolerances import tol

from flowturbo.errors import CheckpointError, FlowTurboError, SamplingError
from flowturbo.export.manifest import MANIFEST_FILE
from flowturbo.export.pipeline import ExportRequest, export_bundle
from flowturbo.export.specs import BatchProfile
from flowturbo.runtime.cpp_backend import CppSampler, cpp_unavailable_reason
from flowturbo.runtime.sampler import Sampler
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.sampling import make_noise, sample_schedule

pytestmark = pytest.mark.skipif(cpp_unavailable_reason() is not None, reason=str(cpp_unavailable_reason()))

GUIDANCE = dict(guidance_scale=1.6, guidance_channels=2)
EXPORTED = SamplingSchedule.parse("H1P1R2", **GUIDANCE)
PROFILE = BatchProfile(1, 2, 4)
CLASSES = {1: [3], 3: [4, 0, 2]}


def sampler_build_info() -> dict:
    import flowturbo._runner

    return flowturbo._runner.build_info()


def _micro_bundle():
    path = Path(__file__).parents[1] / "export" / "test_export_onnx.py"
    spec = importlib.util.spec_from_file_location("_export_onnx_helpers", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_export_onnx_helpers", module)
    spec.loader.exec_module(module)
    return module.micro_bundle(seed=11)


@pytest.fixture(scope="module")
def bundle():
    return _micro_bundle()


@pytest.fixture(scope="module")
def exported(bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cpp") / "aoti"
    export_bundle(bundle, ExportRequest(EXPORTED, PROFILE, ("aoti",), "fp32", "time-input"), out, source="micro")
    return out


def _retarget(exported: Path, target: Path, schedule: SamplingSchedule) -> Path:
    """A copy of the time-input export whose manifest names ``schedule`` (same guidance, same graphs)."""
    shutil.copytree(exported, target)

    def retarget(manifest):
        manifest["schedule"], manifest["schedule_id"] = schedule.describe(), schedule.id
        manifest["key_fields"]["schedule_id"] = schedule.id

    return rewrite_manifest(target, retarget)  # consistent and re-sealed, as if exported for ``schedule``


def _reference(bundle, schedule, classes, seed):
    noise = make_noise(len(classes), bundle.latent_shape, seed)
    with torch.no_grad():
        result = sample_schedule(schedule, noise, torch.tensor(classes), bundle.predictor, bundle.refiner,
                                 num_classes=bundle.num_classes)
        return bundle.decoder.decode(result.latents)


def test_noise_matches_python_make_noise(exported):
    sampler = CppSampler.from_artifacts(exported)
    # (n, seed, first_index): per-image seeds seed + i, a shard starting mid-run, and the wrap at 2^64.
    for n, seed, first in [(1, 0, 0), (3, 7, 0), (2, 2**40 + 3, 0), (3, 7, 5), (3, 2**64 - 2, 0), (2, 2**63, 2**63 - 1)]:
        want = make_noise(n, (3, 6, 6), seed, first_index=first)
        got = sampler.make_noise(n, seed, first)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.equal(got, want)
    # image i is its own draw: the C++ batch equals single-image draws
    assert torch.equal(sampler.make_noise(4, 9)[2:], sampler.make_noise(2, 9, 2))


@pytest.mark.parametrize("notation", ["H2", "H1P2", "H1P1R2"])  # H-only, P-containing, R-containing
@pytest.mark.parametrize("batch", [1, 3])
def test_runner_equals_reference_sampler(bundle, exported, tmp_path, notation, batch):
    schedule = SamplingSchedule.parse(notation, **GUIDANCE)
    folder = exported if schedule.id == EXPORTED.id else _retarget(exported, tmp_path / notation, schedule)
    sampler = Sampler.from_artifacts(str(folder), backend="cpp")
    classes = CLASSES[batch]
    samples = sampler.sample(classes, seed=5 + batch)
    want = _reference(bundle, schedule, classes, 5 + batch)
    assert float(want.abs().mean()) > 0.1  # non-trivial images
    torch.testing.assert_close(samples.images, want, **tol("sampler_fp32"))
    assert samples.predictor_calls == schedule.predictor_calls and samples.refiner_calls == schedule.refiner_calls
    assert samples.num_batches == 1 and samples.times.sample_s > 0


def test_runner_loop_is_bit_identical_to_the_python_loop(exported):
    """Same packages, same op order (h * d, then the add) in the preallocated buffers: the same bits."""
    from flowturbo.runtime.aoti_backend import AotiSampler

    classes = [4, 0, 2]
    got = CppSampler.from_artifacts(exported).sample(classes, seed=9).images
    want = AotiSampler.from_artifacts(exported).sample(classes, seed=9).images
    assert torch.equal(got, want)


def test_engines_that_reuse_their_output_buffers_give_the_same_images(exported):
    """TensorRT engines hand out buffers their next call overwrites; the runner must copy what it keeps
    (the carried velocity, d across the d' call, the images). Simulated on CPU by wrapping the AOTI engines."""
    classes = [1, 3, 0]
    want = CppSampler.from_artifacts(exported).sample(classes, seed=6).images
    reusing = CppSampler.from_artifacts(exported, reuse_engine_buffers=True)
    assert all("(reused output buffers)" in e for e in reusing.runner.engines)
    assert torch.equal(reusing.sample(classes, seed=6).images, want)
    noise = reusing.make_noise(3, 6)
    first = reusing.run_batch(noise, torch.tensor(classes))
    kept = first["images"].clone()
    second = reusing.run_batch(reusing.make_noise(3, 1), torch.tensor([2, 2, 2]))  # same engines, same batch
    assert torch.equal(first["images"], kept) and not torch.equal(second["images"], kept)


def test_more_images_than_the_profile_are_split(bundle, exported):
    sampler = CppSampler.from_artifacts(exported)
    classes = [0, 1, 2, 3, 4, 0]  # 6 > max 4: batches of 4 + 2, same noise as one draw of 6
    samples = sampler.sample(classes, seed=3)
    assert samples.num_batches == 2
    torch.testing.assert_close(samples.images, _reference(bundle, EXPORTED, classes, 3), **tol("sampler_fp32"))
    with pytest.raises(SamplingError, match="outside the exported profile"):
        sampler.sample(classes, seed=3, batch_size=5)


def test_profile_has_one_entry_per_step(exported):
    sampler = CppSampler.from_artifacts(exported)
    profile = sampler.profile_batch([1, 2], seed=0, warmup=1, repeats=2)
    steps = profile["steps"]
    assert [s["kind"] for s in steps] == list(EXPORTED.step_string)
    assert [(s["t_start"], s["t_end"]) for s in steps] == list(zip(EXPORTED.timesteps[:-1], EXPORTED.timesteps[1:]))
    assert [(s["predictor_calls"], s["refiner_calls"]) for s in steps] == [
        tuple(c) for c in EXPORTED.step_calls()]
    assert all(s["ms"] > 0 for s in steps) and profile["decode_ms"] > 0
    # Steps and decode are intervals inside each timed run (the report states how close they come).
    run = sampler.run_batch(make_noise(2, (3, 6, 6), 0), torch.tensor([1, 2]), profile=True)
    assert sum(s["ms"] for s in run["steps"]) + run["decode_ms"] <= run["total_ms"]


def test_bad_requests_are_refused(exported):
    sampler = CppSampler.from_artifacts(exported)
    with pytest.raises(SamplingError, match=r"class ids \[5\] are outside \[0, 5\)"):
        sampler.sample([0, 5])
    with pytest.raises(SamplingError, match="class ids must be in"):  # the runner's own check
        sampler.run_batch(make_noise(2, (3, 6, 6), 0), torch.tensor([0, 9]))
    with pytest.raises(SamplingError, match="outside the exported profile"):
        sampler.run_batch(make_noise(5, (3, 6, 6), 0), torch.zeros(5, dtype=torch.long))
    with pytest.raises(SamplingError, match="noise must have shape"):
        sampler.run_batch(torch.zeros(2, 3, 6, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(SamplingError, match="exported for schedule"):
        sampler.sample([0], schedule=SamplingSchedule.parse("H3", **GUIDANCE))
    noise = make_noise(2, (3, 6, 6), 0)
    noise[1, 0, 2, 2] = float("nan")
    with pytest.raises(SamplingError, match=r"NaN/Inf in the latents after step 0 \(H, t 0.0 -> 0.25\)"):
        sampler.run_batch(noise, torch.tensor([0, 1]))


def test_unusable_directories_are_refused(exported, tmp_path):
    broken = shutil.copytree(exported, tmp_path / "truncated")
    package = next(broken.glob("refiner_step*.pt2"))
    package.write_bytes(package.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated or replaced"):
        CppSampler.from_artifacts(broken)
    missing = shutil.copytree(exported, tmp_path / "missing")
    (missing / "decoder.pt2").unlink()
    with pytest.raises(CheckpointError, match="decoder.pt2 is missing"):
        CppSampler.from_artifacts(missing)
    other = SamplingSchedule.parse("H3", **GUIDANCE)
    with pytest.raises(CheckpointError, match="schedule_id"):
        CppSampler.from_artifacts(exported, expect={"schedule_id": other.id})
    edited = shutil.copytree(exported, tmp_path / "edited")

    def other_id(manifest):  # the schedule and its id disagree (keyed consistently, so only that check objects)
        manifest["schedule_id"] = manifest["key_fields"]["schedule_id"] = other.id

    rewrite_manifest(edited, other_id)
    with pytest.raises(CheckpointError, match="disagree"):
        CppSampler.from_artifacts(edited)
    old_torch = shutil.copytree(exported, tmp_path / "old_torch")

    def older_torch(manifest):  # packages compiled by another torch release
        manifest["tools"]["torch"] = manifest["key_fields"]["tools"]["torch"] = "2.9.1+cu128"

    rewrite_manifest(old_torch, older_torch)
    with pytest.raises(CheckpointError, match="compiled by torch 2.9.1"):
        CppSampler.from_artifacts(old_torch)
    if not sampler_build_info()["tensorrt"]:
        with pytest.raises(FlowTurboError, match="without -DFLOWTURBO_TENSORRT=ON"):
            CppSampler.from_artifacts(exported, engine_format="tensorrt")
    else:  # a TensorRT build: this directory simply has no engines
        with pytest.raises(CheckpointError, match="no tensorrt artifacts"):
            CppSampler.from_artifacts(exported, engine_format="tensorrt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of cuda on a CPU-only build/machine")
def test_cuda_request_on_cpu_artifacts_is_refused(exported):
    with pytest.raises(FlowTurboError, match="no CUDA support|cannot run on cuda"):
        CppSampler.from_artifacts(exported, device="cuda")


def test_cli_sample_with_cpp_backend(bundle, exported, tmp_path, capsys):
    from flowturbo.runtime.cli import main

    assert main(["sample", "--artifacts", str(exported), "--backend", "cpp", "--classes", "2,0,1", "--seed", "4",
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "backend cpp" in printed
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["backend"] == "cpp" and record["model"]["engines"]
    assert main(["sample", "--artifacts", str(tmp_path / "nowhere"), "--backend", "cpp",
                 "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
def test_cuda_graph_replay_equals_step_by_step(bundle, tmp_path):
    cuda_bundle = _micro_bundle()
    cuda_bundle.predictor.cuda(), cuda_bundle.refiner.cuda(), cuda_bundle.decoder.cuda()
    out = tmp_path / "cuda"
    export_bundle(cuda_bundle, ExportRequest(EXPORTED, PROFILE, ("aoti",), "fp32", "time-input", device="cuda"), out)
    graph = CppSampler.from_artifacts(out, device="cuda")
    eager = CppSampler.from_artifacts(out, device="cuda", cuda_graph=False)
    noise, labels = graph.make_noise(3, 1), torch.tensor([4, 0, 2])
    first = graph.run_batch(noise, labels)
    again = graph.run_batch(noise, labels)  # replay
    want = eager.run_batch(noise, labels)
    assert again["graph_replayed"] and not want["graph_replayed"]
    torch.testing.assert_close(first["images"], want["images"], **tol("sampler_fp32"))
    torch.testing.assert_close(again["images"], want["images"], **tol("sampler_fp32"))
    profiled = graph.profile_batch([4, 0, 2], seed=1, warmup=1, repeats=1)  # CUDA events per step
    assert len(profiled["steps"]) == EXPORTED.num_steps and all(s["ms"] > 0 for s in profiled["steps"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
def test_cuda_package_with_our_triton_kernels_equals_reference(bundle, tmp_path):
    triton_bundle = _micro_bundle()
    for model in (triton_bundle.predictor, triton_bundle.refiner, triton_bundle.decoder):
        model.cuda()
    triton_bundle.predictor.set_kernel_backend("triton"), triton_bundle.refiner.set_kernel_backend("triton")
    out = tmp_path / "cuda-triton"
    request = ExportRequest(EXPORTED, PROFILE, ("aoti",), "fp32", "time-input", device="cuda", kernel_backend="triton")
    manifest = export_bundle(triton_bundle, request, out).manifest
    assert manifest["kernel_backend"] == "triton"
    samples = CppSampler.from_artifacts(out, device="cuda").sample(CLASSES[3], seed=2)
    torch.testing.assert_close(samples.images, _reference(bundle, EXPORTED, CLASSES[3], 2), **tol("model_fp32"))
