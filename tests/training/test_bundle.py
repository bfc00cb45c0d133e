"""Bundle folders: round trip, atomic writes, overwrite rules, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL

import flowturbo.training.bundle as bundle_module
from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.training.bundle import (
    BUNDLE_FORMAT,
    Bundle,
    BundleDefaults,
    load_bundle,
    make_random_bundle,
    save_bundle,
)
from flowturbo.training.decoders import DiffusersVAEDecoder, IdentityDecoder
from flowturbo.training.models import count_parameters


def _inputs(bundle, n=3):
    gen = torch.Generator().manual_seed(11)
    c, h, w = bundle.latent_shape
    x = torch.randn(n, c, h, w, generator=gen)
    v = torch.randn(n, c, h, w, generator=gen)
    t = torch.rand(n, generator=gen)
    y = torch.tensor([0, bundle.num_classes - 1, bundle.num_classes])[:n]  # last: the null label
    return x, t, y, v


def _assert_same_outputs(a, b):
    x, t, y, v = _inputs(a)
    with torch.no_grad():
        out_a = a.predictor(x, t, y)
        assert torch.equal(out_a, b.predictor(x, t, y))
        assert out_a.abs().mean() > 1e-3
        if a.refiner is not None:
            assert torch.equal(a.refiner(x, t, y, v), b.refiner(x, t, y, v))
        assert torch.equal(a.decoder.decode(x), b.decoder.decode(x))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundles") / "tiny"
    return make_random_bundle(folder), folder


def test_round_trip(saved):
    original, folder = saved
    loaded = load_bundle(folder)
    _assert_same_outputs(original, loaded)
    assert loaded.predictor.config == original.predictor.config
    assert loaded.refiner.config == original.refiner.config
    assert loaded.class_names == [f"class {i}" for i in range(10)]
    assert loaded.defaults == BundleDefaults("H1P5R3", 1.5, None)
    assert not loaded.predictor.training and not loaded.refiner.training


def test_config_json_layout(saved):
    original, folder = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == BUNDLE_FORMAT == "flowturbo.bundle/1"
    assert set(config) == {"format", "predictor", "refiner", "decoder", "class_names", "defaults"}
    assert config["predictor"]["hidden_size"] == 192 and config["predictor"]["input_size"] == 8
    assert config["decoder"] == {"type": "identity", "channels": 4}
    assert config["defaults"] == {"schedule": "H1P5R3", "cfg": 1.5, "guidance_channels": None}
    assert sorted(p.name for p in folder.iterdir()) == [".flowturbo-owned.json",  # flowturbo's ownership record
                                                         "config.json", "predictor.safetensors", "refiner.safetensors"]


def test_properties(saved):
    original, _ = saved
    assert original.num_classes == 10
    assert original.latent_shape == (4, 8, 8)
    assert original.image_shape == (4, 8, 8)
    counts = original.parameter_counts()
    assert counts == {
        "predictor": count_parameters(original.predictor),
        "refiner": count_parameters(original.refiner),
        "decoder": 0,
        "encoder": 0,  # a random bundle has no encoder
    }
    assert 0 < counts["refiner"] < counts["predictor"]


def test_random_bundle_is_deterministic(tmp_path):
    a = make_random_bundle(tmp_path / "a", seed=3, with_refiner=False)
    b = make_random_bundle(tmp_path / "b", seed=3, with_refiner=False)
    c = make_random_bundle(tmp_path / "c", seed=4, with_refiner=False)
    _assert_same_outputs(a, b)
    assert not torch.equal(a.predictor.blocks[0].attn.qkv.weight, c.predictor.blocks[0].attn.qkv.weight)
    assert a.refiner is None and a.defaults.schedule == "H8"
    loaded = load_bundle(tmp_path / "a")
    assert loaded.refiner is None
    assert not (tmp_path / "a" / "refiner.safetensors").exists()


def test_load_dtype_and_kernel_backend(saved):
    _, folder = saved
    loaded = load_bundle(folder, dtype=torch.float64, kernel_backend="triton")
    assert loaded.predictor.blocks[0].mlp.fc1.weight.dtype == torch.float64
    assert loaded.predictor.kernel_backend.value == "triton" and loaded.refiner.kernel_backend.value == "triton"


def test_overwrite_rules(tmp_path):
    folder = tmp_path / "b"
    make_random_bundle(folder, seed=1)
    with pytest.raises(FlowTurboError, match="overwrite=True"):
        make_random_bundle(folder, seed=2)
    replaced = make_random_bundle(folder, seed=2, overwrite=True)
    _assert_same_outputs(replaced, load_bundle(folder))
    other = tmp_path / "not-a-bundle"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(FlowTurboError, match="not a flowturbo bundle"):
        save_bundle(replaced, other, overwrite=True)
    assert (other / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "not-a-bundle"]  # no temp leftovers


def _fail_on_refiner(monkeypatch):
    real = bundle_module._save_weights

    def flaky(module, path):
        if path.name == "refiner.safetensors":
            raise OSError("disk full (simulated)")
        real(module, path)

    monkeypatch.setattr(bundle_module, "_save_weights", flaky)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch, saved):
    original, _ = saved
    _fail_on_refiner(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(original, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_bundle(tmp_path, monkeypatch):
    folder = tmp_path / "b"
    old = make_random_bundle(folder, seed=5)
    new = make_random_bundle(tmp_path / "other", seed=6)
    _fail_on_refiner(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(new, folder, overwrite=True)
    _assert_same_outputs(old, load_bundle(folder))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "other"]


def test_bundle_with_diffusers_decoder(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
    )
    vae.save_pretrained(str(tmp_path / "vae"))
    decoder = DiffusersVAEDecoder.from_folder(tmp_path / "vae")
    original = make_random_bundle(tmp_path / "b", decoder=decoder)
    assert (tmp_path / "b" / "decoder.safetensors").is_file()
    loaded = load_bundle(tmp_path / "b")
    assert isinstance(loaded.decoder, DiffusersVAEDecoder)
    assert loaded.image_shape == (3, 16, 16)
    _assert_same_outputs(original, loaded)


# ------------------------------------------------------------------------------------------- errors
def test_load_errors(tmp_path, saved):
    _, folder = saved
    with pytest.raises(CheckpointError, match="not found"):
        load_bundle(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_bundle(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"format": "something/else"}))
    with pytest.raises(CheckpointError, match="flowturbo.bundle/1"):
        load_bundle(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_bundle(bad)


def _edited_copy(src, dst, edit):
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_weights_not_matching_config_name_the_keys(tmp_path, saved):
    _, folder = saved
    deeper = _edited_copy(folder, tmp_path / "deeper", lambda c: c["predictor"].update(depth=7))
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.6\.") as info:
        load_bundle(deeper)
    assert "predictor.safetensors" in str(info.value)
    wider = _edited_copy(folder, tmp_path / "classes", lambda c: c["refiner"].update(num_classes=12))
    expected = r"y_embedder.embedding_table.weight: checkpoint \(11, 192\) vs model \(13, 192\)"
    with pytest.raises(CheckpointError, match=expected):
        load_bundle(wider)


def test_bad_config_values(tmp_path, saved):
    _, folder = saved
    no_refiner_file = _edited_copy(folder, tmp_path / "a", lambda c: None)
    (no_refiner_file / "refiner.safetensors").unlink()
    with pytest.raises(CheckpointError, match="refiner.safetensors"):
        load_bundle(no_refiner_file)
    bad_schedule = _edited_copy(folder, tmp_path / "b", lambda c: c["defaults"].update(schedule="R3"))
    with pytest.raises(CheckpointError, match="no velocity is carried"):
        load_bundle(bad_schedule)
    unknown_key = _edited_copy(folder, tmp_path / "c", lambda c: c["predictor"].update(hiden_size=3))
    with pytest.raises(CheckpointError, match="hiden_size"):
        load_bundle(unknown_key)
    names = _edited_copy(folder, tmp_path / "d", lambda c: c.update(class_names=["a", "b"]))
    with pytest.raises(CheckpointError, match="2 class names"):
        load_bundle(names)
    decoder = _edited_copy(folder, tmp_path / "e", lambda c: c["decoder"].update(type="mystery"))
    with pytest.raises(CheckpointError, match="unknown decoder type 'mystery'"):
        load_bundle(decoder)


def test_inconsistent_bundle_refused(saved):
    original, _ = saved
    with pytest.raises(FlowTurboError, match="3-channel latents"):
        Bundle(original.predictor, original.refiner, IdentityDecoder(3))
    with pytest.raises(FlowTurboError, match="no refiner"):
        Bundle(original.predictor, None, original.decoder)  # default schedule H1P5R3 needs one
    assert Bundle(original.predictor, None, original.decoder, defaults=BundleDefaults("H2P4")).refiner is None


def test_an_encoder_that_cannot_be_loaded_does_not_block_sampling(tmp_path, saved):
    """A bundle whose config.json declares an encoder with a missing / damaged weights file loads without it
    (it samples); inpaint / edit get the reason, naming the file; load_encoder and every other file stay strict."""
    from flowturbo.training.autoencoder import AutoencoderConfig
    from flowturbo.training.encoders import (
        ENCODER_WEIGHTS_FILE,
        FlowTurboAutoencoderEncoder,
        add_encoder_to_bundle,
        load_encoder,
        missing_encoder_error,
    )

    original, folder = saved
    with_encoder = _edited_copy(folder, tmp_path / "enc", lambda c: None)
    torch.manual_seed(0)  # an f=1 encoder for the identity decoder's 4x8x8 images
    config = AutoencoderConfig(image_channels=4, image_size=8, latent_channels=4, base_channels=8, channel_mult=(1,),
                               norm_groups=4)
    add_encoder_to_bundle(with_encoder, FlowTurboAutoencoderEncoder(config))
    assert load_bundle(with_encoder).encoder is not None
    weights = with_encoder / ENCODER_WEIGHTS_FILE
    for damage, reason in (("delete", "no weights file encoder.safetensors"), ("garbage", "cannot read encoder")):
        weights.unlink(missing_ok=True)
        if damage == "garbage":
            weights.write_bytes(b"not a safetensors file")
        loaded = load_bundle(with_encoder)
        assert loaded.encoder is None
        _assert_same_outputs(original, loaded)  # the rest of the bundle is intact and loaded
        with pytest.raises(CheckpointError, match=reason):
            load_encoder(with_encoder)
        error = missing_encoder_error(with_encoder, "inpainting")
        assert isinstance(error, FlowTurboError) and str(error).startswith("inpainting needs the bundle's image encoder")
        assert reason in str(error) and ENCODER_WEIGHTS_FILE in str(error) and "no 'encoder' entry" not in str(error)
    (with_encoder / "refiner.safetensors").unlink()  # the other files: as strict as ever
    with pytest.raises(CheckpointError, match="refiner.safetensors"):
        load_bundle(with_encoder)


# ------------------------------------------------------------------------------ dt-conditioned refiners
def _dt_bundle(original, record):
    from flowturbo.training.models import RefinerConfig, VelocityRefiner, perturb_zero_initialized

    refiner = VelocityRefiner(RefinerConfig.for_predictor(original.predictor.config, dt_conditioning=True))
    refiner.initialize_weights(torch.Generator().manual_seed(3))
    perturb_zero_initialized(refiner, generator=torch.Generator().manual_seed(4))
    return Bundle(original.predictor, refiner.eval(), original.decoder, original.class_names, original.defaults,
                  refiner_dt=record)


def test_dt_refiner_and_its_trained_range_round_trip(tmp_path, saved):
    from flowturbo.refiner_dt import DtDistribution

    original, _ = saved
    record = DtDistribution(max_dt=0.5, small_share=0.3, small_max=0.1, zero_share=0.05)
    folder = save_bundle(_dt_bundle(original, record), tmp_path / "dt")
    config = json.loads((folder / "config.json").read_text())
    assert config["refiner"]["dt_conditioning"] is True
    assert config["refiner_dt"] == {"max_dt": 0.5, "small_share": 0.3, "small_max": 0.1, "zero_share": 0.05}
    loaded = load_bundle(folder)
    assert loaded.refiner_dt == record and loaded.refiner.takes_dt
    x, t, y, v = _inputs(loaded)
    dt = torch.full((3,), 0.2)
    with torch.no_grad():
        assert torch.equal(loaded.refiner(x, t, y, v, dt), _dt_bundle(original, record).refiner(x, t, y, v, dt))
    assert load_bundle(saved[1]).refiner_dt is None  # no record: absent from config.json, None when loaded


def test_dt_refiner_declared_without_dt_is_refused_naming_the_fix(tmp_path, saved):
    original, _ = saved
    folder = save_bundle(_dt_bundle(original, None), tmp_path / "dt")
    as_official = _edited_copy(folder, tmp_path / "as-official", lambda c: c["refiner"].update(dt_conditioning=False))
    with pytest.raises(CheckpointError, match='dt-conditioned .* "dt_conditioning": true'):
        load_bundle(as_official)
    official_as_dt = _edited_copy(saved[1], tmp_path / "as-dt", lambda c: c["refiner"].update(dt_conditioning=True))
    with pytest.raises(CheckpointError, match='no dt embedding .* "dt_conditioning": false'):
        load_bundle(official_as_dt)
    bad_record = _edited_copy(saved[1], tmp_path / "bad-record", lambda c: c.update(refiner_dt={"max_dt": 2.0}))
    with pytest.raises(CheckpointError, match=r"max_dt \(--max-dt\) must be in \(0, 1\]"):
        load_bundle(bad_record)
    with pytest.raises(FlowTurboError, match="has no refiner"):
        from flowturbo.refiner_dt import DtDistribution

        Bundle(original.predictor, None, original.decoder, defaults=BundleDefaults("H2"), refiner_dt=DtDistribution())
