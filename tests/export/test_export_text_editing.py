"""Inpainting and editing on text-to-image exports (``flowturbo export --pipeline DIR --with-encoder``, then
``ExportedSampler.inpaint/edit(prompts=...)`` and ``flowturbo inpaint|edit --artifacts EXPORT --prompt ...``).

One export (module-scoped, ~20 s on one core): the tiny SD3 of tests/tiny_diffusers.py at CFG 4 on ``H1P1E1`` with its
VAE encoder graph, ``(mode - shift) * scale``. Its inpainting and editing equal ``Sampler.from_pipeline``'s (same image,
mask, seed, prompts, negative prompt, the family's grid) within ``export_fp32``, through the same ``InpaintTask`` /
``EditTask`` hooks; kept pixels are exactly the input's; the bad requests are one clear error each.

They bite: exporting the encoder without its shift fails the encoder and parity tests (checked by hand mutation of
``export/text_export.py``, README "Export a text-to-image model"). The refusal of a text export made without
``--with-encoder`` is tested in tests/export/test_export_text.py, on that module's encoder-less SD3 export.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_checks import one_error_line
from PIL import Image
from tiny_diffusers import IMAGE_SIZE, MAX_SEQUENCE_LENGTH, SD3_VAE
from tolerances import tol

from flowturbo.errors import FlowTurboError
from flowturbo.export.pipeline import ExportRequest
from flowturbo.export.text_export import TextExport, export_text_pipeline, text_schedule
from flowturbo.families import ImageSize
from flowturbo.runtime.cli import main
from flowturbo.runtime.editing import EditingWarning
from flowturbo.runtime.onnx_backend import OnnxRuntimeSampler
from flowturbo.runtime.sampler import Sampler
from flowturbo.training.families import load_family

SIZE = ImageSize(IMAGE_SIZE, IMAGE_SIZE)
STEPS = "H1P1E1"
CFG = 4.0
PROMPTS = ["a photo of the cat", "a dog", "a photo of the cat"]
NEGATIVE = "blurry"


@pytest.fixture(scope="module")
def exported(tiny_pipelines, tmp_path_factory):
    """(export result, ONNX Runtime sampler of it, the PyTorch Sampler of the same folder)."""
    torch.set_num_threads(1)
    folder = tiny_pipelines["sd3"]
    family = load_family(folder, device=torch.device("cpu"), dtype=torch.float32,
                         max_sequence_length=MAX_SEQUENCE_LENGTH)
    schedule = text_schedule(family, STEPS, CFG, SIZE)
    out = tmp_path_factory.mktemp("text_edit_export") / "sd3"
    result = export_text_pipeline(family, ExportRequest(schedule, "1:2:3", ("onnx",), with_encoder=True),
                                  TextExport(SIZE, MAX_SEQUENCE_LENGTH), out, source=str(folder))
    reference = Sampler.from_pipeline(str(folder), device="cpu", max_sequence_length=MAX_SEQUENCE_LENGTH)
    return result, OnnxRuntimeSampler.from_artifacts(result.path), reference


@pytest.fixture(scope="module")
def image():
    """A random non-zero (1, 3, 32, 32) image in [-1, 1]."""
    return torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7)) * 2 - 1


def _mask():
    mask = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    mask[..., 8:24, 4:20] = 1
    return mask


def test_the_encoder_graph_is_exported_recorded_and_equals_the_familys(exported, image):
    """The manifest holds the encoder graph (checksummed, validated), says what it computes, and the graph equals the
    family's ``encode_image`` — ``(mode - shift) * scale`` — the PyTorch path's encoder."""
    result, sampler, reference = exported
    manifest = result.manifest
    assert manifest["with_encoder"] and [a["role"] for a in manifest["artifacts"]] == ["predictor", "decoder",
                                                                                       "encoder"]
    encoder = manifest["artifacts"][-1]
    assert encoder["file"] == "encoder.onnx" and encoder["file"] in manifest["files"]
    assert encoder["max_abs_error"] < tol("export_fp32")["atol"]
    record = manifest["model"]["image_encoder"]
    assert (record["latent_scale"], record["latent_shift"]) == SD3_VAE and record["graph"] == "encoder"
    images = torch.cat([image, image.flip(-1)])  # (2, 3, 32, 32)
    with torch.no_grad():
        want = reference.pipeline.family.encode_image(images)
    torch.testing.assert_close(sampler.encode(images), want, **tol("export_fp32"))


def test_exported_inpainting_equals_the_pytorch_sampler(exported, image):
    """Same image, mask, seed, prompts and negative prompt: the exported loop (two batches: 2 + 1) equals
    ``Sampler.from_pipeline(...).inpaint(prompts=...)``; kept pixels are the input's exactly."""
    _, sampler, reference = exported
    mask = _mask()
    got = sampler.inpaint(image, mask, prompts=PROMPTS, negative_prompt=NEGATIVE, seed=3, batch_size=2)
    want = reference.inpaint(image, mask, prompts=PROMPTS, negative_prompt=NEGATIVE, schedule=STEPS, cfg=CFG, seed=3,
                             progress=False)
    torch.testing.assert_close(got.images, want.images, **tol("export_fp32"))
    keep = mask[0, 0] == 0
    assert torch.equal(got.images[:, :, keep], image.expand(3, -1, -1, -1)[:, :, keep])
    assert (got.images[:, :, ~keep] - image[:, :, ~keep]).abs().max() > 0.1  # really regenerated
    assert got.num_batches == 2 and got.prompts == ["a photo of the cat", "a dog"] and got.labels == [0, 1, 0]
    assert got.task == want.task and got.conditioning["negative_prompt"] == NEGATIVE
    assert got.schedule.timesteps == want.schedule.timesteps  # the family's shifted grid, recorded at export


