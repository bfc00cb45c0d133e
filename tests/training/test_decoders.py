"""Latent decoders: identity, a tiny diffusers AutoencoderKL folder, the registry."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from diffusers import AutoencoderKL
from tolerances import tol

import flowturbo.training.decoders as decoders
from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.training.decoders import (
    DECODER_TYPES,
    SD_VAE_LATENT_SCALE,
    DiffusersVAEDecoder,
    IdentityDecoder,
    LatentDecoder,
    decoder_class,
    load_decoder_from_bundle,
    register_decoder,
)

TINY_VAE = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE).eval()
    folder = tmp_path_factory.mktemp("tiny-vae")
    vae.save_pretrained(str(folder))
    return vae, folder


def _latents(n=2, size=5):
    return torch.randn(n, 4, size, size, generator=torch.Generator().manual_seed(0))


def test_latent_scale_constant():
    assert SD_VAE_LATENT_SCALE == 0.18215


def test_diffusers_decoder_matches_direct_decode(vae_folder):
    vae, folder = vae_folder
    decoder = DiffusersVAEDecoder.from_folder(folder)
    z = _latents() * 3.0  # some pixels saturate, so the clamp is exercised
    with torch.no_grad():
        images = decoder.decode(z)
        direct = vae.decode(z / SD_VAE_LATENT_SCALE).sample.clamp(-1, 1)
    assert images.shape == (2, 3, 10, 10)
    assert (decoder.latent_channels, decoder.image_channels, decoder.downsample_factor) == (4, 3, 2)
    assert decoder.image_size(5) == 10
    torch.testing.assert_close(images, direct, **tol(torch.float32))
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0
    assert not any(k.startswith("encoder.") for k in decoder.state_dict())  # decoder half only


def test_diffusers_decoder_bundle_round_trip(vae_folder, tmp_path):
    _, folder = vae_folder
    decoder = DiffusersVAEDecoder.from_folder(folder)
    decoder.save_to_bundle(tmp_path)
    config = decoder.bundle_config()
    assert config["type"] == "diffusers-vae" and config["latent_scale"] == SD_VAE_LATENT_SCALE
    reloaded = load_decoder_from_bundle(tmp_path, config)
    assert isinstance(reloaded, DiffusersVAEDecoder)
    z = _latents()
    with torch.no_grad():
        assert torch.equal(reloaded.decode(z), decoder.decode(z))


def test_diffusers_bundle_with_wrong_weights_is_refused(vae_folder, tmp_path):
    _, folder = vae_folder
    decoder = DiffusersVAEDecoder.from_folder(folder)
    decoder.save_to_bundle(tmp_path)
    config = decoder.bundle_config()
    config["vae_config"] = {**config["vae_config"], "block_out_channels": [8, 32]}
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_decoder_from_bundle(tmp_path, config)


def test_missing_config_json_refused(vae_folder, tmp_path):
    _, folder = vae_folder
    weights = "diffusion_pytorch_model.safetensors"
    (tmp_path / weights).write_bytes((folder / weights).read_bytes())
    with pytest.raises(CheckpointError, match="no config.json"):
        DiffusersVAEDecoder.from_folder(tmp_path)


def test_missing_weights_and_folder_refused(vae_folder, tmp_path):
    _, folder = vae_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        DiffusersVAEDecoder.from_folder(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        DiffusersVAEDecoder.from_folder(tmp_path / "absent")


def test_identity_decoder():
    decoder = IdentityDecoder(3)
    x = torch.randn(2, 3, 7, 5, generator=torch.Generator().manual_seed(1)) * 2
    out = decoder(x)
    torch.testing.assert_close(out, x.clamp(-1, 1), **tol(torch.float32))
    assert (decoder.downsample_factor, decoder.image_channels) == (1, 3)
    config = decoder.bundle_config()
    assert config == {"type": "identity", "channels": 3}
    assert load_decoder_from_bundle("unused", config).latent_channels == 3
    with pytest.raises(FlowTurboError, match=r"\(N, 3, h, w\)"):
        decoder(torch.ones(2, 4, 3, 3))
    with pytest.raises(FlowTurboError, match="positive integer"):
        IdentityDecoder(0)


def test_registry(monkeypatch):
    assert DECODER_TYPES["identity"] is IdentityDecoder
    assert DECODER_TYPES["diffusers-vae"] is DiffusersVAEDecoder
    monkeypatch.setattr(decoders, "DECODER_TYPES", dict(DECODER_TYPES))

    @register_decoder
    class Doubler(LatentDecoder):
        decoder_type: ClassVar[str] = "test-doubler"

        def __init__(self) -> None:
            super().__init__()
            self.latent_channels, self.image_channels, self.downsample_factor = 1, 1, 2

        def decode(self, latents: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.interpolate(latents, scale_factor=2).clamp(-1, 1)

        def bundle_config(self) -> dict[str, Any]:
            return {"type": self.decoder_type}

        def save_to_bundle(self, folder) -> None:
            return None

        @classmethod
        def from_bundle(cls, folder, config, device="cpu", dtype=torch.float32):
            return cls()

    assert decoder_class("test-doubler") is Doubler
    assert isinstance(load_decoder_from_bundle("x", {"type": "test-doubler"}), Doubler)
    with pytest.raises(CheckpointError, match="identity"):
        decoder_class("no-such-decoder")
    with pytest.raises(FlowTurboError, match="decoder_type"):
        register_decoder(type("Nameless", (IdentityDecoder,), {"decoder_type": ""}))
    with pytest.raises(FlowTurboError, match="already registered"):
        register_decoder(type("Impostor", (IdentityDecoder,), {"decoder_type": "identity"}))


def test_abstract_base_cannot_be_instantiated():
    with pytest.raises(TypeError):
        LatentDecoder()  # type: ignore[abstract]


TINY_TAESD = dict(
    encoder_block_out_channels=(8, 8),
    decoder_block_out_channels=(8, 8),
    num_encoder_blocks=(1, 1),
    num_decoder_blocks=(1, 1),
    latent_channels=4,
)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from diffusers import AutoencoderTiny

    torch.manual_seed(1)
    vae = AutoencoderTiny(**TINY_TAESD).eval()
    folder = tmp_path_factory.mktemp("tiny-taesd")
    vae.save_pretrained(str(folder))
    return vae, folder


def test_autoencoder_tiny_folder_is_a_decoder_too(tiny_folder, tmp_path):
    """`--vae` accepts a diffusers AutoencoderTiny (TAESD) folder: same scaled latents, its own decoder."""
    vae, folder = tiny_folder
    decoder = decoders.load_vae_decoder(folder)
    assert isinstance(decoder, decoders.DiffusersTinyDecoder) and decoder.decoder_type == "diffusers-tiny"
    z = _latents(size=4) * 2.0
    with torch.no_grad():
        images = decoder.decode(z)
        direct = vae.decode(z).sample.clamp(-1, 1)  # TAESD's scaling_factor is 1: scaled SD latents go in as is
    assert images.shape == direct.shape and images.shape[1] == 3
    torch.testing.assert_close(images, direct, **tol(torch.float32))
    assert images.std() > 0
    decoder.save_to_bundle(tmp_path)  # and it round-trips through a bundle
    again = load_decoder_from_bundle(tmp_path, decoder.bundle_config())
    with torch.no_grad():
        torch.testing.assert_close(again.decode(z), images, **tol(torch.float32))


def test_load_vae_decoder_picks_autoencoder_kl_by_default(vae_folder):
    _, folder = vae_folder
    assert isinstance(decoders.load_vae_decoder(folder), DiffusersVAEDecoder)


@pytest.mark.parametrize("kind", ["kl", "tiny"])
def test_channels_last_decoder_gives_the_same_images(kind, vae_folder, tiny_folder):
    """The fast path makes the diffusers decoders channels-last on CUDA (``to_fast_layout``, called by every
    TorchPipeline); on the CPU it leaves them alone. Images must not change."""
    from flowturbo.runtime.pytorch_backend import TorchPipeline
    from flowturbo.training.bundle import BundleDefaults

    folder = (vae_folder if kind == "kl" else tiny_folder)[1]
    decoder = decoders.load_vae_decoder(folder)
    z = _latents(size=4) * 2.0
    with torch.no_grad():
        plain = decoder.decode(z)

    def first_conv_is_channels_last() -> bool:
        weight = next(p for p in decoder.parameters() if p.dim() == 4 and p.shape[-1] > 1)
        return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()

    def pipeline_on(device: str) -> TorchPipeline:  # the modules stay on the CPU: only the layout decision runs
        return TorchPipeline(torch.nn.Identity(), None, decoder, 10, (4, 4, 4), None, BundleDefaults(), "test",
                             torch.device(device), torch.float32)

    pipeline_on("cpu")
    assert not first_conv_is_channels_last()
    pipeline_on("cuda")
    assert first_conv_is_channels_last()
    with torch.no_grad():
        fast = decoder.decode(z)
    torch.testing.assert_close(fast, plain, **tol(torch.float32))
