"""I/O specs and batch profiles: shapes, dynamic axes, TensorRT profiles, JSON round trip, refusals."""

from __future__ import annotations

import pytest
import torch

from flowturbo.errors import FlowTurboError
from flowturbo.export.specs import (
    BatchProfile,
    ModuleSpec,
    decoder_spec,
    predictor_step_spec,
    refiner_step_spec,
    unrolled_spec,
)

LATENT = (3, 6, 6)
IMAGE = (1, 12, 12)


@pytest.mark.parametrize("text, expected", [("1:4:16", (1, 4, 16)), ("8", (8, 8, 8)), ("2:5", (2, 5, 5)), (3, (3, 3, 3))])
def test_batch_profile_parse(text, expected):
    profile = BatchProfile.parse(text)
    assert (profile.min, profile.opt, profile.max) == expected
    assert BatchProfile.parse(profile.describe()) == profile


@pytest.mark.parametrize("text", ["0:1:2", "4:2:8", "a:b:c", "1:2:3:4", "16:8"])
def test_batch_profile_refuses_bad_text(text):
    with pytest.raises(FlowTurboError, match="MIN:OPT:MAX|1 <= min"):
        BatchProfile.parse(text)


def test_example_batch_avoids_one_when_dynamic():
    assert BatchProfile(1, 1, 7).example_batch() == 2
    assert BatchProfile(3, 3, 3).example_batch() == 3
    assert BatchProfile(1, 5, 7).example_batch() == 5


def test_predictor_spec_shapes_and_profile():
    spec = predictor_step_spec(LATENT, "fp16", BatchProfile(1, 4, 9))
    assert spec.input_names == ["latents", "t", "labels"]
    assert spec.output_names == ["velocity"]
    assert spec.tensor("latents").dtype == "float16" and spec.tensor("t").dtype == "float32"
    assert spec.tensor("labels").dtype == "int64"
    assert spec.tensor("velocity").shape_for(5) == (5, *LATENT)
    profile = spec.tensorrt_profile()
    assert profile["latents"] == ((1, *LATENT), (4, *LATENT), (9, *LATENT))
    assert profile["labels"] == ((1,), (4,), (9,))
    dims = spec.export_dynamic_shapes()
    batch = dims["latents"][0]
    assert dims["t"][0] is batch and dims["labels"][0] is batch
    assert ModuleSpec.from_dict(spec.to_dict()) == spec


def test_folded_specs_have_no_time_input():
    spec = refiner_step_spec(LATENT, "fp32", BatchProfile(2, 2, 2), time=0.5)
    assert spec.input_names == ["latents", "v", "labels"]
    assert spec.time == 0.5 and spec.name.endswith("@0.5")
    assert spec.export_dynamic_shapes() is None  # static profile


def test_dt_refiner_specs_take_or_fold_dt():
    """A dt-conditioned refiner's time-input spec takes dt (float32, batched, after t); its per-step spec folds
    (t, dt) and is named by both; a dt folded into a refiner without dt conditioning is refused."""
    batch = BatchProfile(1, 3, 9)
    spec = refiner_step_spec(LATENT, "fp16", batch, dt_conditioning=True)
    assert spec.input_names == ["latents", "v", "t", "dt", "labels"]
    assert spec.tensor("dt").dtype == "float32" and spec.tensor("dt").shape_for(5) == (5,)
    assert spec.tensorrt_profile()["dt"] == ((1,), (3,), (9,))
    dims = spec.export_dynamic_shapes()
    assert dims["dt"][0] is dims["latents"][0]  # one symbolic batch axis for every input
    folded = refiner_step_spec(LATENT, "fp32", batch, dt_conditioning=True, time=0.75, dt=0.5)
    assert folded.input_names == ["latents", "v", "labels"] and (folded.time, folded.dt) == (0.75, 0.5)
    assert folded.name == "refiner_step@0.75/dt=0.5" and ModuleSpec.from_dict(folded.to_dict()) == folded
    assert "dt" not in refiner_step_spec(LATENT, "fp32", batch, time=0.75).to_dict()  # unchanged for the others
    with pytest.raises(FlowTurboError, match="only a dt-conditioned"):
        refiner_step_spec(LATENT, "fp32", batch, time=0.75, dt=0.5)
    with pytest.raises(FlowTurboError, match="folds both t and dt"):
        refiner_step_spec(LATENT, "fp32", batch, dt_conditioning=True, time=0.75)


