"""Text bundles (`flowturbo train package --refiner RUN` for a refiner trained on a diffusers teacher): a bundle that
points at the pipeline folder, holds the refiner and the sampling defaults, and samples exactly as the folder + the
refiner with those settings (tiny random SD3; the refiner has random non-zero weights so a dropped refiner shows)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_checks import one_error_line
from tiny_diffusers import IMAGE_SIZE, MAX_SEQUENCE_LENGTH, REFINER_CFG, write_random_token_refiner

from flowturbo.runtime.cli import main
from flowturbo.runtime.sampler import Sampler

CFG = REFINER_CFG
PROMPTS = ["a photo of the cat", "a red car"]


@pytest.fixture(scope="module")
def bundle(sd3_refiner, tmp_path_factory):
    out = tmp_path_factory.mktemp("text_bundle") / "bundle"
    assert main(["train", "package", "--refiner", str(sd3_refiner), "--schedule", "H1P1R2",
                 "--inpaint-schedule", "H2", "--out", str(out)]) == 0
    return out


def test_a_text_bundle_points_at_the_folder_and_samples_as_folder_plus_refiner(bundle, tiny_pipelines, sd3_refiner):
    config = json.loads((bundle / "config.json").read_text())
    assert config["pipeline"] == str(tiny_pipelines["sd3"].resolve()) and config["kind"] == "text-to-image"
    assert config["defaults"] == {"schedule": "H1P1R2", "cfg": CFG, "guidance": None, "inpaint_schedule": "H2"}
    assert sorted(p.name for p in bundle.iterdir() if not p.name.startswith(".")) == ["config.json",
                                                                                       "refiner.safetensors"]
    got = Sampler.from_bundle(str(bundle), max_sequence_length=MAX_SEQUENCE_LENGTH).sample(prompts=PROMPTS, seed=3,
                                                                                           progress=False)
    folder = Sampler.from_pipeline(str(tiny_pipelines["sd3"]), refiner=str(sd3_refiner),
                                   max_sequence_length=MAX_SEQUENCE_LENGTH)
    want = folder.sample(prompts=PROMPTS, seed=3, schedule="H1P1R2", cfg=CFG, progress=False)
    assert got.schedule.notation == "H1P1R2" and got.refiner_calls == want.refiner_calls == 4
    torch.testing.assert_close(got.images, want.images, rtol=0, atol=0)


def test_a_text_bundle_inpaints_with_its_inpainting_schedule(bundle):
    sampler = Sampler.from_bundle(str(bundle), max_sequence_length=MAX_SEQUENCE_LENGTH)
    image = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)
    mask[..., 8:24, 8:24] = 1
    inpainted = sampler.inpaint(image, mask, prompts=PROMPTS[:1], progress=False)
    assert inpainted.schedule.notation == "H2" and inpainted.refiner_calls == 0
    assert sampler.edit(image, 0.5, prompts=PROMPTS[:1], progress=False).schedule.notation == "H1P1R2"


def test_a_text_bundle_whose_folder_moved_is_refused_naming_it(tiny_pipelines, tmp_path, capsys):
    moved = tmp_path / "sd3"
    shutil.copytree(tiny_pipelines["sd3"], moved)
    refiner = write_random_token_refiner(moved, tmp_path / "refiner.safetensors", CFG)
    out = tmp_path / "bundle"
    assert main(["train", "package", "--refiner", str(refiner), "--out", str(out)]) == 0
    moved.rename(tmp_path / "elsewhere")
    samples = tmp_path / "samples"
    assert main(["sample", "--model", str(out), "--prompt", "x", "--out", str(samples), "--no-progress"]) == 2
    one_error_line(capsys, f"points at the diffusers pipeline folder {moved.resolve()}", "not there")
    assert not samples.exists()


@pytest.mark.parametrize("flags,needles", [
    (["train", "package", "--refiner", "REF", "--cfg", "3", "--out", "OUT"], ["--cfg does not apply"]),
    (["train", "package", "--refiner", "REF", "--inpaint-schedule", "H4X", "--out", "OUT"], ["H4X"]),
])
def test_text_bundle_packaging_refusals(sd3_refiner, tmp_path, capsys, flags, needles):
    out = tmp_path / "out"
    args = [str(sd3_refiner) if f == "REF" else str(out) if f == "OUT" else f for f in flags]
    assert main(args) == 2
    one_error_line(capsys, *needles)
    assert not out.exists()


def test_parts_flags_on_a_text_bundle_are_refused(bundle, tmp_path, capsys):
    samples = tmp_path / "samples"
    assert main(["sample", "--model", str(bundle), "--prompt", "x", "--pipeline", str(bundle), "--out",
                 str(samples)]) == 2
    one_error_line(capsys, "is a text bundle", "drop --pipeline / --refiner")
    assert not samples.exists()
