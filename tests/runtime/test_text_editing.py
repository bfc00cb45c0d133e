"""Inpainting and editing with text-to-image families (SD3, FLUX.1-dev) through the same hooks as class models.

On the tiny random diffusers folders of ``tests/tiny_diffusers.py`` (32x32 images, 16x16 latents): the family's
VAE encoder against diffusers' own ``(vae.encode(x).latent_dist.mode() - shift) * scale`` and the decode's inverse;
inpainting pins the known latents exactly and regenerates the masked ones; an all-known mask gives the image's
latents back; editing at strength 1 is plain sampling; editing's grid is the family's shifted grid rescaled onto
[t0, 1]; the CLI writes PNGs; bad input is one ``error:`` line, exit 2, nothing written.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_checks import one_error_line
from PIL import Image
from tiny_diffusers import FLUX_VAE, IMAGE_SIZE, MAX_SEQUENCE_LENGTH, SD3_VAE, load_diffusers
from tolerances import tol

from flowturbo.errors import FlowTurboError
from flowturbo.families import ImageSize
from flowturbo.runtime.cli import main
from flowturbo.runtime.editing import EditingWarning, EditTask, ImageInput, InpaintTask, edit_timesteps
from flowturbo.runtime.sampler import Sampler

FAMILIES = ["sd3", "flux_dev"]
VAE = {"sd3": SD3_VAE, "flux_dev": FLUX_VAE}
SIZE = ImageSize(IMAGE_SIZE, IMAGE_SIZE)
TOKENS = ["--max-sequence-length", str(MAX_SEQUENCE_LENGTH)]
PROMPTS = ["a red fox in the snow", "a cat"]


@pytest.fixture(scope="module")
def samplers(tiny_pipelines):
    torch.set_num_threads(1)
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Sampler.from_pipeline(str(tiny_pipelines[name]), device="cpu",
                                                max_sequence_length=MAX_SEQUENCE_LENGTH)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def image():
    """A random non-zero (1, 3, 32, 32) image in [-1, 1]."""
    generator = torch.Generator().manual_seed(7)
    return torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1


def _center_mask(lo=8, hi=24):
    mask = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    mask[..., lo:hi, lo:hi] = 1
    return mask


# ------------------------------------------------------------------------------------------- the encoder
@pytest.mark.parametrize("name", FAMILIES)
def test_encode_image_is_diffusers_vae_mode_with_shift_then_scale(samplers, tiny_pipelines, image, name):
    """``encode_image`` = ``(vae.encode(x).latent_dist.mode() - shift) * scale`` of diffusers' own VAE; a dropped
    shift or a scale applied the wrong way is far outside the tolerance (checked, so the test bites)."""
    family = samplers(name).pipeline.family
    scale, shift = VAE[name]
    vae = load_diffusers(tiny_pipelines[name]).vae
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (scale, shift)
    with torch.no_grad():
        mode = vae.encode(image).latent_dist.mode()  # (1, 16, 16, 16)
    got = family.encode_image(image)
    assert got.shape == (1, 16, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    torch.testing.assert_close(got, (mode - shift) * scale, **tol(torch.float32))
    for wrong in (mode * scale, (mode - shift) / scale, mode * scale - shift):
        assert (got - wrong).abs().max() > 100 * tol(torch.float32)["atol"]


@pytest.mark.parametrize("name", FAMILIES)
def test_decode_inverts_encode_at_the_latent_level(samplers, tiny_pipelines, image, name):
    """decode(encode(x)) is diffusers' ``vae.decode(mode)``: the family's ``z / scale + shift`` gives back the VAE's
    own latents (float32 rounding only), and the images agree through the decoder."""
    family = samplers(name).pipeline.family
    scale, shift = VAE[name]
    vae = load_diffusers(tiny_pipelines[name]).vae
    with torch.no_grad():
        mode = vae.encode(image).latent_dist.mode()
        want = vae.decode(mode).sample.clamp(-1, 1)  # (1, 3, 32, 32)
        z = family.encode_image(image)
        torch.testing.assert_close(z / scale + shift, mode, **tol(torch.float32))
        torch.testing.assert_close(family.decode(z), want, **tol("model_fp32"))


@pytest.mark.parametrize("name", FAMILIES)
def test_encode_refuses_a_size_the_model_cannot_take(samplers, name):
    with pytest.raises(FlowTurboError, match="30x30 is not a multiple of 4.*28x28, 28x32, 32x28, 32x32"):
        samplers(name).pipeline.family.encode_image(torch.zeros(1, 3, 30, 30))


# ------------------------------------------------------------------------------------------- inpainting
@pytest.mark.parametrize("name", FAMILIES)
def test_inpainting_keeps_known_pixels_exactly_and_regenerates_the_mask(samplers, image, name):
    sampler = samplers(name)
    mask = _center_mask()
    out = sampler.inpaint(image, mask, prompts=PROMPTS, schedule="H1P2", seed=3, progress=False)
    keep = mask[0, 0] == 0
    assert out.images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and out.prompts == PROMPTS and out.labels == [0, 1]
    assert torch.equal(out.images[:, :, keep], image.expand(2, -1, -1, -1)[:, :, keep])
    assert (out.images[:, :, ~keep] - image[:, :, ~keep]).abs().max() > 0.1  # really regenerated
    assert out.task["regenerated_fraction"] == pytest.approx(0.25)
    assert out.schedule.timesteps == sampler.default_schedule("H1P2", size=SIZE).timesteps  # the family's grid


@pytest.mark.parametrize("name", FAMILIES)
def test_inpaint_hook_pins_the_known_latents_exactly(samplers, image, name):
    """Through the sampler's own loop (the family's model calls, the prompts' conditioning): the kept latent cells end
    exactly at the image's latents, the masked ones elsewhere; with every cell kept the result is the image's
    latents, bit for bit."""
    sampler = samplers(name)
    family = sampler.pipeline.family
    schedule = sampler.default_schedule("H1P2", size=SIZE)
    known = family.encode_image(image).float()  # (1, 16, 16, 16)
    conditioning = family.condition(PROMPTS, schedule)
    noise = torch.randn(2, *known.shape[1:], generator=torch.Generator().manual_seed(4))
    for mask, kept_all in ((_center_mask(), False), (torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE), True)):
        task = InpaintTask(ImageInput(image), mask, known, (IMAGE_SIZE // 2, IMAGE_SIZE // 2))
        x0, extra = task.prepare(noise, conditioning)
        with torch.inference_mode():
            latents = sampler._integrate(schedule, x0, conditioning, extra, task, check_finite=True)
        keep = task.keep.expand(2, 16, -1, -1)
        assert torch.equal(latents[keep], known.expand(2, -1, -1, -1)[keep])
        if kept_all:
            assert torch.equal(latents, known.expand(2, -1, -1, -1))
        else:
            assert (latents[~keep] - known.expand(2, -1, -1, -1)[~keep]).abs().max() > 0.1


@pytest.mark.parametrize("name", FAMILIES)
def test_non_square_inpainting_keeps_pixels_on_the_grid_of_its_size(samplers, name):
    """A 32x16 (W x H) image: results of its size, kept pixels exact, the family's grid at that size."""
    sampler = samplers(name)
    image = torch.rand(1, 3, 16, 32, generator=torch.Generator().manual_seed(9)) * 2 - 1
    mask = torch.zeros(1, 1, 16, 32)
    mask[..., 4:12, 20:28] = 1
    out = sampler.inpaint(image, mask, prompts=PROMPTS[:1], schedule="E3", seed=2, progress=False)
    keep = mask[0, 0] == 0
    assert out.images.shape == (1, 3, 16, 32)
    assert torch.equal(out.images[:, :, keep], image[:, :, keep])
    assert out.schedule.timesteps == sampler.default_schedule("E3", size=ImageSize(32, 16)).timesteps


