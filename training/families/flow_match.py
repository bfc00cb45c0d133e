"""What the adapters of diffusers' flow-matching text-to-image pipelines share (docs/predictor_protocol.md).

These pipelines (a transformer over VAE latents, text encoders from ``transformers``, a
``FlowMatchEulerDiscreteScheduler``) integrate ``dx/dsigma = model_output`` from ``sigma = 1`` (noise) to
``sigma = 0`` (data), with ``x_sigma = (1 - sigma) x_data + sigma noise``. In flowturbo's convention that is
``t = 1 - sigma`` and the velocity ``v = x_data - noise = -model_output``: the one mapping, made here
(:class:`FlowMatchCalls`). The exactness rules that make our E steps equal the pipelines bit for bit in float32:

* the grid comes from the scheduler itself (:func:`flow_match_timesteps`: the folder's scheduler config, its
  ``set_timesteps`` called as the pipeline calls it), kept as ``t_k = 1 - float(sigma_k)`` in float64, so that
  ``h = t_{k+1} - t_k`` equals the scheduler's float32 ``sigma_k - sigma_{k+1}`` and ``1 - t_k`` gives back the
  float32 sigma exactly;
* the model's timestep is ``float32(sigma * num_train_timesteps)``, as the scheduler computes it;
* the negation of the model output is exact, and so is guidance under it (``u + s (c - u)`` rounds
  sign-symmetrically).

Here: reading a pipeline folder (``model_index.json``) and naming what is missing, the time grid, the prompt
encoding rules (once per distinct prompt, under ``no_grad``, one warning naming the limit when a prompt is
truncated), guidance checks per :class:`~flowturbo.families.GuidanceRule`, the VAE decode with scale and shift,
and :class:`FlowMatchFamily`, the base class of the adapters (``sd3.py``, ``flux.py``), which add their text
encoders, their transformer call and their packing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from flowturbo.errors import CheckpointError, FlowTurboError, FlowTurboWarning, SamplingError
from flowturbo.families import (
    PIPELINE_INDEX,
    ConditioningKind,
    FamilyDefaults,
    GuidanceRule,
    ImageSize,
    PromptEmbeddings,
    TextConditioning,
    check_image_size,
    conditioning_mismatch,
)
from flowturbo.kernels import cfg_guided_reference
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.decoders import DiffusersVAEDecoder
from flowturbo.training.encoders import DiffusersVAEEncoder

MODEL_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_VOCABULARIES = ("tokenizer.json", "vocab.json", "spiece.model")  # any one of them (vocab.json: + merges.txt)
ENCODE_BATCH = 16  # distinct prompts per text-encoder call
PROMPT_PREVIEW = 40  # characters of a prompt quoted in messages
# Scheduler options that are not a deterministic ODE from sigma = 1 to 0, which a FlowTurbo schedule integrates.
UNSUPPORTED_SCHEDULER_OPTIONS = {"stochastic_sampling": "stochastic sampling (an SDE, not an ODE)",
                                 "invert_sigmas": "inverted sigmas"}


class PromptTruncatedWarning(FlowTurboWarning):
    """A prompt is longer than a text encoder reads: the rest is dropped (as the diffusers pipelines do)."""


# ------------------------------------------------------------------------------------------------- folders
@dataclasses.dataclass(frozen=True)
class PipelineFolder:
    """A diffusers pipeline folder as ``save_pretrained`` / the Hub lay it out: ``model_index.json`` naming the
    pipeline class and its components (``name: [library, class]``; optional ones ``[null, null]``), one
    sub-folder per component."""

    path: Path
    class_name: str
    components: dict[str, tuple[str | None, str | None]]

    @classmethod
    def read(cls, folder: str | Path, flag: str = "--pipeline") -> "PipelineFolder":
        path = Path(folder)
        if not path.is_dir():
            raise CheckpointError(f"{flag} {path}: no such folder (give a diffusers pipeline folder, as the Hub "
                                  f"downloads it: {PIPELINE_INDEX} + one folder per component)")
        index = path / PIPELINE_INDEX
        if not index.is_file():
            model_class = _read_json(path / MODEL_CONFIG).get("_class_name") if (path / MODEL_CONFIG).is_file() \
                else None
            what = f"a diffusers model folder ({model_class}), not a pipeline" if model_class else \
                "not a diffusers pipeline folder"
            raise CheckpointError(f"{flag} {path} has no {PIPELINE_INDEX}: {what}; give the whole pipeline folder "
                                  f"({PIPELINE_INDEX} + transformer/, vae/, text_encoder/, ...)")
        data = _read_json(index)
        components = {name: (value[0], value[1]) for name, value in data.items()
                      if not name.startswith("_") and isinstance(value, list) and len(value) == 2}
        return cls(path, str(data.get("_class_name")), components)

    def component_class(self, name: str) -> str | None:
        """The class a component is saved as (None: absent or optional and left out)."""
        return self.components.get(name, (None, None))[1]

    def scheduler_config(self) -> dict[str, Any]:
        config = self.path / "scheduler" / SCHEDULER_CONFIG
        return _read_json(config) if config.is_file() else {}

    def model_config(self, name: str, model_type: Any = None) -> dict[str, Any]:
        """A model component's ``config.json``, completed with ``model_type``'s constructor defaults (what diffusers
        builds from it) when given; read without loading any weights."""
        config = _read_json(self.path / name / MODEL_CONFIG)
        if model_type is None:
            return config
        defaults = {name: p.default for name, p in inspect.signature(model_type.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        return {**defaults, **config}

    def describe_models(self) -> str:
        """``UNet2DConditionModel + PNDMScheduler, epsilon prediction``: what a refused folder holds."""
        denoiser = self.component_class("transformer") or self.component_class("unet") or "no denoiser"
        parts = f"{denoiser} + {self.component_class('scheduler') or 'no scheduler'}"
        prediction = self.scheduler_config().get("prediction_type")
        return f"{parts}, {prediction} prediction" if prediction else parts

    def check_files(self) -> None:
        """Every listed component's files are present; the first missing path is a CheckpointError naming it."""
        for name, (_, class_name) in self.components.items():
            if class_name is None:
                continue  # an optional component saved without it (e.g. SD3's image_encoder)
            missing = _missing_component_file(self.path / name, class_name)
            if missing is not None:
                raise CheckpointError(f"missing {missing}: the {self.class_name} folder's {name} ({class_name}) needs "
                                      f"it; download the complete pipeline folder")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _missing_component_file(folder: Path, class_name: str) -> str | None:
    """The first missing file (or folder) a component of class ``class_name`` needs, or None."""
    if not folder.is_dir():
        return f"{folder}/"
    if class_name.endswith("Scheduler"):
        return None if (folder / SCHEDULER_CONFIG).is_file() else str(folder / SCHEDULER_CONFIG)
    if "Tokenizer" in class_name:
        if (folder / "vocab.json").is_file() and not (folder / "merges.txt").is_file() \
                and not (folder / "tokenizer.json").is_file():
            return str(folder / "merges.txt")
        if any((folder / name).is_file() for name in TOKENIZER_VOCABULARIES):
            return None
        return f"{folder / TOKENIZER_VOCABULARIES[0]} (or {' / '.join(TOKENIZER_VOCABULARIES[1:])})"
    if class_name.endswith(("Processor", "FeatureExtractor")):
        return None  # image pre-processing configs: not used for sampling
    if not (folder / MODEL_CONFIG).is_file():
        return str(folder / MODEL_CONFIG)
    for index in sorted(folder.glob("*.index.json")):  # sharded weights: every shard the index names
        weight_map = _read_json(index).get("weight_map", {})
        for shard in sorted(set(weight_map.values()) if isinstance(weight_map, dict) else ()):
            if not (folder / shard).is_file():
                return str(folder / shard)
        return None
    if any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir()):
        return None
    return f"weights in {folder} (a *.safetensors or *.bin file)"


