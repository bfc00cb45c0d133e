"""Our model bundle: one folder holding everything a sampler needs, loadable in one call.

Layout::

    <folder>/config.json            {"format": "flowturbo.bundle/1", "predictor": {SiTConfig},
                                     "refiner": {RefinerConfig} | null, "decoder": {"type": ..., ...},
                                     "class_names": [...] | null,
                                     "defaults": {"schedule": "H1P5R3", "cfg": 1.5, "guidance_channels": null},
                                     "refiner_dt": {"max_dt": 0.5, ...} | absent}
                                    (refiner_dt: the dt distribution the refiner was trained on, whose max_dt
                                    is its trained range: flowturbo.refiner_dt; absent: not recorded)
    <folder>/predictor.safetensors  SiT state dict (official key layout)
    <folder>/refiner.safetensors    refiner state dict (only when "refiner" is not null)
    <folder>/...                    decoder files, decided by the decoder type (none for "identity",
                                    decoder.safetensors for "diffusers-vae")

Bundles are written into a hidden staging folder beside the target and swapped into place
(:class:`flowturbo.fileio.OutputFolder`: pre-flight, lock, ownership record), so a failed save never leaves a
half-written bundle at the target, and a folder holding anything flowturbo did not write is never replaced.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.fileio import OutputFolder, check_kind, json_text
from flowturbo.kernels import KernelBackend
from flowturbo.refiner_dt import REFINER_DT_KEY, DtDistribution, read_dt_record
from flowturbo.schedule import SamplingSchedule, StepKind
from flowturbo.training.checkpoints import load_refiner_checkpoint, load_sit_checkpoint
from flowturbo.training.decoders import IdentityDecoder, LatentDecoder, load_decoder_from_bundle
from flowturbo.training.encoders import (
    ENCODER_CONFIG_KEY,
    LatentEncoder,
    check_encoder_fits,
    load_encoder_from_bundle,
)
from flowturbo.training.models import (
    RefinerConfig,
    SiT,
    SiTConfig,
    VelocityRefiner,
    count_parameters,
    perturb_zero_initialized,
    sit_config,
)

BUNDLE_FORMAT = "flowturbo.bundle/1"
CONFIG_FILE = "config.json"
PREDICTOR_FILE = "predictor.safetensors"
REFINER_FILE = "refiner.safetensors"
DEFAULT_SCHEDULE = "H1P5R3"  # FlowTurbo's fastest paper schedule (needs a refiner)
DEFAULT_SCHEDULE_WITHOUT_REFINER = "H8"  # plain Heun when a bundle has no refiner
DEFAULT_CFG = 1.5


@dataclasses.dataclass(frozen=True)
class BundleDefaults:
    """Sampling settings a bundle suggests (a CLI uses them when the user gives none)."""

    schedule: str = DEFAULT_SCHEDULE
    cfg: float = DEFAULT_CFG
    guidance_channels: int | None = None
    # Inpainting's schedule when the request names none (None: ``schedule``). A schedule heavy in R steps can lose to
    # H/P steps there: the kept region pasted back after each step moves the state off the trajectory the carried
    # velocity came from (QUALITY.md, inpainting with the default).
    inpaint_schedule: str | None = None

    def __post_init__(self) -> None:
        self.sampling_schedule()  # validates: raises ScheduleError (a FlowTurboError) naming the fix
        if self.inpaint_schedule is not None:
            SamplingSchedule.parse(self.inpaint_schedule, guidance_scale=self.cfg,
                                   guidance_channels=self.guidance_channels)

    def sampling_schedule(self) -> SamplingSchedule:
        """The default schedule with the default guidance applied."""
        return SamplingSchedule.parse(self.schedule, guidance_scale=self.cfg, guidance_channels=self.guidance_channels)

    def to_dict(self) -> dict[str, Any]:
        """The config.json record (``inpaint_schedule`` only when set: bundles without one read as before)."""
        data = dataclasses.asdict(self)
        if data["inpaint_schedule"] is None:
            del data["inpaint_schedule"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BundleDefaults":
        if not isinstance(data, dict):
            raise FlowTurboError(f"bundle defaults must be a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            valid = ", ".join(f.name for f in dataclasses.fields(cls))
            raise FlowTurboError(f"unknown bundle defaults keys {unknown}; valid: {valid}")
        return cls(**data)


OFFICIAL_GUIDANCE_CHANNELS = 3  # official SiT/FlowTurbo code guides 3 of 4 latent channels (DESIGN.md §2)
# The official SiT family's defaults: every bundle made from its checkpoints, every export of such a bundle and
# `flowturbo sample --predictor` guide as the released sampler does.
OFFICIAL_SIT_DEFAULTS = BundleDefaults(guidance_channels=OFFICIAL_GUIDANCE_CHANNELS)


@dataclasses.dataclass
class Bundle:
    """A predictor, an optional refiner, a decoder, class names and default sampling settings."""

    predictor: SiT
    refiner: VelocityRefiner | None
    decoder: LatentDecoder
    class_names: list[str] | None = None
    defaults: BundleDefaults = dataclasses.field(default_factory=BundleDefaults)
    encoder: LatentEncoder | None = None  # images -> latents, for inpainting/editing (None: the bundle samples only)
    refiner_dt: DtDistribution | None = None  # the dt the refiner was trained on (None: not recorded)

    def __post_init__(self) -> None:
        _check_consistency(self)

    @property
    def num_classes(self) -> int:
        return self.predictor.config.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one latent."""
        cfg = self.predictor.config
        return (cfg.in_channels, cfg.input_size, cfg.input_size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, H, W) of one decoded image."""
        size = self.decoder.image_size(self.predictor.config.input_size)
        return (self.decoder.image_channels, size, size)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part: ``{"predictor": ..., "refiner": ... (0 if none), "decoder": ...}``."""
        return {
            "predictor": count_parameters(self.predictor),
            "refiner": count_parameters(self.refiner) if self.refiner is not None else 0,
            "decoder": count_parameters(self.decoder),
            "encoder": count_parameters(self.encoder) if self.encoder is not None else 0,
        }

    def config_dict(self) -> dict[str, Any]:
        """The content of ``config.json``."""
        config = {
            "format": BUNDLE_FORMAT,
            "predictor": self.predictor.config.to_dict(),
            "refiner": self.refiner.config.to_dict() if self.refiner is not None else None,
            "decoder": self.decoder.bundle_config(),
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "defaults": self.defaults.to_dict(),
        }
        if self.encoder is not None:  # no entry: a bundle that samples only (inpaint / edit explain the fix)
            config[ENCODER_CONFIG_KEY] = self.encoder.bundle_config()
        if self.refiner_dt is not None:  # no entry: not recorded (the runtime assumes the paper's range)
            config[REFINER_DT_KEY] = self.refiner_dt.to_dict()
        return config


