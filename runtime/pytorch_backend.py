"""The pure-PyTorch backend: the one documented place where ``runtime`` builds models from ``training``.

:func:`load_pipeline` turns what a user has — our bundle folder, the embedded default, or official
checkpoint files (SiT-XL/2 ``.pt``, a FlowTurbo refiner ``.pt``, a diffusers VAE folder) — and
:func:`load_text_pipeline` a diffusers text-to-image pipeline folder into a :class:`TorchPipeline` the
:class:`~flowturbo.runtime.sampler.Sampler` runs. Each pipeline's :attr:`TorchPipeline.family` is its model
family's adapter (:mod:`flowturbo.families`): what the sampler calls to condition, run and decode.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from flowturbo.dtypes import FLOAT_DTYPE_NAMES, dtype_name, torch_dtype
from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.kernels import TRITON_AVAILABLE, KernelBackend, default_kernel_backend, require_triton_kernels
from flowturbo.refiner_dt import DtDistribution
from flowturbo.training.bundle import OFFICIAL_GUIDANCE_CHANNELS, OFFICIAL_SIT_DEFAULTS, BundleDefaults, load_bundle
from flowturbo.training.checkpoints import (
    PREDICTOR_DEFAULT_ENTRY,
    REFINER_DEFAULT_ENTRY,
    STATE_DICT_CONTAINER_KEYS,
    load_refiner_checkpoint,
    load_sit_checkpoint,
)
from flowturbo.training.decoders import LatentDecoder, load_vae_decoder
from flowturbo.training.encoders import (
    OFFICIAL_SOURCE_PREFIX,
    DiffusersVAEEncoder,
    LatentEncoder,
    missing_encoder_error,
)
from flowturbo.training.families import load_family
from flowturbo.training.families.sit import SiTFamily
from flowturbo.training.sampling import (
    FiniteCheck,
    check_labels,
    make_noise,
    non_finite_message,
    run_schedule,
    sample_schedule,
)

# The reference sampling functions, re-exported: runtime code reaches training/ only through this module.
__all__ = ["OFFICIAL_GUIDANCE_CHANNELS", "TorchPipeline", "FiniteCheck", "check_labels", "load_pipeline",
           "load_prompt_encoder", "load_text_pipeline", "make_noise", "non_finite_message", "resolve_device",
           "resolve_dtype",
           "resolve_kernel_backend", "run_schedule", "sample_schedule"]

DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "assets" / "default_model"
GPU_DEFAULT_DTYPE = torch.bfloat16  # the fast path's default on CUDA (measured: BENCHMARKS.md)
CPU_DEFAULT_DTYPE = torch.float32


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
    dtype: torch.dtype  # the models' (and decoder's) dtype
    kernel_backend: KernelBackend = KernelBackend.REFERENCE
    checkpoint_entries: dict[str, str] | None = None  # official checkpoints: which entry each file was read from
    encoder: LatentEncoder | None = None  # images -> latents (inpainting / editing); see require_encoder
    encoder_source: str | None = None  # official checkpoints: the --vae folder its encoder is read from on demand
    refiner_dt: DtDistribution | None = None  # the dt the refiner was trained on (None: not recorded, e.g. official)
    family_adapter: Any = None  # a text-to-image family's adapter (None: the class-conditional SiT family)

    @property
    def family(self) -> Any:
        """The model family's adapter (:class:`flowturbo.families.ModelFamily`): for class-conditional models the SiT
        family over this pipeline's current predictor, refiner and decoder."""
        if self.family_adapter is not None:
            return self.family_adapter
        return SiTFamily(self.predictor, self.refiner, self.decoder, self.num_classes, self.latent_shape,
                         self.defaults, self.device)

    def __post_init__(self) -> None:
        fast_layout = getattr(self.decoder, "to_fast_layout", None)  # any decoder module works; ours may re-layout
        if fast_layout is not None:
            fast_layout(self.device)  # the SD-VAE / TAESD decoders run channels-last on CUDA

    def require_encoder(self, what: str) -> Any:
        """The image encoder, loaded on first use for official checkpoints (the ``--vae`` AutoencoderKL's encoder);
        a clear error naming the fix when the model has none. A text-to-image pipeline's is its family's VAE encoder
        (with the VAE's scale and shift, the inverse of the family's decode)."""
        if self.encoder is None and self.family_adapter is not None:
            self.encoder = self.family_adapter.image_encoder().eval()
        if self.encoder is None and self.encoder_source is not None:
            self.encoder = DiffusersVAEEncoder.from_folder(self.encoder_source, device=self.device,
                                                           dtype=self.dtype).eval()
        if self.encoder is None:
            raise missing_encoder_error(self.source, what)
        return self.encoder

    @property
    def state_dtype(self) -> torch.dtype:
        """The solver state's dtype: float64 for a float64 model, else float32 (bf16/fp16 models are fed casts,
        the latents accumulate in float32 as under the official code's autocast)."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def describe(self) -> dict[str, Any]:
        if self.family_adapter is not None:  # a text-to-image pipeline: its family says what it is
            return {"source": self.source, **self.family_adapter.describe(), "device": str(self.device),
                    "dtype": dtype_name(self.dtype), "state_dtype": dtype_name(self.state_dtype),
                    "kernels": self.kernel_backend.value}
        described = {
            "source": self.source,
            "num_classes": self.num_classes,
            "latent_shape": list(self.latent_shape),
            "has_refiner": self.refiner is not None,
            "refiner_dt_conditioning": bool(getattr(self.refiner, "takes_dt", False)),
            "decoder": self.decoder.decoder_type,
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            "state_dtype": dtype_name(self.state_dtype),
            "kernels": self.kernel_backend.value,
        }
        if self.checkpoint_entries:
            described["checkpoint_entries"] = dict(self.checkpoint_entries)
        return described


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """``'float32'`` / ``'fp16'`` / ``'bf16'`` / a torch dtype -> torch dtype, with a clear error.

    ``None`` / ``'auto'``: bfloat16 on CUDA (the fast path), float32 elsewhere.
    """
    if name in (None, "auto"):
        return GPU_DEFAULT_DTYPE if device is not None and device.type == "cuda" else CPU_DEFAULT_DTYPE
    dtype = torch_dtype(name)
    if dtype_name(dtype) not in FLOAT_DTYPE_NAMES:
        raise FlowTurboError(f"unknown dtype {name!r}; choose one of {', '.join(FLOAT_DTYPE_NAMES)}")
    return dtype


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``None``/``'auto'`` -> CUDA when available else CPU; refuses CUDA on a machine without it."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise FlowTurboError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise FlowTurboError(f"device {name!r} is not supported; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlowTurboError(f"device {name!r} requested but this machine has no CUDA GPU; use --device cpu")
    return device


def resolve_kernel_backend(name: str | KernelBackend | None, device: torch.device) -> KernelBackend:
    """``None`` / ``'auto'``: our Triton kernels on CUDA (when Triton is installed and a probe launch works there;
    otherwise the reference ops with one warning naming the cause), the reference ops elsewhere.

    An explicit ``'triton'`` where Triton cannot run is refused with the fix.
    """
    if name in (None, "auto"):
        return default_kernel_backend(device)
    backend = KernelBackend.coerce(name)
    if backend is KernelBackend.TRITON:
        if not TRITON_AVAILABLE:
            raise FlowTurboError("--kernels triton needs Triton (pip install 'triton>=3.6'); or use --kernels reference")
        if device.type != "cuda":
            raise FlowTurboError(
                f"--kernels triton runs our Triton kernels on CUDA, not on {device}; use --kernels reference (the "
                "CPU default) or --device cuda"
            )
        require_triton_kernels(device)  # installed but unable to compile/run here: one clear error
    return backend


def load_pipeline(
    model: str | Path | None = None,
    *,
    predictor: str | Path | None = None,
    refiner: str | Path | None = None,
    vae: str | Path | None = None,
    decoder_variant: str | None = None,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    kernel_backend: str | KernelBackend | None = None,
    checkpoint_entry: str | None = None,
) -> TorchPipeline:
    """Load a bundle folder (``model``), the embedded default (nothing given) or official checkpoint files.

    ``predictor``/``refiner`` are ``.pt``/``.safetensors`` files in the official SiT / FlowTurbo key layout;
    ``vae`` is a diffusers ``AutoencoderKL`` folder (sd-vae-ft-ema / -mse) or ``AutoencoderTiny`` folder
    (TAESD). ``decoder_variant`` picks a decoder variant of a bundle's own autoencoder (``ema`` or ``mse``).
    ``dtype`` / ``kernel_backend`` ``None``: the device's fast-path defaults (CUDA: bfloat16 + Triton kernels;
    CPU: float32 + reference ops). ``checkpoint_entry`` (``model`` | ``ema``) picks the entry of official
    ``{"model", "ema"}`` checkpoints; by default each file kind follows the released code (predictor: ema,
    refiner: model).
    """
    torch_device = resolve_device(device)
    model_dtype = resolve_dtype(dtype, torch_device)
    backend = resolve_kernel_backend(kernel_backend, torch_device)
    if checkpoint_entry is not None and checkpoint_entry not in STATE_DICT_CONTAINER_KEYS:
        raise FlowTurboError(f"--checkpoint-entry must be one of {', '.join(STATE_DICT_CONTAINER_KEYS)}, "
                             f"got {checkpoint_entry!r}")
    if predictor is not None:
        if model is not None:
            raise FlowTurboError("give either a bundle (--model) or checkpoint files (--predictor ...), not both")
        return _load_official(predictor, refiner, vae, torch_device, model_dtype, backend, checkpoint_entry)
    if checkpoint_entry is not None:
        raise FlowTurboError("--checkpoint-entry applies to official checkpoint files (--predictor/--refiner); "
                             "a bundle holds one set of weights")
    if refiner is not None or vae is not None:
        raise FlowTurboError("--refiner/--vae are used with --predictor (official checkpoints); a bundle has its own")
    folder = Path(model) if model is not None else DEFAULT_BUNDLE_DIR
    if model is None and not (folder / "config.json").is_file():
        raise CheckpointError(
            f"the embedded default model is missing from {folder}; reinstall flowturbo or pass --model BUNDLE_DIR"
        )
    bundle = load_bundle(folder, device=torch_device, dtype=model_dtype, kernel_backend=backend)
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
        dtype=model_dtype,
        kernel_backend=backend,
        encoder=None if bundle.encoder is None else bundle.encoder.eval(),
        refiner_dt=bundle.refiner_dt,
    )


def text_bundle_settings(folder: str | Path | None) -> dict[str, Any] | None:
    """None unless ``folder`` is a text bundle (``train package --refiner`` of a refiner for a diffusers teacher:
    :mod:`flowturbo.training.text_bundle`); else its ``pipeline`` folder, ``refiner`` weights and ``defaults``
    (the pipeline it points at must still be there: named if not)."""
    from flowturbo.training.text_bundle import bundle_defaults, is_text_bundle, read_text_bundle

    if not is_text_bundle(folder):
        return None
    bundle = read_text_bundle(folder)  # type: ignore[arg-type]
    return {"pipeline": str(bundle.pipeline), "refiner": str(bundle.refiner), "defaults": bundle_defaults(bundle)}


def load_text_pipeline(
    folder: str | Path,
    *,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
    kernel_backend: str | KernelBackend | None = None,
    max_sequence_length: int | None = None,
    before_weights: Any = None,
    refiner: str | Path | None = None,
    defaults: dict[str, Any] | None = None,
) -> TorchPipeline:
    """A diffusers text-to-image pipeline folder (a flow-matching pipeline class registered in
    :mod:`flowturbo.training.families`) as a :class:`TorchPipeline` whose family is the folder's adapter.

    ``dtype`` / ``kernel_backend`` ``None``: the device's fast-path defaults (as :func:`load_pipeline`);
    ``max_sequence_length``: T5 tokens per prompt (None: the pipeline's default); ``before_weights(family)``: called
    with the adapter once the folder's configs are read, before any weights load (e.g. ``family.check_request``);
    ``refiner``: a token refiner trained for this pipeline (``train refiner --teacher DIR`` run or its
    ``refiner.safetensors``), which R steps need; ``defaults``: family defaults to override (a text bundle's
    schedule, CFG and guidance).
    """
    trained = None
    if refiner is not None:
        from flowturbo.training.token_refiner import read_token_refiner

        trained = read_token_refiner(refiner)  # a bad file fails before the pipeline loads
    torch_device = resolve_device(device)
    model_dtype = resolve_dtype(dtype, torch_device)
    backend = resolve_kernel_backend(kernel_backend, torch_device)

    def before(family: Any) -> None:
        if defaults:
            family.defaults = dataclasses.replace(family.defaults, **defaults)
        if trained is not None:
            family.expect_refiner(trained, source=f"--refiner {refiner}")
        if before_weights is not None:
            before_weights(family)

    family = load_family(folder, device=torch_device, dtype=model_dtype, max_sequence_length=max_sequence_length,
                         before_weights=before)
    if trained is not None:
        family.attach_refiner(trained, kernel_backend=backend, source=f"--refiner {refiner}")
    from flowturbo.training.families.fused_adaln import fuse_adaln

    family.adaln_fusion = fuse_adaln(family.transformer, backend)  # the fused adaLN kernel where the pattern matches
    defaults = family.defaults
    return TorchPipeline(
        predictor=family.transformer,
        refiner=family.refiner,
        refiner_dt=family.refiner_dt,
        decoder=family.decoder,
        num_classes=0,
        latent_shape=family.latent_shape(),
        class_names=None,
        defaults=BundleDefaults(defaults.schedule, defaults.cfg, defaults.guidance_channels, defaults.inpaint_schedule),
        source=str(folder),
        device=torch_device,
        dtype=model_dtype,
        kernel_backend=backend,
        family_adapter=family,
    )


def load_prompt_encoder(folder: str | Path, *, max_sequence_length: int | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """The text encoders of a diffusers text-to-image pipeline folder, as its family adapter without the transformer
    and the VAE (neither is loaded): what an exported text-to-image artifact needs to turn prompts into the
    embeddings its graphs take. ``family.condition(prompts, schedule, negative=..., guidance=...)`` then gives the
    same :class:`~flowturbo.families.TextConditioning` as the full adapter (the same encoders, the same rules)."""
    from flowturbo.training.families import recognize_pipeline

    found, family_type = recognize_pipeline(folder, "the export's pipeline folder")
    return family_type.load_encoders(found, device=torch.device(device), dtype=dtype,
                                     max_sequence_length=max_sequence_length)


def _load_official(
    predictor: str | Path, refiner: str | Path | None, vae: str | Path | None,
    device: torch.device, dtype: torch.dtype, kernel_backend: KernelBackend, checkpoint_entry: str | None,
) -> TorchPipeline:
    entries = {"predictor": checkpoint_entry or PREDICTOR_DEFAULT_ENTRY}
    sit = load_sit_checkpoint(predictor, prefer=entries["predictor"], kernel_backend=kernel_backend)
    sit = sit.to(device=device, dtype=dtype).eval()
    config = sit.config
    if vae is None:
        raise FlowTurboError(
            "official SiT checkpoints produce SD-VAE latents: pass --vae FOLDER (a diffusers AutoencoderKL folder "
            "such as stabilityai/sd-vae-ft-ema, or an AutoencoderTiny folder such as madebyollin/taesd)"
        )
    decoder = load_vae_decoder(vae, device=device, dtype=dtype).eval()
    ref = None
    if refiner is not None:
        entries["refiner"] = checkpoint_entry or REFINER_DEFAULT_ENTRY
        ref = load_refiner_checkpoint(refiner, predictor_config=config, prefer=entries["refiner"],
                                      kernel_backend=kernel_backend)
        ref = ref.to(device=device, dtype=dtype).eval()
    return TorchPipeline(
        predictor=sit,
        refiner=ref,
        decoder=decoder,
        num_classes=config.num_classes,
        latent_shape=(config.in_channels, config.input_size, config.input_size),
        class_names=None,
        defaults=OFFICIAL_SIT_DEFAULTS,
        source=f"{OFFICIAL_SOURCE_PREFIX}{predictor}" + (f" + {refiner}" if refiner else ""),
        device=device,
        dtype=dtype,
        kernel_backend=kernel_backend,
        checkpoint_entries=entries,
        encoder_source=_vae_encoder_source(vae),
    )


def _vae_encoder_source(vae: str | Path) -> str | None:
    """The --vae folder when it can encode (AutoencoderKL); TAESD folders are used to decode only."""
    import json

    try:
        class_name = json.loads((Path(vae) / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return str(vae)
    return None if class_name == "AutoencoderTiny" else str(vae)
