"""Latent encoders: the default bundle's encoder (strict load, round-trip PSNR on real test images), the
diffusers AutoencoderKL encoder, bundles without an encoder, bad weights and bad inputs, the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from tolerances import tol

from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.training import fashion_mnist as fm
from flowturbo.training.autoencoder import AutoencoderConfig, Encoder, FlowTurboAutoencoderDecoder
from flowturbo.training.bundle import make_random_bundle
from flowturbo.training.decoders import SD_VAE_LATENT_SCALE, load_decoder_from_bundle
from flowturbo.training.encoders import (
    ENCODER_TYPES,
    ENCODER_WEIGHTS_FILE,
    DiffusersVAEEncoder,
    FlowTurboAutoencoderEncoder,
    LatentEncoder,
    add_encoder_to_bundle,
    load_encoder,
    load_encoder_from_bundle,
    missing_encoder_error,
)

DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "runtime" / "assets" / "default_model"
# Round trip decode(encode(x)) of the first 64 Fashion-MNIST test images through the default bundle's encoder
# and its default ("mse") decoder: mean per-image PSNR measured 24.80 dB with the committed weights (all 10k
# test images: 24.75 dB, model_card.json "encoder"); the bar sits a little below it.
DEFAULT_ROUND_TRIP_PSNR_DB = 24.0
NUM_ROUND_TRIP_IMAGES = 64

TINY_VAE = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)
# A tiny autoencoder matching make_random_bundle's 8x8x4 latents (32x32 images, f = 4).
TINY_AE = AutoencoderConfig(image_channels=1, image_size=32, latent_channels=4, base_channels=8,
                            channel_mult=(1, 2, 2), norm_groups=4, latent_scale=0.8)


def _images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random non-zero images in [-1, 1]."""
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 1.8 - 0.9


# ------------------------------------------------------------------------------------ default bundle
@pytest.fixture(scope="module")
def default_encoder() -> LatentEncoder:
    encoder = load_encoder(DEFAULT_BUNDLE)
    assert encoder is not None, "the default bundle must ship an encoder"
    return encoder


def test_default_encoder_loads_strictly(default_encoder):
    assert isinstance(default_encoder, FlowTurboAutoencoderEncoder)
    assert not default_encoder.training
    config = json.loads((DEFAULT_BUNDLE / "config.json").read_text())
    entry = config["encoder"]
    assert entry["type"] == "flowturbo_autoencoder" and entry["weights"] == ENCODER_WEIGHTS_FILE
    assert entry["autoencoder"] == config["decoder"]["autoencoder"]  # same architecture and latent scale
    stored = load_file(str(DEFAULT_BUNDLE / ENCODER_WEIGHTS_FILE))
    own = default_encoder.state_dict()
    assert set(stored) == set(own) and all(k.startswith("encoder.") for k in stored)
    for key, value in stored.items():
        assert torch.equal(own[key], value), key
    latent_channels = config["predictor"]["in_channels"]
    latent_size = config["predictor"]["input_size"]
    assert default_encoder.latent_channels == latent_channels
    assert default_encoder.latent_size(32) == latent_size


def test_default_round_trip_psnr(default_encoder):
    config = json.loads((DEFAULT_BUNDLE / "config.json").read_text())
    decoder = load_decoder_from_bundle(DEFAULT_BUNDLE, config["decoder"])
    assert decoder.variant == "mse"  # the variant the encoder was fitted to
    arrays = fm.load_fashion_mnist("test", limit=NUM_ROUND_TRIP_IMAGES)
    images = fm.to_model_range(arrays.images)  # (64, 1, 32, 32)
    latents = default_encoder.encode(images)
    assert latents.shape == (NUM_ROUND_TRIP_IMAGES, 4, 8, 8)
    with torch.no_grad():
        recon = decoder.decode(latents)
    mse = (recon.double() - images.double()).square().flatten(1).mean(1)
    psnr = 10 * torch.log10(4.0 / mse)  # images span [-1, 1]: peak-to-peak 2
    assert float(psnr.mean()) > DEFAULT_ROUND_TRIP_PSNR_DB
    # The latents live where the predictor's do: about unit scale (latent_scale normalised them to std 1).
    assert 0.5 < float(latents.std()) < 2.0


