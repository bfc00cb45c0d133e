"""Text-to-image export (``flowturbo export --pipeline``): the tiny SD3 / FLUX.1-dev / FLUX.1-schnell pipelines of
tests/tiny_diffusers.py exported to ONNX, sampled through ONNX Runtime, compared with ``Sampler.from_pipeline``.

One export per pipeline (module-scoped; ~20 s each on one core), each on ``H1P1E1`` so one schedule covers the H, P and
E steps: SD3 with CFG 4 and a negative prompt (the doubled batch inside the graph), FLUX.1-dev with its guidance
embedding as a graph input and its resolution-dependent shift, FLUX.1-schnell unguided on its unshifted grid. One
slow test (as every AOTInductor test) compiles the SD3 CFG graphs with AOTInductor and runs them from Python and from
the C++ runner (skipped, with the build's reason, when the runner is not built).

They bite: CFG on the wrong half, a dropped shift (the schedule recorded on the uniform grid), a wrong time scale or
sign, or a guidance input ignored each fail a parity test below (checked by hand mutation: docs/predictor_protocol.md).
"""

from __future__ import annotations

import pytest
import torch
from cli_checks import one_error_line
from tiny_diffusers import IMAGE_SIZE, MAX_SEQUENCE_LENGTH
from tolerances import tol

from flowturbo.errors import FlowTurboError, SamplingError
from flowturbo.export.pipeline import ExportRequest
from flowturbo.export.text_export import TextExport, export_text_pipeline, text_schedule
from flowturbo.families import ImageSize
from flowturbo.runtime.artifacts import load_artifacts
from flowturbo.runtime.cli import main
from flowturbo.runtime.onnx_backend import OnnxRuntimeSampler
from flowturbo.runtime.sampler import Sampler
from flowturbo.schedule import SamplingSchedule, uniform_timesteps
from flowturbo.training.families import load_family

SIZE = ImageSize(IMAGE_SIZE, IMAGE_SIZE)
STEPS = "H1P1E1"  # H, P and E steps in one schedule
PROMPTS = ["a photo of the cat", "a dog", "a photo of the cat"]
NEGATIVE = "blurry"
CFG = {"sd3": 4.0, "flux_dev": 1.0, "flux_schnell": 1.0}
PROFILE = "1:2:3"


@pytest.fixture(scope="module")
def exported(tiny_pipelines, tmp_path_factory):
    """name -> (export directory, the PyTorch Sampler of the same folder)."""
    torch.set_num_threads(1)
    cache = {}

    def get(name):
        if name not in cache:
            family = load_family(tiny_pipelines[name], device=torch.device("cpu"), dtype=torch.float32,
                                 max_sequence_length=MAX_SEQUENCE_LENGTH)
            schedule = text_schedule(family, STEPS, CFG[name], SIZE)
            out = tmp_path_factory.mktemp("text_exports") / name
            result = export_text_pipeline(family, ExportRequest(schedule, PROFILE, ("onnx",)),
                                          TextExport(SIZE, MAX_SEQUENCE_LENGTH), out, source=str(tiny_pipelines[name]))
            reference = Sampler.from_pipeline(str(tiny_pipelines[name]), device="cpu",
                                              max_sequence_length=MAX_SEQUENCE_LENGTH)
            cache[name] = result, reference
        return cache[name]

    return get


def _reference(reference, name, **kwargs):
    return reference.sample(prompts=PROMPTS, schedule=STEPS, cfg=CFG[name], size=SIZE, seed=3, progress=False,
                            **kwargs)