def test_all_black_mask_returns_the_input_with_a_warning(samplers, image):
    with pytest.warns(EditingWarning, match="nothing to regenerate"):
        out = samplers("sd3").inpaint(image, torch.zeros(IMAGE_SIZE, IMAGE_SIZE), prompts=PROMPTS, progress=False)
    assert torch.equal(out.images, image.expand(2, -1, -1, -1)) and out.predictor_calls == 0
    assert out.prompts == PROMPTS and out.labels == [0, 1]


@pytest.mark.parametrize("name", FAMILIES)
def test_full_mask_inpainting_is_plain_sampling(samplers, image, name):
    sampler = samplers(name)
    full = sampler.inpaint(image, torch.ones(1, 1, IMAGE_SIZE, IMAGE_SIZE), prompts=PROMPTS, schedule="E3", seed=4,
                           progress=False)
    plain = sampler.sample(prompts=PROMPTS, schedule="E3", size=SIZE, seed=4, progress=False)
    assert torch.equal(full.images, plain.images)


# ---------------------------------------------------------------------------------------------- editing
@pytest.mark.parametrize("name", FAMILIES)
def test_strength_one_editing_is_plain_sampling(samplers, image, name):
    sampler = samplers(name)
    kwargs = dict(schedule="H1P2", seed=5, progress=False)
    edited = sampler.edit(image, 1.0, prompts=PROMPTS, **kwargs)
    plain = sampler.sample(prompts=PROMPTS, size=SIZE, **kwargs)
    assert torch.equal(edited.images, plain.images)
    assert edited.predictor_calls == plain.predictor_calls