# ------------------------------------------------------------------------------------------------ the grid
def calculate_shift(image_tokens: int, base_seq_len: int, max_seq_len: int, base_shift: float,
                    max_shift: float) -> float:
    """The resolution-dependent shift ``mu`` of the diffusers pipelines (linear in the image's token count; the same
    arithmetic, so the same float)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_tokens * m + b


def flow_match_timesteps(config: dict[str, Any], num_steps: int, image_tokens: int,
                         linspace_sigmas: bool) -> tuple[float, ...]:
    """The pipeline's own grid for ``num_steps`` steps, on flowturbo's time axis: ``t_k = 1 - sigma_k`` (float64).

    A ``FlowMatchEulerDiscreteScheduler`` is built from the folder's scheduler config and ``set_timesteps`` is called
    as the pipeline calls it: with ``mu`` from the image's token count when the config shifts dynamically (FLUX.1-dev),
    with explicit sigmas ``linspace(1, 1/N, N)`` for pipelines that pass them (``linspace_sigmas``: FLUX), else the
    scheduler's own (static-shift) grid (SD3). So ``E28`` is the pipeline's default exactly.
    """
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    for option, what in UNSUPPORTED_SCHEDULER_OPTIONS.items():
        if config.get(option):
            raise FlowTurboError(f"this pipeline's scheduler uses {what} ({option}: true); FlowTurbo schedules "
                                 "integrate the deterministic flow: set it false in scheduler/scheduler_config.json")
    with quiet_diffusers():
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    full = scheduler.config  # the folder's config with the scheduler's defaults filled in
    kwargs: dict[str, Any] = {}
    if full.get("use_dynamic_shifting"):
        kwargs["mu"] = calculate_shift(image_tokens, full["base_image_seq_len"], full["max_image_seq_len"],
                                       full["base_shift"], full["max_shift"])
    if linspace_sigmas and not full.get("use_flow_sigmas"):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), **kwargs)
    else:
        scheduler.set_timesteps(num_steps, **kwargs)
    grid = tuple(1.0 - float(sigma) for sigma in scheduler.sigmas)  # exact: 1 - a float32 sigma fits a float64
    if len(grid) != num_steps + 1 or grid[0] != 0.0 or grid[-1] != 1.0:
        raise FlowTurboError(f"this pipeline's scheduler gives sigmas {float(scheduler.sigmas[0]):g} .. "
                             f"{float(scheduler.sigmas[-1]):g} over {len(grid) - 1} steps; a FlowTurbo schedule of "
                             f"{num_steps} steps runs from sigma 1 (noise) to 0")
    return grid


# --------------------------------------------------------------------------------------------- the calls
class FlowMatchCalls:
    """:class:`flowturbo.integrator.ModelCalls` of a diffusers flow-matching transformer for one batch.

    ``predictor(x, t)`` runs the transformer at ``sigma = 1 - t`` on ``[x; x]`` with ``[prompt; negative]`` when the
    schedule guides (the solver ops combine the halves), on ``x`` alone otherwise, and returns ``-model_output``
    (flowturbo's velocity). ``refiner(x, t, v, dt)`` runs the family's token refiner (when one is attached:
    :meth:`FlowMatchFamily.attach_refiner`) on the *guided* carried velocity and the prompts' pooled embeddings: B
    rows, which the solver ops take as already guided (``flowturbo.training.token_refiner``).
    """

    def __init__(self, family: "FlowMatchFamily", conditioning: TextConditioning, doubled: bool) -> None:
        self.family = family
        self.doubled = bool(doubled)
        self.inputs = family.transformer_inputs(conditioning, self.doubled)
        self.pooled = conditioning.prompt.pooled  # (B, P): the refiner's text conditioning

    def predictor(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """Raw velocity at (x, t): (M, C, h, w), M = 2B ([cond; uncond]) or B."""
        sigma = 1.0 - float(t)  # exact for t = 1 - sigma (module docstring)
        xx = torch.cat([x, x]) if self.doubled else x  # (M, C, h, w)
        return self.family.transformer_output(xx, sigma, self.inputs).neg()  # v = -model_output

    def refiner(self, x: torch.Tensor, t: float, v: torch.Tensor, dt: float) -> torch.Tensor:
        """The refiner's offset at (x, t) for the carried guided velocity ``v`` of age ``dt``: (B, C, h, w)."""
        refiner = self.family.refiner
        if refiner is None:
            raise SamplingError(f"this {self.family.description} model has no velocity refiner; pass one (--refiner "
                                "RUN) or use a schedule without R steps")
        b = x.shape[0]
        weight = next(refiner.parameters())
        time = torch.full((b,), float(t), dtype=torch.float32, device=x.device)  # (B,)
        age = torch.full((b,), float(dt), dtype=torch.float32, device=x.device) if refiner.takes_dt else None
        with torch.no_grad():
            out = refiner(x.to(weight.dtype), time, v.to(weight.dtype), self.pooled, age)  # (B, C, h, w)
        return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """diffusers' and transformers' own log lines and progress bars off (we say what matters ourselves, once)."""
    import importlib

    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    levels = [logger.level for logger in loggers]
    bars = [importlib.import_module(f"{name}.utils.logging") for name in ("diffusers", "transformers")]
    shown = [bar.is_progress_bar_enabled() for bar in bars]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    for bar in bars:
        bar.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        for bar, was_shown in zip(bars, shown):
            if was_shown:
                bar.enable_progress_bar()


def preview(prompt: str) -> str:
    """A prompt as quoted in messages (shortened)."""
    return repr(prompt if len(prompt) <= PROMPT_PREVIEW else prompt[: PROMPT_PREVIEW - 3] + "...")


def warn_truncated(prompts: Sequence[str], tokenizers: Sequence[tuple[str, Any, int]]) -> None:
    """One :class:`PromptTruncatedWarning` naming the limits when any prompt is longer than a tokenizer keeps.

    ``tokenizers``: ``(name, tokenizer, tokens it keeps, special tokens included)``.
    """
    long: list[str] = []
    with quiet_diffusers():
        for prompt in dict.fromkeys(prompts):
            over = [f"{len(ids)} {name} tokens" for name, tokenizer, limit in tokenizers
                    if len(ids := tokenizer(prompt, truncation=False).input_ids) > limit]
            if over:
                long.append(f"{preview(prompt)} ({', '.join(over)})")
    if long:
        limits = ", ".join(dict.fromkeys(f"{name} {limit} tokens" for name, _, limit in tokenizers))
        warnings.warn(f"{len(long)} prompt(s) are longer than the text encoders read ({limits}) and are truncated, "
                      f"as diffusers does: {'; '.join(long)}", PromptTruncatedWarning, stacklevel=3)


def _distinct_rows(texts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct texts (first-seen order) and the row of each text among them."""
    distinct = list(dict.fromkeys(texts))
    where = {text: i for i, text in enumerate(distinct)}
    return distinct, torch.tensor([where[text] for text in texts], dtype=torch.long)


# -------------------------------------------------------------------------------------------- the adapter
class FlowMatchFamily:
    """Base of the diffusers flow-matching adapters: one loaded pipeline as a :class:`~flowturbo.families.ModelFamily`.

    A subclass names its pipeline (``pipeline_class``, ``transformer_class``, ``schedulers``), loads it
    (:meth:`load`) and implements :meth:`encode` (distinct prompts -> :class:`PromptEmbeddings`), :meth:`tokenizers`,
    :meth:`transformer_inputs` (the conditioning's model inputs, doubled for CFG) and :meth:`transformer_output` (one
    transformer call in diffusers' sign), and sets ``patch`` (latent pixels per token side) and ``latent_channels``.
    """

    conditioning_kind = ConditioningKind.PROMPTS
    name: ClassVar[str]
    pipeline_class: ClassVar[str]  # model_index.json's _class_name
    description: str  # what users call it, for messages
    transformer_class: ClassVar[str]
    schedulers: ClassVar[tuple[str, ...]] = ("FlowMatchEulerDiscreteScheduler",)
    default_max_sequence_length: ClassVar[int]
    linspace_sigmas: ClassVar[bool] = False  # the pipeline passes sigmas = linspace(1, 1/N, N) (FLUX)

    guidance_rule: GuidanceRule
    defaults: FamilyDefaults
    patch: int
    latent_channels: int
    default_latent_side: int
    max_latent_side: int | None = None  # the largest latent side the transformer's position embedding covers

    def __init__(self, folder: PipelineFolder, *, max_sequence_length: int | None = None) -> None:
        """The adapter from ``folder``'s configs alone (no weights: requests can be checked before anything large
        loads); :meth:`attach` gives it the loaded pipeline. Subclasses read ``self.transformer_config``."""
        from diffusers import AutoencoderKL

        self.folder = folder
        self.pipe: Any = None
        self.transformer: Any = None
        self.decoder: Any = None
        self.scheduler_config = folder.scheduler_config()
        self.num_train_timesteps = int(self.scheduler_config.get("num_train_timesteps", 1000))
        self.transformer_config = folder.model_config("transformer", self._transformer_type())
        vae_config = folder.model_config("vae", AutoencoderKL)
        self.vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)  # as the pipelines compute it
        self.max_sequence_length = int(max_sequence_length or self.default_max_sequence_length)
        self.refiner: Any = None  # a TokenRefiner (attach_refiner), or None
        self.refiner_record: Any = None  # its TokenRefinerRecord
        self.refiner_dt: Any = None  # the dt distribution it was trained on (its max_dt: the trained range)
        self.adaln_fusion: Any = None  # which adaptive norms run our fused kernel (fused_adaln.AdaLNFusion), once set
        self._encoders_at: tuple[torch.device, torch.dtype] | None = None  # load_encoders: no transformer to ask

    @classmethod
    def _transformer_type(cls) -> Any:
        import diffusers

        return getattr(diffusers, cls.transformer_class)

    def attach(self, pipe: Any) -> "FlowMatchFamily":
        """Give the adapter its loaded pipeline (transformer, text encoders, VAE decoder with scale and shift)."""
        if int(pipe.vae_scale_factor) != self.vae_scale_factor:
            raise CheckpointError(f"{self.folder.path}: the loaded VAE's factor {pipe.vae_scale_factor} differs from "
                                  f"its config's {self.vae_scale_factor}")
        self.pipe = pipe
        self.transformer = pipe.transformer
        vae = pipe.vae
        self.decoder = DiffusersVAEDecoder._from_vae(vae, float(vae.config.scaling_factor),
                                                     float(vae.config.shift_factor or 0.0)).eval()
        return self

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def check_folder(cls, folder: PipelineFolder) -> None:
        """Refuse a folder of this pipeline class whose models this adapter does not run; then check its files."""
        transformer = folder.component_class("transformer")
        scheduler = folder.component_class("scheduler")
        if transformer != cls.transformer_class or scheduler not in cls.schedulers:
            raise CheckpointError(f"{folder.path} is a {folder.class_name} with {folder.describe_models()}; flowturbo "
                                  f"runs {cls.pipeline_class} folders with a {cls.transformer_class} and a "
                                  f"{' or '.join(cls.schedulers)}")
        folder.check_files()

    @classmethod
    def load(cls, folder: PipelineFolder, *, device: torch.device, dtype: torch.dtype,
             max_sequence_length: int | None = None,
             before_weights: Callable[["FlowMatchFamily"], None] | None = None) -> "FlowMatchFamily":
        """The adapter over ``folder``'s pipeline (diffusers' ``pipeline_class``) on ``device`` in ``dtype``.

        ``before_weights(family)`` runs once the configs are read and before any weights load (the command line
        refuses a bad request there: :meth:`check_request`)."""
        cls._require_libraries(folder)
        family = cls(folder, max_sequence_length=max_sequence_length)
        if before_weights is not None:
            before_weights(family)
        return family.attach(cls.load_pipeline(folder, device, dtype))

    @classmethod
    def load_encoders(cls, folder: PipelineFolder, *, device: torch.device, dtype: torch.dtype,
                      max_sequence_length: int | None = None) -> "FlowMatchFamily":
        """The adapter with the text encoders alone loaded (no transformer, no VAE): what an exported text-to-image
        model needs to turn prompts into its graphs' inputs. :meth:`condition` gives the same embeddings and the same
        refusals as the full adapter's; ``device`` / ``dtype`` are the encoders'."""
        cls._require_libraries(folder)
        family = cls(folder, max_sequence_length=max_sequence_length)
        family._encoders_at = (device, dtype)
        family.pipe = cls.load_pipeline(folder, device, dtype, transformer=None, vae=None)
        return family

    @staticmethod
    def _require_libraries(folder: PipelineFolder) -> None:
        try:
            import diffusers  # noqa: F401
            import transformers  # noqa: F401 - the text encoders' library
        except ImportError as exc:
            raise FlowTurboError(f"{folder.class_name} folders need diffusers and transformers>=5 ({exc.name} is not "
                                 "installed): pip install 'flowturbo[text]'") from None

    @classmethod
    def load_pipeline(cls, folder: PipelineFolder, device: torch.device, dtype: torch.dtype, **components: Any) -> Any:
        """The diffusers pipeline of ``folder`` on ``device`` in ``dtype`` (every component cast: without
        ``accelerate`` diffusers may leave some in float32); ``components`` replace saved ones (``transformer=None,
        vae=None``: the text encoders alone)."""
        import diffusers

        try:
            with quiet_diffusers():
                pipeline_type = getattr(diffusers, cls.pipeline_class)
                pipe = pipeline_type.from_pretrained(str(folder.path), local_files_only=True, dtype=dtype, **components)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"could not load the {folder.class_name} in {folder.path}: "
                                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") \
                from exc
        pipe.set_progress_bar_config(disable=True)
        with quiet_diffusers():
            return pipe.to(device=device, dtype=dtype)

    def attach_refiner(self, trained: Any, *, kernel_backend: Any = None, source: str = "--refiner") -> None:
        """Give the loaded adapter a token refiner (a :class:`~flowturbo.training.token_refiner.TrainedTokenRefiner`)
        trained for this teacher (:meth:`expect_refiner`'s checks), built on the transformer's device and dtype."""
        self.expect_refiner(trained, source=source)
        backend = "reference" if kernel_backend is None else kernel_backend
        self.refiner = trained.build(self.device, self.dtype, backend)

    def expect_refiner(self, trained: Any, *, source: str = "--refiner") -> None:
        """Check a token refiner against this teacher from the configs alone (before any weights load): the pipeline
        class, the transformer's architecture, the latent channels and patch must match (a refiner of another model
        is refused naming the difference); then requests are checked as with the refiner (R steps, its CFG)."""
        from flowturbo.training.token_refiner import transformer_digest

        record, config = trained.record, trained.config
        mine = transformer_digest(self.transformer_config)
        if record.pipeline_class != self.folder.class_name or record.transformer_digest != mine:
            raise CheckpointError(f"{source}: this refiner was trained for a {record.pipeline_class} whose "
                                  f"transformer config digest is {record.transformer_digest} ({record.pipeline}); "
                                  f"{self.folder.path} is a {self.folder.class_name} with digest {mine}: train a "
                                  "refiner for this model (`flowturbo train refiner --teacher DIR --prompts FILE`)")
        if config.latent_channels != self.latent_channels or config.patch_size != self.patch:
            raise CheckpointError(f"{source}: the refiner works on {config.latent_channels}-channel latents in "
                                  f"{config.patch_size}x{config.patch_size} patches; this model has "
                                  f"{self.latent_channels} channels and {self.patch}x{self.patch} patches")
        self.refiner_record = record
        self.refiner_dt = trained.dt

    def sigma_rows(self, sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``sigma`` as (M,) float64 rows for a batch ``x`` of M rows: one float for every row, or one per row."""
        if isinstance(sigma, torch.Tensor):
            if sigma.shape != (x.shape[0],):
                raise SamplingError(f"per-row sigmas must be ({x.shape[0]},), got {tuple(sigma.shape)}")
            return sigma.to(device=x.device, dtype=torch.float64)
        return torch.full((x.shape[0],), float(sigma), dtype=torch.float64, device=x.device)

    def guided_velocity(self, x: torch.Tensor, t: torch.Tensor, conditioning: TextConditioning,
                        cfg: float) -> torch.Tensor:
        """The teacher's guided velocity (flowturbo's convention) at per-row times ``t`` (B,) on latents x
        (B, C, h, w): ``u + cfg (c - u)`` over ``[prompt; negative]`` when ``cfg != 1``, the conditional output
        otherwise (a distilled guidance value is in the conditioning). What the token refiner learns to correct."""
        doubled = cfg != 1.0
        inputs = self.transformer_inputs(conditioning, doubled)
        sigma = 1.0 - t.to(torch.float64)  # (B,)
        xx, ss = (torch.cat([x, x]), torch.cat([sigma, sigma])) if doubled else (x, sigma)
        out = self.transformer_output(xx, ss, inputs).float().neg()  # (M, C, h, w)
        return cfg_guided_reference(out, x.shape[0], out.shape[1], cfg)  # the solver ops' rule: u + s (c - u)

    # --------------------------------------------------------------------------------- family-specific
    def encode(self, prompts: list[str]) -> PromptEmbeddings:
        """The embeddings of distinct prompts (rows in order), computed once (no_grad, the models' dtype)."""
        raise NotImplementedError

    def tokenizers(self) -> list[tuple[str, Any, int]]:
        """``(name, tokenizer, tokens it keeps)`` of every text encoder, for the truncation warning."""
        raise NotImplementedError

    def transformer_inputs(self, conditioning: TextConditioning, doubled: bool) -> dict[str, Any]:
        """The transformer's conditioning inputs for one batch (rows ``[prompt; negative]`` when ``doubled``)."""
        raise NotImplementedError

    def transformer_output(self, x: torch.Tensor, sigma: float | torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """One transformer call at ``sigma`` (one float, or (M,) per-row sigmas: the trainer's states and the exported
        graphs' time input; :meth:`sigma_rows`) on latents x (M, C, h, w) -> the model output (M, C, h, w), diffusers'
        sign (``noise - x_data``)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------- the protocol
    @property
    def device(self) -> torch.device:
        return self._encoders_at[0] if self.transformer is None and self._encoders_at else self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self._encoders_at[1] if self.transformer is None and self._encoders_at else self.transformer.dtype

    def default_size(self) -> ImageSize:
        side = self.default_latent_side * self.vae_scale_factor
        return ImageSize(side, side)

    def latent_shape(self, size: ImageSize | None = None) -> tuple[int, int, int]:
        size = self.default_size() if size is None else size
        multiple = self.vae_scale_factor * self.patch
        check_image_size(size, multiple, f"the VAE's factor {self.vae_scale_factor} times the transformer's "
                                         f"{self.patch}x{self.patch} patches")
        if self.max_latent_side is not None and max(size.width, size.height) > self.max_latent_side * \
                self.vae_scale_factor:
            side = self.max_latent_side * self.vae_scale_factor
            raise FlowTurboError(f"--size {size} is larger than this {self.description} model's position embedding "
                                 f"covers: at most {side} pixels a side (e.g. {side}x{side})")
        return (self.latent_channels, size.height // self.vae_scale_factor, size.width // self.vae_scale_factor)

    def image_size(self, latent_shape: Sequence[int]) -> ImageSize:
        return ImageSize(int(latent_shape[2]) * self.vae_scale_factor, int(latent_shape[1]) * self.vae_scale_factor)

    def image_tokens(self, latent_shape: Sequence[int]) -> int:
        """The transformer's image tokens for a latent shape (what the resolution-dependent shift reads)."""
        return (int(latent_shape[1]) // self.patch) * (int(latent_shape[2]) // self.patch)

    def timesteps(self, num_steps: int, latent_shape: Sequence[int]) -> tuple[float, ...]:
        return flow_match_timesteps(self.scheduler_config, num_steps, self.image_tokens(latent_shape),
                                    self.linspace_sigmas)

    def check_schedule(self, schedule: SamplingSchedule) -> None:
        """R steps need a refiner (:meth:`attach_refiner`); CFG guides every latent channel."""
        if schedule.guidance_channels is not None:
            raise SamplingError(f"--guidance-channels {schedule.guidance_channels}: partial-channel CFG is the "
                                f"official SiT checkpoints' rule; {self.description} models guide every latent channel (drop "
                                "--guidance-channels)")
        if schedule.uses_refiner and self.refiner_record is None:
            raise SamplingError(
                f"schedule {schedule.notation} has R steps, which need a velocity refiner: pass one trained for this "
                f"model (--refiner RUN, from `flowturbo train refiner --teacher {self.folder.path} --prompts FILE`), or "
                f"use H, P and E steps, e.g. H2P4 or {self.defaults.schedule} (the pipeline's default)")
        if schedule.uses_refiner:
            self._check_refiner_guidance(schedule)

    def _check_refiner_guidance(self, schedule: SamplingSchedule) -> None:
        """A refiner corrects the velocity of one guidance setting: another CFG scale is refused."""
        record = self.refiner_record
        if abs(schedule.guidance_scale - record.cfg) > 1e-9:
            raise SamplingError(f"the refiner was trained on the teacher's velocity at CFG {record.cfg:g}; schedule "
                                f"{schedule.notation} asks for CFG {schedule.guidance_scale:g}: sample with --cfg "
                                f"{record.cfg:g}, or train a refiner at this scale (--cfg at training)")

    def check_request(self, schedule: SamplingSchedule, *, size: ImageSize | None = None,
                      negative: str | Sequence[str] | None = None, guidance: float | None = None) -> None:
        """Everything :meth:`condition` and the sampler would refuse about a request, from the configs alone: the
        size, the schedule, the negative prompt and CFG, the distilled guidance value."""
        self.latent_shape(size)
        self.check_schedule(schedule)
        count = 1 if negative is None or isinstance(negative, str) else len(negative)
        self._negative_prompts(negative, count, schedule)
        self._guidance_value(guidance)

    def condition(self, requests: Sequence[Any], schedule: SamplingSchedule, *,
                  negative: Sequence[str] | None = None, guidance: float | None = None) -> TextConditioning:
        """Prompts -> embeddings, each distinct prompt encoded once; the negative prompts' when the schedule
        guides; the distilled guidance value (the family's default when None) where the model takes one."""
        if not all(isinstance(r, str) for r in requests):
            raise conditioning_mismatch(self, ConditioningKind.CLASSES)
        prompts = list(requests)
        if not prompts:
            raise SamplingError("no prompts given: pass at least one prompt")
        negatives = self._negative_prompts(negative, len(prompts), schedule)
        guidance = self._guidance_value(guidance)
        warn_truncated(prompts + (negatives or []), self.tokenizers())
        encoded = self._encode_rows(prompts)
        return TextConditioning(encoded, None if negatives is None else self._encode_rows(negatives), guidance)

    def _encode_rows(self, texts: Sequence[str]) -> PromptEmbeddings:
        distinct, rows = _distinct_rows(texts)
        chunks = []
        with torch.no_grad(), quiet_diffusers():  # as the pipelines' __call__ (grad on changes T5's CPU numbers)
            for start in range(0, len(distinct), ENCODE_BATCH):
                chunks.append(self.encode(distinct[start:start + ENCODE_BATCH]))
        tensors = [torch.cat(parts) for parts in zip(*(chunk.tensors() for chunk in chunks))]
        return chunks[0].with_tensors(tensors).rows(rows.to(tensors[0].device))

    def _negative_prompts(self, negative: Sequence[str] | None, count: int,
                          schedule: SamplingSchedule) -> list[str] | None:
        """One negative prompt per image when the schedule guides (CFG), else None; the guidance rule's checks."""
        guided = schedule.guidance_scale != 1.0
        if negative is not None and not guided:
            raise FlowTurboError("a negative prompt acts through CFG: pass --cfg S with S > 1 (it doubles the "
                                 "transformer's batch)" + self._guidance_hint())
        if not guided:
            return None
        if negative is None:
            if self.guidance_rule is not GuidanceRule.CFG:
                raise FlowTurboError(self._cfg_refusal(schedule.guidance_scale))
            negative = [""]  # the pipelines' default negative prompt: the empty one (not zeros)
        negatives = [negative] if isinstance(negative, str) else list(negative)
        if len(negatives) not in (1, count):
            raise FlowTurboError(f"give one negative prompt, or one per image ({count}), not {len(negatives)}")
        return negatives * count if len(negatives) == 1 else negatives

    def _guidance_hint(self) -> str:
        if self.guidance_rule is GuidanceRule.EMBEDDED:
            return f"; this model's own guidance is --guidance (default {self.defaults.guidance:g})"
        return ""

    def _cfg_refusal(self, scale: float) -> str:
        if self.guidance_rule is GuidanceRule.EMBEDDED:
            return (f"--cfg {scale:g}: {self.description} is guidance-distilled: its guidance is a value the model "
                    f"embeds, set with --guidance G (default {self.defaults.guidance:g}), in one transformer call per "
                    "step; --cfg would run true CFG on a doubled batch, which needs a --negative-prompt")
        return (f"--cfg {scale:g}: {self.description} takes no guidance (it is distilled to sample without); --cfg "
                "runs true CFG on a doubled batch, which needs a --negative-prompt")

    def _guidance_value(self, guidance: float | None) -> float | None:
        if self.guidance_rule is GuidanceRule.EMBEDDED:
            value = self.defaults.guidance if guidance is None else float(guidance)
            if not math.isfinite(value) or value < 0:
                raise FlowTurboError(f"--guidance must be a finite number >= 0, got {guidance}")
            return value
        if guidance is not None:
            fix = "--cfg S (classifier-free guidance)" if self.guidance_rule is GuidanceRule.CFG else \
                "nothing (it is distilled to sample without guidance), or --cfg S with a --negative-prompt"
            raise FlowTurboError(f"--guidance {guidance:g}: {self.description} has no guidance embedding; use {fix}")
        return None

    def model_calls(self, conditioning: TextConditioning, schedule: SamplingSchedule) -> FlowMatchCalls:
        doubled = schedule.guidance_scale != 1.0
        if doubled and conditioning.negative is None:
            raise SamplingError("CFG needs the negative prompts' embeddings: condition the request with the schedule")
        record = self.refiner_record
        if schedule.uses_refiner and record is not None and record.guidance is not None and \
                conditioning.guidance is not None and abs(conditioning.guidance - record.guidance) > 1e-9:
            raise SamplingError(f"the refiner was trained on the teacher's velocity at --guidance {record.guidance:g}; "
                                f"this request asks for {conditioning.guidance:g}: sample with --guidance "
                                f"{record.guidance:g}, or train a refiner at this value")
        return FlowMatchCalls(self, conditioning, doubled)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``vae.decode(latents / scaling_factor + shift_factor)`` in [-1, 1] (B, 3, H, W), as the pipelines."""
        return self.decoder.decode(latents)

    def image_encoder(self) -> DiffusersVAEEncoder:
        """The image encoder inpainting and editing start from: the loaded VAE's encoder with the folder's scale and
        shift, ``(mean - shift_factor) * scaling_factor``, the inverse of :meth:`decode`."""
        if self.pipe is None:
            raise SamplingError("the adapter has no loaded pipeline: load it (FlowMatchFamily.load) before encoding")
        vae = self.pipe.vae
        return DiffusersVAEEncoder._from_vae(vae, float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, C, H/f, W/f): ``(mean - shift_factor) * scaling_factor``
        (:meth:`image_encoder`); a size the model cannot take is refused naming the nearest valid ones."""
        if images.dim() != 4:
            raise FlowTurboError(f"images must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        self.latent_shape(ImageSize(int(images.shape[-1]), int(images.shape[-2])))
        return self.image_encoder().encode(images)

    def describe(self) -> dict[str, Any]:
        return {"family": self.name, "pipeline": str(self.folder.path), "pipeline_class": self.folder.class_name,
                "transformer": self.transformer_class, "scheduler": self.folder.component_class("scheduler"),
                "conditioning": self.conditioning_kind.value, "guidance_rule": self.guidance_rule.value,
                "defaults": self.defaults.to_dict(), "max_sequence_length": self.max_sequence_length,
                "vae_scale_factor": self.vae_scale_factor, "latent_channels": self.latent_channels,
                "default_size": str(self.default_size()),
                "refiner": None if self.refiner is None else {"config": self.refiner.config.to_dict(),
                                                              "trained_for": self.refiner_record.to_dict()},
                "adaln_fusion": None if self.adaln_fusion is None else self.adaln_fusion.to_dict()}


__all__ = [
    "FlowMatchCalls",
    "FlowMatchFamily",
    "PipelineFolder",
    "PromptTruncatedWarning",
    "calculate_shift",
    "flow_match_timesteps",
    "quiet_diffusers",
    "warn_truncated",
]