def _check_consistency(bundle: Bundle) -> None:
    predictor = bundle.predictor.config
    if not isinstance(bundle.predictor, SiT):
        raise FlowTurboError(f"bundle predictor must be a SiT, got {type(bundle.predictor).__name__}")
    if not isinstance(bundle.decoder, LatentDecoder):
        raise FlowTurboError(f"bundle decoder must be a LatentDecoder, got {type(bundle.decoder).__name__}")
    if bundle.decoder.latent_channels != predictor.in_channels:
        raise FlowTurboError(
            f"decoder takes {bundle.decoder.latent_channels}-channel latents but the predictor makes "
            f"{predictor.in_channels}-channel latents; pair them with a matching decoder"
        )
    if bundle.refiner is not None:
        if not isinstance(bundle.refiner, VelocityRefiner):
            raise FlowTurboError(f"bundle refiner must be a VelocityRefiner, got {type(bundle.refiner).__name__}")
        refiner = bundle.refiner.config
        for field in ("in_channels", "input_size", "num_classes"):
            if getattr(refiner, field) != getattr(predictor, field):
                raise FlowTurboError(
                    f"refiner {field} = {getattr(refiner, field)} does not match the predictor's "
                    f"{getattr(predictor, field)}; a refiner must be trained for its predictor"
                )
    if bundle.refiner_dt is not None:
        if not isinstance(bundle.refiner_dt, DtDistribution):
            raise FlowTurboError(f"bundle refiner_dt must be a DtDistribution, got {type(bundle.refiner_dt).__name__}")
        if bundle.refiner is None:
            raise FlowTurboError("the bundle records the dt range a refiner was trained on (refiner_dt) but has no "
                                 "refiner; drop refiner_dt or add the refiner")
    if bundle.encoder is not None:
        if not isinstance(bundle.encoder, LatentEncoder):
            raise FlowTurboError(f"bundle encoder must be a LatentEncoder, got {type(bundle.encoder).__name__}")
        if bundle.encoder.latent_channels != predictor.in_channels:
            raise FlowTurboError(
                f"encoder makes {bundle.encoder.latent_channels}-channel latents but the predictor takes "
                f"{predictor.in_channels}-channel latents; pair them with a matching encoder"
            )
    if bundle.class_names is not None:
        names = bundle.class_names
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise FlowTurboError("class_names must be a list of strings or None")
        if len(names) != predictor.num_classes:
            raise FlowTurboError(
                f"{len(names)} class names for a predictor with {predictor.num_classes} classes; give one per class"
            )
    if not isinstance(bundle.defaults, BundleDefaults):
        raise FlowTurboError(f"bundle defaults must be BundleDefaults, got {type(bundle.defaults).__name__}")
    inpaint = bundle.defaults.inpaint_schedule
    if bundle.refiner is None and inpaint is not None and SamplingSchedule.parse(inpaint).uses_refiner:
        raise FlowTurboError(f"default inpainting schedule {inpaint!r} has refiner (R) steps but the bundle has no "
                             "refiner; give one without R (flowturbo train package --inpaint-schedule H4)")
    if bundle.refiner is None and StepKind.REFINER in bundle.defaults.sampling_schedule().steps:
        raise FlowTurboError(
            f"default schedule {bundle.defaults.schedule!r} has refiner (R) steps but the bundle has no refiner; "
            f"give the bundle a default schedule without R, e.g. BundleDefaults(schedule="
            f"{DEFAULT_SCHEDULE_WITHOUT_REFINER!r}) (flowturbo train package --schedule "
            f"{DEFAULT_SCHEDULE_WITHOUT_REFINER}), or add a refiner"
        )


