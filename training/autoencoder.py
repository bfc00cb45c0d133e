"""Our own small KL-regularised convolutional autoencoder (the embedded default's latent space).

Images ``(N, C, S, S)`` in [-1, 1] map to latents ``(N, L, S/f, S/f)`` with ``f = 2 ** (len(channel_mult) - 1)``
(the default: (N, 1, 32, 32) -> (N, 4, 8, 8), f = 4). The structure follows the LDM / SD-VAE autoencoder
scaled down: conv in, per level ``num_res_blocks`` residual blocks then a stride-2 conv, a middle block,
GroupNorm + SiLU + conv out to ``2 L`` channels (posterior mean and log-variance). The decoder mirrors it
with nearest-neighbour upsampling.

Generators see *scaled* latents ``z * latent_scale`` (like SD's 0.18215), where ``latent_scale`` is computed
from data after training (:func:`compute_latent_scale`) so that the latents have about unit std, and is
stored in :class:`AutoencoderConfig`.

:class:`FlowTurboAutoencoderDecoder` is the bundle-facing decoder (type ``"flowturbo_autoencoder"``): it
stores two decoder weight sets, ``"ema"`` (EMA weights of autoencoder training) and ``"mse"`` (decoder
fine-tuned further on pixel MSE with the encoder frozen), selectable at sampling time.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.training.checkpoints import atomic_save_safetensors, strict_load
from flowturbo.training.decoders import DECODER_WEIGHTS_FILE, IMAGE_RANGE, LatentDecoder, register_decoder

LOGVAR_MIN = -30.0  # posterior log-variance clamp (LDM's DiagonalGaussianDistribution)
LOGVAR_MAX = 20.0
DOWNSAMPLE_STRIDE = 2


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture of :class:`FlowTurboAutoencoder` plus the latent scale that normalises its latents."""

    image_channels: int = 1
    image_size: int = 32
    latent_channels: int = 4
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    norm_groups: int = 8
    latent_scale: float = 1.0  # multiply raw latents by this before the generator sees them

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        if not self.channel_mult:
            raise FlowTurboError("channel_mult must list at least one level, e.g. (1, 2, 4)")
        for mult in self.channel_mult:
            if (self.base_channels * mult) % self.norm_groups:
                raise FlowTurboError(
                    f"base_channels * mult = {self.base_channels * mult} is not divisible by norm_groups="
                    f"{self.norm_groups}; change base_channels or norm_groups"
                )
        if self.image_size % self.downsample_factor:
            raise FlowTurboError(
                f"image_size {self.image_size} is not divisible by the downsample factor {self.downsample_factor}"
            )
        if not self.latent_scale > 0:
            raise FlowTurboError(f"latent_scale must be positive, got {self.latent_scale}")

    @property
    def downsample_factor(self) -> int:
        return DOWNSAMPLE_STRIDE ** (len(self.channel_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample_factor

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AutoencoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"unknown autoencoder config keys {unknown}; was it written by a newer flowturbo?")
        return cls(**dict(data))


# Named presets (plain data). "f4c4-32": Fashion-MNIST 32x32 -> 4x8x8 (the embedded default).
AUTOENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "f4c4-32": dict(image_channels=1, image_size=32, latent_channels=4, base_channels=32, channel_mult=(1, 2, 4)),
    "f4c4-32-small": dict(image_channels=1, image_size=32, latent_channels=4, base_channels=16, channel_mult=(1, 2, 2)),
    "tiny": dict(image_channels=1, image_size=16, latent_channels=4, base_channels=8, channel_mult=(1, 2),
                 num_res_blocks=1, norm_groups=4),
}


