"""`flowturbo sample --pipeline DIR --prompt ...` and ``Sampler.from_pipeline`` on tiny random diffusers folders.

End to end (the images equal the diffusers pipeline's own, run.json names the prompts, files named after them), and
every bad input of the issue: one ``error:`` line, exit status 2, nothing written.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from cli_checks import one_error_line
from PIL import Image
from tiny_diffusers import IMAGE_SIZE, MAX_SEQUENCE_LENGTH, load_diffusers
from tolerances import tol

from flowturbo.errors import FlowTurboError
from flowturbo.families import ImageSize
from flowturbo.runtime.cli import main
from flowturbo.runtime.images import to_uint8
from flowturbo.runtime.sampler import Sampler
from flowturbo.training.families.flow_match import FlowMatchFamily, PromptTruncatedWarning
from flowturbo.training.families.flux import pack_latents

SIZE = f"{IMAGE_SIZE}x{IMAGE_SIZE}"
TOKENS = ["--max-sequence-length", str(MAX_SEQUENCE_LENGTH)]


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


def _sample(folder, out, *args):
    return main(["sample", "--pipeline", str(folder), "--size", SIZE, *TOKENS, "--out", str(out), "--no-progress",
                 *args])


def test_sampler_from_pipeline_equals_the_pipeline(samplers, tiny_pipelines):
    """The whole path: noise per image seed, the model's default schedule (schnell: E4) on its grid at this size,
    the decode: the same images as FluxPipeline's own call on that noise."""
    sampler = samplers("flux_schnell")
    out = sampler.sample(prompts=["a photo of the cat", "a dog"], size=ImageSize(IMAGE_SIZE, IMAGE_SIZE), seed=5,
                         progress=False)
    assert out.schedule.notation == "E4" and out.labels == [0, 1] and out.prompts == ["a photo of the cat", "a dog"]
    from flowturbo.noise import make_noise

    pipe = load_diffusers(tiny_pipelines["flux_schnell"])
    for row, prompt in enumerate(out.prompts):
        noise = make_noise(1, (16, IMAGE_SIZE // 2, IMAGE_SIZE // 2), 5, first_index=row)
        want = pipe(prompt=prompt, latents=pack_latents(noise), height=IMAGE_SIZE, width=IMAGE_SIZE,
                    num_inference_steps=4, max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="pt").images
        torch.testing.assert_close((out.images[row:row + 1] / 2 + 0.5).clamp(0, 1), want, **tol("diffusers_fp32"))


def test_cli_writes_prompts_images_and_record(tiny_pipelines, samplers, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of the cat\n\n  a dog on a hill  \na photo of the cat\n", encoding="utf-8")
    out = tmp_path / "out"
    assert _sample(tiny_pipelines["sd3"], out, "--prompts", str(prompts), "--num-images", "4", "--schedule", "H1P2",
                   "--cfg", "4.5", "--negative-prompt", "blurry", "--seed", "2") == 0
    assert "H1P2" in capsys.readouterr().out
    record = json.loads((out / "run.json").read_text())
    assert record["prompts"] == ["a photo of the cat", "a dog on a hill"] and record["labels"] == [0, 1, 0, 0]
    assert record["conditioning"]["negative_prompt"] == "blurry" and record["conditioning"]["image_size"] == SIZE
    assert record["model"]["family"] == "sd3" and record["model"]["pipeline_class"] == "StableDiffusion3Pipeline"
    assert record["schedule"]["guidance_scale"] == 4.5 and record["schedule"]["timesteps"][1] < 1 / 3  # shifted
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["0_a_photo_of_the_cat.png", "1_a_dog_on_a_hill.png", "2_a_photo_of_the_cat.png",
                     "3_a_photo_of_the_cat.png", "grid.png"]
    want = samplers("sd3").sample(prompts=["a photo of the cat", "a dog on a hill", "a photo of the cat",
                                           "a photo of the cat"], negative_prompt="blurry", schedule="H1P2", cfg=4.5,
                                  size=ImageSize(IMAGE_SIZE, IMAGE_SIZE), seed=2, progress=False)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "1_a_dog_on_a_hill.png")), to_uint8(want.images)[1])


def test_long_prompt_is_truncated_with_one_warning(samplers):
    long = " ".join(["a photo of the cat"] * 30)  # ~150 CLIP tokens
    with pytest.warns(PromptTruncatedWarning) as caught:
        samplers("flux_dev").sample(prompts=[long, long, "short"], schedule="E1", size=ImageSize(16, 16),
                                    progress=False)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "CLIP 77 tokens" in message and f"T5 {MAX_SEQUENCE_LENGTH} tokens" in message and "1 prompt(s)" in message


def test_classes_and_prompts_go_to_the_right_models(samplers, tmp_path, capsys):
    with pytest.raises(FlowTurboError, match="conditioned on text prompts"):
        samplers("sd3").sample([0, 1])
    sit = Sampler.from_bundle(device="cpu")
    with pytest.raises(FlowTurboError, match="conditioned on class ids"):
        sit.sample(prompts=["a cat"])
    out = tmp_path / "out"
    assert main(["sample", "--prompt", "a cat", "--out", str(out)]) == 2
    one_error_line(capsys, "--prompt is for text-to-image models", "--pipeline")
    assert not out.exists()


