"""The pure-PyTorch backend: the one documented place where ``runtime`` builds models from ``training``.

:func:`load_pipeline` turns what a user has — our bundle folder, the embedded default, or official
checkpoint files (SiT-XL/2 ``.pt``, a FlowTurbo refiner ``.pt``, a diffusers VAE folder) — into a
:class:`TorchPipeline` the :class:`~flowturbo.runtime.sampler.Sampler` runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.training.bundle import BundleDefaults, load_bundle
from flowturbo.training.checkpoints import load_refiner_checkpoint, load_sit_checkpoint
from flowturbo.training.decoders import DiffusersVAEDecoder, LatentDecoder
from flowturbo.training.sampling import check_labels, make_noise, sample_schedule

# The reference sampling functions, re-exported: runtime code reaches training/ only through this module.
__all__ = ["TorchPipeline", "check_labels", "load_pipeline", "make_noise", "resolve_device", "resolve_dtype",
           "sample_schedule"]

DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "assets" / "default_model"
OFFICIAL_GUIDANCE_CHANNELS = 3  # official SiT/FlowTurbo code guides 3 of 4 latent channels (DESIGN.md §2)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclasses.dataclass
class TorchPipeline:
    """Predictor + optional refiner + decoder, on one device and dtype, with the model's defaults."""

    predictor: torch.nn.Module
    refiner: torch.nn.Module | None
    decoder: LatentDecoder
    num_classes: int
    latent_shape: tuple[int, int, int]  # (C, H, W)
    class_names: list[str] | None
    defaults: BundleDefaults
    source: str
    device: torch.device
    dtype: torch.dtype

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "num_classes": self.num_classes,
            "latent_shape": list(self.latent_shape),
            "has_refiner": self.refiner is not None,
            "decoder": self.decoder.decoder_type,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``'float32'`` / ``'fp16'`` / ``'bf16'`` / a torch dtype -> torch dtype, with a clear error."""
    if isinstance(name, torch.dtype):
        return name
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp64": "float64"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise FlowTurboError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[key]


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``None``/``'auto'`` -> CUDA when available else CPU; refuses CUDA on a machine without it."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlowTurboError(f"device {name!r} requested but this machine has no CUDA GPU; use --device cpu")
    return device


def load_pipeline(
    model: str | Path | None = None,
    *,
    predictor: str | Path | None = None,
    refiner: str | Path | None = None,
    vae: str | Path | None = None,
    decoder_variant: str | None = None,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype = torch.float32,
    kernel_backend: str = "reference",
) -> TorchPipeline:
    """Load a bundle folder (``model``), the embedded default (nothing given) or official checkpoint files.

    ``predictor``/``refiner`` are ``.pt``/``.safetensors`` files in the official SiT / FlowTurbo key layout;
    ``vae`` is a diffusers ``AutoencoderKL`` folder (sd-vae-ft-ema / -mse). ``decoder_variant`` picks a
    decoder variant of a bundle's own autoencoder (``ema`` or ``mse``).
    """
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    if predictor is not None:
        if model is not None:
            raise FlowTurboError("give either a bundle (--model) or checkpoint files (--predictor ...), not both")
        return _load_official(predictor, refiner, vae, torch_device, torch_dtype, kernel_backend)
    if refiner is not None or vae is not None:
        raise FlowTurboError("--refiner/--vae are used with --predictor (official checkpoints); a bundle has its own")
    folder = Path(model) if model is not None else DEFAULT_BUNDLE_DIR
    if model is None and not (folder / "config.json").is_file():
        raise CheckpointError(
            f"the embedded default model is missing from {folder}; reinstall flowturbo or pass --model BUNDLE_DIR"
        )
    bundle = load_bundle(folder, device=torch_device, dtype=torch_dtype, kernel_backend=kernel_backend)
    decoder = bundle.decoder
    if decoder_variant is not None:
        select = getattr(decoder, "select_variant", None)
        if select is None:
            raise FlowTurboError(
                f"--decoder {decoder_variant} needs a bundle whose autoencoder has decoder variants; "
                f"this bundle's decoder is {decoder.decoder_type!r}"
            )
        decoder = select(decoder_variant)
    return TorchPipeline(
        predictor=bundle.predictor.eval(),
        refiner=None if bundle.refiner is None else bundle.refiner.eval(),
        decoder=decoder.eval(),
        num_classes=bundle.num_classes,
        latent_shape=tuple(bundle.latent_shape),
        class_names=bundle.class_names,
        defaults=bundle.defaults,
        source="embedded default" if model is None else str(folder),
        device=torch_device,
        dtype=torch_dtype,
    )


def _load_official(
    predictor: str | Path, refiner: str | Path | None, vae: str | Path | None,
    device: torch.device, dtype: torch.dtype, kernel_backend: str,
) -> TorchPipeline:
    sit = load_sit_checkpoint(predictor, kernel_backend=kernel_backend).to(device=device, dtype=dtype).eval()
    config = sit.config
    if vae is None:
        raise FlowTurboError(
            "official SiT checkpoints produce SD-VAE latents: pass --vae FOLDER (a diffusers AutoencoderKL folder "
            "such as stabilityai/sd-vae-ft-ema)"
        )
    decoder = DiffusersVAEDecoder.from_folder(vae, device=device, dtype=dtype).eval()
    ref = None
    if refiner is not None:
        ref = load_refiner_checkpoint(refiner, predictor_config=config, kernel_backend=kernel_backend)
        ref = ref.to(device=device, dtype=dtype).eval()
    return TorchPipeline(
        predictor=sit,
        refiner=ref,
        decoder=decoder,
        num_classes=config.num_classes,
        latent_shape=(config.in_channels, config.input_size, config.input_size),
        class_names=None,
        defaults=BundleDefaults(guidance_channels=OFFICIAL_GUIDANCE_CHANNELS),
        source=f"official checkpoints: {predictor}" + (f" + {refiner}" if refiner else ""),
        device=device,
        dtype=dtype,
    )