def autoencoder_config(name: str, **overrides: Any) -> AutoencoderConfig:
    """The preset ``name`` (see :data:`AUTOENCODER_PRESETS`) with ``overrides`` applied."""
    if name not in AUTOENCODER_PRESETS:
        raise FlowTurboError(f"unknown autoencoder preset {name!r}; choose one of {sorted(AUTOENCODER_PRESETS)}")
    return AutoencoderConfig(**{**AUTOENCODER_PRESETS[name], **overrides})


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a (1x1-projected when channels change) skip connection."""

    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """Images (N, C, S, S) -> posterior moments (N, 2 L, S/f, S/f)."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.image_channels, chans[0], 3, padding=1)
        layers: list[nn.Module] = []
        ch = chans[0]
        for level, out_ch in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, out_ch, cfg.norm_groups))
                ch = out_ch
            if level < len(chans) - 1:
                layers.append(nn.Conv2d(ch, ch, 3, stride=DOWNSAMPLE_STRIDE, padding=1))
        self.down = nn.Sequential(*layers)
        self.mid = ResBlock(ch, ch, cfg.norm_groups)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Raw latents (N, L, S/f, S/f) -> images (N, C, S, S) (unclamped)."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        ch = chans[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = ResBlock(ch, ch, cfg.norm_groups)
        layers: list[nn.Module] = []
        for level in reversed(range(len(chans))):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, chans[level], cfg.norm_groups))
                ch = chans[level]
            if level > 0:
                layers.append(nn.Upsample(scale_factor=DOWNSAMPLE_STRIDE, mode="nearest"))
                layers.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.up = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, cfg.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over all elements."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


class FlowTurboAutoencoder(nn.Module):
    """Encoder + decoder. ``encode_latents``/``decode_latents`` work in the *scaled* latent space."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and clamped log-variance of raw latents, each (N, L, s, s)."""
        mean, logvar = self.encoder(images).chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: ``(reconstruction (N, C, S, S), mean, logvar)`` with a posterior sample."""
        mean, logvar = self.moments(images)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + (0.5 * logvar).exp() * noise  # (N, L, s, s)
        return self.decoder(z), mean, logvar

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor, *, sample: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (N, C, S, S) in [-1, 1] -> scaled latents (N, L, s, s) (posterior mean unless ``sample``)."""
        mean, logvar = self.moments(images)
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + (0.5 * logvar).exp() * noise
        return mean * self.config.latent_scale

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, L, s, s) -> images (N, C, S, S) clamped to [-1, 1]."""
        return self.decoder(latents / self.config.latent_scale).clamp(-1.0, 1.0)

    def with_latent_scale(self, latent_scale: float) -> FlowTurboAutoencoder:
        """Set the config's latent scale (in place; the config stays a frozen value object)."""
        self.config = dataclasses.replace(self.config, latent_scale=float(latent_scale))
        return self


@torch.no_grad()
def compute_latent_scale(model: FlowTurboAutoencoder, images: torch.Tensor, batch_size: int = 256) -> float:
    """``1 / std`` of the raw posterior means over ``images`` (N, C, S, S): scaled latents get unit std."""
    device = next(model.parameters()).device
    sq_sum, total, count = 0.0, 0.0, 0
    for start in range(0, images.shape[0], batch_size):
        mean, _ = model.moments(images[start : start + batch_size].to(device))
        mean = mean.double()
        sq_sum += float(mean.square().sum())
        total += float(mean.sum())
        count += mean.numel()
    if count == 0:
        raise FlowTurboError("compute_latent_scale needs at least one image")
    var = sq_sum / count - (total / count) ** 2
    if not var > 0:
        raise FlowTurboError("the encoder's latents have zero variance; the autoencoder did not train")
    return 1.0 / var**0.5


# ----------------------------------------------------------------------------------- bundle decoder
DECODER_VARIANTS = ("ema", "mse")
"""``"ema"``: EMA weights of autoencoder training; ``"mse"``: decoder fine-tuned further on pixel MSE."""
DEFAULT_DECODER_VARIANT = "ema"


def _check_variant(variant: str, available: Sequence[str]) -> str:
    if variant not in available:
        raise FlowTurboError(
            f"unknown autoencoder decoder variant {variant!r}; this decoder holds {list(available)} "
            f"(known variants: {list(DECODER_VARIANTS)})"
        )
    return variant