def _refused(capsys, folder, out, *args, needles=()):
    assert _sample(folder, out, *args) == 2
    err = one_error_line(capsys, *needles)
    assert not out.exists() and not list(out.parent.glob(".out*"))
    return err


@pytest.mark.parametrize("name, args, needles", [
    ("sd3", ["--classes", "1", "--prompt", "x"], ["--classes is for class-conditional models", "--prompt"]),
    ("sd3", ["--prompt", "x", "--size", "30x30"], ["28x28", "32x32", "not a multiple of 4"]),
    ("sd3", ["--prompt", "x", "--size", "68x40"], ["larger than", "at most 64 pixels a side"]),
    ("sd3", ["--prompt", "x", "--schedule", "H2P2R2"], ["R steps", "need a velocity refiner", "--refiner RUN", "E28"]),
    ("sd3", ["--prompt", "x", "--guidance", "3"], ["no guidance embedding", "--cfg"]),
    ("flux_dev", ["--prompt", "x", "--cfg", "4"], ["guidance-distilled", "--guidance G (default 3.5)"]),
    ("flux_schnell", ["--prompt", "x", "--cfg", "2"], ["takes no guidance", "--negative-prompt"]),
    ("flux_schnell", ["--prompt", "x", "--negative-prompt", "y"], ["negative prompt acts through CFG", "--cfg"]),
    ("sd3", ["--prompt", "x", "--model", "somewhere"], ["--pipeline holds the whole model", "--model"]),
    ("sd3", ["--prompt", "x", "--backend", "cpp"],
     ["export it first", "--format aoti", "--artifacts EXPORT --backend cpp"]),
    ("sd3", ["--prompt", "x", "--backend", "tensorrt"], ["ONNX or AOTInductor only", "drop --backend"]),
    ("sd3", [], ["--pipeline needs prompts"]),
])
def test_bad_requests_are_one_error_line(tiny_pipelines, tmp_path, capsys, monkeypatch, name, args, needles):
    """Each refused from the folder's configs alone, before any weights load (a real FLUX.1 folder is 30 GB)."""
    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the request was refused")

    monkeypatch.setattr(FlowMatchFamily, "load_pipeline", no_weights)
    _refused(capsys, tiny_pipelines[name], tmp_path / "out", *args, needles=needles)


def test_a_non_flow_matching_folder_is_named(tiny_pipelines, tmp_path, capsys):
    _refused(capsys, tiny_pipelines["sd15"], tmp_path / "out", "--prompt", "x",
             needles=["StableDiffusionPipeline", "UNet2DConditionModel + PNDMScheduler, epsilon prediction",
                      "StableDiffusion3Pipeline", "FluxPipeline"])
    _refused(capsys, tiny_pipelines["sd3"] / "vae", tmp_path / "out", "--prompt", "x",
             needles=["no model_index.json", "a diffusers model folder (AutoencoderKL)"])


@pytest.mark.parametrize("removed", ["text_encoder_2/model.safetensors", "tokenizer/tokenizer.json", "tokenizer_2"])
def test_missing_text_encoder_files_name_the_path(tiny_pipelines, tmp_path, capsys, removed):
    folder = tmp_path / "flux"
    shutil.copytree(tiny_pipelines["flux_dev"], folder)
    target = folder / removed
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    missing = folder / removed.split("/")[0]
    _refused(capsys, folder, tmp_path / "out", "--prompt", "x", needles=["missing", str(missing), "FluxPipeline"])


def test_pipeline_on_a_command_without_text_models_is_one_error_line(tiny_pipelines, tmp_path, capsys):
    """`sample`, `export` (tests/export/test_export_text.py), `inpaint`, `edit` (tests/runtime/test_text_editing.py),
    `tune` (tests/runtime/test_tune_text.py), `profile` (tests/runtime/test_profile.py) and `eval`
    (tests/runtime/test_eval_text.py) run text-to-image models: `train` refuses --pipeline with one line naming
    `train refiner --teacher` (not argparse's "unrecognized arguments")."""
    assert main(["train", "predictor", "--pipeline", str(tiny_pipelines["sd3"]), "--out", str(tmp_path / "x")]) == 2
    one_error_line(capsys, "flowturbo train: error:", "works with `flowturbo sample`, `export`, `inpaint`, `edit`, "
                   "`tune`, `profile` and `eval`", "train refiner --teacher DIR --prompts FILE")
    assert not (tmp_path / "x").exists()


def test_train_refiner_with_a_diffusers_teacher_needs_prompts(tiny_pipelines, tmp_path, capsys):
    """A diffusers teacher samples its own training states: without --prompts, one line saying so (the training itself
    is tests/training/test_text_refiner.py)."""
    out = tmp_path / "ref"
    assert main(["train", "refiner", "--preset", "tiny", "--teacher", str(tiny_pipelines["flux_dev"]),
                 "--out", str(out)]) == 2
    one_error_line(capsys, "samples its own training states from prompts", "--prompts FILE")
    assert not out.exists()


def test_guidance_channels_are_refused_for_text_models(tiny_pipelines, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(FlowMatchFamily, "load_pipeline", None)  # refused before the weights load
    _refused(capsys, tiny_pipelines["sd3"], tmp_path / "out", "--prompt", "x", "--cfg", "3", "--guidance-channels",
             "3", needles=["partial-channel CFG", "guide every latent channel"])
