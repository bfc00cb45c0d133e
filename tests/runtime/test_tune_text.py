"""`flowturbo tune --pipeline DIR --prompts FILE`: schedule search on a text-to-image model (tiny random SD3).

The default metric for these models is ``fine-grid``: the RMS distance of a candidate's final latents to the model's
own fine Heun solution (``H{--fine-steps}`` on the model's shifted grid) from the same noise and prompt. The tests
recompute the tuner's numbers independently, through ``Sampler.from_pipeline``'s family and step loop: a wrong prompt
per image, a fine reference on another grid, CFG on the wrong half or a dropped refiner call each change them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_checks import one_error_line
from PIL import Image
from tiny_diffusers import IMAGE_SIZE, MAX_SEQUENCE_LENGTH, REFINER_CFG

from flowturbo.families import ImageSize
from flowturbo.noise import make_noise
from flowturbo.runtime.cli import main
from flowturbo.runtime.sampler import Sampler
from flowturbo.runtime.tune import (
    SearchSpace,
    TuneConfig,
    Tuner,
    TuneRequests,
)
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.evaluation import folder_reference, score_features
from flowturbo.training.sampling import run_schedule

CFG = REFINER_CFG
PROMPTS = ["a photo of the cat", "a dog on a beach", "a red car"]
SIZE = ImageSize(IMAGE_SIZE, IMAGE_SIZE)
FINE_STEPS = 8
NUM_SAMPLES = 4
# The fine-grid RMS recomputed at another batch size: float32 sums in another order.
SCORE_TOLERANCE = dict(rel=1e-4, abs=1e-6)


def _tune_args(tiny_pipelines, sd3_refiner, root) -> list[str]:
    """One small text tune (with R steps) writing ``root/out`` with its cache in ``root/cache``."""
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return ["tune", "--pipeline", str(tiny_pipelines["sd3"]), "--refiner", str(sd3_refiner),
            "--prompts", str(prompts), "--cfg", str(CFG), "--size", str(IMAGE_SIZE),
            "--max-sequence-length", str(MAX_SEQUENCE_LENGTH), "--budget-calls", "6",
            "--num-samples", str(NUM_SAMPLES), "--search", "exhaustive", "--batch", "2", "--latency-batch", "2",
            "--latency-repeats", "1", "--heun", "1", "--pseudo", "0:1", "--refiner-steps", "0:1", "--euler", "2",
            "--fine-steps", str(FINE_STEPS), "--out", str(root / "out"), "--cache", str(root / "cache"),
            "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def tuned(tiny_pipelines, sd3_refiner, tmp_path_factory):
    """One small text tune through the CLI (with R steps): its output folder."""
    root = tmp_path_factory.mktemp("tune_text")
    assert main(_tune_args(tiny_pipelines, sd3_refiner, root)) == 0
    return root / "out"


@pytest.mark.timeout(300)
def test_a_torchrun_text_tune_scores_as_one_process(tuned, tiny_pipelines, sd3_refiner, tmp_path):
    """Two gloo processes split each candidate's images (batches of 2: images 0-1 on rank 0, 2-3 on rank 1) and
    gather them on rank 0: the same batches, noise and prompts as one process, so the very same scores."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "flowturbo",
           *_tune_args(tiny_pipelines, sd3_refiner, tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = (json.loads((folder / "tune.json").read_text()) for folder in (tuned, tmp_path / "out"))
    assert {c["name"]: c["score"] for c in two["candidates"]} == {c["name"]: c["score"] for c in one["candidates"]}
    assert two["recommended"] == one["recommended"] and two["settings"]["requests"] == one["settings"]["requests"]
    assert proc.stdout.count("recommended:") == 1  # rank 0 reports


@torch.no_grad()
def _independent_rms(sampler: Sampler, schedule: SamplingSchedule, n: int) -> float:
    """RMS of ``schedule``'s final latents to the H{FINE_STEPS} solution on the model's grid, image i from seed i and
    prompt i mod P, all n images in one batch (the tuner ran batches of 2)."""
    family = sampler.pipeline.family
    noise = make_noise(n, family.latent_shape(SIZE), 0)  # (n, C, h, w)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    fine = sampler.default_schedule(f"H{FINE_STEPS}", cfg=CFG, size=SIZE)

    def final(s: SamplingSchedule) -> torch.Tensor:
        return run_schedule(s, noise, family.model_calls(family.condition(prompts, s), s)).latents

    return float((final(schedule) - final(fine)).pow(2).mean().sqrt())


def test_text_tune_scores_are_the_fine_grid_distance(tuned, tiny_pipelines, sd3_refiner):
    report = json.loads((tuned / "tune.json").read_text())
    assert report["metric"] == "fine-grid" and report["settings"]["fine_steps"] == FINE_STEPS
    assert report["settings"]["requests"]["prompts"] == f"i mod P, P = {len(PROMPTS)}"
    rows = {r["name"]: r for r in report["candidates"]}
    sampler = Sampler.from_pipeline(str(tiny_pipelines["sd3"]), refiner=str(sd3_refiner),
                                    max_sequence_length=MAX_SEQUENCE_LENGTH)
    # an R-step candidate and a Heun one, each on the model's own grid, scored on every sample
    for name in ("H1P1R1@model", "H1P1@model"):
        row = rows[name]
        assert row["num_samples"] == NUM_SAMPLES, row
        schedule = SamplingSchedule.from_dict(row["schedule"])
        assert schedule.timesteps == sampler.default_schedule(schedule.notation, cfg=CFG, size=SIZE).timesteps
        assert row["score"] == pytest.approx(_independent_rms(sampler, schedule, NUM_SAMPLES), **SCORE_TOLERANCE)
    assert rows["H1P1R1@model"]["refiner_calls"] > 0 and report["costs"]["refiner_ms"] is not None
    # the uniform grid is searched too (another schedule id, another score)
    assert rows["H1P1@uniform"]["schedule"]["timesteps"] != rows["H1P1@model"]["schedule"]["timesteps"]
    assert report["recommended"] in rows and rows[report["recommended"]]["within_budget"]
    assert "fine RMS" in (tuned / "table.txt").read_text()
    assert not any(r["family"] == "velocity-norm" for r in rows.values())  # class models only


def test_the_recommended_schedule_file_samples_the_text_model(tuned, tiny_pipelines, sd3_refiner, tmp_path):
    """recommended_schedule.json runs with `flowturbo sample --pipeline ... --schedule FILE` (its grid as tuned)."""
    out = tmp_path / "samples"
    assert main(["sample", "--pipeline", str(tiny_pipelines["sd3"]), "--refiner", str(sd3_refiner),
                 "--prompt", PROMPTS[0], "--size", str(IMAGE_SIZE), "--max-sequence-length",
                 str(MAX_SEQUENCE_LENGTH), "--schedule", str(tuned / "recommended_schedule.json"), "--out", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    assert len(list(out.glob("*.png"))) >= 1


class _ChannelMeans:
    """A stand-in feature extractor: each image's mean of its first two channels (N, 2)."""

    name, dim, device = "channel-means", 2, torch.device("cpu")

    def identity(self) -> str:
        return "channel-means:v1"

    def extract(self, images: torch.Tensor, progress: bool = False, batch_size: int | None = None) -> torch.Tensor:
        return images.float().mean(dim=(2, 3))[:, :2].cpu()


def test_a_fid_tune_of_a_text_model_scores_decoded_images_against_a_reference_folder(tiny_pipelines, tmp_path):
    """--metric inception-fid with --reference FOLDER, through the Tuner with a stand-in extractor: the FID equals
    the one of the images `flowturbo sample --pipeline` makes (same seeds and prompts) against the folder's."""
    torch.manual_seed(0)
    refs = tmp_path / "refs"
    refs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(refs / f"{i}.png")
    sampler = Sampler.from_pipeline(str(tiny_pipelines["sd3"]), max_sequence_length=MAX_SEQUENCE_LENGTH)
    requests = TuneRequests(tuple(PROMPTS), size=SIZE)
    space = SearchSpace.from_text(heun="1", pseudo="1", refiner="0", euler="", grids="model", vnorm_c="")
    config = TuneConfig(model="tiny sd3", metric="inception-fid", num_samples=6, min_samples=6, batch=3,
                        latency_batch=2, cfg=CFG, budget_calls=10, space=space, reference=str(refs),
                        allow_small_sample=True, latency_repeats=1)
    report = Tuner(config, sampler.pipeline, _ChannelMeans(), cache_dir=tmp_path / "cache", progress=False,
                   requests=requests).run()
    (row,) = [r for r in report["candidates"] if r["score"] is not None]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(6)]
    images = sampler.sample(prompts=prompts, schedule=SamplingSchedule.from_dict(row["schedule"]), seed=0,
                            size=SIZE, progress=False).images
    reference = folder_reference(refs, _ChannelMeans(), SIZE, progress=False)
    expected = score_features(_ChannelMeans().extract(images.clamp(-1, 1)).numpy(), features=_ChannelMeans(),
                              reference=reference, progress=False, allow_small_sample=True)["fid"]
    assert row["score"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_folder_reference_fits_each_image_to_the_size(tmp_path):
    """Images of another size are resized to cover the target and centre-cropped; one of the target's size is read
    as it is; unreadable files and too few images are refused naming the problem."""
    side = 8
    exact = np.zeros((side, side, 3), np.uint8)
    exact[..., 0] = 255  # red
    Image.fromarray(exact).save(tmp_path / "a.png")
    wide = np.zeros((side, 4 * side, 3), np.uint8)
    wide[:, side:3 * side, 1] = 255  # green in the middle half: the centre crop keeps only green
    Image.fromarray(wide).save(tmp_path / "b.png")
    stats = folder_reference(tmp_path, _ChannelMeans(), ImageSize(side, side), progress=False)
    np.testing.assert_allclose(stats.features, [[1.0, -1.0], [-1.0, 1.0]], atol=2e-2)
    (tmp_path / "c.jpg").write_bytes(b"not an image")
    with pytest.raises(Exception, match="c.jpg is not a readable image"):
        folder_reference(tmp_path, _ChannelMeans(), ImageSize(side, side), progress=False)
    lone = tmp_path / "lone"
    lone.mkdir()
    Image.fromarray(exact).save(lone / "a.png")
    with pytest.raises(Exception, match="at least 2 reference images"):
        folder_reference(lone, _ChannelMeans(), ImageSize(side, side), progress=False)


@pytest.mark.parametrize("flags,needles", [
    ([], ["needs the prompts to tune on", "--prompts FILE"]),
    (["--prompt", "x", "--metric", "domain-fid"], ["--metric domain-fid", "fine-grid"]),
    (["--prompt", "x", "--metric", "inception-fid"], ["needs --reference"]),
    (["--prompt", "x", "--vnorm-c", "0.3"], ["velocity-norm rule runs on class-conditional models only"]),
    (["--prompt", "x", "--guidance-channels", "3"], ["--guidance-channels"]),
    (["--prompt", "x", "--export", "EXPORT"], ["flowturbo export --pipeline DIR --schedule"]),
    (["--prompt", "x", "--predictor", "PRED"], ["--pipeline holds the whole model", "--predictor"]),
    (["--prompt", "x", "--metric", "inception-fid", "--reference", "REF", "--fine-steps", "8"],
     ["--fine-steps sets the fine-grid metric's reference"]),
])
def test_bad_text_tune_flags_are_refused_before_loading(tiny_pipelines, tmp_path, capsys, flags, needles):
    for placeholder in ("PRED", "REF"):
        (tmp_path / placeholder).mkdir()
    flags = [str(tmp_path / f) if f in ("PRED", "REF", "EXPORT") else f for f in flags]
    out = tmp_path / "out"
    assert main(["tune", "--pipeline", str(tiny_pipelines["sd3"]), "--budget-calls", "4", *flags,
                 "--out", str(out), "--cache", str(tmp_path / "cache")]) == 2
    one_error_line(capsys, *needles)
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_text_flags_on_a_class_tune_are_refused(tmp_path, capsys):
    assert main(["tune", "--prompt", "a cat", "--budget-calls", "4", "--out", str(tmp_path / "out")]) == 2
    one_error_line(capsys, "--prompt is for text-to-image models", "--pipeline DIR")


def test_the_model_grid_is_the_family_grid_and_uniform_for_class_models():
    """``model``: the family's own N-step grid when it has one, else uniform (SiT)."""
    space = SearchSpace.from_text(heun="2", pseudo="0", refiner="0", euler="", grids="model", vnorm_c="")
    own = (0.0, 0.6, 1.0)
    (text,), _ = space.candidates(cfg=1.0, guidance_channels=None, has_refiner=False, model_grid=lambda n: own,
                                  rule=False)
    assert text.schedule.timesteps == own and text.name == "H2@model"
    (cls,), _ = space.candidates(cfg=1.0, guidance_channels=None, has_refiner=False)
    assert cls.schedule.timesteps == (0.0, 0.5, 1.0)
    _, notes = SearchSpace.from_text(heun="2", pseudo="0", refiner="0", euler="", grids="model",
                                     vnorm_c="0.3").candidates(cfg=1.0, guidance_channels=None, has_refiner=False,
                                                               rule=False)
    assert any("velocity-norm rule runs on class-conditional models only" in n for n in notes)


def test_resuming_a_text_tune_with_other_prompts_is_refused_naming_them(tiny_pipelines, tmp_path):
    """The prompts are part of what a tune's results depend on: the cache key and ``--resume``'s settings hold their
    digest, so a resumed tune with another prompt set is refused naming it (and never reuses the other's cache)."""
    from flowturbo.errors import FlowTurboError

    sampler = Sampler.from_pipeline(str(tiny_pipelines["sd3"]), max_sequence_length=MAX_SEQUENCE_LENGTH)
    space = SearchSpace.from_text(heun="1", pseudo="0", refiner="0", euler="", grids="model", vnorm_c="")

    def tuner(prompts, resume):
        requests = TuneRequests(tuple(prompts), size=SIZE)
        config = TuneConfig(model="tiny sd3", metric="fine-grid", num_samples=2, min_samples=2, batch=2,
                            latency_batch=2, cfg=1.0, budget_calls=10, space=space, latency_repeats=1,
                            fine_steps=4)
        return Tuner(config, sampler.pipeline, None, cache_dir=tmp_path / "cache", progress=False,
                     state_path=tmp_path / "state.json", resume=resume, requests=requests)

    first = tuner(PROMPTS, resume=False)
    first.run()
    other = tuner(PROMPTS[::-1], resume=True)
    assert other.cache != first.cache
    with pytest.raises(FlowTurboError, match="requests.prompts_sha256"):
        other.run()
    tuner(PROMPTS, resume=True).run()  # the same prompts resume
