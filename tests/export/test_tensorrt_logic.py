"""TensorRT: cache keys, metadata, refusal messages and profiles (no TensorRT needed); builds skip without it."""

from __future__ import annotations

import json

import pytest

from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.export import tensorrt_export as trt_export
from flowturbo.export.specs import BatchProfile, predictor_step_spec

LATENT = (4, 8, 8)


def _meta(**overrides):
    spec = predictor_step_spec(LATENT, "fp16", BatchProfile.parse(overrides.pop("batch", "1:4:8")))
    fields = dict(weights_sha256="ab" * 32, schedule_id="0123456789abcdef", precision="fp16",
                  tensorrt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3")
    fields.update(overrides)
    return trt_export.engine_metadata(spec, **fields)


def test_key_changes_with_every_field():
    base = _meta()["key"]
    variants = [
        _meta(weights_sha256="cd" * 32), _meta(schedule_id="fedcba9876543210"), _meta(batch="1:4:16"),
        _meta(precision="bf16"), _meta(tensorrt_version="10.4.0"), _meta(gpu_name="NVIDIA H200"),
    ]
    keys = {m["key"] for m in variants}
    assert base not in keys and len(keys) == len(variants)
    assert _meta()["key"] == base  # deterministic


def test_refusal_names_every_difference():
    with pytest.raises(CheckpointError) as info:
        trt_export.check_engine_metadata(_meta(), _meta(gpu_name="NVIDIA H200", batch="1:4:16"))
    message = str(info.value)
    assert "gpu_name: engine has 'NVIDIA H100 80GB HBM3', wanted 'NVIDIA H200'" in message
    assert "batch: engine has '1:4:8', wanted '1:4:16'" in message
    assert "schedule_id" not in message
    trt_export.check_engine_metadata(_meta(), _meta())  # identical: accepted


def test_hand_edited_metadata_refused():
    meta = _meta()
    edited = {**meta, "key": "0" * 16}
    with pytest.raises(CheckpointError, match="edited by hand"):
        trt_export.check_engine_metadata(edited, meta)
    with pytest.raises(CheckpointError, match="format"):
        trt_export.check_engine_metadata({**meta, "format": "other"}, meta)


def test_lookup_verifies_metadata_and_checksum(tmp_path):
    meta = _meta()
    engine, meta_path = trt_export.engine_paths(tmp_path, meta)
    assert trt_export.lookup_engine(tmp_path, meta) is None  # nothing cached
    engine.write_bytes(b"serialized engine bytes")
    from flowturbo.export.manifest import sha256_file

    meta_path.write_text(json.dumps({**meta, "engine_sha256": sha256_file(engine)}))
    assert trt_export.lookup_engine(tmp_path, meta) == engine
    engine.write_bytes(b"serialized engine byte")  # truncated
    with pytest.raises(CheckpointError, match="checksum"):
        trt_export.lookup_engine(tmp_path, meta)


def test_options_flags_and_refusals():
    assert trt_export.TensorRTOptions("fp16").builder_flags() == ("FP16",)
    assert trt_export.TensorRTOptions("tf32").builder_flags() == ("TF32",)
    assert trt_export.TensorRTOptions("fp32").builder_flags() == ()
    with pytest.raises(FlowTurboError, match="precision"):
        trt_export.TensorRTOptions("int4")
    with pytest.raises(FlowTurboError, match="optimization level"):
        trt_export.TensorRTOptions("fp16", optimization_level=9)


def test_profile_from_spec_matches_batch():
    spec = predictor_step_spec(LATENT, "fp16", BatchProfile(2, 4, 8))
    low, opt, high = spec.tensorrt_profile()["latents"]
    assert (low[0], opt[0], high[0]) == (2, 4, 8) and low[1:] == LATENT


def test_build_refused_without_tensorrt(tmp_path):
    if trt_export.tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT is installed here")
    spec = predictor_step_spec(LATENT, "fp16", BatchProfile(1, 1, 1))
    with pytest.raises(FlowTurboError, match="TensorRT is not installed"):
        trt_export.build_engine(tmp_path / "x.onnx", spec, trt_export.TensorRTOptions(), _meta(), tmp_path)
