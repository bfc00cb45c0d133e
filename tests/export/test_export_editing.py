"""Inpainting / editing on the exported backends (issue 11): `export --with-encoder`, parity with PyTorch."""

from __future__ import annotations

import json

import pytest
import torch
from tolerances import tol

from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.export.pipeline import ExportRequest, export_bundle
from flowturbo.export.specs import BatchProfile
from flowturbo.runtime.aoti_backend import AotiSampler
from flowturbo.runtime.artifacts import load_artifacts
from flowturbo.runtime.onnx_backend import OnnxRuntimeSampler
from flowturbo.runtime.pytorch_backend import DEFAULT_BUNDLE_DIR
from flowturbo.runtime.sampler import Sampler
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.bundle import load_bundle
from flowturbo.training.fashion_mnist import load_fashion_mnist, to_model_range

SCHEDULE = SamplingSchedule.parse("H1P2R2", guidance_scale=1.5)
PROFILE = BatchProfile(1, 2, 2)


@pytest.fixture(scope="module")
def image():
    return to_model_range(load_fashion_mnist("test", limit=1).images)  # (1, 1, 32, 32)


@pytest.fixture(scope="module")
def mask():
    m = torch.zeros(1, 1, 32, 32)
    m[..., :, 16:] = 1  # regenerate the right half
    return m


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    out = tmp_path_factory.mktemp("edit_export") / "both"
    request = ExportRequest(SCHEDULE, PROFILE, ("onnx", "aoti"), "fp32", "time-input", with_encoder=True)
    return export_bundle(bundle, request, out, source="embedded default", command="pytest", progress=False)