# --------------------------------------------------------------------------------------------- save
def _save_weights(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})


def save_bundle(bundle: Bundle, folder: str | os.PathLike[str], *, overwrite: bool = False,
                wait: bool = False) -> Path:
    """Write ``bundle`` to ``folder`` atomically (staging folder beside it + swap); returns the folder.

    An existing ``folder`` is replaced only with ``overwrite=True``, and only if every entry in it is listed
    in flowturbo's ownership record (so a typo cannot delete unrelated files). ``wait``: queue behind another
    flowturbo process writing ``folder`` instead of failing.
    """
    _check_consistency(bundle)
    target = Path(folder)
    check_kind(target, command="train package")  # never another kind of output, whatever `overwrite` says
    if target.exists() and not overwrite:
        raise FlowTurboError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    with OutputFolder(target, command="train package", what="bundle", wait=wait) as out, out.staging() as staging:
        (staging / CONFIG_FILE).write_text(json_text(bundle.config_dict()))
        _save_weights(bundle.predictor, staging / PREDICTOR_FILE)
        if bundle.refiner is not None:
            _save_weights(bundle.refiner, staging / REFINER_FILE)
        bundle.decoder.save_to_bundle(staging)
        if bundle.encoder is not None:
            bundle.encoder.save_to_bundle(staging)
    return target


# --------------------------------------------------------------------------------------------- load
def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise CheckpointError(f"bundle folder not found: {folder}")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; a bundle is a folder holding {CONFIG_FILE} and weights")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(
            f"{folder} has no {CONFIG_FILE}; a bundle folder holds {CONFIG_FILE} + {PREDICTOR_FILE} "
            "(write one with save_bundle / make_random_bundle)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != BUNDLE_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{config_path} has format {found!r}; expected {BUNDLE_FORMAT!r}")
    missing = [k for k in ("predictor", "decoder") if k not in config]
    if missing:
        raise CheckpointError(f"{config_path} lacks {missing}")
    return config


def load_bundle(
    folder: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    kernel_backend: KernelBackend | str = KernelBackend.REFERENCE,
) -> Bundle:
    """Load a bundle folder: models in eval mode on ``device`` in ``dtype`` (decoder and encoder too).

    Raises :class:`CheckpointError` for a missing folder or config, a bad format, or weights that do not fit
    the config (the message names the keys).
    """
    root = Path(folder)
    config = _read_config(root)
    backend = KernelBackend.coerce(kernel_backend)
    try:
        predictor_config = SiTConfig.from_dict(config["predictor"])
        refiner_config = RefinerConfig.from_dict(config["refiner"]) if config.get("refiner") is not None else None
        defaults = BundleDefaults.from_dict(config.get("defaults") or {})
        refiner_dt = read_dt_record(config.get(REFINER_DT_KEY))
    except CheckpointError:
        raise
    except (FlowTurboError, TypeError) as exc:
        raise CheckpointError(f"bundle {root}: bad {CONFIG_FILE}: {exc}") from exc
    predictor_path = root / PREDICTOR_FILE
    if not predictor_path.is_file():
        raise CheckpointError(f"bundle {root} has no {PREDICTOR_FILE}")
    predictor = load_sit_checkpoint(
        predictor_path, predictor_config, device=device, dtype=dtype, kernel_backend=backend
    )
    refiner = None
    if refiner_config is not None:
        refiner_path = root / REFINER_FILE
        if not refiner_path.is_file():
            raise CheckpointError(f"bundle {root} declares a refiner but has no {REFINER_FILE}")
        refiner = load_refiner_checkpoint(
            refiner_path, refiner_config, device=device, dtype=dtype, kernel_backend=backend
        )
    decoder = load_decoder_from_bundle(root, config["decoder"], device, dtype)
    encoder = _load_encoder_or_none(root, config, device, dtype)
    try:
        return Bundle(predictor, refiner, decoder, config.get("class_names"), defaults, encoder, refiner_dt)
    except CheckpointError:
        raise
    except FlowTurboError as exc:
        if refiner is None and StepKind.REFINER in defaults.sampling_schedule().steps:  # no --schedule fixes it
            raise CheckpointError(
                f"bundle {root} is inconsistent: its default schedule {defaults.schedule!r} has refiner (R) steps "
                f"but it has no refiner; set \"defaults\": {{\"schedule\": \"{DEFAULT_SCHEDULE_WITHOUT_REFINER}\"}} "
                f"in {root / CONFIG_FILE} (or any schedule without R), or add the refiner (flowturbo train package "
                f"--refiner RUN)"
            ) from exc
        raise CheckpointError(f"bundle {root} is inconsistent: {exc}") from exc


