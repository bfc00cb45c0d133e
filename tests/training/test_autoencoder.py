"""Our small KL autoencoder and its bundle decoder with "ema" / "mse" variants."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tolerances import tol

from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.training.autoencoder import (
    AutoencoderConfig,
    FlowTurboAutoencoder,
    FlowTurboAutoencoderDecoder,
    autoencoder_config,
    compute_latent_scale,
    kl_divergence,
)
from flowturbo.training.decoders import DECODER_TYPES, load_decoder_from_bundle

TINY = dict(image_channels=1, image_size=12, latent_channels=3, base_channels=8, channel_mult=(1, 2, 2),
            norm_groups=4)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_default_config_maps_32px_images_to_4x8x8_latents() -> None:
    torch.manual_seed(0)
    cfg = AutoencoderConfig()
    assert cfg.downsample_factor == 4 and cfg.latent_size == 8
    model = FlowTurboAutoencoder(cfg)
    images = torch.rand(3, 1, 32, 32) * 2 - 1
    recon, mean, logvar = model(images)
    assert recon.shape == (3, 1, 32, 32) and mean.shape == (3, 4, 8, 8) and logvar.shape == (3, 4, 8, 8)
    assert autoencoder_config("tiny").downsample_factor == 2


def test_config_validation_and_roundtrip() -> None:
    cfg = AutoencoderConfig(**TINY, latent_scale=0.7)
    assert AutoencoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(FlowTurboError, match="norm_groups"):
        AutoencoderConfig(base_channels=10, norm_groups=4)
    with pytest.raises(FlowTurboError, match="divisible"):
        AutoencoderConfig(image_size=30)
    with pytest.raises(CheckpointError, match="unknown autoencoder config keys"):
        AutoencoderConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_kl_divergence_matches_closed_form() -> None:
    g = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    dist = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    expected = torch.distributions.kl_divergence(dist, torch.distributions.Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(kl_divergence(mean, logvar), expected, **tol(torch.float32))


def test_latent_scale_normalises_latents_and_roundtrips_through_decode() -> None:
    torch.manual_seed(0)
    model = FlowTurboAutoencoder(AutoencoderConfig(**TINY))
    _randomize(model, 2)
    images = torch.rand(7, 1, 12, 12) * 2 - 1
    scale = compute_latent_scale(model, images, batch_size=3)
    model.with_latent_scale(scale)
    latents = model.encode_latents(images)
    assert latents.shape == (7, 3, 3, 3)
    torch.testing.assert_close(latents.std(unbiased=False), torch.tensor(1.0), **tol(torch.float32))
    expected = model.decoder(model.moments(images)[0]).clamp(-1, 1)
    torch.testing.assert_close(model.decode_latents(latents), expected, **tol(torch.float32))


def test_bundle_decoder_variants_save_load_and_switch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = AutoencoderConfig(**TINY, latent_scale=1.7)
    decoder = FlowTurboAutoencoderDecoder(cfg)
    _randomize(decoder.variants["ema"], 3)
    _randomize(decoder.variants["mse"], 4)
    assert DECODER_TYPES["flowturbo_autoencoder"] is FlowTurboAutoencoderDecoder
    latents = torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(5))
    out_ema = decoder.decode(latents)
    out_mse = decoder.set_variant("mse").decode(latents)
    assert out_ema.shape == (2, 1, 12, 12) and not torch.allclose(out_ema, out_mse)
    assert out_ema.abs().max() <= 1.0
    # "ema" is exactly the raw decoder on unscaled latents.
    torch.testing.assert_close(out_ema, decoder.variants["ema"](latents / 1.7).clamp(-1, 1), **tol(torch.float32))

    decoder.set_variant("ema")
    decoder.save_to_bundle(tmp_path)
    config = decoder.bundle_config()
    assert config["variants"] == ["ema", "mse"] and config["autoencoder"]["latent_scale"] == 1.7
    loaded = load_decoder_from_bundle(tmp_path, config)
    torch.testing.assert_close(loaded.decode(latents), out_ema, **tol(torch.float32))
    loaded_mse = load_decoder_from_bundle(tmp_path, {**config, "variant": "mse"})  # chosen at sampling time
    torch.testing.assert_close(loaded_mse.decode(latents), out_mse, **tol(torch.float32))
    torch.testing.assert_close(loaded.select_variant("mse").decode(latents), out_mse, **tol(torch.float32))
    with pytest.raises(FlowTurboError, match="variant"):
        loaded.set_variant("sharp")


def test_decoder_with_only_the_ema_variant(tmp_path: Path) -> None:
    cfg = AutoencoderConfig(**TINY)
    decoder = FlowTurboAutoencoderDecoder(cfg, variants=("ema",))
    with pytest.raises(FlowTurboError, match=r"holds \['ema'\]"):
        decoder.set_variant("mse")
    decoder.save_to_bundle(tmp_path)
    loaded = FlowTurboAutoencoderDecoder.from_bundle(tmp_path, decoder.bundle_config())
    assert loaded.available_variants == ("ema",)
    bad = dataclasses.replace(cfg, latent_channels=5)
    with pytest.raises(CheckpointError):
        FlowTurboAutoencoderDecoder.from_bundle(tmp_path, {**decoder.bundle_config(), "autoencoder": bad.to_dict()})
