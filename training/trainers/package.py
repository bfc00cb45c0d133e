"""Assemble trained parts into a bundle (``flowturbo train package``): EMA weights throughout.

Predictor: a ``train predictor`` run folder, checkpoint folder or ``predictor.safetensors``, or an official
SiT ``.pt``. Refiner (optional): a ``train refiner`` run / file (its trained dt distribution is carried into
``config.json`` as ``refiner_dt``), or an official FlowTurbo refiner ``.pt`` (no record).
Decoder: our autoencoder (``train autoencoder`` run folder or ``autoencoder.safetensors``; both decoder
variants stored, ``variant`` active by default), a diffusers AutoencoderKL folder, or an existing bundle's
(``decoder_bundle``: its decoder with every variant, its encoder and class names, e.g. to give the embedded default
a new refiner). Encoder (for inpainting and editing): always included — the same autoencoder's encoder, the
AutoencoderKL folder's, or the bundle's.
"""

from __future__ import annotations

import json
from pathlib import Path

from flowturbo.errors import FlowTurboError
from flowturbo.training.bundle import (
    BUNDLE_FORMAT,
    CONFIG_FILE,
    DEFAULT_CFG,
    DEFAULT_SCHEDULE,
    DEFAULT_SCHEDULE_WITHOUT_REFINER,
    OFFICIAL_SIT_DEFAULTS,
    PREDICTOR_FILE,
    Bundle,
    BundleDefaults,
    load_bundle_image_parts,
    save_bundle,
)
from flowturbo.training.checkpoints import load_refiner_checkpoint, load_sit_checkpoint
from flowturbo.training.models import SiTConfig
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
    decoder_bundle: str | Path | None = None,
    variant: str | None = None,
    schedule: str | None = None,
    cfg: float | None = None,
    guidance_channels: int | None = None,
    class_names: list[str] | None = None,
    inpaint_schedule: str | None = None,
    trust_pickle: bool = False,
    overwrite: bool = False,
    wait: bool = False,
) -> Bundle:
    """Build a :class:`Bundle` from trained parts (predictor, optional refiner, decoder, and the encoder that
    belongs to the decoder, for inpainting and editing), save it to ``out`` (atomically) and return it.

    ``variant`` picks the active decoder variant (``ema``/``mse``; None: ``ema`` for an autoencoder run, the
    bundle's own for ``decoder_bundle``). The model family's defaults travel into the bundle: official SiT
    checkpoints guide 3 of their 4 latent channels (:data:`flowturbo.training.bundle.OFFICIAL_SIT_DEFAULTS`), as the
    released sampler and ``flowturbo sample --predictor`` do; ``guidance_channels`` overrides. ``out`` must not be
    another kind of flowturbo output (a training run, an export, ...), whatever ``overwrite`` says."""
    from flowturbo.fileio import check_kind, check_replaceable, check_writable_target

    check_writable_target(out)  # before loading any weights
    check_kind(out, command=PACKAGE_COMMAND)  # another kind of output is never replaced, --overwrite or not
    if Path(out).exists():
        if not overwrite:
            raise FlowTurboError(f"{out} already exists; pass --overwrite to replace it")
        check_replaceable(out, "bundle", command=PACKAGE_COMMAND)
    ours = read_trained_predictor(predictor)
    in_bundle = bundle_of_predictor(predictor)
    if ours is not None:
        state, predictor_config, names = ours
        sit = load_sit_checkpoint(state, predictor_config)
        family = BundleDefaults()  # the family's defaults travel along: ours guide every channel
    elif in_bundle is not None:  # a bundle's predictor (no metadata of its own): the bundle says what it is
        folder, config = in_bundle
        sit = load_sit_checkpoint(folder / PREDICTOR_FILE, SiTConfig.from_dict(config["predictor"]))
        names = config.get("class_names")
        family = BundleDefaults(guidance_channels=(config.get("defaults") or {}).get("guidance_channels"))
    else:
        sit, names = load_sit_checkpoint(predictor, trust_pickle=trust_pickle), None
        family = OFFICIAL_SIT_DEFAULTS  # the released code guides 3 of 4 channels
    ref, refiner_dt = None, None
    if refiner is not None:
        ours_ref = read_trained_refiner(refiner)
        if ours_ref is not None:  # ours: its trained dt distribution goes into config.json (refiner_dt)
            ref, refiner_dt = load_refiner_checkpoint(ours_ref.state, ours_ref.config), ours_ref.dt
        else:  # official: no record (the runtime assumes the paper's dt <= 0.12)
            ref = load_refiner_checkpoint(refiner, trust_pickle=trust_pickle)
    decoder, encoder, bundle_names = _image_parts(autoencoder, vae, decoder_bundle, variant)
    names = names if names is not None else bundle_names
    defaults = BundleDefaults(
        schedule=schedule or (DEFAULT_SCHEDULE if ref is not None else DEFAULT_SCHEDULE_WITHOUT_REFINER),
        cfg=DEFAULT_CFG if cfg is None else cfg,
        guidance_channels=family.guidance_channels if guidance_channels is None else guidance_channels,
        inpaint_schedule=inpaint_schedule,
    )
    bundle = Bundle(sit.eval(), None if ref is None else ref.eval(), decoder.eval(),
                    class_names if class_names is not None else names, defaults,
                    None if encoder is None else encoder.eval(), refiner_dt)
    save_bundle(bundle, out, overwrite=overwrite, wait=wait)
    return bundle


def bundle_of_predictor(predictor: str | Path) -> tuple[Path, dict] | None:
    """``(folder, config)`` when ``predictor`` is a bundle folder or the predictor file inside one, else None."""
    path = Path(predictor)
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.name != PREDICTOR_FILE:
        return None
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("format") != BUNDLE_FORMAT or "predictor" not in config:
        return None
    return folder, config


def _image_parts(autoencoder: str | Path | None, vae: str | Path | None, decoder_bundle: str | Path | None,
                 variant: str | None) -> tuple[LatentDecoder, LatentEncoder | None, list[str] | None]:
    """The decoder, the encoder that belongs to it and (from a bundle) class names, from exactly one source."""
    if sum(source is not None for source in (autoencoder, vae, decoder_bundle)) != 1:
        raise FlowTurboError("give exactly one decoder: --autoencoder (a `train autoencoder` run), --vae (a diffusers "
                             "AutoencoderKL folder) or --decoder-bundle (an existing bundle's decoder and encoder)")
    if autoencoder is not None:
        decoder = autoencoder_decoder(autoencoder, variant or "ema")
        return decoder, FlowTurboAutoencoderEncoder.from_autoencoder_file(autoencoder), None
    if decoder_bundle is not None:
        decoder, encoder, names = load_bundle_image_parts(decoder_bundle)
        if variant is not None:
            select = getattr(decoder, "select_variant", None)
            if select is None:
                raise FlowTurboError(f"--variant {variant}: the decoder of {decoder_bundle} ({decoder.decoder_type}) "
                                     "has no variants; drop --variant")
            decoder = select(variant)
        return decoder, encoder, names
    if variant not in (None, "ema"):
        raise FlowTurboError("--variant applies to our autoencoder; for a diffusers VAE pick the folder "
                             "(sd-vae-ft-ema or sd-vae-ft-mse) instead")
    return DiffusersVAEDecoder.from_folder(vae), DiffusersVAEEncoder.from_folder(vae), None  # type: ignore[arg-type]
