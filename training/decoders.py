"""Latent decoders: turn predictor latents into images in [-1, 1].

Every decoder is a :class:`LatentDecoder` with a ``decoder_type`` string registered in
:data:`DECODER_TYPES`, so a bundle's ``config.json`` (``"decoder": {"type": ..., ...}``) names the class
that reads its files back. Built in: ``"identity"`` (pixel-space models) and ``"diffusers-vae"``
(the decoder half of a diffusers ``AutoencoderKL`` such as sd-vae-ft-ema / sd-vae-ft-mse). Other decoders
(e.g. our own small autoencoder) register themselves with :func:`register_decoder`.
"""

from __future__ import annotations

import abc
import importlib
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.training.checkpoints import strict_load

SD_VAE_LATENT_SCALE = 0.18215
"""Latents of SD-VAE-based generators (SiT, DiT, FlowTurbo) are ``vae_latent * 0.18215``."""

DECODER_WEIGHTS_FILE = "decoder.safetensors"  # weights file of a decoder inside a bundle
DIFFUSERS_CONFIG_FILE = "config.json"
DIFFUSERS_WEIGHTS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
IMAGE_RANGE = (-1.0, 1.0)  # decoders return images clamped to this range

DECODER_TYPES: dict[str, type["LatentDecoder"]] = {}
"""``decoder_type`` -> class; filled by :func:`register_decoder`."""