@pytest.mark.parametrize("name", FAMILIES)
def test_edit_grid_is_the_familys_shifted_grid_rescaled_onto_t0_1(samplers, image, name):
    """The family's grid at this size (time-shifted: not uniform) composed with the affine rescaling onto [t0, 1]:
    ``t0 + (1 - t0) t_k`` with exact ends; the step loop really runs on it (the times the hooks see)."""
    sampler = samplers(name)
    family = sampler.pipeline.family
    grid = family.timesteps(4, family.latent_shape(SIZE))
    assert grid[0] == 0.0 and grid[-1] == 1.0 and not np.allclose(np.diff(grid), 0.25)  # shifted, non-uniform
    schedule = sampler.default_schedule("E4", size=SIZE)
    assert schedule.timesteps == grid
    out = sampler.edit(image, 0.6, prompts=PROMPTS[:1], schedule="E4", seed=6, progress=False)
    t0 = 1.0 - 0.6
    want = [t0, *(t0 + (1 - t0) * t for t in grid[1:-1]), 1.0]
    assert out.task["timesteps"] == pytest.approx(want, abs=1e-15) and out.task["timesteps"][0] == t0
    assert list(edit_timesteps(schedule, 0.6)) == out.task["timesteps"]
    np.testing.assert_allclose(np.diff(out.task["timesteps"]), (1 - t0) * np.diff(grid), rtol=1e-12)


@pytest.mark.parametrize("name", FAMILIES)
def test_low_strength_stays_close_to_the_input_latents(samplers, image, name):
    """In latent space (the tiny random VAE does not reconstruct pixels): the edit's latents at strength 0.2 are much
    nearer the image's than plain sampling's (strength 1)."""
    sampler = samplers(name)
    family = sampler.pipeline.family
    schedule = sampler.default_schedule("E3", size=SIZE)
    known = family.encode_image(image).float()  # (1, 16, 16, 16)
    conditioning = family.condition(PROMPTS[:1], schedule)
    noise = torch.randn(1, *known.shape[1:], generator=torch.Generator().manual_seed(6))
    distance = {}
    for strength in (0.2, 1.0):
        task = EditTask(ImageInput(image), known, strength, schedule)
        x0, extra = task.prepare(noise, conditioning)
        with torch.inference_mode():
            latents = sampler._integrate(schedule, x0, conditioning, extra, task, check_finite=True)
        distance[strength] = float((latents - known).abs().mean())
    assert distance[0.2] < 0.5 * distance[1.0], distance


def test_sampler_refuses_the_wrong_conditioning_and_sizes(samplers, image):
    sd3 = samplers("sd3")
    with pytest.raises(FlowTurboError, match="conditioned on text prompts"):
        sd3.edit(image, 0.5, [1])
    with pytest.raises(FlowTurboError, match="--image 30x30 is not a multiple of 4.*28x28"):
        sd3.edit(torch.zeros(1, 3, 30, 30), 0.5, prompts=["x"])
    with pytest.raises(FlowTurboError, match="mask must be 32x32"):
        sd3.inpaint(image, torch.ones(1, 1, 16, 16), prompts=["x"])
    with pytest.raises(FlowTurboError, match="conditioned on class ids"):
        Sampler.from_bundle(device="cpu").edit(torch.zeros(1, 1, 32, 32), 0.5, prompts=["a cat"])


