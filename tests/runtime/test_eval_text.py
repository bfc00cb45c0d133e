"""`flowturbo eval --pipeline DIR --prompts FILE --reference R`: FID / precision / recall of a text-to-image model.

The real Inception weights are a download, so the scoring runs through a stand-in extractor (the channel means of
each image) put where ``eval`` takes ``InceptionFeatures`` from; the test recomputes the numbers independently from
``Sampler.from_pipeline``'s images (image i: prompt i mod P, seed + i) and the reference folder's images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_checks import one_error_line
from PIL import Image
from tiny_diffusers import IMAGE_SIZE, MAX_SEQUENCE_LENGTH, save_tiny_clip_model
from tolerances import tol

import flowturbo.training.evaluation as evaluation
from flowturbo.errors import FlowTurboError
from flowturbo.families import ImageSize
from flowturbo.runtime.cli import main
from flowturbo.runtime.sampler import Sampler
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.evaluation import FeatureExtractor, evaluate_samples, folder_reference
from flowturbo.training.evaluation.clip_score import ClipScore
from flowturbo.training.families.flow_match import FlowMatchFamily

PROMPTS = ["a photo of the cat", "a dog on a beach", "a red car"]
NUM_SAMPLES = 7  # > precision/recall's k = 3, not a multiple of the 3 prompts
SIZE = ImageSize(IMAGE_SIZE, IMAGE_SIZE)
SEED = 5


class ChannelMeans(FeatureExtractor):
    """A stand-in for InceptionFeatures: each image's mean per channel (N, 3)."""

    name, dim, default_batch_size = "channel-means", 3, 64

    def __init__(self, device=None) -> None:
        super().__init__("cpu")

    def identity(self) -> str:
        return "channel-means:v1"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # (B, 3)


@pytest.fixture
def stand_in_inception(monkeypatch):
    monkeypatch.setattr(evaluation, "InceptionFeatures", ChannelMeans)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_tiny_clip_model(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture
def reference_folder(tmp_path):
    """Six random RGB images, two of another size (fitted to the samples' size by the reference reader)."""
    folder = tmp_path / "refs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        shape = (IMAGE_SIZE, IMAGE_SIZE, 3) if i < 4 else (IMAGE_SIZE + 8, IMAGE_SIZE * 2, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _eval_args(tiny_pipelines, tmp_path, *extra: str) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return ["eval", "--pipeline", str(tiny_pipelines["sd3"]), "--prompts", str(prompts), "--size", str(IMAGE_SIZE),
            "--max-sequence-length", str(MAX_SEQUENCE_LENGTH), "--num-samples", str(NUM_SAMPLES), "--batch", "3",
            "--seed", str(SEED), "--allow-small-sample", "--device", "cpu", *extra]


def test_eval_of_a_text_model_scores_its_images_against_a_reference_folder(
        tiny_pipelines, tmp_path, reference_folder, clip_folder, stand_in_inception, capsys):
    schedule_file = tmp_path / "schedule.json"
    schedule_file.write_text(json.dumps(SamplingSchedule.parse("H1P1", guidance_scale=3.0).to_dict()))
    out = tmp_path / "result.json"
    assert main(_eval_args(tiny_pipelines, tmp_path, "--reference", str(reference_folder), "--schedule",
                           str(schedule_file), "--cfg", "3", "--clip", str(clip_folder), "--out", str(out))) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["features"] == "channel-means" and result["num_samples"] == NUM_SAMPLES
    assert result["prompts"] == "i mod P, P = 3" and result["seed"] == SEED and result["size"] == str(SIZE)
    assert result["schedule"].startswith("H1P1") and result["cfg"] == 3.0
    assert "class_accuracy" not in result

    # Independently: the same images through the Sampler, the folder's statistics, the library's scoring.
    sampler = Sampler.from_pipeline(str(tiny_pipelines["sd3"]), max_sequence_length=MAX_SEQUENCE_LENGTH)
    schedule = SamplingSchedule.from_file(schedule_file)  # a file's schedule runs on its own grid, as in `sample`
    images = sampler.sample(prompts=[PROMPTS[i % len(PROMPTS)] for i in range(NUM_SAMPLES)], schedule=schedule,
                            seed=SEED, size=SIZE, batch_size=3, progress=False).images
    reference = folder_reference(reference_folder, ChannelMeans(), SIZE, progress=False)
    expected = evaluate_samples(images, None, features=ChannelMeans(), reference=reference, progress=False,
                                allow_small_sample=True)
    close = tol(torch.float32)  # the same images (same code, batches and seeds); the statistics in another order
    for key in ("fid", "precision", "recall"):
        assert result[key] is not None
        assert result[key] == pytest.approx(expected[key], rel=close["rtol"], abs=close["atol"]), key
    clip = ClipScore(clip_folder).scores(images, [PROMPTS[i % len(PROMPTS)] for i in range(NUM_SAMPLES)])
    assert result["clip_model"] == "tiny-clip" and result["clip_score"] > 0
    assert result["clip_score"] == pytest.approx(clip.mean(), rel=close["rtol"], abs=close["atol"])
    # another seed gives other images, hence another FID: the seed reaches the sampler
    other = tmp_path / "other.json"
    assert main(_eval_args(tiny_pipelines, tmp_path, "--reference", str(reference_folder), "--schedule",
                           str(schedule_file), "--cfg", "3", "--out", str(other), "--seed", "6")) == 0
    assert json.loads(other.read_text())["fid"] != pytest.approx(result["fid"], rel=1e-3)


