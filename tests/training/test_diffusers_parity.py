"""Parity with diffusers itself: our schedules through the SD3 / FLUX adapters against the pipelines' own loops.

Tiny random pipelines built offline (tests/tiny_diffusers.py, once per session), loaded back from their folders by
both sides. Same noise (ours: flowturbo.noise; the pipeline gets it as ``latents``, FLUX packed), same prompts,
same guidance; float32. What each test pins:

* E steps on the model's grid equal the pipeline with its default scheduler — SD3 with CFG (E28 at CFG 7: the
  pipeline's default exactly), FLUX.1-dev (guidance embedding, resolution-dependent shift), FLUX.1-schnell — on
  the final latents and the decoded images;
* H steps equal ``FlowMatchHeunDiscreteScheduler`` (SD3: ``H``*(N-1) + ``E``);
* a batch of prompts (each encoded once) equals the pipeline given the same embeddings; FLUX true CFG.

They bite: a wrong shift, a flipped time convention, CFG on the wrong half and an unpacked latent each fail one
(checked by hand mutation; the table is in docs/predictor_protocol.md).
"""

from __future__ import annotations

import pytest
import torch
from tiny_diffusers import IMAGE_SIZE, MAX_SEQUENCE_LENGTH, load_diffusers
from tolerances import tol

from flowturbo.families import ImageSize
from flowturbo.noise import make_noise
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.families import load_family
from flowturbo.training.families.flux import image_ids, pack_latents, unpack_latents
from flowturbo.training.sampling import run_schedule

PROMPT = "a photo of the cat"
NEGATIVE = "blurry"
SIZE = ImageSize(IMAGE_SIZE, IMAGE_SIZE)
LATENT_SIDE = IMAGE_SIZE // 2


@pytest.fixture(scope="module")
def loaded(tiny_pipelines):
    """name -> (our adapter, the diffusers pipeline), both from the saved folder."""
    torch.set_num_threads(1)
    cache = {}

    def get(name):
        if name not in cache:
            family = load_family(tiny_pipelines[name], device=torch.device("cpu"), dtype=torch.float32,
                                 max_sequence_length=MAX_SEQUENCE_LENGTH)
            cache[name] = family, load_diffusers(tiny_pipelines[name])
        return cache[name]

    return get


def ours(family, steps, prompts, *, cfg=1.0, negative=None, guidance=None, seed=3, size=SIZE, decode=True):
    """(final latents, images in [0, 1] as the pipeline's output_type='pt', noise) of our sampler."""
    shape = family.latent_shape(size)
    schedule = SamplingSchedule.parse(steps, guidance_scale=cfg)
    schedule = SamplingSchedule(schedule.steps, family.timesteps(schedule.num_steps, shape), cfg)
    noise = make_noise(len(prompts), shape, seed)  # (B, 16, h, w)
    with torch.inference_mode():
        conditioning = family.condition(prompts, schedule, negative=negative, guidance=guidance)
        latents = run_schedule(schedule, noise, family.model_calls(conditioning, schedule)).latents
        images = (family.decode(latents) / 2 + 0.5).clamp(0, 1) if decode else None  # the pipeline's postprocess
    return latents, images, noise