# ------------------------------------------------------------------------------------------------- CLI
@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    paths = {"image": tmp_path / "in.png", "mask": tmp_path / "mask.png", "odd": tmp_path / "odd.png"}
    Image.fromarray(rng.integers(1, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(paths["image"])
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(paths["mask"])
    Image.fromarray(rng.integers(1, 256, (30, 30, 3), dtype=np.uint8)).save(paths["odd"])
    return paths


def test_cli_inpaint_writes_pngs_and_keeps_pixels_byte_exact(tiny_pipelines, files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["inpaint", "--pipeline", str(tiny_pipelines["sd3"]), "--image", str(files["image"]), "--mask",
                 str(files["mask"]), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--schedule", "H1P2", "--cfg",
                 "4.5", "--negative-prompt", "blurry", *TOKENS, "--seed", "2", "--out", str(out), "--no-progress"]) == 0
    assert "flowturbo inpaint: H1P2" in capsys.readouterr().out
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["0_a_red_fox_in_the_snow.png", "1_a_cat.png", "grid.png", "input.png", "mask.png"]
    record = json.loads((out / "run.json").read_text())
    assert record["prompts"] == PROMPTS and record["model"]["family"] == "sd3"
    assert record["task"]["task"] == "inpaint" and record["schedule"]["guidance_scale"] == 4.5
    assert record["conditioning"]["negative_prompt"] == "blurry"
    keep = np.asarray(Image.open(files["mask"])) == 0
    source = np.asarray(Image.open(files["image"]))
    for name in names[:2]:
        result = np.asarray(Image.open(out / name))
        np.testing.assert_array_equal(result[keep], source[keep])
        assert np.abs(result[~keep].astype(int) - source[~keep]).max() > 20


def test_cli_edit_writes_pngs_and_the_rescaled_grid(tiny_pipelines, samplers, files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["edit", "--pipeline", str(tiny_pipelines["flux_dev"]), "--image", str(files["image"]), "--strength",
                 "0.6", "--prompt", "a cat", "--schedule", "E4", "--guidance", "2.5", *TOKENS, "--seed", "1",
                 "--out", str(out), "--no-progress"]) == 0
    assert "strength 0.6 (t0 = 0.4)" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.png")) == ["0_a_cat.png", "grid.png", "input.png"]
    record = json.loads((out / "run.json").read_text())
    assert record["task"]["t0"] == pytest.approx(0.4) and record["conditioning"]["guidance"] == 2.5
    pixels = torch.from_numpy(np.asarray(Image.open(files["image"])).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    want = samplers("flux_dev").edit(pixels, 0.6, prompts=["a cat"], schedule="E4", guidance=2.5, seed=1,
                                     progress=False)
    assert record["task"]["timesteps"] == want.task["timesteps"]
    from flowturbo.runtime.images import to_uint8

    np.testing.assert_array_equal(np.asarray(Image.open(out / "0_a_cat.png")), to_uint8(want.images)[0])


@pytest.mark.parametrize("task, image, args, needles", [
    ("edit", "image", ["--classes", "1", "--prompt", "x"], ["--classes is for class-conditional models", "--prompt"]),
    ("inpaint", "image", ["--classes", "1"], ["--classes is for class-conditional models"]),
    ("edit", "odd", ["--prompt", "x"], ["--image 30x30 is not a multiple of 4", "28x28", "32x32"]),
    ("inpaint", "odd", ["--prompt", "x"], ["--image 30x30", "nearest valid sizes"]),
    ("edit", "image", ["--prompt", "x", "--guidance-channels", "3", "--cfg", "3"], ["partial-channel CFG"]),
    ("edit", "image", ["--prompt", "x", "--guidance", "2"], ["--guidance 2", "no guidance embedding"]),
])
def test_cli_bad_text_input_is_one_error_line_and_writes_nothing(tiny_pipelines, files, tmp_path, capsys, task,
                                                                 image, args, needles):
    extra = ["--strength", "0.5"] if task == "edit" else ["--mask", str(files["mask"])]
    out = tmp_path / "out"
    assert main([task, "--pipeline", str(tiny_pipelines["sd3"]), "--image", str(files[image]), *extra, *TOKENS,
                 *args, "--out", str(out), "--no-progress"]) == 2
    one_error_line(capsys, *needles)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("task", ["inpaint", "edit"])
def test_cli_prompt_with_a_class_model_is_one_error_line(files, tmp_path, capsys, task):
    extra = ["--strength", "0.5"] if task == "edit" else ["--mask", str(files["mask"])]
    out = tmp_path / "out"
    assert main([task, "--image", str(files["image"]), *extra, "--prompt", "a cat", "--out", str(out)]) == 2
    one_error_line(capsys, "--prompt is for text-to-image models", "--pipeline")
    assert main([task, "--image", str(files["image"]), *extra, "--out", str(out)]) == 2
    one_error_line(capsys, "--classes is required")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
