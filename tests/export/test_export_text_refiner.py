"""FlowTurbo schedules with R steps exported for a text-to-image model: the token refiner's graph beside the predictor's
(``flowturbo export --pipeline DIR --refiner RUN``), sampled through ONNX Runtime and compared with
``Sampler.from_pipeline(..., refiner=RUN)`` on the tiny SD3 pipeline (tests/tiny_diffusers.py).

The refiner here has random non-zero weights everywhere (not a trained one: the export must carry whatever it holds),
so a dropped refiner call, the carried velocity in the wrong place, a wrong dt or the negative prompt's pooled
embeddings instead of the prompt's each change the images.
"""

from __future__ import annotations

import json

import pytest
import torch
from cli_checks import one_error_line
from tiny_diffusers import IMAGE_SIZE, MAX_SEQUENCE_LENGTH
from tolerances import tol

from flowturbo.errors import FlowTurboError
from flowturbo.runtime.cli import main
from flowturbo.runtime.sampler import Sampler
from flowturbo.training.families import load_family
from flowturbo.training.token_refiner import (
    TokenRefiner,
    TokenRefinerConfig,
    TokenRefinerRecord,
    transformer_digest,
    write_token_refiner,
)
from flowturbo.training.trainers.text_refiner import TEXT_REFINER_DT

CFG = 4.0
SCHEDULE = "H1P1R2"  # 3 predictor calls, 2 R steps (4 refiner calls: dt = 0 and h, then h_prev and h_prev + h)
PROMPTS = ["a photo of the cat", "a dog", "a red car"]


@pytest.fixture(scope="module")
def refiner_file(tiny_pipelines, tmp_path_factory):
    """A token refiner for the tiny SD3 at CFG 4, every weight random non-zero."""
    torch.set_num_threads(1)
    family = load_family(tiny_pipelines["sd3"], device=torch.device("cpu"), dtype=torch.float32,
                         max_sequence_length=MAX_SEQUENCE_LENGTH)
    pooled = family.condition(["x"], family_schedule()).prompt.pooled.shape[1]
    generator = torch.Generator().manual_seed(7)
    refiner = TokenRefiner(TokenRefinerConfig(latent_channels=family.latent_channels, patch_size=family.patch,
                                              pooled_dim=int(pooled), hidden_size=16, num_heads=2))
    with torch.no_grad():
        for p in refiner.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    record = TokenRefinerRecord(family.folder.class_name, transformer_digest(family.transformer_config),
                                str(tiny_pipelines["sd3"]), CFG, None, f"{IMAGE_SIZE}x{IMAGE_SIZE}")
    path = tmp_path_factory.mktemp("token_refiner") / "refiner.safetensors"
    write_token_refiner(path, refiner, record, TEXT_REFINER_DT)
    return path


def family_schedule():
    from flowturbo.schedule import SamplingSchedule

    return SamplingSchedule.parse("E1")


@pytest.fixture(scope="module")
def exported(tiny_pipelines, refiner_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("text_refiner_export") / "sd3_h1p1r2"
    code = main(["export", "--pipeline", str(tiny_pipelines["sd3"]), "--refiner", str(refiner_file), "--schedule",
                 SCHEDULE, "--cfg", str(CFG), "--size", str(IMAGE_SIZE), "--max-sequence-length",
                 str(MAX_SEQUENCE_LENGTH), "--batch", "1:2:3", "--format", "onnx", "--out", str(out)])
    assert code == 0
    return out


def test_exported_r_steps_equal_the_pytorch_sampler(exported, tiny_pipelines, refiner_file):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert [a["role"] for a in manifest["artifacts"]] == ["predictor", "refiner", "decoder"]
    assert manifest["model"]["has_refiner"] and manifest["model"]["refiner_dt_conditioning"]
    assert manifest["model"]["refiner_trained_for"]["cfg"] == CFG
    got = Sampler.from_artifacts(str(exported), backend="onnxruntime").sample(prompts=PROMPTS, seed=5,
                                                                              progress=False)
    reference = Sampler.from_pipeline(str(tiny_pipelines["sd3"]), device="cpu", refiner=str(refiner_file),
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


def test_r_steps_without_a_refiner_or_at_another_cfg_are_refused(tiny_pipelines, refiner_file, tmp_path, capsys):
    common = ["export", "--pipeline", str(tiny_pipelines["sd3"]), "--size", str(IMAGE_SIZE), "--max-sequence-length",
              str(MAX_SEQUENCE_LENGTH), "--format", "onnx"]
    assert main([*common, "--schedule", SCHEDULE, "--cfg", str(CFG), "--out", str(tmp_path / "a")]) == 2
    one_error_line(capsys, "need a velocity refiner", "--refiner")
    assert main([*common, "--refiner", str(refiner_file), "--schedule", SCHEDULE, "--cfg", "2",
                 "--out", str(tmp_path / "b")]) == 2
    one_error_line(capsys, "at CFG 4", "--cfg 4")
    assert main([*common, "--refiner", str(refiner_file), "--schedule", SCHEDULE, "--cfg", str(CFG), "--pipeline",
                 str(tiny_pipelines["flux_dev"]), "--out", str(tmp_path / "c")]) == 2
    one_error_line(capsys, "trained for a StableDiffusion3Pipeline")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_the_cpp_runner_refuses_text_exports_with_r_steps(exported):
    try:
        import flowturbo._runner  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the C++ runner is not built here ({exc})")
    with pytest.raises(FlowTurboError, match="does not run text-to-image exports with R steps"):
        Sampler.from_artifacts(str(exported), backend="cpp")