def test_encode_refuses_bad_images(default_encoder):
    with pytest.raises(FlowTurboError, match="1-channel"):
        default_encoder.encode(_images(2, 3, 32))
    with pytest.raises(FlowTurboError, match=r"127\.5"):
        default_encoder.encode(_images(2, 1, 32) * 127.5 + 127.5)
    with pytest.raises(FlowTurboError, match="divisible by 4"):
        default_encoder.encode(_images(2, 1, 30))
    with pytest.raises(FlowTurboError, match=r"\(N, 1, H, W\)"):
        default_encoder.encode(_images(2, 1, 32)[0])


# -------------------------------------------------------------------------------------- diffusers VAE
@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE).eval()
    folder = tmp_path_factory.mktemp("tiny-vae")
    vae.save_pretrained(str(folder))
    return vae, folder


def test_diffusers_encoder_matches_latent_dist_mean(vae_folder):
    vae, folder = vae_folder
    encoder = DiffusersVAEEncoder.from_folder(folder)
    images = _images(3, 3, 10, seed=1)
    with torch.no_grad():
        latents = encoder.encode(images)
        direct = vae.encode(images).latent_dist.mean * SD_VAE_LATENT_SCALE
    assert latents.shape == (3, 4, 5, 5)
    assert (encoder.latent_channels, encoder.image_channels, encoder.downsample_factor) == (4, 3, 2)
    torch.testing.assert_close(latents, direct, **tol(torch.float32))
    assert latents.std() > 0
    assert not any(k.startswith("decoder.") for k in encoder.state_dict())  # encoder half only


def test_diffusers_encoder_bundle_round_trip_and_bad_weights(vae_folder, tmp_path):
    _, folder = vae_folder
    encoder = DiffusersVAEEncoder.from_folder(folder)
    encoder.save_to_bundle(tmp_path)
    config = encoder.bundle_config()
    assert config["type"] == "diffusers-vae" and config["latent_scale"] == SD_VAE_LATENT_SCALE
    reloaded = load_encoder_from_bundle(tmp_path, config)
    images = _images(2, 3, 8, seed=2)
    assert torch.equal(reloaded.encode(images), encoder.encode(images))
    config["vae_config"] = {**config["vae_config"], "block_out_channels": [8, 32]}
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_encoder_from_bundle(tmp_path, config)


# ------------------------------------------------------------------------------------------- bundles
@pytest.fixture
def random_bundle(tmp_path) -> Path:
    torch.manual_seed(0)
    decoder = FlowTurboAutoencoderDecoder(TINY_AE, variants=("ema",), variant="ema")
    folder = tmp_path / "bundle"
    make_random_bundle(folder, preset="SiT-T/2", input_size=8, in_channels=4, num_classes=10, seed=1,
                       decoder=decoder)
    return folder


def test_bundle_without_encoder_gives_none(random_bundle):
    assert "encoder" not in json.loads((random_bundle / "config.json").read_text())
    assert load_encoder(random_bundle) is None
    error = missing_encoder_error(random_bundle, "inpainting")
    assert isinstance(error, FlowTurboError) and "inpainting" in str(error) and "no 'encoder' entry" in str(error)


