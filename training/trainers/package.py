"""Assemble trained parts into a bundle (``flowturbo train package``): EMA weights throughout.

Predictor: a ``train predictor`` run folder, checkpoint folder or ``predictor.safetensors``, or an official
SiT ``.pt``. Refiner (optional): a ``train refiner`` run / file, or an official FlowTurbo refiner ``.pt``.
Decoder: our autoencoder (``train autoencoder`` run folder or ``autoencoder.safetensors``; both decoder
variants stored, ``variant`` active by default) or a diffusers AutoencoderKL folder. Encoder (for inpainting and
editing): always included — the same autoencoder's encoder, or the AutoencoderKL folder's.
"""

from __future__ import annotations

from pathlib import Path

from flowturbo.errors import FlowTurboError
from flowturbo.training.bundle import (
    DEFAULT_CFG,
    DEFAULT_SCHEDULE,
    DEFAULT_SCHEDULE_WITHOUT_REFINER,
    OFFICIAL_SIT_DEFAULTS,
    Bundle,
    BundleDefaults,
    save_bundle,
)
from flowturbo.training.checkpoints import load_refiner_checkpoint, load_sit_checkpoint
from flowturbo.training.decoders import DiffusersVAEDecoder, LatentDecoder
from flowturbo.training.encoders import DiffusersVAEEncoder, FlowTurboAutoencoderEncoder, LatentEncoder
from flowturbo.training.trainers.autoencoder import autoencoder_decoder
from flowturbo.training.trainers.predictor import read_trained_predictor
from flowturbo.training.trainers.refiner import read_trained_refiner

PACKAGE_COMMAND = "train package"


def package_bundle(
    out: str | Path,
    *,
    predictor: str | Path,
    refiner: str | Path | None = None,
    autoencoder: str | Path | None = None,
    vae: str | Path | None = None,
    variant: str = "ema",
    schedule: str | None = None,
    cfg: float | None = None,
    guidance_channels: int | None = None,
    class_names: list[str] | None = None,
    trust_pickle: bool = False,
    overwrite: bool = False,
    wait: bool = False,
) -> Bundle:
    """Build a :class:`Bundle` from trained parts (predictor, optional refiner, decoder, and the encoder that
    belongs to the decoder, for inpainting and editing), save it to ``out`` (atomically) and return it.

    The model family's defaults travel into the bundle: official SiT checkpoints guide 3 of their 4 latent
    channels (:data:`flowturbo.training.bundle.OFFICIAL_SIT_DEFAULTS`), as the released sampler and ``flowturbo
    sample --predictor`` do; ``guidance_channels`` overrides. ``out`` must not be another kind of flowturbo
    output (a training run, an export, ...), whatever ``overwrite`` says."""
    from flowturbo.fileio import check_kind, check_replaceable, check_writable_target

    check_writable_target(out)  # before loading any weights
    check_kind(out, command=PACKAGE_COMMAND)  # another kind of output is never replaced, --overwrite or not
    if Path(out).exists():
        if not overwrite:
            raise FlowTurboError(f"{out} already exists; pass --overwrite to replace it")
        check_replaceable(out, "bundle", command=PACKAGE_COMMAND)
    ours = read_trained_predictor(predictor)
    if ours is not None:
        state, predictor_config, names = ours
        sit = load_sit_checkpoint(state, predictor_config)
    else:
        sit, names = load_sit_checkpoint(predictor, trust_pickle=trust_pickle), None
    family = BundleDefaults() if ours is not None else OFFICIAL_SIT_DEFAULTS  # the family's defaults travel along
    ref = None
    if refiner is not None:
        ours_ref = read_trained_refiner(refiner)
        if ours_ref is not None:
            ref = load_refiner_checkpoint(ours_ref[0], ours_ref[1])
        else:
            ref = load_refiner_checkpoint(refiner, trust_pickle=trust_pickle)
    decoder = _decoder(autoencoder, vae, variant)
    encoder = _encoder(autoencoder, vae)
    defaults = BundleDefaults(
        schedule=schedule or (DEFAULT_SCHEDULE if ref is not None else DEFAULT_SCHEDULE_WITHOUT_REFINER),
        cfg=DEFAULT_CFG if cfg is None else cfg,
        guidance_channels=family.guidance_channels if guidance_channels is None else guidance_channels,
    )
    bundle = Bundle(sit.eval(), None if ref is None else ref.eval(), decoder.eval(),
                    class_names if class_names is not None else names, defaults, encoder.eval())
    save_bundle(bundle, out, overwrite=overwrite, wait=wait)
    return bundle


def _decoder(autoencoder: str | Path | None, vae: str | Path | None, variant: str) -> LatentDecoder:
    if (autoencoder is None) == (vae is None):
        raise FlowTurboError("give exactly one decoder: --autoencoder (a `train autoencoder` run) or --vae "
                             "(a diffusers AutoencoderKL folder)")
    if autoencoder is not None:
        return autoencoder_decoder(autoencoder, variant)
    if variant != "ema":
        raise FlowTurboError("--variant applies to our autoencoder; for a diffusers VAE pick the folder "
                             "(sd-vae-ft-ema or sd-vae-ft-mse) instead")
    return DiffusersVAEDecoder.from_folder(vae)  # type: ignore[arg-type]


def _encoder(autoencoder: str | Path | None, vae: str | Path | None) -> LatentEncoder:
    """The encoder that belongs to the decoder: the autoencoder run's own, or the AutoencoderKL folder's."""
    if autoencoder is not None:
        return FlowTurboAutoencoderEncoder.from_autoencoder_file(autoencoder)
    return DiffusersVAEEncoder.from_folder(vae)  # type: ignore[arg-type]