@pytest.mark.parametrize("extra, needles", [
    (["--features", "domain"], ["--features domain", "Fashion-MNIST", "--features inception"]),
    ([], ["needs --reference", "folder of real images", ".npz"]),
    (["--classifier", "CLS"], ["--classifier checks class ids", "drop --classifier"]),
    (["--samples", "SAMPLES"], ["--samples evaluates a folder", "drop --pipeline"]),
    (["--predictor", "PRED"], ["--pipeline holds the whole model", "--predictor"]),
    (["--cfg", "2", "--guidance", "3"], ["no guidance embedding", "--cfg"]),
])
def test_bad_text_eval_flags_are_one_error_line_before_any_weights_load(
        tiny_pipelines, tmp_path, reference_folder, capsys, monkeypatch, extra, needles):
    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the request was refused")

    monkeypatch.setattr(FlowMatchFamily, "load_pipeline", no_weights)
    for placeholder in ("CLS", "SAMPLES", "PRED"):
        (tmp_path / placeholder).mkdir()
    extra = [str(tmp_path / a) if a in ("CLS", "SAMPLES", "PRED") else a for a in extra]
    if "--reference" not in extra and needles[0] != "needs --reference":
        extra += ["--reference", str(reference_folder)]
    out = tmp_path / "result.json"
    assert main(_eval_args(tiny_pipelines, tmp_path, *extra, "--out", str(out))) == 2
    one_error_line(capsys, *needles)
    assert not out.exists()