def test_exported_editing_equals_the_pytorch_sampler(exported, image):
    """Editing walks the export's recorded grid rescaled onto [t0, 1], as the PyTorch path walks the family's."""
    _, sampler, reference = exported
    got = sampler.edit(image, 0.6, prompts=PROMPTS[:2], seed=4)
    want = reference.edit(image, 0.6, prompts=PROMPTS[:2], schedule=STEPS, cfg=CFG, seed=4, progress=False)
    torch.testing.assert_close(got.images, want.images, **tol("export_fp32"))
    assert got.task["timesteps"] == want.task["timesteps"] and got.task["t0"] == pytest.approx(0.4)
    # Strength 1 is plain sampling, bit for bit.
    full = sampler.edit(image, 1.0, prompts=PROMPTS[:2], seed=4)
    assert torch.equal(full.images, sampler.sample(prompts=PROMPTS[:2], seed=4).images)


def test_embeddings_and_an_all_black_mask(exported, image):
    """Prompt embeddings given directly inpaint exactly as the prompts; an all-black mask returns the input (warned,
    no model call)."""
    _, sampler, reference = exported
    family = reference.pipeline.family
    with torch.no_grad():
        conditioning = family.condition(PROMPTS[:2], sampler.schedule, negative=[NEGATIVE])
    mask = _mask()
    got = sampler.inpaint(image, mask, prompt_embeds=conditioning.prompt.embeds,
                          pooled_prompt_embeds=conditioning.prompt.pooled,
                          negative_prompt_embeds=conditioning.negative.embeds,
                          negative_pooled_prompt_embeds=conditioning.negative.pooled, seed=3)
    want = sampler.inpaint(image, mask, prompts=PROMPTS[:2], negative_prompt=NEGATIVE, seed=3)
    assert torch.equal(got.images, want.images) and got.prompts is None and got.labels == [0, 1]
    with pytest.warns(EditingWarning, match="black everywhere"):
        black = sampler.inpaint(image, torch.zeros_like(mask), prompts=PROMPTS)
    assert black.predictor_calls == 0 and black.prompts == ["a photo of the cat", "a dog"]
    assert torch.equal(black.images, image.expand(3, -1, -1, -1))


def test_bad_requests_are_one_clear_error_each(exported, image):
    _, sampler, _ = exported
    mask = _mask()
    with pytest.raises(FlowTurboError, match="conditioned on prompts, not class ids"):
        sampler.inpaint(image, mask, [0, 1])
    with pytest.raises(FlowTurboError, match="conditioned on prompts, not class ids"):
        sampler.edit(image, 0.5, [0])
    big = torch.zeros(1, 3, 2 * IMAGE_SIZE, 2 * IMAGE_SIZE)
    with pytest.raises(FlowTurboError, match=r"the image must be \(1 or 1, 3, 32, 32\)"):
        sampler.edit(big, 0.5, prompts=["a"])
    with pytest.raises(FlowTurboError, match="the mask must be 32x32"):
        sampler.inpaint(image, torch.ones(1, 1, 16, 16), prompts=["a"])
    with pytest.raises(FlowTurboError, match="outside the exported profile 1:2:3"):
        sampler.inpaint(image, mask, prompts=["a"] * 4, batch_size=4)
    with pytest.raises(FlowTurboError, match="no guidance embedding"):
        sampler.edit(image, 0.5, prompts=["a"], guidance=2.0)


