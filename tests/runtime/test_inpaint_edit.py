"""Inpainting and editing (issue 11): guarantees, hooks, backends, CLI and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from micro_models import counting_graph_backend
from tolerances import tol

from flowturbo.errors import FlowTurboError
from flowturbo.integrator import IntegratorState, StepHooks, StepInfo
from flowturbo.runtime.cli import main
from flowturbo.runtime.editing import (
    EditingWarning,
    InpaintHook,
    edit_timesteps,
    feathered_blend,
    latent_keep_mask,
    load_image,
    load_mask,
)
from flowturbo.runtime.sampler import Sampler
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.fashion_mnist import load_fashion_mnist, to_model_range

SCHEDULE = "H1P2R2"  # every step kind but E; E is covered below


@pytest.fixture(scope="module")
def sampler():
    return Sampler.from_bundle(device="cpu")


@pytest.fixture(scope="module")
def shirt():
    data = load_fashion_mnist("test", limit=8)
    images = to_model_range(data.images)  # (8, 1, 32, 32) in [-1, 1]
    return images[:1], int(data.labels[0])


def _center_mask(size=32, lo=8, hi=24):
    mask = torch.zeros(1, 1, size, size)
    mask[..., lo:hi, lo:hi] = 1
    return mask


def _schedule(sampler, spec=SCHEDULE):
    return sampler.default_schedule(spec)


def test_kept_pixels_equal_the_input_exactly(sampler, shirt):
    image, _ = shirt
    mask = _center_mask()
    out = sampler.inpaint(image, mask, [7, 5, 9], schedule=_schedule(sampler), seed=3, progress=False)
    keep = mask[0, 0] == 0
    assert torch.equal(out.images[:, :, keep], image.expand(3, -1, -1, -1)[:, :, keep])
    inside = out.images[:, :, ~keep]
    assert (inside - image[:, :, ~keep]).abs().max() > 0.1  # the white region really was regenerated
    assert out.task["regenerated_fraction"] == pytest.approx(0.25)


@pytest.mark.parametrize("spec", ["H1P2R2", "E3", "H2"])
def test_full_mask_inpainting_is_plain_sampling(sampler, shirt, spec):
    image, _ = shirt
    schedule = _schedule(sampler, spec)
    full = sampler.inpaint(image, torch.ones(1, 1, 32, 32), [1, 8], schedule=schedule, seed=4, progress=False)
    plain = sampler.sample([1, 8], schedule=schedule, seed=4, progress=False)
    assert torch.equal(full.images, plain.images)


def test_strength_one_editing_is_plain_sampling(sampler, shirt):
    image, _ = shirt
    schedule = _schedule(sampler)
    edited = sampler.edit(image, 1.0, [3, 6], schedule=schedule, seed=5, progress=False)
    plain = sampler.sample([3, 6], schedule=schedule, seed=5, progress=False)
    assert torch.equal(edited.images, plain.images)
    assert (edited.predictor_calls, edited.refiner_calls) == (schedule.predictor_calls, schedule.refiner_calls)


def test_low_strength_stays_close_to_the_input(sampler, shirt):
    image, label = shirt
    near = sampler.edit(image, 0.2, [label], schedule=_schedule(sampler), seed=6, progress=False).images
    far = sampler.edit(image, 1.0, [label], schedule=_schedule(sampler), seed=6, progress=False).images
    assert (near - image).abs().mean() < 0.5 * (far - image).abs().mean()


def test_edit_grid_is_the_schedule_rescaled_with_exact_ends():
    schedule = SamplingSchedule.parse("H1P5R3")
    grid = edit_timesteps(schedule, 0.6)
    assert grid[0] == pytest.approx(0.4) and grid[0] == 1.0 - 0.6 and grid[-1] == 1.0
    assert len(grid) == len(schedule.timesteps)
    assert np.allclose(np.diff(grid), 0.6 / 9)
    assert edit_timesteps(schedule, 1.0) == schedule.timesteps


class Recorder(StepHooks):
    def __init__(self):
        self.calls = []

    def before_step(self, step: StepInfo, state: IntegratorState) -> None:
        self.calls.append(("before", step.index))

    def after_step(self, step: StepInfo, state: IntegratorState) -> None:
        self.calls.append(("after", step.index))


def test_inpaint_hook_runs_once_per_step_in_order_and_pins_the_known_region(sampler, shirt):
    """Through the sampler's loop: hooks see every step once, before then after; after each step the kept
    latent cells sit exactly on the linear path t x_1 + (1 - t) z; the carried velocity is left untouched."""
    from flowturbo.training.sampling import make_noise, sample_schedule

    image, _ = shirt
    pipe = sampler.pipeline
    schedule = _schedule(sampler)
    known = pipe.encoder.encode(image)  # (1, 4, 8, 8)
    keep = latent_keep_mask(_center_mask(), 8)
    noise = make_noise(2, pipe.latent_shape, 9)
    recorder = Recorder()

    class Check(StepHooks):
        def __init__(self):
            self.carried = []

        def after_step(self, step, state):
            on_path = known * step.t_end + noise * (1 - step.t_end)
            keep2 = keep.expand(2, 4, -1, -1)
            assert torch.equal(state.x[keep2], on_path.expand(2, -1, -1, -1)[keep2])
            self.carried.append(state.carried)

    check = Check()
    hook = InpaintHook(known.expand(2, -1, -1, -1), noise, keep.expand(2, -1, -1, -1))
    with torch.no_grad():
        sample_schedule(schedule, noise, torch.tensor([2, 3]), pipe.predictor, pipe.refiner,
                        num_classes=pipe.num_classes, hooks=[recorder, hook, check])
    n = schedule.num_steps
    assert recorder.calls == [(w, k) for k in range(n) for w in ("before", "after")]
    assert all(c is not None for c in check.carried)  # every step here carries a velocity; the hook keeps it


def test_latent_mask_and_feathering():
    mask = _center_mask()
    keep = latent_keep_mask(mask, 8)
    assert keep.shape == (1, 1, 8, 8) and not keep[..., 2:6, 2:6].any() and keep[..., :2, :].all()
    blend = feathered_blend(mask, 2)
    assert torch.equal(blend[mask == 0], torch.zeros_like(blend[mask == 0]))  # kept pixels: weight exactly 0
    assert blend.max() == 1 and 0 < blend[0, 0, 8, 15] < 1  # a ramp inside the white region's border
    assert torch.equal(feathered_blend(mask, 0), mask)


def test_all_black_mask_returns_the_input_with_a_warning(sampler, shirt):
    image, _ = shirt
    with pytest.warns(EditingWarning, match="black everywhere"):
        out = sampler.inpaint(image, torch.zeros(1, 1, 32, 32), [0, 1], seed=0, progress=False)
    assert torch.equal(out.images, image.expand(2, -1, -1, -1)) and out.predictor_calls == 0


def test_bundle_without_encoder_is_refused_and_still_samples(tmp_path, shirt):
    from flowturbo.training.bundle import load_bundle, save_bundle
    from flowturbo.runtime.pytorch_backend import DEFAULT_BUNDLE_DIR

    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    bundle.encoder = None
    save_bundle(bundle, tmp_path / "no_encoder")
    sampler = Sampler.from_bundle(str(tmp_path / "no_encoder"), device="cpu")
    assert sampler.sample([1], seed=0, progress=False).images.shape == (1, 1, 32, 32)
    with pytest.raises(FlowTurboError, match="inpainting needs an image encoder.*train package"):
        sampler.inpaint(shirt[0], _center_mask(), [1], progress=False)
    with pytest.raises(FlowTurboError, match="editing needs an image encoder"):
        sampler.edit(shirt[0], 0.5, [1], progress=False)
    with pytest.raises(FlowTurboError, match="inpainting needs an image encoder"):  # even with nothing to regenerate
        sampler.inpaint(shirt[0], torch.zeros(1, 1, 32, 32), [1], progress=False)


# ----------------------------------------------------------------------------------------------- files
@pytest.fixture(scope="module")
def files(tmp_path_factory, shirt):
    folder = tmp_path_factory.mktemp("inputs")
    pixels = ((shirt[0][0, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    Image.fromarray(pixels).save(folder / "shirt.png")
    Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(folder / "shirt_rgb.png")
    Image.fromarray(pixels).resize((40, 40)).save(folder / "big.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    gray = mask.copy()
    gray[8:24, 8:16] = 100  # below the 0.5 threshold: kept
    Image.fromarray(gray).save(folder / "gray_mask.png")
    Image.fromarray(mask).resize((16, 16), Image.NEAREST).save(folder / "small_mask.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / "black.png")
    (folder / "not_an_image.png").write_text("hello")
    # 16-bit grayscale copies (PIL mode I;16) with the same content: v16 = v8 * 257
    Image.fromarray(pixels.astype(np.uint16) * 257).save(folder / "shirt16.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "gray_mask16.png")
    return folder


def test_image_and_mask_loading_rules(files):
    image = load_image(files / "shirt_rgb.png", channels=1, size=32)
    assert image.pixels.shape == (1, 1, 32, 32) and "converted the RGB image to L" in image.notes[0]
    mask, notes = load_mask(files / "gray_mask.png", size=32)
    assert mask[0, 0, 10, 10] == 0 and mask[0, 0, 10, 20] == 1 and "not binary" in notes[0]
    with pytest.raises(FlowTurboError, match="--image is 40x40 but the model makes 32x32.*--resize"):
        load_image(files / "big.png", channels=1, size=32)
    assert "resized" in load_image(files / "big.png", channels=1, size=32, resize=True).notes[0]
    with pytest.raises(FlowTurboError, match="--mask is 16x16 but --image is 32x32"):
        load_mask(files / "small_mask.png", size=32, image_size=(32, 32))
    with pytest.raises(FlowTurboError, match="not a readable image"):
        load_image(files / "not_an_image.png", channels=1, size=32)


def _cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_inpaint_writes_like_sample_and_keeps_pixels_byte_exact(files, tmp_path, capsys):
    out = tmp_path / "inp"
    code, stdout, _ = _cli(["inpaint", "--image", str(files / "shirt_rgb.png"), "--mask", str(files / "mask.png"),
                            "--classes", "3,7", "--schedule", SCHEDULE, "--device", "cpu", "--out", str(out),
                            "--no-progress"], capsys)
    assert code == 0, stdout
    record = json.loads((out / "run.json").read_text())
    assert record["task"]["task"] == "inpaint" and any("converted the RGB" in n for n in record["task"]["notes"])
    assert sorted(p.name for p in out.glob("*.png")) == ["0_Dress.png", "1_Sneaker.png", "grid.png", "input.png",
                                                          "mask.png"]
    source = np.asarray(Image.open(files / "shirt.png"))
    mask = np.asarray(Image.open(files / "mask.png")) > 0
    for name in ("0_Dress.png", "1_Sneaker.png"):
        result = np.asarray(Image.open(out / name))
        assert np.array_equal(result[~mask], source[~mask])  # kept pixels: the input's bytes
    assert "note: converted the RGB image" in stdout


def test_cli_edit_writes_strength_and_grid(files, tmp_path, capsys):
    out = tmp_path / "edit"
    code, stdout, _ = _cli(["edit", "--image", str(files / "shirt.png"), "--strength", "0.7", "--classes", "3",
                            "--num-images", "2", "--device", "cpu", "--out", str(out), "--no-progress"], capsys)
    assert code == 0
    record = json.loads((out / "run.json").read_text())
    assert record["task"]["strength"] == 0.7 and record["task"]["t0"] == pytest.approx(0.3)
    assert record["task"]["timesteps"][0] == pytest.approx(0.3) and record["task"]["timesteps"][-1] == 1.0
    assert "strength 0.7 (t0 = 0.3)" in stdout


@pytest.mark.parametrize("extra,message", [
    (["--mask", "{f}/small_mask.png"], "--mask is 16x16 but --image is 32x32"),
    (["--mask", "{f}/not_an_image.png"], "not a readable image"),
    (["--mask", "{f}/missing.png"], "not found"),
])
def test_cli_inpaint_bad_input_is_one_error_line_and_writes_nothing(files, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    args = ["inpaint", "--image", str(files / "shirt.png"), "--classes", "1", "--device", "cpu", "--out", str(out),
            *[a.format(f=files) for a in extra]]
    code, _, err = _cli(args, capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())


@pytest.mark.parametrize("strength", ["0", "1.5", "-0.2", "nan"])
def test_cli_edit_refuses_strength_outside_0_1(files, tmp_path, capsys, strength):
    code, _, err = _cli(["edit", "--image", str(files / "shirt.png"), "--strength", strength, "--classes", "1",
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--strength must be a finite number in (0, 1]" in err and not (tmp_path / "o").exists()


def test_cli_all_black_mask_warns_and_returns_the_input(files, tmp_path, capsys):
    out = tmp_path / "black"
    with pytest.warns(EditingWarning, match="the mask is black everywhere"):  # printed as one `warning:` line
        code, stdout, err = _cli(["inpaint", "--image", str(files / "shirt.png"), "--mask", str(files / "black.png"),
                                  "--classes", "1", "--device", "cpu", "--out", str(out)], capsys)
    assert code == 0 and "the mask is black everywhere" in json.loads((out / "run.json").read_text())["task"]["notes"][-1]
    assert "(0 predictor + 0 refiner calls" in stdout  # the calls really made, not the schedule's
    assert np.array_equal(np.asarray(Image.open(out / "0_Trouser.png")), np.asarray(Image.open(files / "shirt.png")))


def test_cli_cpp_backend_says_it_is_not_supported(files, tmp_path, capsys):
    code, _, err = _cli(["edit", "--image", str(files / "shirt.png"), "--strength", "0.5", "--classes", "1",
                         "--artifacts", str(tmp_path / "art"), "--backend", "cpp", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "not supported by --backend cpp" in err


def test_one_image_per_result_keeps_each_images_own_pixels(sampler):
    """A batch of different images (one per class), split over batches: every row keeps its own input."""
    data = load_fashion_mnist("test", limit=5)
    images = to_model_range(data.images)  # (5, 1, 32, 32)
    masks = torch.zeros(5, 1, 32, 32)
    for k in range(5):
        masks[k, :, 4 * k:4 * k + 12, :] = 1  # a different band per image
    out = sampler.inpaint(images, masks, [int(c) for c in data.labels], schedule=_schedule(sampler), seed=1,
                          batch_size=2, progress=False)
    assert out.num_batches == 3
    for k in range(5):
        keep = masks[k, 0] == 0
        assert torch.equal(out.images[k, :, keep], images[k, :, keep])
    with pytest.raises(FlowTurboError, match="the image must be \\(1 or 3"):
        sampler.inpaint(images[:2], masks[:2], [1, 2, 3], progress=False)


# ---------------------------------------------------------------------------- audit: more paths and inputs
def test_inpaint_and_edit_through_the_cuda_graph_path_match_eager(sampler):
    """The graph path captures the task's hooks with the schedule; a second request with another mask (or image)
    replays the same graph with its own inputs, and matches the eager path; an edit strength is its own graph."""
    backend = counting_graph_backend()
    graphed = Sampler(sampler.pipeline, cuda_graph=True, graph_backend=backend)
    images = to_model_range(load_fashion_mnist("test", limit=2).images)  # (2, 1, 32, 32)
    half = torch.zeros(1, 1, 32, 32)
    half[..., :, 16:] = 1
    schedule = _schedule(sampler)
    for k, (image, mask) in enumerate([(images[:1], _center_mask()), (images[1:], half)]):
        got = graphed.inpaint(image, mask, [7, 2], schedule=schedule, seed=3, progress=False)
        want = sampler.inpaint(image, mask, [7, 2], schedule=schedule, seed=3, progress=False)
        assert got.execution["cuda_graph"] and (backend.captures, backend.replays) == (1, k + 1)
        torch.testing.assert_close(got.images, want.images, **tol("sampler_fp32"))
        keep = mask[0, 0] == 0
        assert torch.equal(got.images[:, :, keep], image.expand(2, -1, -1, -1)[:, :, keep])
    for strength, image, captures in ((0.6, images[:1], 2), (0.6, images[1:], 2), (0.3, images[:1], 3)):
        got = graphed.edit(image, strength, [4, 9], schedule=schedule, seed=5, progress=False)
        want = sampler.edit(image, strength, [4, 9], schedule=schedule, seed=5, progress=False)
        assert backend.captures == captures
        torch.testing.assert_close(got.images, want.images, **tol("sampler_fp32"))
    assert backend.replays == 5


def test_partial_mask_with_an_euler_schedule_keeps_pixels_exactly(sampler, shirt):
    image, _ = shirt
    mask = _center_mask(lo=4, hi=20)
    out = sampler.inpaint(image, mask, [5, 0], schedule=_schedule(sampler, "E4"), seed=8, progress=False)
    keep = mask[0, 0] == 0
    assert torch.equal(out.images[:, :, keep], image.expand(2, -1, -1, -1)[:, :, keep])
    assert (out.images[:, :, ~keep] - image[:, :, ~keep]).abs().max() > 0.1
    assert (out.predictor_calls, out.refiner_calls) == (4, 0)


def test_16_bit_grayscale_pngs_read_like_their_8_bit_copies(files):
    assert Image.open(files / "shirt16.png").mode == "I;16"
    wide, narrow = load_image(files / "shirt16.png", channels=1, size=32), load_image(files / "shirt.png", channels=1,
                                                                                       size=32)
    assert torch.equal(wide.pixels, narrow.pixels) and "16-bit" in wide.notes[0]
    assert torch.equal(load_image(files / "shirt16.png", channels=3, size=32).pixels, narrow.pixels.expand(1, 3, -1, -1))
    mask16, notes = load_mask(files / "gray_mask16.png", size=32)
    assert torch.equal(mask16, load_mask(files / "gray_mask.png", size=32)[0])  # grey 100/255 stays below 0.5
    assert any("16-bit" in n for n in notes) and any("not binary" in n for n in notes)


def _args(files, out, *extra, image="shirt.png", mask="mask.png", task="inpaint"):
    args = [task, "--image", str(files / image), "--classes", "1", "--schedule", "H2", "--device", "cpu",
            "--out", str(out), "--no-progress", *extra]
    return args + (["--mask", str(files / mask)] if task == "inpaint" else ["--strength", "0.5"])


def _nothing_written(tmp_path, out):
    return not out.exists() and not any(p.name.startswith(f".{out.name}") for p in tmp_path.iterdir())


def test_cli_size_mismatch_is_refused_naming_both_sizes_unless_resize(files, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = _cli(_args(files, out, mask="small_mask.png"), capsys)
    assert code == 2 and err.count("\n") == 1 and "--mask is 16x16 but --image is 32x32" in err
    assert _nothing_written(tmp_path, out)
    code, _, err = _cli(_args(files, out, image="big.png", mask="mask.png"), capsys)
    assert code == 2 and "--image is 40x40 but the model makes 32x32" in err and _nothing_written(tmp_path, out)
    code, stdout, _ = _cli(_args(files, out, "--resize", mask="small_mask.png"), capsys)
    assert code == 0, stdout
    notes = json.loads((out / "run.json").read_text())["task"]["notes"]
    assert any("resized the mask from 16x16 to 32x32" in n for n in notes)


def test_cli_grey_mask_is_thresholded_and_noted(files, tmp_path, capsys):
    out = tmp_path / "grey"
    code, stdout, _ = _cli(_args(files, out, mask="gray_mask.png"), capsys)
    assert code == 0 and "note: the mask is not binary" in stdout
    record = json.loads((out / "run.json").read_text())
    assert any("pixels >= 0.5 count as white" in n for n in record["task"]["notes"])
    assert record["task"]["regenerated_fraction"] == pytest.approx(0.125)  # the grey half of the square is kept
    result, source = np.asarray(Image.open(out / "0_Trouser.png")), np.asarray(Image.open(files / "shirt.png"))
    assert np.array_equal(result[8:24, 8:16], source[8:24, 8:16])


@pytest.mark.parametrize("image,message", [("not_an_image.png", "is not a readable image"), ("nope.png", "not found")])
@pytest.mark.parametrize("task", ["inpaint", "edit"])
def test_cli_unreadable_image_is_one_error_line_and_writes_nothing(files, tmp_path, capsys, image, message, task):
    out = tmp_path / "never"
    code, _, err = _cli(_args(files, out, image=image, task=task), capsys)
    assert code == 2 and err.count("\n") == 1 and f"--image {files / image} {message}" in err
    assert _nothing_written(tmp_path, out)


@pytest.fixture(scope="module")
def encoderless(tmp_path_factory):
    """The default bundle saved without an encoder entry, and a copy whose declared encoder file is missing."""
    import shutil

    from flowturbo.runtime.pytorch_backend import DEFAULT_BUNDLE_DIR
    from flowturbo.training.bundle import load_bundle, save_bundle
    from flowturbo.training.encoders import ENCODER_WEIGHTS_FILE

    root = tmp_path_factory.mktemp("encoderless")
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    bundle.encoder = None
    save_bundle(bundle, root / "none")
    shutil.copytree(DEFAULT_BUNDLE_DIR, root / "broken")
    (root / "broken" / ENCODER_WEIGHTS_FILE).unlink()
    return root


@pytest.mark.parametrize("kind,message", [("none", "has none (no 'encoder' entry"),
                                          ("broken", "has no weights file encoder.safetensors")])
@pytest.mark.parametrize("task,mask", [("inpaint", "mask.png"), ("inpaint", "black.png"), ("edit", None)])
def test_cli_model_without_a_usable_encoder_is_refused_but_samples(files, tmp_path, capsys, encoderless, kind,
                                                                   message, task, mask):
    """Exit 2, one `error:` line naming the cause, nothing written — an all-black mask too (no model call is
    needed, but the request is refused like any other); `sample` still works with the same bundle."""
    out = tmp_path / "never"
    what = "inpainting" if task == "inpaint" else "editing"
    code, _, err = _cli([*_args(files, out, mask=mask or "mask.png", task=task), "--model",
                         str(encoderless / kind)], capsys)
    assert code == 2 and err.count("\n") == 1 and f"{what} needs" in err and message in err
    assert _nothing_written(tmp_path, out)
    if task == "edit":
        code, _, _ = _cli(["sample", "--model", str(encoderless / kind), "--classes", "1", "--schedule", "H2",
                           "--device", "cpu", "--out", str(tmp_path / "s"), "--no-progress"], capsys)
        assert code == 0 and (tmp_path / "s" / "0_Trouser.png").is_file()


def test_official_checkpoints_with_a_taesd_vae_ask_for_an_autoencoder_kl(tmp_path):
    from diffusers import AutoencoderTiny

    from flowturbo.training.models import SiT, perturb_zero_initialized, sit_config

    sit = SiT(sit_config("SiT-T/2", input_size=8, in_channels=4, num_classes=7))
    perturb_zero_initialized(sit, generator=torch.Generator().manual_seed(0))
    torch.save({"model": sit.state_dict(), "ema": sit.state_dict()}, tmp_path / "SiT-tiny.pt")
    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(str(tmp_path / "taesd"))
    official = Sampler.from_bundle(predictor=str(tmp_path / "SiT-tiny.pt"), vae=str(tmp_path / "taesd"), device="cpu")
    assert official.sample([1], schedule=official.default_schedule("H2"), seed=0, progress=False).images.shape[0] == 1
    pipe = official.pipeline
    size = pipe.decoder.image_size(8)
    image = torch.zeros(1, pipe.decoder.image_channels, size, size)
    for run, what in ((lambda: official.inpaint(image, torch.ones(1, 1, size, size), [1], progress=False), "inpainting"),
                      (lambda: official.edit(image, 0.5, [1], progress=False), "editing")):
        with pytest.raises(FlowTurboError) as info:
            run()
        message = str(info.value)
        assert message.startswith(f"{what} needs an image encoder") and "AutoencoderTiny (TAESD)" in message
        assert "only decodes" in message and "--vae with a diffusers AutoencoderKL folder" in message
        assert "train package" not in message and "'encoder' entry" not in message


# ------------------------------------------------------------------------------------ per-task default schedule
def test_the_embedded_default_inpaints_with_its_own_inpainting_schedule(sampler, shirt, files, tmp_path, capsys):
    """The embedded default samples and edits with H1R3 but inpaints with H4 (its config's ``inpaint_schedule``:
    QUALITY.md measured H4 0.7-1.2 domain FID better than H1R3 for inpainting); a --schedule still wins."""
    image, label = shirt
    assert sampler.pipeline.defaults.inpaint_schedule == "H4"
    inpainted = sampler.inpaint(image, _center_mask(), [label], progress=False)
    assert inpainted.schedule.notation == "H4" and inpainted.predictor_calls == 8 and inpainted.refiner_calls == 0
    assert sampler.edit(image, 0.5, [label], progress=False).schedule.notation == "H1R3"
    assert sampler.sample([label], progress=False).schedule.notation == "H1R3"
    assert sampler.inpaint(image, _center_mask(), [label], schedule="H2", progress=False).schedule.notation == "H2"
    out = tmp_path / "inp"
    code, stdout, _ = _cli(["inpaint", "--image", str(files / "shirt.png"), "--mask", str(files / "mask.png"),
                            "--classes", "1", "--device", "cpu", "--out", str(out), "--no-progress"], capsys)
    assert code == 0 and "H4 (8 predictor + 0 refiner calls" in stdout, stdout
    assert json.loads((out / "run.json").read_text())["schedule"]["notation"] == "H4"


def test_bundle_defaults_check_the_inpainting_schedule():
    from flowturbo.training.bundle import BundleDefaults

    assert BundleDefaults.from_dict({"schedule": "H1R3", "inpaint_schedule": "H4"}).inpaint_schedule == "H4"
    with pytest.raises(FlowTurboError, match="H4X"):
        BundleDefaults(inpaint_schedule="H4X")
    with pytest.raises(FlowTurboError, match="valid: schedule, cfg, guidance_channels, inpaint_schedule"):
        BundleDefaults.from_dict({"inpaint": "H4"})


def test_train_package_records_the_inpainting_schedule(tmp_path, capsys):
    """`train package --inpaint-schedule` writes it into the bundle; R steps without a refiner are refused."""
    from flowturbo.runtime.pytorch_backend import DEFAULT_BUNDLE_DIR

    out = tmp_path / "bundle"
    common = ["train", "package", "--predictor", str(DEFAULT_BUNDLE_DIR), "--decoder-bundle", str(DEFAULT_BUNDLE_DIR)]
    assert main([*common, "--schedule", "H4", "--inpaint-schedule", "H2P2", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["defaults"]["inpaint_schedule"] == "H2P2"
    capsys.readouterr()
    assert main([*common, "--schedule", "H4", "--inpaint-schedule", "H1R2", "--out", str(tmp_path / "b2")]) == 2
    assert "default inpainting schedule 'H1R2' has refiner (R) steps" in capsys.readouterr().err
    assert not (tmp_path / "b2").exists()
