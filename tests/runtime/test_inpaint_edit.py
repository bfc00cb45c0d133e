"""Inpainting and editing (issue 11): guarantees, hooks, backends, CLI and bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from tolerances import tol

from flowturbo.errors import FlowTurboError
from flowturbo.integrator import IntegratorState, StepHooks, StepInfo
from flowturbo.runtime.cli import main
from flowturbo.runtime.editing import (
    EditingWarning,
    ImageInput,
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
    assert code == 2 and "--strength must be in (0, 1]" in err and not (tmp_path / "o").exists()


def test_cli_all_black_mask_warns_and_returns_the_input(files, tmp_path, capsys):
    out = tmp_path / "black"
    with pytest.warns(EditingWarning, match="the mask is black everywhere"):  # printed as one `warning:` line
        code, stdout, err = _cli(["inpaint", "--image", str(files / "shirt.png"), "--mask", str(files / "black.png"),
                                  "--classes", "1", "--device", "cpu", "--out", str(out)], capsys)
    assert code == 0 and "the mask is black everywhere" in json.loads((out / "run.json").read_text())["task"]["notes"][-1]
    assert np.array_equal(np.asarray(Image.open(out / "0_Trouser.png")), np.asarray(Image.open(files / "shirt.png")))


def test_cli_cpp_backend_says_it_is_not_supported(files, tmp_path, capsys):
    code, _, err = _cli(["edit", "--image", str(files / "shirt.png"), "--strength", "0.5", "--classes", "1",
                         "--artifacts", str(tmp_path), "--backend", "cpp", "--out", str(tmp_path / "o")], capsys)
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