def load_bundle_image_parts(folder: str | os.PathLike[str], *, device: torch.device | str = "cpu",
                            dtype: torch.dtype = torch.float32) -> tuple[LatentDecoder, LatentEncoder | None,
                                                                         list[str] | None]:
    """The decoder (every variant it stores), the encoder (None if it has none) and the class names of the bundle
    folder, without its predictor and refiner: what ``train package --decoder-bundle`` reuses around new models."""
    root = Path(folder)
    config = _read_config(root)
    decoder = load_decoder_from_bundle(root, config["decoder"], device, dtype)
    return decoder, _load_encoder_or_none(root, config, device, dtype), config.get("class_names")


def _load_encoder_or_none(root: Path, config: dict[str, Any], device: torch.device | str,
                          dtype: torch.dtype) -> LatentEncoder | None:
    """The bundle's encoder, or None when it has none *or when the declared one cannot be loaded* (missing or
    damaged weights file, weights that do not fit, another model's encoder).

    Only inpainting and editing need the encoder, so a broken one must not stop the bundle from sampling:
    they raise :func:`flowturbo.training.encoders.missing_encoder_error`, which re-reads the bundle and gives
    this load's reason (naming the file). :func:`flowturbo.training.encoders.load_encoder` stays strict.
    """
    if config.get(ENCODER_CONFIG_KEY) is None:
        return None
    try:
        encoder = load_encoder_from_bundle(root, config[ENCODER_CONFIG_KEY], device, dtype)
        check_encoder_fits(encoder, config, str(root))
    except FlowTurboError:  # CheckpointError, or e.g. diffusers missing for a diffusers-vae encoder
        return None
    return encoder


# ------------------------------------------------------------------------------------------- random
def make_random_bundle(
    folder: str | os.PathLike[str],
    *,
    preset: str = "SiT-T/2",
    input_size: int = 8,
    in_channels: int = 4,
    num_classes: int = 10,
    seed: int = 0,
    with_refiner: bool = True,
    decoder: str | LatentDecoder = "identity",
    overwrite: bool = False,
) -> Bundle:
    """Save a bundle with deterministic random weights (for tests and demos) and return it.

    All weights come from a generator seeded with ``seed``; the adaLN-Zero layers get small noise too so
    the outputs are not identically zero. ``decoder`` is ``"identity"`` or a :class:`LatentDecoder`.
    """
    generator = torch.Generator().manual_seed(seed)
    predictor_config = sit_config(preset, input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    predictor = SiT(predictor_config)
    predictor.initialize_weights(generator)
    perturb_zero_initialized(predictor, generator=generator)
    refiner = None
    if with_refiner:
        refiner = VelocityRefiner(RefinerConfig.for_predictor(predictor_config))
        refiner.initialize_weights(generator)
        perturb_zero_initialized(refiner, generator=generator)
    if decoder == "identity":
        decoder_module: LatentDecoder = IdentityDecoder(in_channels)
    elif isinstance(decoder, LatentDecoder):
        decoder_module = decoder
    else:
        raise FlowTurboError(f"decoder must be 'identity' or a LatentDecoder instance, got {decoder!r}")
    defaults = BundleDefaults(schedule=DEFAULT_SCHEDULE if with_refiner else DEFAULT_SCHEDULE_WITHOUT_REFINER)
    bundle = Bundle(
        predictor=predictor.eval(),
        refiner=refiner.eval() if refiner is not None else None,
        decoder=decoder_module.eval(),
        class_names=[f"class {i}" for i in range(num_classes)],
        defaults=defaults,
    )
    save_bundle(bundle, folder, overwrite=overwrite)
    return bundle


__all__ = [
    "BUNDLE_FORMAT",
    "Bundle",
    "BundleDefaults",
    "load_bundle",
    "load_bundle_image_parts",
    "make_random_bundle",
    "save_bundle",
]
