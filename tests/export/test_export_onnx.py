"""ONNX export of a micro bundle: module parity on ONNX Runtime, whole-schedule parity, manifest, refusals.

One module-scoped export (time-input variant, fp32) serves most tests; the unrolled and fp16 variants get
one export each. The micro model (depth 1, width 32, 6x6 latents, 3 channels) keeps every export at a
few seconds on 2 cores.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tolerances import tol

from flowturbo.errors import CheckpointError, FlowTurboError, SamplingError
from flowturbo.export.manifest import MANIFEST_FILE, sha256_file
from flowturbo.export.pipeline import ExportRequest, example_inputs, export_bundle
from flowturbo.export.specs import BatchProfile
from flowturbo.kernels import KernelBackend
from flowturbo.runtime.artifacts import load_artifacts
from flowturbo.runtime.onnx_backend import OnnxRuntimeSampler
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.bundle import Bundle, BundleDefaults
from flowturbo.training.decoders import IdentityDecoder
from flowturbo.kernels import cfg_guided_reference
from flowturbo.training.sampling import CFGModelCalls, GuidedVelocity, make_noise, sample_schedule
from micro_models import SENSITIVITY_FACTOR, micro_models

from flowturbo.refiner_dt import DtDistribution

NUM_CLASSES = 5
SCHEDULE = SamplingSchedule.parse("H1P2R2", guidance_scale=1.7, guidance_channels=2)
PROFILE = BatchProfile(1, 2, 5)


def micro_bundle(*, with_refiner: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0,
                 dt_conditioning: bool = False, refiner_dt: DtDistribution | None = None) -> Bundle:
    """A depth-1 SiT (+ refiner, dt-conditioned if asked) on (3, 6, 6) latents with an identity decoder, random
    non-zero weights (:func:`micro_models.micro_models`)."""
    predictor, refiner = micro_models(seed, num_classes=NUM_CLASSES, dt_conditioning=dt_conditioning, dtype=dtype)
    defaults = BundleDefaults(schedule="H1P2R2" if with_refiner else "H2")
    return Bundle(predictor, refiner if with_refiner else None, IdentityDecoder(3).eval(), None, defaults,
                  refiner_dt=refiner_dt if with_refiner else None)


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return micro_bundle()


def test_micro_models_depend_strongly_on_time_and_label(bundle):
    """A graph wired to the wrong time or label must fail the parity tests: outputs at t=0 vs t=1, and for
    two labels, differ by far more than the export tolerance."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    v = torch.randn(2, 3, 6, 6, generator=gen)
    y = torch.tensor([1, 4])
    floor = SENSITIVITY_FACTOR * tol("export_fp32")["atol"]
    with torch.no_grad():
        for name, run in (("predictor", lambda t, y: bundle.predictor(x, t, y)),
                          ("refiner", lambda t, y: bundle.refiner(x, t, y, v))):
            at0, at1 = run(torch.zeros(2), y), run(torch.ones(2), y)
            assert (at0 - at1).abs().max() >= floor, f"{name} barely depends on t"
            other = run(torch.full((2,), 0.5), torch.tensor([2, 0]))
            assert (run(torch.full((2,), 0.5), y) - other).abs().max() >= floor, f"{name} barely depends on the label"
            null = run(torch.full((2,), 0.5), torch.full((2,), NUM_CLASSES))
            assert (run(torch.full((2,), 0.5), y) - null).abs().max() >= floor, f"{name}: null label has no effect"