@register_decoder
class FlowTurboAutoencoderDecoder(LatentDecoder):
    """The decoder half of :class:`FlowTurboAutoencoder` for bundles, with selectable weight variants.

    Holds one :class:`Decoder` per variant (``"ema"``, and ``"mse"`` when the fine-tune stage ran); the
    active one is chosen by ``variant`` at construction, by :meth:`set_variant`, or at load time by the
    ``"variant"`` entry of the bundle config (override it to switch without rewriting the bundle).
    ``decode`` takes *scaled* latents (as the generator produces them) and returns images in [-1, 1].
    """

    decoder_type: ClassVar[str] = "flowturbo_autoencoder"

    def __init__(self, config: AutoencoderConfig, variants: Sequence[str] = DECODER_VARIANTS,
                 variant: str = DEFAULT_DECODER_VARIANT) -> None:
        super().__init__()
        variants = tuple(variants)
        if not variants or any(v not in DECODER_VARIANTS for v in variants):
            raise FlowTurboError(f"decoder variants must be a non-empty subset of {DECODER_VARIANTS}, got {variants}")
        self.config = config
        self.latent_channels = config.latent_channels
        self.downsample_factor = config.downsample_factor
        self.image_channels = config.image_channels
        self.variants = nn.ModuleDict({v: Decoder(config) for v in variants})
        self.variant = _check_variant(variant, variants)

    @classmethod
    def from_weights(cls, config: AutoencoderConfig, decoders: Mapping[str, Mapping[str, torch.Tensor]],
                     variant: str = DEFAULT_DECODER_VARIANT) -> FlowTurboAutoencoderDecoder:
        """Build from ``{variant: Decoder state dict}`` (e.g. the trainer's EMA and fine-tuned decoders)."""
        module = cls(config, tuple(v for v in DECODER_VARIANTS if v in decoders), variant)
        for name, state in decoders.items():
            strict_load(module.variants[name], state, f"autoencoder decoder ({name})")
        return module.eval()

    @property
    def available_variants(self) -> tuple[str, ...]:
        return tuple(self.variants.keys())

    def set_variant(self, variant: str) -> FlowTurboAutoencoderDecoder:
        """Switch the weights used by :meth:`decode` (``"ema"`` or ``"mse"``); returns self."""
        self.variant = _check_variant(variant, self.available_variants)
        return self

    def select_variant(self, variant: str) -> FlowTurboAutoencoderDecoder:
        """Same as :meth:`set_variant` (the runtime's ``--decoder ema|mse`` hook); returns self."""
        return self.set_variant(variant)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, L, h, w) -> images (N, C, h*f, w*f) in [-1, 1]."""
        self._check_latents(latents)
        decoder = self.variants[self.variant]
        z = latents.to(decoder.conv_in.weight.dtype) / self.config.latent_scale
        return decoder(z).clamp(*IMAGE_RANGE)

    def bundle_config(self) -> dict[str, Any]:
        return {
            "type": self.decoder_type,
            "autoencoder": self.config.to_dict(),
            "variant": self.variant,
            "variants": list(self.available_variants),
            "weights": DECODER_WEIGHTS_FILE,
        }

    def save_to_bundle(self, folder: str | os.PathLike[str]) -> None:
        """Write ``decoder.safetensors`` with keys ``<variant>.<decoder key>`` for every variant (atomically)."""
        state = {f"{name}.{k}": v for name, dec in self.variants.items() for k, v in dec.state_dict().items()}
        atomic_save_safetensors(state, Path(folder) / DECODER_WEIGHTS_FILE)

    @classmethod
    def from_bundle(
        cls,
        folder: str | os.PathLike[str],
        config: dict[str, Any],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> FlowTurboAutoencoderDecoder:
        """Rebuild from :meth:`bundle_config` output; ``config["variant"]`` picks the active weights."""
        from safetensors.torch import load_file

        if not isinstance(config.get("autoencoder"), Mapping):
            raise CheckpointError(f"flowturbo_autoencoder decoder config in {folder} lacks 'autoencoder'")
        ae_config = AutoencoderConfig.from_dict(config["autoencoder"])
        variants = tuple(config.get("variants", DECODER_VARIANTS))
        variant = config.get("variant", DEFAULT_DECODER_VARIANT)
        weights = Path(folder) / config.get("weights", DECODER_WEIGHTS_FILE)
        if not weights.is_file():
            raise CheckpointError(f"bundle {folder} has no decoder weights file {weights.name}")
        with torch.device("meta"):
            module = cls(ae_config, variants, variant)
        module = module.to(dtype=dtype).to_empty(device=device)
        strict_load(module.variants, load_file(str(weights), device="cpu"),
                    f"flowturbo autoencoder decoder from {weights}")
        return module.eval()
