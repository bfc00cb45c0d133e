"""The TensorRT sampling backend: engine refusal, availability, and binding logic (fake ``tensorrt`` module).

TensorRT cannot be installed on our machines (DESIGN.md §6). What does not need it is tested for real: the
metadata/refusal logic against metadata written the way ``export/tensorrt_export.engine_metadata`` writes it,
the refusal without TensorRT / CUDA, and the binding logic (shapes set from the batch, addresses bound in spec
order, outputs allocated at the spec's shape and dtype, cached per batch, the whole E/H/P/R loop through the
engines) with a small fake ``tensorrt`` module whose execution context reads and writes the bound memory.
The end-to-end test with real engines skips with the precise reason.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from tolerances import tol

from flowturbo.errors import CheckpointError, FlowTurboError, SamplingError
from flowturbo.export import tensorrt_export
from flowturbo.export.manifest import EXPORT_FORMAT, MANIFEST_FILE, file_entries, sha256_file
from flowturbo.fileio import artifact_key, read_sealed_json, sealed_json_bytes
from flowturbo.export.specs import BatchProfile, decoder_spec, predictor_step_spec, refiner_step_spec
from flowturbo.runtime import tensorrt_backend as tb
from flowturbo.runtime.artifacts import ArtifactEntry, load_artifacts
from flowturbo.runtime.onnx_backend import ExportedSampler
from flowturbo.schedule import SamplingSchedule

FAKE_TRT_VERSION = "10.99.0"
FAKE_GPU = "NVIDIA Fake GPU 80GB"
WEIGHTS = "ab" * 32
LATENT = (4, 3, 5)  # odd sizes
IMAGE = (1, 6, 10)
NUM_CLASSES = 10
PROFILE = BatchProfile(1, 2, 4)
METADATA_PROFILE = BatchProfile(1, 4, 8)
REAL_REASON = tb.tensorrt_unavailable_reason()


# ----------------------------------------------------------------------------------- fake TensorRT module
class _DataType:
    FLOAT = "DataType.FLOAT"
    HALF = "DataType.HALF"
    BF16 = "DataType.BF16"
    INT64 = "DataType.INT64"
    INT32 = "DataType.INT32"


class _TensorIOMode:
    INPUT = "TensorIOMode.INPUT"
    OUTPUT = "TensorIOMode.OUTPUT"


class _Logger:
    WARNING = 2

    def __init__(self, severity: int) -> None:
        self.severity = severity


_TORCH_OF = {_DataType.FLOAT: torch.float32, _DataType.HALF: torch.float16, _DataType.BF16: torch.bfloat16,
             _DataType.INT64: torch.int64}
_TRT_OF = {"float32": _DataType.FLOAT, "float16": _DataType.HALF, "bfloat16": _DataType.BF16, "int64": _DataType.INT64}


def _memory(address: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor aliasing ``address`` (what a CUDA kernel would read/write through a bound pointer)."""
    count = 1
    for d in shape:
        count *= d
    raw = (ctypes.c_char * (count * torch.empty((), dtype=dtype).element_size())).from_address(address)
    return torch.frombuffer(raw, dtype=dtype).view(shape)


def _predictor(latents, t, labels):  # asymmetric in its inputs, so a swapped binding shows
    out = -0.5 * latents.float() + 0.3 * t.float().view(-1, 1, 1, 1) + 0.01 * labels.float().view(-1, 1, 1, 1)
    return out.to(latents.dtype)


def _refiner(latents, v, t, labels):
    out = 0.1 * v.float() - 0.05 * latents.float() + 0.02 * t.float().view(-1, 1, 1, 1) - 0.003 * labels.float().view(-1, 1, 1, 1)
    return out.to(latents.dtype)


def _decoder(latents):
    return torch.tanh(latents[:, :1].float()).repeat_interleave(2, 2).repeat_interleave(2, 3).to(latents.dtype)


FUNCTIONS = {"predictor_step": _predictor, "refiner_step": _refiner, "decoder": _decoder}