def theirs(pipe, noise, steps, *, packed=False, size=SIZE, **kwargs):
    """(final latents as (B, C, h, w), images) of the pipeline itself on the same noise."""
    captured = {}

    def keep_latents(pipeline, step, timestep, tensors):
        captured["latents"] = tensors["latents"]
        return tensors

    images = pipe(latents=pack_latents(noise) if packed else noise, height=size.height, width=size.width,
                  num_inference_steps=steps, output_type="pt", callback_on_step_end=keep_latents,
                  callback_on_step_end_tensor_inputs=["latents"], **kwargs).images
    latents = captured["latents"]
    if packed:
        latents = unpack_latents(latents, size.height // 2, size.width // 2)
    return latents, images


def test_sd3_default_e28_is_the_pipeline_default(loaded):
    """The family's default (E28 at CFG 7 on the scheduler's shift-3 grid) is the pipeline's default run."""
    family, pipe = loaded("sd3")
    assert (family.defaults.schedule, family.defaults.cfg) == ("E28", 7.0)
    latents, images, noise = ours(family, "E28", [PROMPT], cfg=7.0)
    want_latents, want_images = theirs(pipe, noise, 28, prompt=PROMPT, max_sequence_length=MAX_SEQUENCE_LENGTH)
    torch.testing.assert_close(latents, want_latents, **tol("diffusers_fp32"))
    torch.testing.assert_close(images, want_images, **tol("diffusers_fp32"))


def test_sd3_cfg_with_a_negative_prompt(loaded):
    family, pipe = loaded("sd3")
    latents, images, noise = ours(family, "E3", [PROMPT], cfg=4.5, negative=NEGATIVE)
    want_latents, want_images = theirs(pipe, noise, 3, prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=4.5,
                                       max_sequence_length=MAX_SEQUENCE_LENGTH)
    torch.testing.assert_close(latents, want_latents, **tol("diffusers_fp32"))
    torch.testing.assert_close(images, want_images, **tol("diffusers_fp32"))


@pytest.mark.parametrize("name, guidance", [("flux_dev", None), ("flux_dev", 2.0), ("flux_schnell", None)])
def test_flux_equals_the_pipeline(loaded, name, guidance):
    """FLUX.1-dev (guidance embedding, default 3.5, no doubled batch; resolution-dependent shift) and -schnell: the
    packed transformer input, the pipeline's sigmas, the decode with the FLUX VAE's scale and shift."""
    family, pipe = loaded(name)
    latents, images, noise = ours(family, "E3", [PROMPT], guidance=guidance)
    extra = {} if guidance is None else {"guidance_scale": guidance}
    want_latents, want_images = theirs(pipe, noise, 3, packed=True, prompt=PROMPT,
                                       max_sequence_length=MAX_SEQUENCE_LENGTH, **extra)
    torch.testing.assert_close(latents, want_latents, **tol("diffusers_fp32"))
    torch.testing.assert_close(images, want_images, **tol("diffusers_fp32"))


def test_flux_dev_grid_follows_the_resolution(loaded):
    """FLUX.1-dev's shift depends on the image's token count: a larger image gets a later grid, each the pipeline's."""
    family, pipe = loaded("flux_dev")
    grids = {}
    for side in (IMAGE_SIZE, 2 * IMAGE_SIZE):
        size = ImageSize(side, side)
        grids[side] = family.timesteps(2, family.latent_shape(size))
        noise = make_noise(1, family.latent_shape(size), 0)
        theirs(pipe, noise, 2, packed=True, size=size, prompt=PROMPT, max_sequence_length=MAX_SEQUENCE_LENGTH)
        assert grids[side] == tuple(1.0 - float(s) for s in pipe.scheduler.sigmas)
    assert grids[2 * IMAGE_SIZE][1] < grids[IMAGE_SIZE][1]  # more tokens: more shift, more time near the noise


def test_sd3_heun_equals_the_heun_scheduler(loaded):
    """``H``*(N-1) + ``E`` on the Euler grid = SD3 with FlowMatchHeunDiscreteScheduler (2N - 1 calls)."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    family, pipe = loaded("sd3")
    latents, images, noise = ours(family, "H2E1", [PROMPT], cfg=3.0)
    euler = pipe.scheduler
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(euler.config)
    try:
        want_latents, want_images = theirs(pipe, noise, 3, prompt=PROMPT, guidance_scale=3.0,
                                           max_sequence_length=MAX_SEQUENCE_LENGTH)
    finally:
        pipe.scheduler = euler
    torch.testing.assert_close(latents, want_latents, **tol("diffusers_heun_fp32"))
    torch.testing.assert_close(images, want_images, **tol("diffusers_heun_fp32"))


def test_a_batch_of_prompts_encodes_each_once_and_equals_the_pipeline(loaded, monkeypatch):
    """Three images of two distinct prompts: each prompt (and the negative) encoded once, the rows repeated; the
    sampling equals the pipeline given the same embeddings."""
    family, pipe = loaded("sd3")
    encoded = []
    original = family.encode
    monkeypatch.setattr(family, "encode", lambda prompts: encoded.append(list(prompts)) or original(prompts))
    prompts = [PROMPT, "a dog", PROMPT]
    shape = family.latent_shape(SIZE)
    schedule = SamplingSchedule.parse("E2", guidance_scale=5.0)
    schedule = SamplingSchedule(schedule.steps, family.timesteps(2, shape), 5.0)
    noise = make_noise(3, shape, 11)
    with torch.inference_mode():
        conditioning = family.condition(prompts, schedule, negative=NEGATIVE)
        latents = run_schedule(schedule, noise, family.model_calls(conditioning, schedule)).latents
    assert encoded == [[PROMPT, "a dog"], [NEGATIVE]]
    assert torch.equal(conditioning.prompt.embeds[0], conditioning.prompt.embeds[2])
    want, _ = theirs(pipe, noise, 2, prompt_embeds=conditioning.prompt.embeds,
                     pooled_prompt_embeds=conditioning.prompt.pooled,
                     negative_prompt_embeds=conditioning.negative.embeds,
                     negative_pooled_prompt_embeds=conditioning.negative.pooled, guidance_scale=5.0)
    torch.testing.assert_close(latents, want, **tol("diffusers_fp32"))


def test_flux_true_cfg(loaded):
    """A negative prompt with --cfg on FLUX.1-dev: our doubled batch = the pipeline's true CFG (two calls)."""
    family, pipe = loaded("flux_dev")
    latents, _, noise = ours(family, "E2", [PROMPT], cfg=2.5, negative=NEGATIVE, decode=False)
    want, _ = theirs(pipe, noise, 2, packed=True, prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=2.5,
                     max_sequence_length=MAX_SEQUENCE_LENGTH)
    torch.testing.assert_close(latents, want, **tol("diffusers_batched_fp32"))
    plain, _, _ = ours(family, "E2", [PROMPT], decode=False)
    assert (plain - latents).abs().max() > 1e-3  # the guidance did something


def test_packing_and_ids_are_the_pipeline_s():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    assert torch.equal(image_ids(6, 10, torch.device("cpu"), torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
