"""FlowTurbo schedules with R steps exported for a text-to-image model: the token refiner's graph beside the predictor's
(``flowturbo export --pipeline DIR --refiner RUN``), sampled through ONNX Runtime and compared with
``Sampler.from_pipeline(..., refiner=RUN)`` on the tiny SD3 pipeline (tests/tiny_diffusers.py).

The refiner here has random non-zero weights everywhere (not a trained one: the export must carry whatever it holds),
so a dropped refiner call, the carried velocity in the wrong place, a wrong dt or the negative prompt's pooled
embeddings instead of the prompt's each change the images.

One slow test (as every AOTInductor test) exports the same schedule as AOTInductor packages and samples them with the
exported Python loop and with the C++ runner (its refiner engine fed the pooled prompt embeddings the predictor gets;
skipped, with the build's reason, when the runner is not built). Checked by hand mutation: the C++ refiner call fed
the negative prompt's pooled embeddings, or t and dt swapped, fails it.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_checks import one_error_line
from tiny_diffusers import IMAGE_SIZE, MAX_SEQUENCE_LENGTH, REFINER_CFG
from tolerances import tol

from flowturbo.errors import FlowTurboError
from flowturbo.runtime.cli import main
from flowturbo.runtime.sampler import Sampler
from flowturbo.training.token_refiner import TokenRefiner

CFG = REFINER_CFG
SCHEDULE = "H1P1R2"  # 3 predictor calls, 2 R steps (4 refiner calls: dt = 0 and h, then h_prev and h_prev + h)
PROMPTS = ["a photo of the cat", "a dog", "a red car"]


def _export(tiny_pipelines, sd3_refiner, out, fmt: str):
    """``SCHEDULE`` at CFG 4 with the random refiner, batches 1..3, in ``fmt``."""
    code = main(["export", "--pipeline", str(tiny_pipelines["sd3"]), "--refiner", str(sd3_refiner), "--schedule",
                 SCHEDULE, "--cfg", str(CFG), "--size", str(IMAGE_SIZE), "--max-sequence-length",
                 str(MAX_SEQUENCE_LENGTH), "--batch", "1:2:3", "--format", fmt, "--out", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def exported(tiny_pipelines, sd3_refiner, tmp_path_factory):
    return _export(tiny_pipelines, sd3_refiner, tmp_path_factory.mktemp("text_refiner_export") / "sd3_h1p1r2", "onnx")


def test_exported_r_steps_equal_the_pytorch_sampler(exported, tiny_pipelines, sd3_refiner):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert [a["role"] for a in manifest["artifacts"]] == ["predictor", "refiner", "decoder"]
    assert manifest["model"]["has_refiner"] and manifest["model"]["refiner_dt_conditioning"]
    assert manifest["model"]["refiner_trained_for"]["cfg"] == CFG
    got = Sampler.from_artifacts(str(exported), backend="onnxruntime").sample(prompts=PROMPTS, seed=5,
                                                                              progress=False)
    reference = Sampler.from_pipeline(str(tiny_pipelines["sd3"]), device="cpu", refiner=str(sd3_refiner),
                                      max_sequence_length=MAX_SEQUENCE_LENGTH)
    want = reference.sample(prompts=PROMPTS, seed=5, schedule=SCHEDULE, cfg=CFG, progress=False)
    assert got.refiner_calls == want.refiner_calls == 4 and got.predictor_calls == want.predictor_calls == 3
    torch.testing.assert_close(got.images, want.images, **tol("export_fp32"))
    # the refiner matters: the same schedule with its offset at zero is different
    family = reference.pipeline.family
    real = family.refiner
    family.refiner = TokenRefiner(real.config).eval()
    try:
        zero = reference.sample(prompts=PROMPTS, seed=5, schedule=SCHEDULE, cfg=CFG, progress=False)
    finally:
        family.refiner = real
    assert not torch.allclose(zero.images, got.images, **tol("export_fp32"))


def test_r_steps_without_a_refiner_or_at_another_cfg_are_refused(tiny_pipelines, sd3_refiner, tmp_path, capsys):
    common = ["export", "--pipeline", str(tiny_pipelines["sd3"]), "--size", str(IMAGE_SIZE), "--max-sequence-length",
              str(MAX_SEQUENCE_LENGTH), "--format", "onnx"]
    assert main([*common, "--schedule", SCHEDULE, "--cfg", str(CFG), "--out", str(tmp_path / "a")]) == 2
    one_error_line(capsys, "need a velocity refiner", "--refiner")
    assert main([*common, "--refiner", str(sd3_refiner), "--schedule", SCHEDULE, "--cfg", "2",
                 "--out", str(tmp_path / "b")]) == 2
    one_error_line(capsys, "at CFG 4", "--cfg 4")
    assert main([*common, "--refiner", str(sd3_refiner), "--schedule", SCHEDULE, "--cfg", str(CFG), "--pipeline",
                 str(tiny_pipelines["flux_dev"]), "--out", str(tmp_path / "c")]) == 2
    one_error_line(capsys, "trained for a StableDiffusion3Pipeline")
    assert not any((tmp_path / n).exists() for n in "abc")


def _cpp_or_skip():
    from flowturbo.runtime.cpp_backend import cpp_unavailable_reason

    if cpp_unavailable_reason() is not None:  # the C++ runner is optional (as in tests/runtime/test_cpp_runner.py)
        pytest.skip(f"C++ runner: {cpp_unavailable_reason()}")


def test_the_cpp_runner_takes_text_exports_with_r_steps(exported):
    """No refusal of the R steps any more: the ONNX export is refused only for having no AOTInductor packages."""
    _cpp_or_skip()
    with pytest.raises(FlowTurboError, match="has no aoti artifacts") as caught:
        Sampler.from_artifacts(str(exported), backend="cpp")
    assert "R steps" not in str(caught.value)


@pytest.fixture(scope="module")
def aoti_exported(tiny_pipelines, sd3_refiner, tmp_path_factory):
    """The same schedule as AOTInductor (CPU) packages: predictor, refiner and decoder (~80 s on one core)."""
    torch.set_num_threads(1)
    return _export(tiny_pipelines, sd3_refiner, tmp_path_factory.mktemp("text_refiner_aoti") / "sd3_h1p1r2", "aoti")


@pytest.mark.slow
def test_aoti_and_cpp_r_steps_equal_the_pytorch_sampler(aoti_exported, tiny_pipelines, sd3_refiner):
    """The exported Python loop and the C++ runner on the AOTInductor packages against ``Sampler.from_pipeline``
    and against each other; four prompts with a negative one: batches of 3 and 1 within the profile."""
    from flowturbo.runtime.cpp_backend import CppSampler

    manifest = json.loads((aoti_exported / "manifest.json").read_text())
    assert [a["role"] for a in manifest["artifacts"]] == ["predictor", "refiner", "decoder"]
    refiner_inputs = [t["name"] for t in manifest["artifacts"][1]["spec"]["inputs"]]
    assert refiner_inputs == ["latents", "v", "t", "dt", "pooled_prompt_embeds"]
    prompts, negative = [*PROMPTS, "a dog"], "blurry"
    reference = Sampler.from_pipeline(str(tiny_pipelines["sd3"]), device="cpu", refiner=str(sd3_refiner),
                                      max_sequence_length=MAX_SEQUENCE_LENGTH)
    want = reference.sample(prompts=prompts, negative_prompt=negative, seed=5, schedule=SCHEDULE, cfg=CFG,
                            progress=False)
    python_loop = Sampler.from_artifacts(str(aoti_exported), backend="aoti").sample(
        prompts=prompts, negative_prompt=negative, seed=5, progress=False)
    torch.testing.assert_close(python_loop.images, want.images, **tol("export_fp32"))
    _cpp_or_skip()
    runner = CppSampler.from_artifacts(aoti_exported)  # the same packages, the loop in C++
    got = runner.sample(prompts=prompts, negative_prompt=negative, seed=5)
    assert got.num_batches == 2 and got.refiner_calls == want.refiner_calls == 4
    torch.testing.assert_close(got.images, want.images, **tol("export_fp32"))
    torch.testing.assert_close(got.images, python_loop.images, **tol("export_fp32"))
    # the refiner matters: the same schedule with its offset at zero is different
    family = reference.pipeline.family
    real = family.refiner
    family.refiner = TokenRefiner(real.config).eval()
    try:
        zero = reference.sample(prompts=prompts, negative_prompt=negative, seed=5, schedule=SCHEDULE, cfg=CFG,
                                progress=False)
    finally:
        family.refiner = real
    assert not torch.allclose(zero.images, got.images, **tol("export_fp32"))


@pytest.mark.slow
@pytest.mark.parametrize("edit, needles", [
    (lambda inputs: inputs[-1].update(name="pooled_projection"),
     ["refiner graph takes an input 'pooled_projection' the runner does not know", "re-export"]),
    (lambda inputs: inputs[-1].update(shape=["batch", 7]),
     ["refiner graph takes pooled_prompt_embeds (b, 7) float32 but the predictor graph takes it (b, ", "re-export"]),
])
def test_cpp_runner_refuses_refiner_inputs_it_cannot_feed(aoti_exported, tmp_path, edit, needles):
    """A manifest (consistent and sealed) whose refiner graph takes an input the runner does not feed, or the pooled
    embeddings in another shape than the predictor's, is one clear error before any engine loads."""
    from micro_models import rewrite_manifest

    from flowturbo.errors import CheckpointError
    from flowturbo.runtime.cpp_backend import CppSampler

    _cpp_or_skip()
    target = tmp_path / "edited"
    shutil.copytree(aoti_exported, target)

    def edit_refiner(manifest):
        for artifact in manifest["artifacts"]:
            if artifact["role"] == "refiner":
                edit(artifact["spec"]["inputs"])

    rewrite_manifest(target, edit_refiner)
    with pytest.raises(CheckpointError) as caught:
        CppSampler.from_artifacts(target)
    for needle in needles:
        assert needle in str(caught.value)