def test_decoder_and_unrolled_specs():
    dec = decoder_spec(LATENT, IMAGE, "fp32", BatchProfile(1, 2, 3))
    assert dec.tensor("images").shape_for(3) == (3, *IMAGE)
    whole = unrolled_spec(LATENT, IMAGE, "fp32", BatchProfile(1, 2, 3))
    assert whole.input_names == ["noise", "labels"] and whole.output_names == ["images", "latents"]


def test_unknown_precision_refused():
    with pytest.raises(FlowTurboError, match="fp32, fp16, bf16"):
        predictor_step_spec(LATENT, "int8", BatchProfile(1, 1, 1))


def test_dynamic_shapes_are_torch_dims():
    spec = decoder_spec(LATENT, IMAGE, "fp32", BatchProfile(1, 2, 3))
    dim = spec.export_dynamic_shapes()["latents"][0]
    assert isinstance(dim, type(torch.export.Dim("x", min=1, max=3)))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_runtime_manifest_cross_check_accepts_every_spec_the_exporter_writes(precision):
    """The runtime's re-sealed-manifest check (runtime/artifacts.check_consistent) knows the exporter's dtypes:
    every spec built here passes at its own precision, and a dtype or batch range changed in one spec is refused."""
    from pathlib import Path

    from flowturbo.errors import CheckpointError
    from flowturbo.export.manifest import artifact_key
    from flowturbo.export.specs import (DT_INPUT, GUIDANCE_INPUT, LABEL_DTYPE, TIME_DTYPE, encoder_spec,
                                        text_predictor_step_spec)
    from flowturbo.runtime.artifacts import DT_INPUT as RUNTIME_DT_INPUT
    from flowturbo.runtime.artifacts import FIXED_DTYPES, check_consistent

    assert FIXED_DTYPES == {"t": TIME_DTYPE, DT_INPUT: TIME_DTYPE, "labels": LABEL_DTYPE, GUIDANCE_INPUT: TIME_DTYPE}
    assert RUNTIME_DT_INPUT == DT_INPUT
    batch = BatchProfile(1, 2, 4)
    specs = [predictor_step_spec(LATENT, precision, batch), predictor_step_spec(LATENT, precision, batch, time=0.5),
             refiner_step_spec(LATENT, precision, batch, halves=True), decoder_spec(LATENT, IMAGE, precision, batch),
             encoder_spec(IMAGE, LATENT, precision, batch), unrolled_spec(LATENT, IMAGE, precision, batch),
             refiner_step_spec(LATENT, precision, batch, dt_conditioning=True),
             refiner_step_spec(LATENT, precision, batch, dt_conditioning=True, time=0.5, dt=0.25),
             text_predictor_step_spec(LATENT, precision, batch, sequence_length=7, embed_dim=5, pooled_dim=3,
                                      negative=True, guidance_input=True)]
    top = {"batch": batch.describe(), "precision": precision, "variant": "time-input", "schedule_id": "s",
           "formats": ["onnx"], "weights_sha256": "w", "kernel_backend": "reference", "with_encoder": True,
           "tools": {"torch": "2"}, "device": "cpu (x86_64)"}
    manifest = {**top, "key": artifact_key(top), "key_fields": top, "batch": batch.to_dict(),
                "model": {"weights_sha256": "w"},
                "artifacts": [{"file": f"{i}.onnx", "spec": spec.to_dict()} for i, spec in enumerate(specs)]}
    check_consistent(Path("manifest.json"), manifest)
    other = {"fp32": "float16", "fp16": "float32", "bf16": "float16"}[precision]
    manifest["artifacts"][3]["spec"]["outputs"][0]["dtype"] = other
    with pytest.raises(CheckpointError, match=f"3.onnx's spec gives 'images' the dtype '{other}'"):
        check_consistent(Path("manifest.json"), manifest)
    manifest["artifacts"][3]["spec"] = specs[3].to_dict()
    manifest["artifacts"][0]["spec"]["batch"]["max"] = 8
    with pytest.raises(CheckpointError, match="0.onnx's spec has the batch range '1:2:8', the manifest '1:2:4'"):
        check_consistent(Path("manifest.json"), manifest)