class _Context:
    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.calls: list[tuple] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name, shape):
        self.calls.append(("set_input_shape", name, tuple(shape)))
        if not self.engine.profile[0] <= shape[0] <= self.engine.profile[1]:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        assert isinstance(address, int) and address != 0
        self.calls.append(("set_tensor_address", name, address))
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream_handle):
        self.calls.append(("execute_async_v3", stream_handle))
        kw = {n: _memory(self.addresses[n], self.shapes[n], _TORCH_OF[self.engine.dtypes[n]]).clone()
              for n in self.engine.inputs}
        out = FUNCTIONS[self.engine.function](**kw)
        name = self.engine.outputs[0]
        assert _TORCH_OF[self.engine.dtypes[name]] == out.dtype
        _memory(self.addresses[name], tuple(out.shape), out.dtype).copy_(out)
        return True


class _Engine:
    """Deserialized from the JSON the tests write as engine bytes: IO names/dtypes, function, batch profile."""

    def __init__(self, desc: dict) -> None:
        self.inputs = [n for n, _ in desc["inputs"]]
        self.outputs = [n for n, _ in desc["outputs"]]
        self.dtypes = {n: getattr(_DataType, d) for n, d in desc["inputs"] + desc["outputs"]}
        self.function = desc["function"]
        self.profile = desc["profile"]
        self.contexts: list[_Context] = []

    @property
    def num_io_tensors(self):
        return len(self.inputs) + len(self.outputs)

    def get_tensor_name(self, index):
        return (self.inputs + self.outputs)[index]

    def get_tensor_mode(self, name):
        return _TensorIOMode.INPUT if name in self.inputs else _TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def create_execution_context(self):
        self.contexts.append(_Context(self))
        return self.contexts[-1]


class _Runtime:
    def __init__(self, logger: _Logger) -> None:
        assert isinstance(logger, _Logger)

    def deserialize_cuda_engine(self, data):
        try:
            return _Engine(json.loads(bytes(data)))
        except ValueError:
            return None  # what TensorRT does with bytes it cannot read


def _fake_tensorrt() -> types.ModuleType:
    module = types.ModuleType("tensorrt")
    module.__version__ = FAKE_TRT_VERSION
    module.Logger, module.Runtime, module.DataType, module.TensorIOMode = _Logger, _Runtime, _DataType, _TensorIOMode
    return module


@pytest.fixture
def fake_trt(monkeypatch):
    """A fake ``tensorrt`` importable, this CPU standing in for the GPU (device injected as ``cpu``)."""
    fake = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(tb, "tensorrt_unavailable_reason", lambda device="cuda": None)
    monkeypatch.setattr(tb, "gpu_name", lambda device: FAKE_GPU)
    return fake


# --------------------------------------------------------------------------------- export directory
def _engine_bytes(spec, function: str, profile=None, **override) -> bytes:
    desc = {
        "inputs": [[t.name, _TRT_OF[t.dtype].split(".")[1]] for t in spec.inputs],
        "outputs": [[t.name, _TRT_OF[t.dtype].split(".")[1]] for t in spec.outputs],
        "function": function,
        "profile": list(profile or (spec.batch.min, spec.batch.max)),
    }
    desc.update(override)
    return json.dumps(desc).encode()


def _specs(precision: str, batch: BatchProfile):
    return [
        ("predictor_step", "predictor", predictor_step_spec(LATENT, precision, batch)),
        ("refiner_step", "refiner", refiner_step_spec(LATENT, precision, batch)),
        ("decoder", "decoder", decoder_spec(LATENT, IMAGE, precision, batch)),
    ]