def register_decoder(cls: type["LatentDecoder"]) -> type["LatentDecoder"]:
    """Class decorator: make ``cls`` loadable from bundles under ``cls.decoder_type``."""
    name = getattr(cls, "decoder_type", None)
    if not isinstance(name, str) or not name:
        raise FlowTurboError(f"{cls.__name__} needs a non-empty string class attribute decoder_type")
    existing = DECODER_TYPES.get(name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise FlowTurboError(f"decoder type {name!r} is already registered by {existing.__qualname__}")
    DECODER_TYPES[name] = cls
    return cls


# Decoder types that live in their own module (imported lazily: they import this module to register).
BUILTIN_DECODER_MODULES = {"flowturbo_autoencoder": "flowturbo.training.autoencoder"}


def decoder_class(decoder_type: str) -> type["LatentDecoder"]:
    """The registered class for ``decoder_type`` (CheckpointError listing the known types otherwise).

    Built-in decoders defined in other modules are imported on first use so they can register themselves.
    """
    if decoder_type not in DECODER_TYPES and decoder_type in BUILTIN_DECODER_MODULES:
        importlib.import_module(BUILTIN_DECODER_MODULES[decoder_type])
    cls = DECODER_TYPES.get(decoder_type)
    if cls is None:
        raise CheckpointError(
            f"unknown decoder type {decoder_type!r}; known types: {sorted(DECODER_TYPES)} "
            "(a custom decoder must be imported so that it registers itself)"
        )
    return cls


class LatentDecoder(nn.Module, abc.ABC):
    """Latents (N, latent_channels, h, w) -> images (N, image_channels, h*f, w*f) in [-1, 1].

    Subclasses set the class attribute ``decoder_type`` and the instance attributes ``latent_channels``,
    ``downsample_factor`` (f) and ``image_channels``, and implement :meth:`decode`, :meth:`bundle_config`
    (must include ``"type"``), :meth:`save_to_bundle` and :meth:`from_bundle`.
    """

    decoder_type: ClassVar[str] = ""
    # True for conv decoders that take their latents in the weights' memory format (the diffusers VAEs): the
    # fast path runs them channels-last on CUDA (:meth:`to_fast_layout`).
    channels_last_on_cuda: ClassVar[bool] = False
    latent_channels: int
    downsample_factor: int
    image_channels: int

    def to_fast_layout(self, device: torch.device) -> "LatentDecoder":
        """Channels-last weights on CUDA for decoders that declare ``channels_last_on_cuda`` (in place; returns
        self). The images are the same; cuDNN's NHWC convolutions are faster for bf16/fp16 on tensor cores."""
        if device.type == "cuda" and self.channels_last_on_cuda:
            self.to(memory_format=torch.channels_last)
        return self

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) latents -> (N, image_channels, h*f, w*f) images in [-1, 1]."""

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode(latents)

    def image_size(self, latent_size: int) -> int:
        """Image side length for a latent side length."""
        return latent_size * self.downsample_factor

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise FlowTurboError(
                f"{type(self).__name__} decodes (N, {self.latent_channels}, h, w) latents, got {tuple(latents.shape)}"
            )

    @abc.abstractmethod
    def bundle_config(self) -> dict[str, Any]:
        """JSON-serialisable description stored as ``config.json["decoder"]``; includes ``"type"``."""

    @abc.abstractmethod
    def save_to_bundle(self, folder: str | os.PathLike[str]) -> None:
        """Write this decoder's files (if any) into the bundle folder ``folder``."""

    @classmethod
    @abc.abstractmethod
    def from_bundle(
        cls,
        folder: str | os.PathLike[str],
        config: dict[str, Any],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "LatentDecoder":
        """Rebuild the decoder from ``bundle_config()`` output and the files in ``folder``."""


def load_decoder_from_bundle(
    folder: str | os.PathLike[str],
    config: dict[str, Any],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LatentDecoder:
    """Dispatch on ``config["type"]`` to the registered decoder class."""
    if not isinstance(config, dict) or not isinstance(config.get("type"), str):
        raise CheckpointError(f"bundle decoder config must be a dict with a 'type' string, got {config!r}")
    return decoder_class(config["type"]).from_bundle(folder, config, device, dtype)


@register_decoder
class IdentityDecoder(LatentDecoder):
    """Pixel-space models: the "latents" are the image; decode only clamps to [-1, 1]."""

    decoder_type: ClassVar[str] = "identity"

    def __init__(self, channels: int) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise FlowTurboError(f"IdentityDecoder channels must be a positive integer, got {channels!r}")
        self.latent_channels = channels
        self.image_channels = channels
        self.downsample_factor = 1

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_latents(latents)
        return latents.clamp(*IMAGE_RANGE)

    def bundle_config(self) -> dict[str, Any]:
        return {"type": self.decoder_type, "channels": self.latent_channels}

    def save_to_bundle(self, folder: str | os.PathLike[str]) -> None:
        """Nothing to write: the identity has no weights."""
        return None

    @classmethod
    def from_bundle(
        cls,
        folder: str | os.PathLike[str],
        config: dict[str, Any],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "IdentityDecoder":
        if "channels" not in config:
            raise CheckpointError(f"identity decoder config in {folder} lacks 'channels': {config!r}")
        return cls(int(config["channels"]))


def _import_autoencoder_kl() -> type:
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:
        raise FlowTurboError(
            "decoding with a diffusers VAE needs the 'diffusers' package: pip install 'flowturbo[vae]'"
        ) from exc
    return AutoencoderKL


def _like_weights(latents: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Latents in the first conv's dtype and memory format (channels-last decoders take channels-last input)."""
    channels_last = weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last) and \
        not weight.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return latents.to(dtype=weight.dtype, memory_format=fmt)


def _json_safe(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return value


@register_decoder
class DiffusersVAEDecoder(LatentDecoder):
    """The decoder half (``post_quant_conv`` + ``decoder``) of a diffusers ``AutoencoderKL``.

    ``decode(z) == vae.decode(z / latent_scale + latent_shift).sample.clamp(-1, 1)``; the encoder is not kept in
    memory. ``latent_shift`` is the VAE's ``shift_factor`` (0 for the SD-VAE; SD3 / FLUX VAEs have one).
    """

    decoder_type: ClassVar[str] = "diffusers-vae"
    channels_last_on_cuda: ClassVar[bool] = True

    def __init__(
        self,
        vae_config: dict[str, Any],
        decoder: nn.Module,
        post_quant_conv: nn.Module | None,
        latent_scale: float = SD_VAE_LATENT_SCALE,
        latent_shift: float = 0.0,
    ) -> None:
        super().__init__()
        self.vae_config = _json_safe({k: v for k, v in dict(vae_config).items() if not k.startswith("_")})
        self.decoder = decoder
        self.post_quant_conv = post_quant_conv
        self.latent_scale = float(latent_scale)
        self.latent_shift = float(latent_shift)
        self.latent_channels = int(self.vae_config["latent_channels"])
        self.image_channels = int(self.vae_config["out_channels"])
        self.downsample_factor = 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @classmethod
    def _from_vae(cls, vae: nn.Module, latent_scale: float, latent_shift: float = 0.0) -> "DiffusersVAEDecoder":
        return cls(dict(vae.config), vae.decoder, vae.post_quant_conv, latent_scale, latent_shift)

    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike[str],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        latent_scale: float = SD_VAE_LATENT_SCALE,
    ) -> "DiffusersVAEDecoder":
        """Load a diffusers ``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``
        or ``.bin``) offline and keep its decoder half."""
        vae = load_diffusers_folder(path, "AutoencoderKL", dtype)
        return cls._from_vae(vae, latent_scale).to(device=device, dtype=dtype).eval()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_latents(latents)
        z = _like_weights(latents, self.decoder.conv_in.weight) / self.latent_scale  # (N, C, h, w)
        if self.latent_shift:
            z = z + self.latent_shift
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).clamp(*IMAGE_RANGE)  # (N, 3, h*f, w*f)

    def bundle_config(self) -> dict[str, Any]:
        config = {
            "type": self.decoder_type,
            "latent_scale": self.latent_scale,
            "vae_config": self.vae_config,
            "weights": DECODER_WEIGHTS_FILE,
        }
        if self.latent_shift:
            config["latent_shift"] = self.latent_shift
        return config

    def save_to_bundle(self, folder: str | os.PathLike[str]) -> None:
        """Write ``decoder.safetensors`` (keys ``decoder.*`` and ``post_quant_conv.*``)."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(Path(folder) / DECODER_WEIGHTS_FILE))

    @classmethod
    def from_bundle(
        cls,
        folder: str | os.PathLike[str],
        config: dict[str, Any],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "DiffusersVAEDecoder":
        from safetensors.torch import load_file

        if not isinstance(config.get("vae_config"), dict):
            raise CheckpointError(f"diffusers-vae decoder config in {folder} lacks 'vae_config'")
        weights = Path(folder) / config.get("weights", DECODER_WEIGHTS_FILE)
        if not weights.is_file():
            raise CheckpointError(f"bundle {folder} has no decoder weights file {weights.name}")
        autoencoder_kl = _import_autoencoder_kl()
        with torch.device("meta"):
            vae = autoencoder_kl.from_config(config["vae_config"])
        module = cls._from_vae(vae, config.get("latent_scale", SD_VAE_LATENT_SCALE), config.get("latent_shift", 0.0))
        del vae  # the meta encoder goes with it
        module = module.to(dtype=dtype).to_empty(device=device)
        strict_load(module, load_file(str(weights), device="cpu"), f"diffusers VAE decoder from {weights}")
        return module.eval()


def _import_autoencoder_tiny() -> type:
    try:
        from diffusers import AutoencoderTiny
    except ImportError as exc:
        raise FlowTurboError(
            "decoding with a diffusers tiny autoencoder needs the 'diffusers' package: pip install 'flowturbo[vae]'"
        ) from exc
    return AutoencoderTiny


def load_diffusers_folder(path: str | os.PathLike[str], kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A diffusers ``AutoencoderKL`` / ``AutoencoderTiny`` folder (``config.json`` + weights), loaded offline.

    The one loader behind every ``from_folder`` (the KL decoder and encoder, the tiny decoder): the folder is
    checked first so that a wrong path names what is missing instead of failing inside diffusers.
    """
    importer, example = _DIFFUSERS_KINDS[kind]
    folder = Path(path)
    weights = " or ".join(DIFFUSERS_WEIGHTS_FILES)
    if not folder.is_dir():
        raise CheckpointError(
            f"VAE folder not found: {folder} (expected a diffusers {kind} folder{example}, holding "
            f"{DIFFUSERS_CONFIG_FILE} and {weights})"
        )
    if not (folder / DIFFUSERS_CONFIG_FILE).is_file():
        raise CheckpointError(
            f"VAE folder {folder} has no {DIFFUSERS_CONFIG_FILE}; expected a diffusers {kind} folder "
            f"({DIFFUSERS_CONFIG_FILE} + {weights})"
        )
    if not any((folder / name).is_file() for name in DIFFUSERS_WEIGHTS_FILES):
        raise CheckpointError(f"VAE folder {folder} has no weights: expected {weights} next to {DIFFUSERS_CONFIG_FILE}")
    model_class = importer()
    try:
        return model_class.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"could not load the diffusers {kind} in {folder}: {exc}") from exc


# diffusers class name -> (importer, example folder named in the not-found error)
_DIFFUSERS_KINDS = {"AutoencoderKL": (_import_autoencoder_kl, " such as sd-vae-ft-ema"),
                    "AutoencoderTiny": (_import_autoencoder_tiny, "")}


@register_decoder
class DiffusersTinyDecoder(LatentDecoder):
    """The decoder of a diffusers ``AutoencoderTiny`` (TAESD-style): a few convolutions instead of the SD-VAE.

    It decodes the same *scaled* SD latents generators produce (``vae_latent * 0.18215``; TAESD's
    ``scaling_factor`` is 1.0): ``decode(z) == tiny.decode(z / scaling_factor).sample.clamp(-1, 1)``.
    Roughly 100x cheaper than the SD-VAE decoder at a visible quality cost (blurrier fine detail, slightly
    worse FID: see README); the weights are ``madebyollin/taesd`` on the Hugging Face Hub.
    """

    decoder_type: ClassVar[str] = "diffusers-tiny"
    channels_last_on_cuda: ClassVar[bool] = True

    def __init__(self, vae_config: dict[str, Any], decoder: nn.Module) -> None:
        super().__init__()
        self.vae_config = _json_safe({k: v for k, v in dict(vae_config).items() if not k.startswith("_")})
        self.decoder = decoder
        self.latent_scale = float(self.vae_config.get("scaling_factor", 1.0))
        self.latent_channels = int(self.vae_config["latent_channels"])
        self.image_channels = int(self.vae_config["out_channels"])
        upsample = int(self.vae_config.get("upsampling_scaling_factor", 2))
        self.downsample_factor = upsample ** (len(self.vae_config["decoder_block_out_channels"]) - 1)

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str], device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> "DiffusersTinyDecoder":
        """Load a diffusers ``AutoencoderTiny`` folder offline and keep its decoder."""
        vae = load_diffusers_folder(path, "AutoencoderTiny", dtype)
        return cls(dict(vae.config), vae.decoder).to(device=device, dtype=dtype).eval()

    def _first_weight(self) -> torch.Tensor:
        return next(p for p in self.decoder.parameters() if p.dim() == 4)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_latents(latents)
        z = _like_weights(latents, self._first_weight()) / self.latent_scale  # (N, C, h, w)
        return self.decoder(z).clamp(*IMAGE_RANGE)  # (N, 3, h*f, w*f)

    def bundle_config(self) -> dict[str, Any]:
        return {"type": self.decoder_type, "vae_config": self.vae_config, "weights": DECODER_WEIGHTS_FILE}

    def save_to_bundle(self, folder: str | os.PathLike[str]) -> None:
        """Write ``decoder.safetensors`` (keys ``decoder.*``)."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(Path(folder) / DECODER_WEIGHTS_FILE))

    @classmethod
    def from_bundle(cls, folder: str | os.PathLike[str], config: dict[str, Any],
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "DiffusersTinyDecoder":
        from safetensors.torch import load_file

        if not isinstance(config.get("vae_config"), dict):
            raise CheckpointError(f"diffusers-tiny decoder config in {folder} lacks 'vae_config'")
        weights = Path(folder) / config.get("weights", DECODER_WEIGHTS_FILE)
        if not weights.is_file():
            raise CheckpointError(f"bundle {folder} has no decoder weights file {weights.name}")
        autoencoder_tiny = _import_autoencoder_tiny()
        with torch.device("meta"):
            vae = autoencoder_tiny.from_config(config["vae_config"])
        module = cls(config["vae_config"], vae.decoder).to(dtype=dtype).to_empty(device=device)
        strict_load(module, load_file(str(weights), device="cpu"), f"diffusers tiny decoder from {weights}")
        return module.eval()


def load_vae_decoder(path: str | os.PathLike[str], device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> LatentDecoder:
    """A diffusers VAE folder as a decoder: ``AutoencoderTiny`` (by its config's ``_class_name``) or
    ``AutoencoderKL`` (sd-vae-ft-ema / -mse, the default)."""
    folder = Path(path)
    config_file = folder / DIFFUSERS_CONFIG_FILE
    class_name = None
    if config_file.is_file():
        import json

        try:
            class_name = json.loads(config_file.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"cannot read {config_file}: {exc}") from None
    if class_name == "AutoencoderTiny":
        return DiffusersTinyDecoder.from_folder(folder, device=device, dtype=dtype)
    return DiffusersVAEDecoder.from_folder(folder, device=device, dtype=dtype)


__all__ = [
    "DECODER_TYPES",
    "DiffusersTinyDecoder",
    "DiffusersVAEDecoder",
    "IdentityDecoder",
    "LatentDecoder",
    "SD_VAE_LATENT_SCALE",
    "decoder_class",
    "load_decoder_from_bundle",
    "load_vae_decoder",
    "register_decoder",
]