@pytest.fixture(scope="module")
def exported(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "h1p2r2"
    result = export_bundle(bundle, ExportRequest(SCHEDULE, PROFILE, ("onnx",), "fp32", "time-input"), out,
                           source="micro", command="pytest")
    return result


def _reference_images(bundle, schedule, classes, seed):
    noise = make_noise(len(classes), bundle.latent_shape, seed)
    with torch.no_grad():
        result = sample_schedule(schedule, noise, torch.tensor(classes), bundle.predictor, bundle.refiner,
                                 num_classes=NUM_CLASSES)
        return bundle.decoder.decode(result.latents)


@pytest.mark.parametrize("batch", [1, 3])
def test_module_parity_against_reference_cfg(bundle, exported, batch):
    """Each ONNX module equals GuidedVelocity over the eager model (CFG doubling inside the graph)."""
    from flowturbo.export.onnx_export import run_onnx

    artifacts = {a["module"]: a for a in exported.manifest["artifacts"]}
    root = exported.path
    generator = torch.Generator().manual_seed(7 + batch)
    x = torch.randn(batch, 3, 6, 6, generator=generator)
    v = torch.randn(batch, 6, 6, 6, generator=generator)  # per-CFG-half velocity: 2 of 3 channels guided, R steps
    t = torch.rand(batch, generator=generator) * 0.9 + 0.05
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    calls = CFGModelCalls(bundle.predictor, bundle.refiner, y, NUM_CLASSES, guided=True)
    scale, channels = SCHEDULE.guidance_scale, SCHEDULE.guidance_channels
    with torch.no_grad():
        want_v = cfg_guided_reference(calls.predictor(x, t), batch, 3, scale, channels, halves=True)
        want_r = cfg_guided_reference(calls.refiner(x, t, v, 0.25), batch, 3, scale, channels, halves=True)
        guide = GuidedVelocity(y, NUM_CLASSES, scale, channels)  # the conditional half, computed the plain way
        torch.testing.assert_close(want_v[:, :3], guide.predictor(bundle.predictor, x, t), **tol("export_fp32"))
    got_v = run_onnx(root / artifacts["predictor_step"]["file"], {"latents": x, "t": t, "labels": y})[0]
    got_r = run_onnx(root / artifacts["refiner_step"]["file"], {"latents": x, "v": v, "t": t, "labels": y})[0]
    got_d = run_onnx(root / artifacts["decoder"]["file"], {"latents": 2 * x})[0]
    torch.testing.assert_close(got_v, want_v, **tol("export_fp32"))
    torch.testing.assert_close(got_r, want_r, **tol("export_fp32"))
    torch.testing.assert_close(got_d, bundle.decoder.decode(2 * x), **tol("export_fp32"))
    assert not torch.equal(got_v[:, :2], got_v[:, :2] * 0)  # non-trivial values


def test_whole_schedule_parity_time_input(bundle, exported):
    sampler = OnnxRuntimeSampler.from_artifacts(exported.path)
    classes = [4, 0, 2]
    out = sampler.sample(classes, seed=11)
    torch.testing.assert_close(out.images, _reference_images(bundle, SCHEDULE, classes, 11), **tol("export_fp32"))
    assert (out.predictor_calls, out.refiner_calls) == (SCHEDULE.predictor_calls, SCHEDULE.refiner_calls)
    split = sampler.sample(classes, seed=11, batch_size=2)  # batches of 2 + 1: same noise, same images
    torch.testing.assert_close(split.images, out.images, **tol("export_fp32"))
    assert split.num_batches == 2


def test_manifest_contents_and_checksums(bundle, exported):
    manifest = json.loads((exported.path / MANIFEST_FILE).read_text())
    assert manifest["schedule_id"] == SCHEDULE.id
    assert SamplingSchedule.from_dict(manifest["schedule"]) == SCHEDULE
    assert manifest["variant"] == "time-input" and manifest["precision"] == "fp32"
    assert manifest["batch"] == {"min": 1, "opt": 2, "max": 5}
    assert manifest["command"] == "pytest" and manifest["tools"]["onnx"] and manifest["device"].startswith("cpu")
    assert {a["module"] for a in manifest["artifacts"]} == {"predictor_step", "refiner_step", "decoder"}
    for rel, entry in manifest["files"].items():
        assert sha256_file(exported.path / rel) == entry["sha256"]
    assert set(manifest["files"]) == {"predictor_step.onnx", "refiner_step.onnx", "decoder.onnx"}
    spec = next(a["spec"] for a in manifest["artifacts"] if a["module"] == "predictor_step")
    assert spec["inputs"][0] == {"name": "latents", "dtype": "float32", "shape": ["batch", 3, 6, 6]}
    assert not list(exported.path.parent.glob(".*tmp-*"))  # no staging left behind


def test_same_request_reuses_and_other_schedule_refused(bundle, exported):
    again = export_bundle(bundle, ExportRequest(SCHEDULE, PROFILE, ("onnx",), "fp32", "time-input"), exported.path,
                          source="micro", command="pytest")
    assert again.reused and again.manifest["key"] == exported.manifest["key"]
    other = SamplingSchedule.parse("H1P3R1", guidance_scale=1.7, guidance_channels=2)
    with pytest.raises(FlowTurboError, match="schedule_id: existing"):
        export_bundle(bundle, ExportRequest(other, PROFILE, ("onnx",), "fp32", "time-input"), exported.path)
    assert load_artifacts(exported.path).schedule == SCHEDULE  # untouched


def test_other_model_refused_by_expectation(exported):
    with pytest.raises(CheckpointError, match="weights_sha256: artifacts have"):
        load_artifacts(exported.path, expect={"weights_sha256": "0" * 64})
    other = SamplingSchedule.parse("H2")
    with pytest.raises(CheckpointError, match="schedule_id"):
        OnnxRuntimeSampler.from_artifacts(exported.path, expect={"schedule_id": other.id})
    sampler = OnnxRuntimeSampler.from_artifacts(exported.path)
    with pytest.raises(SamplingError, match="re-export with `flowturbo export --schedule H2 --cfg 1`"):
        sampler.sample([0], schedule=other)


def test_batch_outside_profile_refused(exported):
    sampler = OnnxRuntimeSampler.from_artifacts(exported.path)
    with pytest.raises(SamplingError, match="outside the exported profile 1:2:5"):
        sampler.sample([0] * 6, batch_size=6)
    with pytest.raises(SamplingError, match="outside"):
        sampler.sample([0, NUM_CLASSES])  # class id out of range is refused too (message: outside [0, 5))


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
def test_damaged_files_refused(exported, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(exported.path, copy)
    target = copy / "refiner_step.onnx"
    data = target.read_bytes()
    if damage == "corrupt":
        target.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
        match = "SHA-256"
    elif damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
        match = "truncated"
    else:
        target.unlink()
        match = "missing"
    with pytest.raises(CheckpointError, match=match):
        OnnxRuntimeSampler.from_artifacts(copy)


def test_missing_manifest_refused(tmp_path):
    (tmp_path / "predictor_step.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        load_artifacts(tmp_path)


def test_request_refusals_write_nothing(tmp_path):
    out = tmp_path / "never"
    no_refiner = micro_bundle(with_refiner=False)
    with pytest.raises(FlowTurboError, match="no refiner"):
        export_bundle(no_refiner, ExportRequest(SCHEDULE, PROFILE, ("onnx",)), out)
    with pytest.raises(FlowTurboError, match="bf16"):
        ExportRequest(SCHEDULE, PROFILE, ("onnx",), "bf16")
    with pytest.raises(FlowTurboError, match="opset 17"):
        ExportRequest(SCHEDULE, PROFILE, ("onnx",), opset=17)
    with pytest.raises(FlowTurboError, match="unknown export format"):
        ExportRequest(SCHEDULE, PROFILE, ("openvino",))
    from flowturbo.export.tensorrt_export import tensorrt_unavailable_reason

    if tensorrt_unavailable_reason() is not None:
        with pytest.raises(FlowTurboError, match="TensorRT is not installed"):
            ExportRequest(SCHEDULE, PROFILE, ("tensorrt",))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_non_export_directory_not_replaced(bundle, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FlowTurboError, match="not a flowturbo export directory"):
        export_bundle(bundle, ExportRequest(SCHEDULE, PROFILE, ("onnx",), variant="time-input"), tmp_path,
                      overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_unrolled_variant_parity(bundle, tmp_path):
    schedule = SamplingSchedule.parse("H1P1R1", guidance_scale=1.5)
    result = export_bundle(bundle, ExportRequest(schedule, BatchProfile(1, 2, 4), ("onnx",), "fp32", "unrolled"),
                           tmp_path / "unrolled")
    assert [a["module"] for a in result.manifest["artifacts"]] == ["unrolled_schedule"]
    sampler = OnnxRuntimeSampler.from_artifacts(result.path)
    classes = [1, 3, 3]
    torch.testing.assert_close(sampler.sample(classes, seed=5).images,
                               _reference_images(bundle, schedule, classes, 5), **tol("export_fp32"))


def test_fp16_export_parity(tmp_path):
    schedule = SamplingSchedule.parse("H1R1", guidance_scale=1.5)
    half = micro_bundle(dtype=torch.float16)
    result = export_bundle(half, ExportRequest(schedule, BatchProfile(1, 2, 4), ("onnx",), "fp16", "time-input"),
                           tmp_path / "fp16")
    spec = result.manifest["artifacts"][0]["spec"]
    assert spec["inputs"][0]["dtype"] == "float16"
    sampler = OnnxRuntimeSampler.from_artifacts(result.path)
    classes = [0, 2, 4]
    reference = _reference_images(micro_bundle(), schedule, classes, 9)  # fp32 weights, same values
    torch.testing.assert_close(sampler.sample(classes, seed=9).images, reference, **tol("export_fp16"))


def test_example_inputs_follow_spec(exported):
    spec = next(a["spec"] for a in exported.manifest["artifacts"] if a["module"] == "refiner_step")
    from flowturbo.export.specs import ModuleSpec

    inputs = example_inputs(ModuleSpec.from_dict(spec), 3, NUM_CLASSES)
    assert inputs["latents"].shape == (3, 3, 6, 6) and inputs["labels"].dtype == torch.int64
    assert bool((inputs["t"] > 0).all() and (inputs["t"] < 1).all()) and inputs["v"].abs().sum() > 0


def test_triton_kernels_only_go_into_cuda_aoti_packages(bundle):
    """--kernels triton: AOTInductor CUDA packages only (ONNX/TensorRT need standard ops; CPU packages use the
    reference ops); a bundle loaded with other kernels than the request's is refused."""
    with pytest.raises(FlowTurboError, match="AOTInductor packages only"):
        ExportRequest(SCHEDULE, PROFILE, ("onnx", "aoti"), "fp32", "time-input", device="cuda", kernel_backend="triton")
    with pytest.raises(FlowTurboError, match="needs --device cuda"):
        ExportRequest(SCHEDULE, PROFILE, ("aoti",), "fp32", "time-input", device="cpu", kernel_backend="triton")
    with pytest.raises(FlowTurboError, match="unknown kernel backend|kernel"):
        ExportRequest(SCHEDULE, PROFILE, ("aoti",), "fp32", kernel_backend="cuda-graphs")
    request = ExportRequest(SCHEDULE, PROFILE, ("onnx",), "fp32")
    assert request.key_fields()["kernel_backend"] == "reference"
    triton_bundle = micro_bundle()
    triton_bundle.predictor.kernel_backend = KernelBackend.TRITON
    with pytest.raises(FlowTurboError, match="runs the 'triton' kernels but the export asks for 'reference'"):
        export_bundle(triton_bundle, request, "/nonexistent/never-written")


@pytest.mark.parametrize("edit", ["precision", "shape"])
def test_graph_read_back_against_its_manifest(exported, tmp_path, edit):
    """A manifest that is sealed, consistent with itself (key, batch range, precision) and whose checksums hold,
    but whose spec is not the graph's (a manifest written by another tool, or an exporter bug), is refused when
    the graph is loaded: dtype and shape are read back from the graph."""
    from micro_models import rewrite_manifest

    from flowturbo.runtime.artifacts import FIXED_DTYPES

    copy = tmp_path / "copy"
    shutil.copytree(exported.path, copy)

    def claim_fp16(manifest):  # every graph claimed fp16, consistently, while the files are fp32 graphs
        manifest["precision"] = manifest["key_fields"]["precision"] = "fp16"
        for artifact in manifest["artifacts"]:
            for tensor in artifact["spec"]["inputs"] + artifact["spec"]["outputs"]:
                if tensor["name"] not in FIXED_DTYPES:
                    tensor["dtype"] = "float16"

    def wider_latents(manifest):
        entry = next(a for a in manifest["artifacts"] if a["role"] == "predictor")
        tensor = entry["spec"]["inputs"][0]  # x: (batch, C, H, W)
        tensor["shape"][1] = int(tensor["shape"][1]) + 1

    if edit == "precision":
        rewrite_manifest(copy, claim_fp16)
        match = r"does not match its manifest.*is tensor\(float\), the manifest says tensor\(float16\)"
    else:
        rewrite_manifest(copy, wider_latents)
        match = "predictor.*does not match its manifest.*has shape"
    with pytest.raises(CheckpointError, match=match):
        OnnxRuntimeSampler.from_artifacts(copy)