def _make_export(root: Path, *, schedule: SamplingSchedule, precision: str = "fp32",
                 batch: BatchProfile = PROFILE, tensorrt_version: str = FAKE_TRT_VERSION,
                 gpu: str = FAKE_GPU) -> Path:
    """An export directory laid out like export/pipeline.py writes a ``--format tensorrt`` export."""
    engines = root / "tensorrt"
    engines.mkdir(parents=True)
    artifacts, written = [], []
    for stem, role, spec in _specs(precision, batch):
        meta = tensorrt_export.engine_metadata(spec, weights_sha256=WEIGHTS, schedule_id=schedule.id,
                                               precision=precision, tensorrt_version=tensorrt_version, gpu_name=gpu)
        engine, meta_path = tensorrt_export.engine_paths(engines, meta)
        engine.write_bytes(_engine_bytes(spec, stem))
        meta_path.write_text(json.dumps({**meta, "engine_sha256": sha256_file(engine), "optimization_level": 3}))
        written += [engine, meta_path]
        artifacts.append({"module": stem, "role": role, "spec": spec.to_dict(), "time": spec.time,
                          "format": "tensorrt", "file": engine.relative_to(root).as_posix(),
                          "build_seconds": 0.0, "engine_key": meta["key"]})
    key_fields = {"format": EXPORT_FORMAT, "weights_sha256": WEIGHTS, "schedule_id": schedule.id,
                  "batch": batch.describe(), "formats": ["tensorrt"], "precision": precision, "variant": "time-input",
                  "opset": None, "kernel_backend": None, "with_encoder": False, "tools": {}, "device": f"cuda: {gpu}"}
    manifest = {
        "format": EXPORT_FORMAT, "key": artifact_key(key_fields), "key_fields": key_fields,
        "schedule": schedule.describe(),
        "schedule_id": schedule.id, "variant": "time-input", "precision": precision, "batch": batch.to_dict(),
        "formats": ["tensorrt"],
        "model": {"source": "test", "weights_sha256": WEIGHTS, "num_classes": NUM_CLASSES,
                  "latent_shape": list(LATENT), "image_shape": list(IMAGE), "class_names": None,
                  "has_refiner": True},
        "artifacts": artifacts, "files": file_entries(root, written), "tools": {}, "device": f"cuda: {gpu}",
    }
    (root / MANIFEST_FILE).write_bytes(sealed_json_bytes(manifest))  # sealed, as the exporter writes it
    return root


def _refresh_manifest_files(root: Path) -> None:
    """Re-record every file's checksum in the manifest (so only the engine metadata can object)."""
    manifest = read_sealed_json(root / MANIFEST_FILE, fix="")
    manifest["files"] = file_entries(root, [root / rel for rel in manifest["files"]])
    (root / MANIFEST_FILE).write_bytes(sealed_json_bytes(manifest))


SCHEDULE = SamplingSchedule.parse("H1P2R2", guidance_scale=1.5)


class _TorchSampler(ExportedSampler):
    """The same shared loop over the same functions in plain torch: the reference for the fake engines."""

    backend = "reference"
    artifact_format = "tensorrt"

    def _load(self, entry):
        fn = FUNCTIONS[entry.spec["name"]]
        return lambda **inputs: [fn(**inputs)]


# ------------------------------------------------------------------------------------ key and metadata
def _metadata(precision="fp16", batch=METADATA_PROFILE, **overrides):
    fields = {"weights_sha256": WEIGHTS, "schedule_id": SCHEDULE.id, "precision": precision,
              "tensorrt_version": FAKE_TRT_VERSION, "gpu_name": FAKE_GPU}
    fields.update(overrides)
    return tensorrt_export.engine_metadata(predictor_step_spec(LATENT, precision, batch), **fields)


def test_format_and_key_fields_match_the_exporter():
    assert tb.ENGINE_FORMAT == tensorrt_export.ENGINE_FORMAT
    assert tb.KEY_FIELDS == tensorrt_export.KEY_FIELDS
    meta = _metadata()
    assert tb.engine_key(meta) == tensorrt_export.engine_cache_key(meta) == meta["key"]


def test_matching_metadata_has_no_problems():
    meta = _metadata()
    assert tb.engine_problems({**meta, "engine_sha256": "f" * 64}, meta, engine_sha256="f" * 64) == []