@pytest.fixture(scope="module")
def reference():
    return Sampler.from_bundle(device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("backend", [OnnxRuntimeSampler, AotiSampler], ids=["onnxruntime", "aoti"])
def test_exported_inpaint_and_edit_match_pytorch(exported, reference, image, mask, backend):
    assert {a["role"] for a in exported.manifest["artifacts"]} >= {"encoder"} and exported.manifest["with_encoder"]
    sampler = backend.from_artifacts(exported.path)
    classes = [3, 8, 0]
    got = sampler.inpaint(image, mask, classes, seed=2)
    want = reference.inpaint(image, mask, classes, schedule=SCHEDULE, seed=2, progress=False)
    torch.testing.assert_close(got.images, want.images, **tol("export_fp32"))
    keep = mask[0, 0] == 0
    assert torch.equal(got.images[:, :, keep], image.expand(3, -1, -1, -1)[:, :, keep])  # exact on every backend
    assert got.num_batches == 2  # the profile's max batch (2) splits 3 images
    got = sampler.edit(image, 0.55, classes, seed=4)
    want = reference.edit(image, 0.55, classes, schedule=SCHEDULE, seed=4, progress=False)
    torch.testing.assert_close(got.images, want.images, **tol("export_fp32"))
    assert got.task["t0"] == pytest.approx(0.45)


@pytest.mark.slow
def test_encoder_graph_is_required_sealed_and_refused_when_missing(exported, tmp_path, image, mask):
    manifest = json.loads((exported.path / "manifest.json").read_text())
    encoders = [a for a in manifest["artifacts"] if a["role"] == "encoder"]
    assert {a["format"] for a in encoders} == {"onnx", "aoti"}
    assert all(a["file"] in manifest["files"] for a in encoders)
    # A directory exported without --with-encoder samples but refuses inpainting / editing with the fix.
    plain = export_bundle(load_bundle(DEFAULT_BUNDLE_DIR), ExportRequest(SCHEDULE, PROFILE, ("onnx",), "fp32"),
                          tmp_path / "plain", command="pytest", progress=False)
    sampler = OnnxRuntimeSampler.from_artifacts(plain.path)
    assert sampler.sample([1], seed=0).images.shape == (1, 1, 32, 32)
    with pytest.raises(FlowTurboError, match="no encoder graph.*--with-encoder"):
        sampler.inpaint(image, mask, [1])
    # Deleting the encoder graph is caught before anything runs.
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(exported.path, broken)
    (broken / encoders[0]["file"]).unlink()
    with pytest.raises(CheckpointError):
        load_artifacts(broken)


def test_unrolled_export_refuses_tasks_with_the_fix(monkeypatch, image, mask, tmp_path):
    """The unrolled graph has no step boundaries for hooks: a clear error, not wrong images."""
    from flowturbo.runtime.editing import EditTask, ImageInput
    from flowturbo.runtime.exported import ExportedSampler

    sampler = ExportedSampler.__new__(ExportedSampler)
    sampler._unrolled = lambda **inputs: None
    task = EditTask(ImageInput(image), torch.zeros(1, 4, 8, 8), 0.5, SCHEDULE)
    with pytest.raises(FlowTurboError, match="edit needs the loop in Python.*--variant time-input"):
        sampler.run_batch(torch.zeros(1, 4, 8, 8), torch.zeros(1, dtype=torch.long), task)


def test_with_encoder_needs_a_bundle_with_an_encoder(tmp_path):
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    bundle.encoder = None
    with pytest.raises(FlowTurboError, match="--with-encoder needs a bundle with an encoder"):
        export_bundle(bundle, ExportRequest(SCHEDULE, PROFILE, ("onnx",), "fp32", with_encoder=True),
                      tmp_path / "x", command="pytest", progress=False)


def test_export_with_encoder_names_a_missing_encoder_file(tmp_path, capsys):
    """A bundle that declares an encoder whose weights file is gone still loads (it samples); `export
    --with-encoder` then names the file instead of asking to repackage a bundle that has an encoder entry."""
    import json
    import shutil

    from flowturbo.runtime.cli import main

    bundle = shutil.copytree(DEFAULT_BUNDLE_DIR, tmp_path / "bundle")
    weights = json.loads((bundle / "config.json").read_text())["encoder"]["weights"]
    (bundle / weights).unlink()
    assert main(["export", "--model", str(bundle), "--schedule", "H2", "--format", "onnx", "--with-encoder",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "could not be loaded" in err and weights in err, err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------- a batch profile with MIN > 1
TINY_AE = dict(image_channels=3, image_size=6, latent_channels=3, base_channels=8, channel_mult=(1,), norm_groups=4)


@pytest.fixture(scope="module")
def tiny_min2(tmp_path_factory):
    """micro_models' tiny bundle (3x6x6 latents, identity decoder) with a random f=1 encoder, exported to ONNX
    with the batch profile 2:2:2 (every graph, the encoder's too, takes exactly 2 images)."""
    from micro_models import save_tiny_bundle

    from flowturbo.training.autoencoder import AutoencoderConfig
    from flowturbo.training.bundle import save_bundle
    from flowturbo.training.encoders import FlowTurboAutoencoderEncoder

    root = tmp_path_factory.mktemp("min2")
    bundle = load_bundle(save_tiny_bundle(root / "plain", seed=3))
    torch.manual_seed(7)
    bundle.encoder = FlowTurboAutoencoderEncoder(AutoencoderConfig(**TINY_AE)).eval()
    save_bundle(bundle, root / "bundle")
    request = ExportRequest(SCHEDULE, BatchProfile(2, 2, 2), ("onnx",), "fp32", "time-input", with_encoder=True)
    export_bundle(bundle, request, root / "export", command="pytest", progress=False)
    return (OnnxRuntimeSampler.from_artifacts(root / "export"), Sampler.from_bundle(str(root / "bundle"), device="cpu"),
            bundle)


def test_min_above_one_profile_encodes_in_chunks_that_fit(tiny_min2):
    """`export --batch 2:2:2 --with-encoder`: one input image (below MIN) and three (2 + 1) go through the encoder
    graph padded to the profile, and inpaint / edit match PyTorch (they crashed inside ONNX Runtime before)."""
    exported, reference, bundle = tiny_min2
    images = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 1.8 - 0.9
    for n in (1, 3):
        torch.testing.assert_close(exported.encode(images[:n]), bundle.encoder.encode(images[:n]),
                                   **tol("export_fp32"))
    image = images[:1]
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., 2:5, 1:4] = 1
    classes = [3, 8, 1, 5]  # two batches of the profile's 2
    got = exported.inpaint(image, mask, classes, seed=2)
    want = reference.inpaint(image, mask, classes, schedule=SCHEDULE, seed=2, progress=False)
    torch.testing.assert_close(got.images, want.images, **tol("export_fp32"))
    keep = mask[0, 0] == 0
    assert torch.equal(got.images[:, :, keep], image.expand(4, -1, -1, -1)[:, :, keep])
    got = exported.edit(image, 0.6, classes[:2], seed=4)
    want = reference.edit(image, 0.6, classes[:2], schedule=SCHEDULE, seed=4, progress=False)
    torch.testing.assert_close(got.images, want.images, **tol("export_fp32"))
    # Fewer results than MIN: the profile's refusal (a FlowTurboError naming it), before anything is encoded.
    for run in (lambda: exported.inpaint(image, mask, [3]), lambda: exported.edit(image, 0.6, [3])):
        with pytest.raises(FlowTurboError, match="outside the exported profile 2:2:2"):
            run()