def test_add_encoder_to_bundle_keeps_config(random_bundle):
    before = json.loads((random_bundle / "config.json").read_text())
    torch.manual_seed(3)
    encoder = FlowTurboAutoencoderEncoder(TINY_AE).eval()
    add_encoder_to_bundle(random_bundle, encoder)
    after = json.loads((random_bundle / "config.json").read_text())
    assert {k: v for k, v in after.items() if k != "encoder"} == before
    assert list(after)[: len(before)] == list(before)  # existing entries keep their order
    loaded = load_encoder(random_bundle)
    images = _images(2, 1, 32, seed=4)
    torch.testing.assert_close(loaded.encode(images), encoder.encode(images), **tol(torch.float32))
    # encode = posterior mean of the Encoder times the latent scale
    raw = Encoder(TINY_AE)
    raw.load_state_dict(encoder.encoder.state_dict())
    with torch.no_grad():
        expected = raw(images)[:, :4] * TINY_AE.latent_scale
    torch.testing.assert_close(loaded.encode(images), expected, **tol(torch.float32))


def test_wrong_weights_give_clear_errors(random_bundle):
    torch.manual_seed(3)
    add_encoder_to_bundle(random_bundle, FlowTurboAutoencoderEncoder(TINY_AE))
    config_path = random_bundle / "config.json"
    config = json.loads(config_path.read_text())

    # Weights of another width: strict loading names the mismatched keys and both shapes.
    wide = FlowTurboAutoencoderEncoder(AutoencoderConfig(**{**TINY_AE.to_dict(), "base_channels": 16}))
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(random_bundle / ENCODER_WEIGHTS_FILE))
    mismatch = r"shape mismatches: .*encoder\.conv_in\.weight: checkpoint \(16, 1, 3, 3\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_encoder(random_bundle)

    # Keys of a whole autoencoder (unexpected decoder keys) are refused too.
    state = {k: v.contiguous() for k, v in FlowTurboAutoencoderEncoder(TINY_AE).state_dict().items()}
    state["decoder.conv_in.weight"] = torch.ones(3)
    save_file(state, str(random_bundle / ENCODER_WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_encoder(random_bundle)

    (random_bundle / ENCODER_WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="no weights file encoder.safetensors"):
        load_encoder(random_bundle)

    # A latent scale other than the decoder's: the latents would not be the predictor's.
    config["encoder"]["autoencoder"]["latent_scale"] = 1.0
    config_path.write_text(json.dumps(config))
    FlowTurboAutoencoderEncoder(TINY_AE).save_to_bundle(random_bundle)
    with pytest.raises(CheckpointError, match="latent_scale"):
        load_encoder(random_bundle)

    config["encoder"] = {"type": "no-such-encoder"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown encoder type"):
        load_encoder(random_bundle)


def test_registry():
    assert ENCODER_TYPES["flowturbo_autoencoder"] is FlowTurboAutoencoderEncoder
    assert ENCODER_TYPES["diffusers-vae"] is DiffusersVAEEncoder
    with pytest.raises(TypeError):
        LatentEncoder()  # type: ignore[abstract]


# ------------------------------------------------------------------------------------------- trainer
def test_train_encoder_smoke(tmp_path):
    from flowturbo.training.trainers.common import LoopConfig
    from flowturbo.training.trainers.data import ImageDataConfig
    from flowturbo.training.trainers.encoder import EncoderTrainConfig, PairConfig, train_encoder, trained_encoder

    config = EncoderTrainConfig(
        bundle=str(DEFAULT_BUNDLE),
        data=ImageDataConfig(limit=16),
        pairs=PairConfig(num=8, schedule="H1P1R1", batch_size=8),
        loop=LoopConfig(steps=2, batch_size=4, lr=1e-3, ema_decay=0.5, progress=False, ckpt_every=2, seed=0),
        pair_batch_size=4,
    )
    out = tmp_path / "run"
    train_encoder(config, out, log=lambda _m: None)
    encoder = trained_encoder(out)
    summary = json.loads((out / "encoder.config.json").read_text())
    assert summary["steps"] == 2 and summary["num_pairs"] == 8
    assert encoder.bundle_config()["source"]["decoder_variant"] == "mse"
    assert torch.isfinite(encoder.encode(_images(2, 1, 32))).all()