@pytest.mark.parametrize("field, found_kw", [
    ("schedule_id", {"schedule_id": SamplingSchedule.parse("H8").id}),
    ("precision", {"precision": "fp32"}),  # also changes the spec dtypes
    ("batch", {"batch": BatchProfile(1, 2, 4)}),
    ("tensorrt_version", {"tensorrt_version": "10.3.0"}),
    ("gpu_name", {"gpu_name": "NVIDIA H100 80GB HBM3"}),
    ("weights_sha256", {"weights_sha256": "cd" * 32}),
])
def test_each_mismatch_is_refused_naming_the_field(field, found_kw):
    found, wanted = _metadata(**found_kw), _metadata()
    with pytest.raises(CheckpointError) as info:
        tb.check_engine(found, wanted, "tensorrt/predictor_step-x.engine")
    message = str(info.value)
    assert f"\n  {field}: " in message
    assert "flowturbo export --format tensorrt" in message and "predictor_step-x.engine" in message
    assert "format:" not in message and "key:" not in message  # a consistent engine, just built for else


def test_an_engine_for_another_module_is_refused():
    refiner = tensorrt_export.engine_metadata(
        refiner_step_spec(LATENT, "fp16", METADATA_PROFILE), weights_sha256=WEIGHTS, schedule_id=SCHEDULE.id,
        precision="fp16", tensorrt_version=FAKE_TRT_VERSION, gpu_name=FAKE_GPU)
    problems = tb.engine_problems(refiner, _metadata())
    assert problems == ["module: engine has 'refiner_step', the manifest wants 'predictor_step'",
                        "spec: the engine's inputs/outputs differ from the module spec in the manifest"]


def test_every_difference_is_listed_at_once():
    found = _metadata(tensorrt_version="10.3.0", gpu_name="NVIDIA A100-SXM4-80GB", schedule_id="0" * 16)
    problems = tb.engine_problems(found, _metadata())
    assert [p.split(":")[0] for p in problems] == ["schedule_id", "tensorrt_version", "gpu_name"]
    assert "10.3.0" in problems[1] and FAKE_TRT_VERSION in problems[1]
    assert "NVIDIA A100-SXM4-80GB" in problems[2] and FAKE_GPU in problems[2]


def test_wrong_format_is_refused():
    found = {**_metadata(), "format": "flowturbo.tensorrt-engine/0"}
    with pytest.raises(CheckpointError, match=r"(?s)and --overwrite:\n  format: metadata has 'flowturbo.tensorrt-engine/0'"):
        tb.check_engine(found, _metadata(), "e.engine")
    with pytest.raises(CheckpointError, match="format: metadata has None"):
        tb.check_engine({}, _metadata(), "e.engine")