def test_sd3_cfg_export_equals_the_pytorch_sampler(exported):
    """SD3 at CFG 4 with a negative prompt: the graph doubles the batch and combines u + s (c - u) inside; the
    shifted grid is the one recorded; the exported images equal the PyTorch path's on the same noise and prompts."""
    result, reference = exported("sd3")
    manifest = result.manifest
    assert [a["file"] for a in manifest["artifacts"]] == ["predictor_step.onnx", "decoder.onnx"]
    assert all(a["max_abs_error"] < tol("export_fp32")["atol"] for a in manifest["artifacts"])
    assert manifest["model"]["conditioning"] == "prompts" and manifest["model"]["max_sequence_length"] == 16
    names = [t["name"] for t in manifest["artifacts"][0]["spec"]["inputs"]]
    assert names == ["latents", "t", "prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                     "negative_pooled_prompt_embeds"]
    sampler = Sampler.from_artifacts(result.path, backend="onnxruntime")
    want_schedule = reference.default_schedule(STEPS, CFG["sd3"], size=SIZE)
    assert sampler.schedule.timesteps == want_schedule.timesteps != uniform_timesteps(3)  # the static shift baked in
    got = sampler.sample(prompts=PROMPTS, negative_prompt=NEGATIVE, seed=3)
    want = _reference(reference, "sd3", negative_prompt=NEGATIVE)
    torch.testing.assert_close(got.images, want.images, **tol("export_fp32"))
    assert got.prompts == ["a photo of the cat", "a dog"] and got.labels == [0, 1, 0]
    assert got.conditioning["negative_prompt"] == NEGATIVE
    # The guidance acts: the default negative prompt ("") gives other images (the test would see a swapped half).
    other = sampler.sample(prompts=PROMPTS, seed=3)
    assert (other.images - got.images).abs().max() > 100 * tol("export_fp32")["atol"]
    torch.testing.assert_close(other.images, _reference(reference, "sd3").images, **tol("export_fp32"))


def test_embeddings_given_directly_equal_prompts(exported):
    """``sample(prompt_embeds=..., pooled_prompt_embeds=..., negative_...=...)`` with the family's own embeddings is
    the prompts' run exactly (same graphs, same inputs)."""
    result, reference = exported("sd3")
    sampler = OnnxRuntimeSampler.from_artifacts(result.path)
    family = reference.pipeline.family
    schedule = sampler.schedule
    with torch.no_grad():
        conditioning = family.condition(PROMPTS, schedule, negative=[NEGATIVE])
    got = sampler.sample(prompt_embeds=conditioning.prompt.embeds, pooled_prompt_embeds=conditioning.prompt.pooled,
                         negative_prompt_embeds=conditioning.negative.embeds,
                         negative_pooled_prompt_embeds=conditioning.negative.pooled, seed=3)
    want = sampler.sample(prompts=PROMPTS, negative_prompt=NEGATIVE, seed=3)
    assert torch.equal(got.images, want.images)
    assert got.prompts is None and got.labels == [0, 1, 2]


@pytest.mark.parametrize("name, guidance", [("flux_dev", None), ("flux_dev", 2.0), ("flux_schnell", None)])
def test_flux_export_equals_the_pytorch_sampler(exported, name, guidance):
    """FLUX.1-dev (packing, rope ids as constants, the distilled guidance value as a graph input, the
    resolution-dependent shift) and FLUX.1-schnell (no guidance, unshifted grid)."""
    result, reference = exported(name)
    sampler = Sampler.from_artifacts(result.path, backend="onnxruntime")
    assert sampler.schedule.timesteps == reference.default_schedule(STEPS, size=SIZE).timesteps
    extra = {} if guidance is None else {"guidance": guidance}
    got = sampler.sample(prompts=PROMPTS, seed=3, **extra)
    want = _reference(reference, name, **extra)
    torch.testing.assert_close(got.images, want.images, **tol("export_fp32"))
    if name == "flux_dev":
        assert got.conditioning["guidance"] == (3.5 if guidance is None else guidance)
        other = sampler.sample(prompts=PROMPTS, seed=3, guidance=5.0)  # the input is used, not folded
        assert (other.images - got.images).abs().max() > 100 * tol("export_fp32")["atol"]


def test_bad_text_requests_are_one_clear_error_each(exported):
    result, reference = exported("sd3")
    sampler = OnnxRuntimeSampler.from_artifacts(result.path)
    family = reference.pipeline.family
    with torch.no_grad():
        conditioning = family.condition(PROMPTS[:2], sampler.schedule, negative=[NEGATIVE])
    embeds, pooled = conditioning.prompt.embeds, conditioning.prompt.pooled
    negative = dict(negative_prompt_embeds=conditioning.negative.embeds,
                    negative_pooled_prompt_embeds=conditioning.negative.pooled)
    longer = torch.cat([embeds, embeds[:, :3]], dim=1)  # (2, L + 3, D)
    with pytest.raises(FlowTurboError, match=r"has 96 tokens, but .* exported for 93 \(--max-sequence-length 16\)"):
        sampler.sample(prompt_embeds=longer, pooled_prompt_embeds=pooled, **negative)
    with pytest.raises(FlowTurboError, match="negative_prompt_embeds and negative_pooled_prompt_embeds"):
        sampler.sample(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    with pytest.raises(FlowTurboError, match="has 1 rows, the prompt embeddings 2"):
        sampler.sample(prompt_embeds=embeds, pooled_prompt_embeds=pooled[:1], **negative)
    with pytest.raises(SamplingError, match=r"outside the exported profile 1:2:3"):
        sampler.sample(prompts=["a"] * 4, batch_size=4)
    with pytest.raises(FlowTurboError, match="conditioned on prompts, not class ids"):
        sampler.sample([0, 1])
    with pytest.raises(FlowTurboError, match="no guidance embedding"):
        sampler.sample(prompts=PROMPTS, guidance=2.0)
    with pytest.raises(SamplingError, match="exported for schedule"):
        sampler.sample(prompts=PROMPTS, schedule=SamplingSchedule.parse("E2", guidance_scale=4.0))


def test_prompts_to_a_class_export_are_refused(tmp_path, capsys):
    """A class-conditional export refuses prompts and prompt embeddings (API and command line), naming what it
    takes."""
    import importlib.util
    import sys
    from pathlib import Path

    from flowturbo.export.pipeline import export_bundle

    spec = importlib.util.spec_from_file_location("_export_onnx_helpers",
                                                  Path(__file__).with_name("test_export_onnx.py"))
    helpers = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_export_onnx_helpers", helpers)
    spec.loader.exec_module(helpers)
    bundle = helpers.micro_bundle(with_refiner=False)
    path = export_bundle(bundle, ExportRequest(SamplingSchedule.parse("H1"), "1:1:2", ("onnx",)), tmp_path / "sit",
                         progress=False).path
    sampler = OnnxRuntimeSampler.from_artifacts(path)
    for request in (dict(prompts=["a cat"]), dict(prompt_embeds=torch.randn(1, 4, 8))):
        with pytest.raises(FlowTurboError, match="conditioned on class ids, not text prompts"):
            sampler.sample(**request)
    assert sampler.sample([1], seed=0).images.shape[0] == 1  # class ids still work
    capsys.readouterr()
    assert main(["sample", "--artifacts", str(path), "--backend", "onnxruntime", "--prompt", "a cat",
                 "--out", str(tmp_path / "images")]) == 2
    one_error_line(capsys, "conditioned on class ids, not text prompts", "--classes")


def test_manifest_records_the_pipeline(exported):
    """The manifest names the pipeline folder whose text encoders make the embeddings; the sampler loads only those
    (no transformer, no VAE) and they give the full adapter's embeddings."""
    result, reference = exported("flux_dev")
    encoder = OnnxRuntimeSampler.from_artifacts(result.path).prompt_encoder()
    assert encoder.pipe.transformer is None and encoder.pipe.vae is None
    schedule = SamplingSchedule.parse("E1")
    with torch.no_grad():
        mine, theirs = (f.condition(PROMPTS, schedule) for f in (encoder, reference.pipeline.family))
    assert torch.equal(mine.prompt.embeds, theirs.prompt.embeds) and torch.equal(mine.prompt.pooled, theirs.prompt.pooled)
    artifacts = load_artifacts(result.path)
    model = artifacts.model
    assert model["pipeline"] == result.manifest["model"]["source"] and "text encoders" in model["prompt_encoder"]
    assert model["guidance_rule"] == "embedded" and model["defaults"]["guidance"] == 3.5
    assert [t["name"] for t in result.manifest["artifacts"][0]["spec"]["inputs"]][-1] == "guidance"


@pytest.mark.parametrize("args, needles", [
    (["--schedule", "H1R2"], ("has R steps", "need a velocity refiner", "--refiner RUN")),
    (["--variant", "per-step"], ("time-input variant only",)),
    (["--guidance-channels", "2"], ("every latent channel",)),
    (["--size", "33"], ("not a multiple of",)),
])
def test_export_cli_refusals_are_one_error_line(tiny_pipelines, tmp_path, capsys, args, needles):
    """Refused before any weights load, one ``error:`` line, exit 2, nothing written."""
    out = tmp_path / "out"
    argv = ["export", "--pipeline", str(tiny_pipelines["sd3"]), *args, "--out", str(out)]
    assert main(argv) == 2
    one_error_line(capsys, *needles)
    assert not out.exists()


def test_inpaint_and_edit_without_the_encoder_graph_name_with_encoder(exported, tmp_path, capsys):
    """An export made without ``--with-encoder`` samples, but inpainting and editing (API and command line) are
    refused naming the flag; the command line prints the full re-export command (tests/export/
    test_export_text_editing.py has the export with the encoder)."""
    import numpy as np
    from PIL import Image

    result, _ = exported("sd3")
    sampler = OnnxRuntimeSampler.from_artifacts(result.path)
    image, mask = torch.rand(1, 3, 32, 32) * 2 - 1, torch.ones(1, 1, 32, 32)
    with pytest.raises(FlowTurboError, match="no encoder graph.*--with-encoder"):
        sampler.inpaint(image, mask, prompts=["a"])
    with pytest.raises(FlowTurboError, match="no encoder graph.*--with-encoder"):
        sampler.edit(image, 0.5, prompts=["a"])
    Image.fromarray(np.full((32, 32, 3), 80, np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "mask.png")
    for task, extra in (("inpaint", ["--mask", str(tmp_path / "mask.png")]), ("edit", ["--strength", "0.5"])):
        capsys.readouterr()
        assert main([task, "--artifacts", str(result.path), "--backend", "onnxruntime", "--image",
                     str(tmp_path / "in.png"), *extra, "--prompt", "a", "--out", str(tmp_path / "out")]) == 2
        one_error_line(capsys, "no encoder graph", f"--pipeline {result.manifest['model']['pipeline']}",
                       "--with-encoder")
    assert not (tmp_path / "out").exists()


def test_export_and_sample_cli_end_to_end(exported, tiny_pipelines, tmp_path, capsys):
    """``flowturbo sample --artifacts TEXT_EXPORT --prompt ...`` writes the prompts' images (the export's images), and
    the class flags / another size are refused."""
    result, _ = exported("flux_schnell")
    out = tmp_path / "images"
    argv = ["sample", "--artifacts", str(result.path), "--backend", "onnxruntime", "--prompt", "a dog", "--seed", "3",
            "--schedule", STEPS, "--out", str(out)]  # the exported notation: its grid is the family's, as recorded
    assert main(argv) == 0
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))  # (the ownership record is hidden)
    assert written == ["0_a_dog.png", "grid.png", "run.json"]
    capsys.readouterr()
    assert main(["sample", "--artifacts", str(result.path), "--backend", "onnxruntime", "--classes", "1",
                 "--out", str(tmp_path / "x")]) == 2
    one_error_line(capsys, "text-to-image export", "--prompt")
    assert main(["sample", "--artifacts", str(result.path), "--backend", "onnxruntime", "--prompt", "a",
                 "--size", "64", "--out", str(tmp_path / "y")]) == 2
    one_error_line(capsys, "exported for 32x32")
    assert main(["sample", "--artifacts", str(result.path), "--backend", "onnxruntime", "--prompt", "a",
                 "--schedule", "E2", "--out", str(tmp_path / "z")]) == 2
    one_error_line(capsys, "exported for schedule H1P1E1", f"--pipeline {result.manifest['model']['pipeline']}")


@pytest.mark.slow
def test_aoti_sd3_cfg_export_equals_the_pytorch_sampler(tiny_pipelines, tmp_path):
    """AOTInductor (CPU) packages of the SD3 CFG graphs (~50 s to compile both on one core; slow, as every AOTInductor
    test): the same parity as ONNX Runtime, batches split within the profile."""
    torch.set_num_threads(1)
    family = load_family(tiny_pipelines["sd3"], device=torch.device("cpu"), dtype=torch.float32,
                         max_sequence_length=MAX_SEQUENCE_LENGTH)
    schedule = text_schedule(family, "H1E1", 3.0, SIZE)
    result = export_text_pipeline(family, ExportRequest(schedule, PROFILE, ("aoti",)),
                                  TextExport(SIZE, MAX_SEQUENCE_LENGTH), tmp_path / "aoti",
                                  source=str(tiny_pipelines["sd3"]))
    assert [a["file"] for a in result.manifest["artifacts"]] == ["predictor_step.pt2", "decoder.pt2"]
    sampler = Sampler.from_artifacts(result.path, backend="aoti")
    got = sampler.sample(prompts=PROMPTS + ["a dog"], negative_prompt=NEGATIVE, seed=5)  # batches of 3 and 1
    reference = Sampler.from_pipeline(str(tiny_pipelines["sd3"]), device="cpu", max_sequence_length=MAX_SEQUENCE_LENGTH)
    want = reference.sample(prompts=PROMPTS + ["a dog"], negative_prompt=NEGATIVE, schedule="H1E1", cfg=3.0,
                            size=SIZE, seed=5, progress=False)
    torch.testing.assert_close(got.images, want.images, **tol("export_fp32"))
    assert got.num_batches == 2
    from flowturbo.runtime.cpp_backend import CppSampler, cpp_unavailable_reason

    if cpp_unavailable_reason() is not None:  # the C++ runner is optional (as in tests/runtime/test_cpp_runner.py)
        pytest.skip(f"C++ runner: {cpp_unavailable_reason()}")
    runner = CppSampler.from_artifacts(result.path)  # the same packages, the loop in C++
    torch.testing.assert_close(runner.sample(prompts=PROMPTS + ["a dog"], negative_prompt=NEGATIVE, seed=5).images,
                               want.images, **tol("export_fp32"))
    with pytest.raises(FlowTurboError, match="conditioned on prompts, not class ids"):
        runner.sample([0])
    with pytest.raises(FlowTurboError, match="negative_prompt_embeds and negative_pooled_prompt_embeds"):
        runner.sample(prompt_embeds=torch.randn(1, 93, 64), pooled_prompt_embeds=torch.randn(1, 64))