def test_clip_score_is_the_clipped_cosine_of_the_models_own_embeddings(clip_folder):
    """Against CLIPModel's forward (its normalised image and text embeddings), image i paired with prompt i, in
    batches that do not divide the images, a prompt longer than CLIP's 77 tokens truncated."""
    from transformers import CLIPModel, CLIPProcessor

    generator = torch.Generator().manual_seed(3)
    images = torch.rand(5, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1  # (5, 3, 32, 32)
    prompts = ["a cat", "the dog on the sand", "a red car", "x", "the end of a very long prompt " * 20]
    got = ClipScore(clip_folder).scores(images, prompts, batch_size=2)
    model, processor = CLIPModel.from_pretrained(clip_folder).eval(), CLIPProcessor.from_pretrained(clip_folder)
    pixels = [((im + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy() for im in images]
    inputs = processor(text=prompts, images=pixels, return_tensors="pt", padding=True, truncation=True, max_length=77)
    with torch.no_grad():
        out = model(**inputs)
    cosine = (out.image_embeds * out.text_embeds).sum(-1)  # both unit length: (5,)
    expected = (100 * cosine.clamp(min=0)).double().numpy()
    np.testing.assert_allclose(got, expected, **tol(torch.float32))
    assert (got > 0).any() and len(set(np.round(got, 4))) == len(got)  # pairs differ: not one shared score
    with pytest.raises(FlowTurboError, match="one prompt per image"):
        ClipScore(clip_folder).scores(images, prompts[:4])


def test_clip_on_a_class_model_or_a_folder_that_is_not_clip_is_refused(tmp_path, capsys):
    assert main(["eval", "--num-samples", "8", "--allow-small-sample", "--clip", str(tmp_path)]) == 2
    one_error_line(capsys, "--clip scores images against their prompts", "--pipeline DIR")
    with pytest.raises(FlowTurboError, match="no config.json"):
        ClipScore(tmp_path)


def test_eval_without_prompts_or_with_text_flags_on_a_class_model_is_refused(tiny_pipelines, tmp_path, capsys):
    assert main(["eval", "--pipeline", str(tiny_pipelines["sd3"]), "--reference", str(tmp_path)]) == 2
    one_error_line(capsys, "eval --pipeline needs the prompts", "--prompts FILE")
    assert main(["eval", "--prompt", "a cat", "--num-samples", "10"]) == 2
    one_error_line(capsys, "--prompt is for text-to-image models", "--pipeline DIR")


def test_eval_of_a_text_sample_folder_takes_no_class_metrics(tiny_pipelines, tmp_path, reference_folder, clip_folder,
                                                             stand_in_inception, capsys):
    """A `sample --pipeline` folder is scored with Inception features (the default for it) and no class accuracy
    (its run record lists prompts, and its labels are not class ids); domain features are refused for it."""
    from flowturbo.runtime.images import read_sample_folder

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    samples = tmp_path / "samples"
    assert main(["sample", "--pipeline", str(tiny_pipelines["sd3"]), "--prompts", str(prompts), "--num-images",
                 str(NUM_SAMPLES), "--schedule", "H1P1", "--size", str(IMAGE_SIZE), "--max-sequence-length",
                 str(MAX_SEQUENCE_LENGTH), "--device", "cpu", "--no-progress", "--out", str(samples)]) == 0
    capsys.readouterr()
    assert main(["eval", "--samples", str(samples), "--reference", str(reference_folder), "--allow-small-sample",
                 "--clip", str(clip_folder)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["features"] == "channel-means" and "class_accuracy" not in result
    images, labels, record = read_sample_folder(samples)
    per_image = [record["prompts"][i] for i in labels]  # labels index the distinct prompts
    assert per_image == [PROMPTS[i % len(PROMPTS)] for i in range(NUM_SAMPLES)]
    clip = ClipScore(clip_folder).scores(images, per_image)
    assert result["clip_score"] == pytest.approx(clip.mean(), rel=1e-6)
    capsys.readouterr()
    reference = folder_reference(reference_folder, ChannelMeans(), SIZE, progress=False)
    expected = evaluate_samples(images, None, features=ChannelMeans(), reference=reference, progress=False,
                                allow_small_sample=True)
    close = tol(torch.float32)
    assert result["fid"] == pytest.approx(expected["fid"], rel=close["rtol"], abs=close["atol"])
    assert main(["eval", "--samples", str(samples), "--features", "domain", "--allow-small-sample"]) == 2
    one_error_line(capsys, "--features domain", "holds a text-to-image model's images", "--features inception")


def test_eval_of_a_class_model_takes_a_schedule_file_and_a_reference_folder(tmp_path, monkeypatch, capsys):
    """The embedded default with `--schedule FILE.json` (a tune's recommendation: it was parsed as notation and
    refused before) scored against a folder of images fitted to its 28x28 grey samples."""
    monkeypatch.setenv("FLOWTURBO_CACHE_DIR", str(tmp_path / "cache"))
    schedule_file = tmp_path / "h2.json"
    schedule_file.write_text(json.dumps(SamplingSchedule.parse("H2", guidance_scale=1.5).to_dict()))
    refs = tmp_path / "refs"
    refs.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(refs / f"{i}.png")
    assert main(["eval", "--num-samples", "8", "--batch", "4", "--allow-small-sample", "--device", "cpu",
                 "--schedule", str(schedule_file), "--reference", str(refs)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["schedule"] == "H2" and result["features"] == "domain" and result["num_reference"] == 8
    assert np.isfinite(result["fid"]) and result["precision"] is not None and "class_accuracy" in result


@pytest.mark.parametrize("flags, features, num_samples, batch", [
    ([], "domain", 2000, 250),
    (["--features", "inception"], "inception", 5000, 250),  # 2000 would be refused: FID needs > 2048 samples
    (["--pipeline", "SD3", "--prompt", "a cat", "--reference", "REFS"], "inception", 5000, 16),
    (["--pipeline", "SD3", "--prompt", "a cat", "--reference", "REFS", "--num-samples", "7", "--batch", "3"],
     "inception", 7, 3),
])
def test_eval_defaults_follow_the_features_and_the_model(tiny_pipelines, tmp_path, flags, features, num_samples,
                                                         batch):
    from flowturbo.cliargs import check_path_arguments
    from flowturbo.runtime.cli import build_parser, check_eval_sampling_args, check_eval_text_args

    (tmp_path / "refs").mkdir()
    flags = [{"SD3": str(tiny_pipelines["sd3"]), "REFS": str(tmp_path / "refs")}.get(f, f) for f in flags]
    args = build_parser("eval").parse_args(["eval", *flags, "--allow-small-sample"])
    check_path_arguments(args)
    check_eval_text_args(args)
    check_eval_sampling_args(args)
    assert (args.features, args.num_samples, args.batch) == (features, num_samples, batch)