def test_checksum_mismatch_is_refused():
    data = b"engine bytes"
    found = {**_metadata(), "engine_sha256": hashlib.sha256(data).hexdigest()}
    tb.check_engine(found, _metadata(), "e.engine", engine_sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(CheckpointError, match=r"engine_sha256: the engine file hashes to .*corrupted"):
        tb.check_engine(found, _metadata(), "e.engine", engine_sha256=hashlib.sha256(data + b"!").hexdigest())


def test_hand_edited_key_and_manifest_key_mismatch_are_refused():
    meta = _metadata()
    with pytest.raises(CheckpointError, match="key: metadata key 'deadbeefdeadbeef' does not match its fields"):
        tb.check_engine({**meta, "key": "deadbeefdeadbeef"}, meta, "e.engine")
    with pytest.raises(CheckpointError, match="key: the manifest lists engine key '0123456789abcdef'"):
        tb.check_engine(meta, meta, "e.engine", manifest_key="0123456789abcdef")


def test_expected_fields_from_the_manifest_equal_what_the_exporter_recorded(tmp_path):
    root = _make_export(tmp_path / "export", schedule=SCHEDULE, precision="fp16", batch=BatchProfile(1, 3, 5))
    artifacts = load_artifacts(root)
    for entry in artifacts.entries("tensorrt"):
        found = tb.read_engine_metadata(entry.path)
        expected = tb.expected_engine_fields(entry, artifacts.manifest, tensorrt_version=FAKE_TRT_VERSION, gpu=FAKE_GPU)
        assert tb.engine_problems(found, expected, engine_sha256=sha256_file(entry.path)) == []
        assert {f: found[f] for f in tb.KEY_FIELDS} == expected


def test_missing_or_broken_metadata_is_refused(tmp_path):
    engine = tmp_path / "decoder-0123.engine"
    engine.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"has no metadata file decoder-0123\.json.*--format tensorrt"):
        tb.read_engine_metadata(engine)
    (tmp_path / "decoder-0123.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        tb.read_engine_metadata(engine)
    (tmp_path / "decoder-0123.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        tb.read_engine_metadata(engine)


# ------------------------------------------------------------------------------------------ availability
@pytest.mark.skipif(REAL_REASON is None or "not installed" not in REAL_REASON,
                    reason="TensorRT is installed here; the not-installed message is tested with a blocked import")
def test_this_machine_lacks_tensorrt_and_says_why():
    assert "not installed" in REAL_REASON and "NVIDIA" in REAL_REASON and "onnxruntime" in REAL_REASON


def test_from_artifacts_without_tensorrt_refuses_before_reading_the_directory(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    reason = tb.tensorrt_unavailable_reason()
    assert reason is not None and "not installed" in reason and "install time" in reason
    with pytest.raises(FlowTurboError) as info:
        tb.TensorRTSampler.from_artifacts(tmp_path / "does-not-exist")
    assert type(info.value) is FlowTurboError and str(info.value) == reason


def test_without_cuda_the_reason_is_the_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs a CUDA GPU" in tb.tensorrt_unavailable_reason()
    assert "not on cpu" in tb.tensorrt_unavailable_reason("cpu")
    with pytest.raises(FlowTurboError, match="needs a CUDA GPU"):
        tb.TensorRTSampler.from_artifacts("anywhere")


# ------------------------------------------------------------------------------------ binding (fake TRT)
def _entry(tmp_path: Path, spec, function: str, **engine_kw) -> tuple[ArtifactEntry, bytes]:
    path = tmp_path / f"{function}.engine"
    data = _engine_bytes(spec, function, **engine_kw)
    path.write_bytes(data)
    return ArtifactEntry(function, "refiner", "tensorrt", path, spec.to_dict(), spec.time), data


def _refiner_inputs(batch: int, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(batch, *LATENT, generator=g).to(dtype),
            "v": torch.randn(batch, *LATENT, generator=g).to(dtype),
            "t": torch.rand(batch, generator=g) * 0.9 + 0.05,
            "labels": torch.randint(0, NUM_CLASSES, (batch,), generator=g)}


def test_module_binds_shapes_and_addresses_in_spec_order(fake_trt, tmp_path):
    spec = refiner_step_spec(LATENT, "fp32", BatchProfile(1, 2, 4))
    entry, data = _entry(tmp_path, spec, "refiner_step")
    module = tb.TensorRTModule(entry, data, fake_trt, torch.device("cpu"))
    context = module.engine.contexts[0]
    inputs = _refiner_inputs(3)
    (offset,) = module(**inputs)

    shapes = [c[1:] for c in context.calls if c[0] == "set_input_shape"]
    assert shapes == [("latents", (3, *LATENT)), ("v", (3, *LATENT)), ("t", (3,)), ("labels", (3,))]
    bound = [c[1] for c in context.calls if c[0] == "set_tensor_address"]
    assert bound == ["latents", "v", "t", "labels", "offset"]
    assert context.calls[-1] == ("execute_async_v3", 0)  # the stream handle (0 off CUDA)
    (buffer,) = module.output_buffers(3)
    assert buffer.shape == (3, *LATENT) and buffer.dtype == torch.float32
    assert context.addresses["offset"] == buffer.data_ptr()
    torch.testing.assert_close(offset, _refiner(**inputs), rtol=0, atol=0)


def test_module_caches_output_buffers_per_batch_and_returns_copies(fake_trt, tmp_path):
    spec = refiner_step_spec(LATENT, "fp32", BatchProfile(1, 2, 4))
    entry, data = _entry(tmp_path, spec, "refiner_step")
    module = tb.TensorRTModule(entry, data, fake_trt, torch.device("cpu"))
    context = module.engine.contexts[0]
    first = module(**_refiner_inputs(3, seed=1))[0]
    kept = first.clone()
    address_3 = context.addresses["offset"]
    second = module(**_refiner_inputs(3, seed=2))[0]
    assert context.addresses["offset"] == address_3  # same static buffer for the same batch
    assert first.data_ptr() != address_3 and second.data_ptr() != address_3
    torch.testing.assert_close(first, kept, rtol=0, atol=0)  # an earlier result survives the next call
    module(**_refiner_inputs(2, seed=3))
    assert context.addresses["offset"] != address_3 and sorted(module._buffers) == [2, 3]
    assert module.output_buffers(2)[0].shape == (2, *LATENT)


def test_fp16_engine_maps_half_and_refuses_float32_inputs(fake_trt, tmp_path):
    spec = refiner_step_spec(LATENT, "fp16", BatchProfile(1, 2, 4))
    entry, data = _entry(tmp_path, spec, "refiner_step")
    module = tb.TensorRTModule(entry, data, fake_trt, torch.device("cpu"))
    (offset,) = module(**_refiner_inputs(2, dtype=torch.float16))
    assert offset.dtype == torch.float16 and module.output_buffers(2)[0].dtype == torch.float16
    with pytest.raises(SamplingError, match=r"input latents must be float16 \(2, 4, 3, 5\), got float32"):
        module(**_refiner_inputs(2, dtype=torch.float32))


def test_engine_io_that_disagrees_with_the_spec_is_refused(fake_trt, tmp_path):
    spec = refiner_step_spec(LATENT, "fp32", BatchProfile(1, 2, 4))
    entry, data = _entry(tmp_path, spec, "refiner_step", inputs=[["latents", "FLOAT"], ["t", "FLOAT"],
                                                                  ["labels", "INT64"]])
    with pytest.raises(CheckpointError, match=r"has inputs \['latents', 't', 'labels'\].*spec has inputs "
                                              r"\['latents', 'v', 't', 'labels'\]"):
        tb.TensorRTModule(entry, data, fake_trt, torch.device("cpu"))
    entry, data = _entry(tmp_path, spec, "refiner_step", outputs=[["offset", "HALF"]])
    with pytest.raises(CheckpointError, match=r"dtypes: offset: engine DataType.HALF, spec float32"):
        tb.TensorRTModule(entry, data, fake_trt, torch.device("cpu"))
    entry, _ = _entry(tmp_path, spec, "refiner_step")
    with pytest.raises(CheckpointError, match="could not deserialize"):
        tb.TensorRTModule(entry, b"\x00garbage", fake_trt, torch.device("cpu"))


def test_shape_outside_the_profile_is_a_clear_error(fake_trt, tmp_path):
    spec = refiner_step_spec(LATENT, "fp32", BatchProfile(1, 2, 4))
    entry, data = _entry(tmp_path, spec, "refiner_step", profile=(1, 2))
    module = tb.TensorRTModule(entry, data, fake_trt, torch.device("cpu"))
    with pytest.raises(SamplingError, match=r"rejected input latents of shape \(3, 4, 3, 5\).*--batch"):
        module(**_refiner_inputs(3))
    with pytest.raises(SamplingError, match=r"missing \['v'\]"):
        module(**{k: v for k, v in _refiner_inputs(2).items() if k != "v"})


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_sampler_with_fake_engines_matches_the_same_loop_in_torch(fake_trt, tmp_path, precision):
    root = _make_export(tmp_path / "export", schedule=SCHEDULE, precision=precision)
    sampler = tb.TensorRTSampler.from_artifacts(root, expect={"schedule_id": SCHEDULE.id}, device="cpu")
    assert sampler.backend == "tensorrt" and sampler.describe()["tensorrt_version"] == FAKE_TRT_VERSION
    classes = [3, 7, 1, 9, 0]  # 5 images: batches of 4 + 1, both inside the 1:2:4 profile
    got = sampler.sample(classes, seed=11)
    want = _TorchSampler(load_artifacts(root)).sample(classes, seed=11)
    assert got.images.shape == want.images.shape == (5, *IMAGE) and got.images.device.type == "cpu"
    assert got.num_batches == 2 and (got.predictor_calls, got.refiner_calls) == (4, 4)
    torch.testing.assert_close(got.images, want.images, rtol=0, atol=0)
    for module in (sampler._predict[None], sampler._refine[None], sampler._decode):
        assert sorted(module._buffers) == [1, 4]  # one set of static buffers per batch size seen


def test_sampler_refuses_an_engine_built_on_another_gpu_and_version(fake_trt, tmp_path):
    root = _make_export(tmp_path / "export", schedule=SCHEDULE, gpu="NVIDIA A100-SXM4-80GB", tensorrt_version="10.0.1")
    with pytest.raises(CheckpointError) as info:
        tb.TensorRTSampler.from_artifacts(root, device="cpu")
    message = str(info.value)
    assert "tensorrt_version: engine was built with TensorRT '10.0.1'" in message
    assert f"gpu_name: engine was built on 'NVIDIA A100-SXM4-80GB', this GPU is '{FAKE_GPU}'" in message
    assert "flowturbo export --format tensorrt" in message


def test_sampler_refuses_an_engine_that_does_not_match_its_metadata_checksum(fake_trt, tmp_path):
    root = _make_export(tmp_path / "export", schedule=SCHEDULE)
    engine = next((root / "tensorrt").glob("decoder-*.engine"))
    engine.write_bytes(engine.read_bytes().replace(b'"decoder"', b'"decoder" '))
    _refresh_manifest_files(root)  # the manifest agrees: only the engine metadata can object
    with pytest.raises(CheckpointError, match=r"(?s)decoder-.*\.engine cannot be used here.*engine_sha256"):
        tb.TensorRTSampler.from_artifacts(root, device="cpu")


def test_sampler_refuses_metadata_for_another_schedule(fake_trt, tmp_path):
    root = _make_export(tmp_path / "export", schedule=SCHEDULE)
    for meta_path in (root / "tensorrt").glob("predictor_step-*.json"):
        meta = json.loads(meta_path.read_text())
        meta["schedule_id"] = SamplingSchedule.parse("H8").id
        meta["key"] = tensorrt_export.engine_cache_key(meta)
        meta_path.write_text(json.dumps(meta))
    _refresh_manifest_files(root)
    with pytest.raises(CheckpointError, match=r"(?s)schedule_id: engine has .*the manifest wants '"
                                              + SCHEDULE.id):
        tb.TensorRTSampler.from_artifacts(root, device="cpu")


# ------------------------------------------------------------------------------------ real TensorRT
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(REAL_REASON is not None, reason=REAL_REASON or "")
def test_real_engines_match_the_pytorch_sampler(tmp_path):  # pragma: no cover - needs TensorRT + a CUDA GPU
    from flowturbo.export.pipeline import ExportRequest, export_model
    from flowturbo.runtime.pytorch_backend import DEFAULT_BUNDLE_DIR
    from flowturbo.runtime.sampler import Sampler
    from flowturbo.training.bundle import load_bundle

    schedule = load_bundle(DEFAULT_BUNDLE_DIR).defaults.sampling_schedule()
    request = ExportRequest(schedule, BatchProfile(1, 2, 4), ("tensorrt",), "fp32", "time-input", device="cuda")
    result = export_model(DEFAULT_BUNDLE_DIR, request, tmp_path / "trt")
    sampler = tb.TensorRTSampler.from_artifacts(result.path, expect={"schedule_id": schedule.id})
    classes = [3, 7, 1]
    got = sampler.sample(classes, seed=4)
    want = Sampler.from_bundle(None, device="cpu").sample(classes, schedule=schedule, seed=4, progress=False)
    assert got.images.shape == want.images.shape
    torch.testing.assert_close(got.images, want.images, **tol("export_fp32"))