def test_text_r_steps_beyond_the_trained_range_warn_once_as_in_pytorch(tiny_pipelines, sd3_refiner, tmp_path):
    """H1R3 on the tiny SD3's grid (t = 0, 0.142, 0.398, 0.991, 1) asks the refiner for dt 0.849 in its third step,
    beyond the 0.8 it was trained on: the exported text loop warns once per schedule, as the PyTorch sampler does."""
    import warnings

    from flowturbo.refiner_dt import RefinerRangeWarning

    out = tmp_path / "h1r3"
    assert main(["export", "--pipeline", str(tiny_pipelines["sd3"]), "--refiner", str(sd3_refiner), "--schedule",
                 "H1R3", "--cfg", str(CFG), "--size", str(IMAGE_SIZE), "--max-sequence-length",
                 str(MAX_SEQUENCE_LENGTH), "--batch", "1:1:2", "--format", "onnx", "--out", str(out)]) == 0
    exported = Sampler.from_artifacts(str(out), backend="onnxruntime")
    reference = Sampler.from_pipeline(str(tiny_pipelines["sd3"]), device="cpu", refiner=str(sd3_refiner),
                                      max_sequence_length=MAX_SEQUENCE_LENGTH)
    for sample in (lambda: exported.sample(prompts=PROMPTS[:2], seed=1),
                   lambda: reference.sample(prompts=PROMPTS[:2], seed=1, schedule="H1R3", cfg=CFG, progress=False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sample()
        ours = [str(w.message) for w in caught if issubclass(w.category, RefinerRangeWarning)]
        assert len(ours) == 1 and "dt up to 0.849 in R step(s) 3," in ours[0], ours
        with warnings.catch_warnings():
            warnings.simplefilter("error", RefinerRangeWarning)
            sample()  # said once per schedule