@pytest.fixture(scope="module")
def files(image, tmp_path_factory):
    folder = tmp_path_factory.mktemp("text_edit_files")
    pixels = ((image[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / "in.png")
    Image.fromarray(np.zeros((2 * IMAGE_SIZE, 2 * IMAGE_SIZE, 3), np.uint8) + 90).save(folder / "big.png")
    Image.fromarray((_mask()[0, 0].numpy() * 255).astype(np.uint8)).save(folder / "mask.png")
    return folder


def test_cli_inpaint_and_edit_on_the_export(exported, files, tmp_path, capsys):
    """``flowturbo inpaint|edit --artifacts EXPORT --prompt ...`` write the prompts' images (kept pixels byte-exact in
    the PNGs) and record the task on the export's grid."""
    result, _, _ = exported
    base = ["--artifacts", str(result.path), "--backend", "onnxruntime", "--image", str(files / "in.png"),
            "--prompt", "a red fox", "--negative-prompt", NEGATIVE, "--seed", "3", "--no-progress"]
    out = tmp_path / "inpaint"
    assert main(["inpaint", *base, "--mask", str(files / "mask.png"), "--out", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert written == ["0_a_red_fox.png", "grid.png", "input.png", "mask.png", "run.json"]
    keep = np.asarray(Image.open(files / "mask.png")) == 0
    result_png = np.asarray(Image.open(out / "0_a_red_fox.png"))
    assert np.array_equal(result_png[keep], np.asarray(Image.open(files / "in.png"))[keep])
    assert "regenerated" in capsys.readouterr().out
    out = tmp_path / "edit"
    assert main(["edit", *base, "--strength", "0.6", "--schedule", STEPS, "--cfg", "4", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["task"]["t0"] == pytest.approx(0.4) and run["prompts"] == ["a red fox"]
    assert run["task"]["timesteps"][1:-1] == [0.4 + 0.6 * t for t in result.manifest["schedule"]["timesteps"][1:-1]]


@pytest.mark.parametrize("task, args, needles", [
    ("edit", ["--classes", "1"], ["text-to-image export", "--prompt", "instead of --classes"]),
    ("inpaint", ["--prompt", "a", "--image", "big.png"], ["--image is 64x64", "32x32", "--resize"]),
    ("edit", ["--prompt", "a", "--schedule", "E2"], ["exported for schedule H1P1E1", "--with-encoder"]),
    ("inpaint", ["--prompt", "a", "--backend", "cpp"], ["not supported by --backend cpp", "--backend aoti"]),
])
def test_cli_refusals_are_one_error_line(exported, files, tmp_path, capsys, task, args, needles):
    result, _, _ = exported
    extra = ["--strength", "0.5"] if task == "edit" else ["--mask", str(files / "mask.png")]
    image = [str(files / a) if a.endswith(".png") else a for a in args]
    argv = [task, "--artifacts", str(result.path), "--backend", "onnxruntime", "--image", str(files / "in.png"),
            *extra, *image, "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 2
    one_error_line(capsys, *needles)
    assert not (tmp_path / "out").exists()


def test_prompts_to_a_class_export_are_refused(files, tmp_path, capsys):
    """A class-conditional export refuses prompts for inpainting and editing (API and command line)."""
    import importlib.util
    import sys
    from pathlib import Path

    from flowturbo.export.pipeline import export_bundle
    from flowturbo.schedule import SamplingSchedule

    spec = importlib.util.spec_from_file_location("_export_onnx_helpers",
                                                  Path(__file__).with_name("test_export_onnx.py"))
    helpers = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_export_onnx_helpers", helpers)
    spec.loader.exec_module(helpers)
    path = export_bundle(helpers.micro_bundle(with_refiner=False),
                         ExportRequest(SamplingSchedule.parse("H1"), "1:1:2", ("onnx",)), tmp_path / "sit",
                         progress=False).path
    sampler = OnnxRuntimeSampler.from_artifacts(path)
    pixels = torch.rand(1, 3, 6, 6) * 2 - 1
    with pytest.raises(FlowTurboError, match="conditioned on class ids, not text prompts"):
        sampler.inpaint(pixels, torch.ones(1, 1, 6, 6), prompts=["a cat"])
    with pytest.raises(FlowTurboError, match="conditioned on class ids, not text prompts"):
        sampler.edit(pixels, 0.5, prompt_embeds=torch.randn(1, 4, 8))
    capsys.readouterr()
    for task, extra in (("inpaint", ["--mask", str(files / "mask.png")]), ("edit", ["--strength", "0.5"])):
        assert main([task, "--artifacts", str(path), "--backend", "onnxruntime", "--image", str(files / "in.png"),
                     *extra, "--prompt", "a cat", "--out", str(tmp_path / "out")]) == 2
        one_error_line(capsys, "conditioned on class ids, not text prompts", "--classes")
    assert not (tmp_path / "out").exists()


def test_encoded_latents_reach_the_graphs_contiguous(exported, image):
    """An AOTInductor encoder package returns channels-last latents (the VAE's convolutions) and a package reads its
    inputs as contiguous whatever their strides: ``encode`` returns contiguous latents and the AOTInductor module
    passes contiguous inputs (without both, editing from an AOTInductor text export was wrong by ~1.7)."""
    from flowturbo.runtime.aoti_backend import _AotiModule

    _, sampler, _ = exported
    graph = sampler._encoder
    try:
        sampler._encoder = lambda images: [o.contiguous(memory_format=torch.channels_last) for o in graph(images=images)]
        latents = sampler.encode(image)
    finally:
        sampler._encoder = graph
    assert latents.is_contiguous() and torch.equal(latents, sampler.encode(image))
    module = _AotiModule.__new__(_AotiModule)
    seen = []
    module.names, module.device, module._checked = ["latents"], torch.device("cpu"), True
    module.runner = lambda x: seen.append(x.is_contiguous()) or x
    module(latents=latents.contiguous(memory_format=torch.channels_last))
    assert seen == [True]


@pytest.mark.slow
def test_aoti_text_export_inpaints_and_edits_as_pytorch(exported, tiny_pipelines, tmp_path, image):
    """AOTInductor (CPU) packages of the SD3 CFG graphs with the encoder (~80 s to compile on one core; slow, as every
    AOTInductor test): inpainting and editing equal the PyTorch path's; the C++ runner on the same packages refuses
    both, naming --backend aoti."""
    from flowturbo.runtime.cpp_backend import CppSampler, cpp_unavailable_reason

    _, _, reference = exported
    family = reference.pipeline.family
    schedule = text_schedule(family, "H1E1", 3.0, SIZE)
    result = export_text_pipeline(family, ExportRequest(schedule, "1:2:3", ("aoti",), with_encoder=True),
                                  TextExport(SIZE, MAX_SEQUENCE_LENGTH), tmp_path / "aoti",
                                  source=str(tiny_pipelines["sd3"]))
    assert [a["file"] for a in result.manifest["artifacts"]] == ["predictor_step.pt2", "decoder.pt2", "encoder.pt2"]
    sampler = Sampler.from_artifacts(result.path, backend="aoti")
    mask = _mask()
    got = sampler.inpaint(image, mask, prompts=PROMPTS, negative_prompt=NEGATIVE, seed=3)
    want = reference.inpaint(image, mask, prompts=PROMPTS, negative_prompt=NEGATIVE, schedule="H1E1", cfg=3.0,
                             seed=3, progress=False)
    torch.testing.assert_close(got.images, want.images, **tol("export_fp32"))
    got = sampler.edit(image, 0.6, prompts=PROMPTS, seed=4)
    want = reference.edit(image, 0.6, prompts=PROMPTS, schedule="H1E1", cfg=3.0, seed=4, progress=False)
    torch.testing.assert_close(got.images, want.images, **tol("export_fp32"))
    if cpp_unavailable_reason() is not None:  # the C++ runner is optional (as in tests/runtime/test_cpp_runner.py)
        pytest.skip(f"C++ runner: {cpp_unavailable_reason()}")
    runner = CppSampler.from_artifacts(result.path)
    with pytest.raises(FlowTurboError, match="inpainting is not supported by --backend cpp.*--backend aoti"):
        runner.inpaint(image, mask, prompts=PROMPTS)
    with pytest.raises(FlowTurboError, match="editing is not supported by --backend cpp.*--backend aoti"):
        runner.edit(image, 0.6, prompts=PROMPTS)
