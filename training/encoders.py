"""Latent encoders: turn images in [-1, 1] into the *scaled* latents a bundle's predictor was trained on.

The mirror of :mod:`flowturbo.training.decoders`. Inpainting and editing start from a user's image, so a
bundle needs the inverse of its decoder: ``encode(images (N, C_img, H, W)) -> latents (N, C, H/f, W/f)`` in
exactly the space the predictor saw during training (the posterior *mean* times the latent scale; never a
posterior sample, so encoding is deterministic).

Every encoder is a :class:`LatentEncoder` with an ``encoder_type`` registered in :data:`ENCODER_TYPES`, so the
``"encoder"`` entry of a bundle's ``config.json`` names the class that reads its files back. Built in:

* ``"flowturbo_autoencoder"`` (:class:`FlowTurboAutoencoderEncoder`): the encoder half of our own KL
  autoencoder (:class:`flowturbo.training.autoencoder.Encoder`). ``config.json``::

      "encoder": {"type": "flowturbo_autoencoder",
                  "autoencoder": {AutoencoderConfig, latent_scale included: the decoder's},
                  "weights": "encoder.safetensors",
                  "source": {...}}            # optional, informational: how the weights were obtained

  ``encoder.safetensors`` holds the keys ``encoder.*`` exactly as in a ``train autoencoder`` run's
  ``autoencoder.safetensors``, so a freshly trained autoencoder's encoder goes into a bundle unchanged
  (:meth:`FlowTurboAutoencoderEncoder.from_autoencoder_file`).
* ``"diffusers-vae"`` (:class:`DiffusersVAEEncoder`): the encoder half (``encoder`` + ``quant_conv``) of a
  diffusers ``AutoencoderKL`` (sd-vae-ft-ema / -mse): ``vae.encode(x).latent_dist.mean * 0.18215``.
  ``config.json``: ``{"type": "diffusers-vae", "latent_scale": 0.18215, "vae_config": {...},
  "weights": "encoder.safetensors"}``.

A bundle without an ``"encoder"`` entry still samples; :func:`load_encoder` returns None for it and callers
that need an encoder (inpaint, edit) raise :func:`missing_encoder_error`.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.fileio import atomic_write_bytes
from flowturbo.training.autoencoder import AutoencoderConfig, Encoder
from flowturbo.training.checkpoints import atomic_save_safetensors, strict_load
from flowturbo.training.decoders import (
    IMAGE_RANGE,
    SD_VAE_LATENT_SCALE,
    _import_autoencoder_kl,
    _json_safe,
    load_diffusers_folder,
)

ENCODER_WEIGHTS_FILE = "encoder.safetensors"  # weights file of an encoder inside a bundle
ENCODER_CONFIG_KEY = "encoder"  # the entry of a bundle's config.json that describes its encoder
BUNDLE_CONFIG_FILE = "config.json"
# Inputs may overshoot [-1, 1] by this much (resampling, float noise) before encode refuses them as
# "not in [-1, 1]" (a [0, 1] or [0, 255] image is the mistake this catches).
IMAGE_RANGE_SLACK = 1e-2
AUTOENCODER_ENCODER_PREFIX = "encoder."  # keys of the encoder inside autoencoder.safetensors / encoder.safetensors
AUTOENCODER_FILE = "autoencoder.safetensors"  # what a `train autoencoder` run writes
AUTOENCODER_METADATA_KEY = "autoencoder_config"  # metadata key of autoencoder.safetensors (and encoder.safetensors)

ENCODER_TYPES: dict[str, type["LatentEncoder"]] = {}
"""``encoder_type`` -> class; filled by :func:`register_encoder`."""


def register_encoder(cls: type["LatentEncoder"]) -> type["LatentEncoder"]:
    """Class decorator: make ``cls`` loadable from bundles under ``cls.encoder_type``."""
    name = getattr(cls, "encoder_type", None)
    if not isinstance(name, str) or not name:
        raise FlowTurboError(f"{cls.__name__} needs a non-empty string class attribute encoder_type")
    existing = ENCODER_TYPES.get(name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise FlowTurboError(f"encoder type {name!r} is already registered by {existing.__qualname__}")
    ENCODER_TYPES[name] = cls
    return cls


def encoder_class(encoder_type: str) -> type["LatentEncoder"]:
    """The registered class for ``encoder_type`` (CheckpointError listing the known types otherwise)."""
    cls = ENCODER_TYPES.get(encoder_type)
    if cls is None:
        raise CheckpointError(
            f"unknown encoder type {encoder_type!r}; known types: {sorted(ENCODER_TYPES)} "
            "(a custom encoder must be imported so that it registers itself)"
        )
    return cls


class LatentEncoder(nn.Module, abc.ABC):
    """Images (N, image_channels, H, W) in [-1, 1] -> scaled latents (N, latent_channels, H/f, W/f).

    Subclasses set the class attribute ``encoder_type`` and the instance attributes ``latent_channels``,
    ``downsample_factor`` (f) and ``image_channels``, and implement :meth:`_encode`, :meth:`bundle_config`
    (must include ``"type"``), :meth:`save_to_bundle` and :meth:`from_bundle`. :meth:`encode` validates the
    input (channels, size divisible by f, value range) and runs :meth:`_encode` without autograd.
    """

    encoder_type: ClassVar[str] = ""
    latent_channels: int
    downsample_factor: int
    image_channels: int

    @abc.abstractmethod
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """Validated images (N, C_img, H, W) -> scaled latents (N, C, H/f, W/f), differentiable."""

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, image_channels, H, W) in [-1, 1] -> scaled latents (N, latent_channels, H/f, W/f)."""
        self.check_images(images)
        return self._encode(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable encode (for training); same checks as :meth:`encode`."""
        self.check_images(images, check_range=False)
        return self._encode(images)

    def latent_size(self, image_size: int) -> int:
        """Latent side length for an image side length (which must be divisible by f)."""
        if image_size % self.downsample_factor:
            raise FlowTurboError(
                f"{type(self).__name__} needs image sides divisible by {self.downsample_factor}, got {image_size}"
            )
        return image_size // self.downsample_factor

    def check_images(self, images: torch.Tensor, *, check_range: bool = True) -> None:
        """Refuse images of the wrong rank, channel count, size or value range, naming the fix."""
        name = type(self).__name__
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise FlowTurboError(f"{name} encodes (N, {self.image_channels}, H, W) images, got {shape}")
        if images.shape[1] != self.image_channels:
            raise FlowTurboError(
                f"{name} encodes {self.image_channels}-channel images, got {images.shape[1]} channels "
                f"(shape {tuple(images.shape)}); convert the image (e.g. RGB -> grayscale) first"
            )
        f = self.downsample_factor
        if images.shape[-1] % f or images.shape[-2] % f:
            raise FlowTurboError(
                f"{name} needs image height and width divisible by {f}, got {tuple(images.shape[-2:])}; "
                "resize or pad the image"
            )
        if not images.is_floating_point():
            raise FlowTurboError(f"{name} encodes float images in [-1, 1], got dtype {images.dtype}")
        if check_range and images.numel():
            lo, hi = float(images.min()), float(images.max())
            if lo != lo or hi != hi:  # NaN
                raise FlowTurboError(f"{name}: the images contain NaN")
            if lo < IMAGE_RANGE[0] - IMAGE_RANGE_SLACK or hi > IMAGE_RANGE[1] + IMAGE_RANGE_SLACK:
                raise FlowTurboError(
                    f"{name} encodes images in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]; "
                    "map uint8 pixels p with p / 127.5 - 1 (or [0, 1] images x with 2 x - 1)"
                )

    @abc.abstractmethod
    def bundle_config(self) -> dict[str, Any]:
        """JSON-serialisable description stored as ``config.json["encoder"]``; includes ``"type"``."""

    @abc.abstractmethod
    def save_to_bundle(self, folder: str | os.PathLike[str]) -> None:
        """Write this encoder's files into the bundle folder ``folder`` (atomically)."""

    @classmethod
    @abc.abstractmethod
    def from_bundle(
        cls,
        folder: str | os.PathLike[str],
        config: dict[str, Any],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "LatentEncoder":
        """Rebuild the encoder from ``bundle_config()`` output and the files in ``folder``."""


def _weights_path(folder: str | os.PathLike[str], config: Mapping[str, Any], what: str) -> Path:
    name = config.get("weights", ENCODER_WEIGHTS_FILE)
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise CheckpointError(f"{what} config in {folder}: 'weights' must be a file name, got {name!r}")
    path = Path(folder) / name
    if not path.is_file():
        raise CheckpointError(
            f"bundle {folder} declares an encoder ({what}) but has no weights file {name}; "
            "copy the encoder weights there or repackage the bundle with flowturbo's train package command (the "
            "bundle still samples without them)"
        )
    return path


def _read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) on damaged files
        raise CheckpointError(f"cannot read {what} weights {path}: {exc}") from exc


# ---------------------------------------------------------------------------------- our autoencoder
def read_autoencoder_file(path: str | os.PathLike[str]) -> tuple[Path, AutoencoderConfig, dict[str, torch.Tensor]]:
    """A ``train autoencoder`` result (its run folder or ``autoencoder.safetensors``): the file, its
    ``autoencoder_config`` metadata and all its tensors (``encoder.*``, ``decoder.*``, ``decoder_<variant>.*``)."""
    from safetensors import safe_open

    path = Path(path)
    file = path / AUTOENCODER_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(
            f"no autoencoder at {path}: expected a `train autoencoder` run folder holding {AUTOENCODER_FILE} "
            "(it is written when training finishes) or that file itself"
        )
    with safe_open(str(file), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if AUTOENCODER_METADATA_KEY not in metadata:
        raise CheckpointError(f"{file} has no '{AUTOENCODER_METADATA_KEY}' metadata; it is not a flowturbo autoencoder")
    return file, AutoencoderConfig.from_dict(json.loads(metadata[AUTOENCODER_METADATA_KEY])), tensors


@register_encoder
class FlowTurboAutoencoderEncoder(LatentEncoder):
    """The encoder half of :class:`flowturbo.training.autoencoder.FlowTurboAutoencoder` for bundles.

    ``encode(x) = mean(Encoder(x)) * latent_scale``: the posterior mean (the first ``latent_channels`` of the
    ``2 L`` output channels; the log-variance half is not used) in the scaled space the predictor sees.
    ``latent_scale`` must be the decoder's (it is part of the ``AutoencoderConfig`` stored with both).
    """

    encoder_type: ClassVar[str] = "flowturbo_autoencoder"

    def __init__(self, config: AutoencoderConfig, source: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config
        self.source = dict(source) if source is not None else None
        self.latent_channels = config.latent_channels
        self.downsample_factor = config.downsample_factor
        self.image_channels = config.image_channels
        self.encoder = Encoder(config)

    @classmethod
    def from_weights(cls, config: AutoencoderConfig, encoder_state: Mapping[str, torch.Tensor],
                     source: Mapping[str, Any] | None = None) -> "FlowTurboAutoencoderEncoder":
        """Build from an :class:`Encoder` state dict (keys ``conv_in.weight``, ...), loaded strictly."""
        module = cls(config, source)
        strict_load(module.encoder, encoder_state, "flowturbo autoencoder encoder")
        return module.eval()

    @classmethod
    def from_autoencoder_file(cls, path: str | os.PathLike[str],
                              source: Mapping[str, Any] | None = None) -> "FlowTurboAutoencoderEncoder":
        """The encoder of a ``train autoencoder`` result: its run folder or ``autoencoder.safetensors``.

        Reads the ``encoder.*`` keys and the ``autoencoder_config`` metadata (latent scale included).
        """
        file, config, tensors = read_autoencoder_file(path)
        state = {k[len(AUTOENCODER_ENCODER_PREFIX):]: v for k, v in tensors.items()
                 if k.startswith(AUTOENCODER_ENCODER_PREFIX)}
        if not state:
            raise CheckpointError(f"{file} holds no encoder.* weights")
        return cls.from_weights(config, state, source or {"method": "autoencoder training", "file": file.name})

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.encoder.conv_in.weight.dtype)
        mean = self.encoder(x)[:, : self.latent_channels]  # (N, L, h, w); the log-variance half is unused
        return mean * self.config.latent_scale

    def bundle_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "type": self.encoder_type,
            "autoencoder": self.config.to_dict(),
            "weights": ENCODER_WEIGHTS_FILE,
        }
        if self.source is not None:
            config["source"] = self.source
        return config

    def save_to_bundle(self, folder: str | os.PathLike[str]) -> None:
        """Write ``encoder.safetensors`` (keys ``encoder.*``, as in ``autoencoder.safetensors``) atomically."""
        atomic_save_safetensors(self.state_dict(), Path(folder) / ENCODER_WEIGHTS_FILE,
                                 {AUTOENCODER_METADATA_KEY: json.dumps(self.config.to_dict())})

    @classmethod
    def from_bundle(
        cls,
        folder: str | os.PathLike[str],
        config: dict[str, Any],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "FlowTurboAutoencoderEncoder":
        unknown = sorted(set(config) - {"type", "autoencoder", "weights", "source"})
        if unknown:
            raise CheckpointError(f"flowturbo_autoencoder encoder config in {folder} has unknown keys {unknown}")
        if not isinstance(config.get("autoencoder"), Mapping):
            raise CheckpointError(f"flowturbo_autoencoder encoder config in {folder} lacks 'autoencoder'")
        try:
            ae_config = AutoencoderConfig.from_dict(config["autoencoder"])
        except CheckpointError:
            raise
        except (FlowTurboError, TypeError) as exc:
            raise CheckpointError(f"bad 'autoencoder' in the encoder config of {folder}: {exc}") from exc
        weights = _weights_path(folder, config, cls.encoder_type)
        with torch.device("meta"):
            module = cls(ae_config, config.get("source"))
        module = module.to(dtype=dtype).to_empty(device=device)
        strict_load(module, _read_safetensors(weights, "encoder"), f"flowturbo autoencoder encoder from {weights}")
        return module.eval()


# ----------------------------------------------------------------------------------- diffusers VAE
@register_encoder
class DiffusersVAEEncoder(LatentEncoder):
    """The encoder half (``encoder`` + ``quant_conv``) of a diffusers ``AutoencoderKL``.

    ``encode(x) == (vae.encode(x).latent_dist.mean - latent_shift) * latent_scale`` (``SD_VAE_LATENT_SCALE`` =
    0.18215 by default; ``latent_shift`` is the VAE's ``shift_factor``, 0 for the SD-VAE, set for SD3 / FLUX VAEs):
    the exact inverse of :class:`~flowturbo.training.decoders.DiffusersVAEDecoder`'s scaling. The posterior's mean
    (= its mode), not a sample: deterministic (diffusers' img2img / inpaint pipelines draw a sample by default, which
    differs by ``std * eps``). The decoder is not kept in memory.
    """

    encoder_type: ClassVar[str] = "diffusers-vae"

    def __init__(
        self,
        vae_config: dict[str, Any],
        encoder: nn.Module,
        quant_conv: nn.Module | None,
        latent_scale: float = SD_VAE_LATENT_SCALE,
        latent_shift: float = 0.0,
    ) -> None:
        super().__init__()
        self.vae_config = _json_safe({k: v for k, v in dict(vae_config).items() if not k.startswith("_")})
        self.encoder = encoder
        self.quant_conv = quant_conv
        self.latent_scale = float(latent_scale)
        self.latent_shift = float(latent_shift)
        self.latent_channels = int(self.vae_config["latent_channels"])
        self.image_channels = int(self.vae_config["in_channels"])
        self.downsample_factor = 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @classmethod
    def _from_vae(cls, vae: nn.Module, latent_scale: float, latent_shift: float = 0.0) -> "DiffusersVAEEncoder":
        return cls(dict(vae.config), vae.encoder, vae.quant_conv, latent_scale, latent_shift)

    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike[str],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        latent_scale: float = SD_VAE_LATENT_SCALE,
    ) -> "DiffusersVAEEncoder":
        """Load a diffusers ``AutoencoderKL`` folder offline (the same ``--vae`` folder as the decoder's) and
        keep its encoder half."""
        vae = load_diffusers_folder(path, "AutoencoderKL", dtype)
        return cls._from_vae(vae, latent_scale).to(device=device, dtype=dtype).eval()

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        h = self.encoder(images.to(self.encoder.conv_in.weight.dtype))  # (N, 2 C, h, w) posterior moments
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean = h[:, : self.latent_channels]  # DiagonalGaussianDistribution.mean: the first half
        if self.latent_shift:
            mean = mean - self.latent_shift
        return mean * self.latent_scale

    def bundle_config(self) -> dict[str, Any]:
        config = {
            "type": self.encoder_type,
            "latent_scale": self.latent_scale,
            "vae_config": self.vae_config,
            "weights": ENCODER_WEIGHTS_FILE,
        }
        if self.latent_shift:
            config["latent_shift"] = self.latent_shift
        return config

    def save_to_bundle(self, folder: str | os.PathLike[str]) -> None:
        """Write ``encoder.safetensors`` (keys ``encoder.*`` and ``quant_conv.*``) atomically."""
        atomic_save_safetensors(self.state_dict(), Path(folder) / ENCODER_WEIGHTS_FILE)

    @classmethod
    def from_bundle(
        cls,
        folder: str | os.PathLike[str],
        config: dict[str, Any],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "DiffusersVAEEncoder":
        if not isinstance(config.get("vae_config"), dict):
            raise CheckpointError(f"diffusers-vae encoder config in {folder} lacks 'vae_config'")
        weights = _weights_path(folder, config, cls.encoder_type)
        autoencoder_kl = _import_autoencoder_kl()
        with torch.device("meta"):
            vae = autoencoder_kl.from_config(config["vae_config"])
        module = cls._from_vae(vae, config.get("latent_scale", SD_VAE_LATENT_SCALE), config.get("latent_shift", 0.0))
        del vae  # the meta decoder goes with it
        module = module.to(dtype=dtype).to_empty(device=device)
        state = _read_safetensors(weights, "diffusers VAE encoder")
        strict_load(module, state, f"diffusers VAE encoder from {weights}")
        return module.eval()


# ------------------------------------------------------------------------------------------ bundles
def load_encoder_from_bundle(
    folder: str | os.PathLike[str],
    config: dict[str, Any],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LatentEncoder:
    """Dispatch on ``config["type"]`` (a bundle's ``config.json["encoder"]``) to the registered class."""
    if not isinstance(config, dict) or not isinstance(config.get("type"), str):
        raise CheckpointError(f"bundle encoder config must be a dict with a 'type' string, got {config!r}")
    return encoder_class(config["type"]).from_bundle(folder, config, device, dtype)


def _read_bundle_config(folder: Path) -> dict[str, Any]:
    # Imported here: bundle.py will import this module to load encoders with the rest of a bundle.
    from flowturbo.training.bundle import _read_config

    return _read_config(folder)


def check_encoder_fits(encoder: LatentEncoder, bundle_config: Mapping[str, Any], where: str) -> None:
    """Refuse an encoder whose latents cannot be the predictor's, or whose latent scale is not the decoder's."""
    predictor = bundle_config.get("predictor") or {}
    channels = predictor.get("in_channels")
    if channels is not None and int(channels) != encoder.latent_channels:
        raise CheckpointError(
            f"bundle {where}: the encoder makes {encoder.latent_channels}-channel latents but the predictor takes "
            f"{channels}-channel latents; the encoder belongs to another model"
        )
    decoder = bundle_config.get("decoder") or {}
    if isinstance(encoder, FlowTurboAutoencoderEncoder) and isinstance(decoder.get("autoencoder"), Mapping):
        dec_scale = decoder["autoencoder"].get("latent_scale")
        if dec_scale is not None and float(dec_scale) != encoder.config.latent_scale:
            raise CheckpointError(
                f"bundle {where}: encoder latent_scale {encoder.config.latent_scale} differs from the decoder's "
                f"{dec_scale}; encoder and decoder must come from the same autoencoder"
            )
    if isinstance(encoder, DiffusersVAEEncoder) and "latent_scale" in decoder:
        if float(decoder["latent_scale"]) != encoder.latent_scale:
            raise CheckpointError(
                f"bundle {where}: encoder latent_scale {encoder.latent_scale} differs from the decoder's "
                f"{decoder['latent_scale']}"
            )


def load_encoder(
    bundle_dir: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LatentEncoder | None:
    """The encoder of the bundle folder ``bundle_dir`` (eval mode, ``device``/``dtype``), or None if its
    ``config.json`` has no ``"encoder"`` entry (such a bundle still samples; see :func:`missing_encoder_error`).

    Raises :class:`CheckpointError` for a missing weights file, weights that do not fit the declared
    architecture (strict loading; the message names the keys and shapes), or an encoder that does not fit
    the bundle's predictor / decoder.
    """
    root = Path(bundle_dir)
    config = _read_bundle_config(root)
    entry = config.get(ENCODER_CONFIG_KEY)
    if entry is None:
        return None
    encoder = load_encoder_from_bundle(root, entry, device, dtype)
    check_encoder_fits(encoder, config, str(root))
    return encoder


OFFICIAL_SOURCE_PREFIX = "official checkpoints: "  # how load_pipeline names a model built from official files


def missing_encoder_error(bundle_dir: str | os.PathLike[str], what: str = "this command") -> FlowTurboError:
    """The error to raise when ``what`` (inpainting, editing) needs an encoder the model lacks.

    ``bundle_dir`` is the model's source: a bundle folder, or ``load_pipeline``'s ``"official checkpoints: ..."``.
    Three cases, three fixes: official checkpoints with a TAESD ``--vae`` (it only decodes: give an
    AutoencoderKL folder); a bundle whose ``config.json`` declares an encoder that could not be loaded
    (``load_bundle`` lets such a bundle sample; the reason is read again here and names the file); a bundle
    without an ``"encoder"`` entry (repackage it).
    """
    source = str(bundle_dir)
    if source.startswith(OFFICIAL_SOURCE_PREFIX):  # load_pipeline: only a TAESD --vae gives no encoder
        return FlowTurboError(
            f"{what} needs an image encoder, which official checkpoints take from the --vae folder, but an "
            "AutoencoderTiny (TAESD) folder only decodes; pass --vae with a diffusers AutoencoderKL folder "
            "(e.g. stabilityai/sd-vae-ft-ema) for inpainting and editing"
        )
    try:
        declared = _read_bundle_config(Path(bundle_dir)).get(ENCODER_CONFIG_KEY) is not None
    except FlowTurboError:
        declared = False
    if declared:
        try:
            load_encoder(bundle_dir)
        except FlowTurboError as exc:
            return CheckpointError(f"{what} needs the bundle's image encoder, which could not be loaded: {exc}")
        return CheckpointError(f"{what} needs the bundle's image encoder, which could not be loaded when the bundle "
                               f"{bundle_dir} was loaded (its files have changed since): load it again")
    return FlowTurboError(
        f"{what} needs an image encoder, but the bundle {bundle_dir} has none (no 'encoder' entry in its "
        f"{BUNDLE_CONFIG_FILE}); repackage it with flowturbo's train package command (which includes the "
        "autoencoder's encoder) or train one against its decoder with flowturbo.training.trainers.encoder"
    )


def add_encoder_to_bundle(bundle_dir: str | os.PathLike[str], encoder: LatentEncoder) -> Path:
    """Write ``encoder``'s files into an existing bundle and set its ``config.json["encoder"]`` entry.

    Every other entry of ``config.json`` is kept as it was (same order and formatting conventions); both
    files are written atomically, the weights first, so a failure leaves the old config valid.
    """
    root = Path(bundle_dir)
    config = _read_bundle_config(root)
    check_encoder_fits(encoder, config, str(root))
    encoder.save_to_bundle(root)
    config[ENCODER_CONFIG_KEY] = encoder.bundle_config()
    path = root / BUNDLE_CONFIG_FILE
    trailing = "\n" if path.read_text().endswith("\n") else ""
    atomic_write_bytes(path, (json.dumps(config, indent=2) + trailing).encode())
    return root


__all__ = [
    "ENCODER_CONFIG_KEY",
    "ENCODER_TYPES",
    "ENCODER_WEIGHTS_FILE",
    "DiffusersVAEEncoder",
    "FlowTurboAutoencoderEncoder",
    "LatentEncoder",
    "add_encoder_to_bundle",
    "check_encoder_fits",
    "encoder_class",
    "load_encoder",
    "load_encoder_from_bundle",
    "missing_encoder_error",
    "read_autoencoder_file",
    "register_encoder",
]
