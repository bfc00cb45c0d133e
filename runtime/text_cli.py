"""``flowturbo sample --pipeline DIR --prompt ...``: the text-to-image flags of ``sample`` (docs/predictor_protocol.md).

A ``--pipeline`` folder is a diffusers ``StableDiffusion3Pipeline`` or ``FluxPipeline`` as the Hub downloads it; its
model family's adapter (:mod:`flowturbo.training.families`) does everything model-specific. This module parses and
checks the flags (before anything is loaded or written), reads ``--prompts`` files and names the images; the
sampling, the record and the output folder are ``sample``'s own (:mod:`flowturbo.runtime.cli`).
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from flowturbo.cliargs import Number, input_path, int_in
from flowturbo.errors import FlowTurboError
from flowturbo.families import ImageSize, read_prompts

MAX_SEQUENCE_LENGTH = 512  # the diffusers pipelines refuse longer T5 sequences
NAME_CHARS = 40  # characters of a prompt in its images' file names
TEXT_FLAGS = ("--prompt", "--prompts", "--negative-prompt", "--guidance", "--size", "--max-sequence-length")
MODEL_FLAGS = ("--model", "--predictor", "--vae", "--decoder", "--checkpoint-entry", "--artifacts")


def add_text_arguments(p: argparse.ArgumentParser, *, size: bool = True) -> None:
    """``sample``'s text-to-image group (``inpaint`` / ``edit``: without ``--size``, the input image's)."""
    g = p.add_argument_group("text-to-image (a diffusers flow-matching pipeline folder instead of --model)")
    g.add_argument("--pipeline", default=None, type=input_path("--pipeline"),
                   help="a diffusers StableDiffusion3Pipeline (SD3 / SD3.5) or FluxPipeline (FLUX.1-dev / -schnell) "
                        "folder, as the Hub downloads it (model_index.json + one folder per component)")
    g.add_argument("--prompt", action="append", default=None,
                   help="a text prompt (repeat the flag for several); each distinct prompt is encoded once")
    g.add_argument("--prompts", default=None, type=input_path("--prompts"),
                   help="a UTF-8 text file with one prompt per line (blank lines skipped)")
    g.add_argument("--negative-prompt", default=None,
                   help="what to steer away from, through CFG (--cfg > 1; SD3's default is the empty prompt)")
    g.add_argument("--guidance", type=Number(float, low=0), default=None,
                   help="the distilled guidance value of guidance-distilled models (FLUX.1-dev: default 3.5); not "
                        "CFG: one transformer call per step")
    if size:
        g.add_argument("--size", default=None,
                       help="image size WIDTHxHEIGHT in pixels, or one number for a square (default: the model's, "
                            "1024x1024 for SD3.5 / FLUX.1); a multiple of the VAE factor times the patch size (16)")
    g.add_argument("--max-sequence-length", type=int_in(1, MAX_SEQUENCE_LENGTH), default=None,
                   help="T5 tokens per prompt (default: the pipeline's, 256 for SD3 and 512 for FLUX.1)")


def _given(args: argparse.Namespace, flags: tuple[str, ...]) -> list[str]:
    """The flags of ``flags`` set on the command line (argparse attribute names from the flags)."""
    return [flag for flag in flags if getattr(args, flag.lstrip("-").replace("-", "_"), None) is not None]


def resolve_text_bundle(args: argparse.Namespace) -> None:
    """``--model BUNDLE`` naming a text bundle (a refiner packaged for a diffusers pipeline folder) is that folder
    (``--pipeline``) with the bundle's refiner (``--refiner``) and defaults (``args.text_defaults``)."""
    args.text_defaults = None
    if getattr(args, "model", None) is None:
        return
    from flowturbo.runtime.pytorch_backend import text_bundle_settings

    text = text_bundle_settings(args.model)
    if text is None:
        return
    if args.pipeline is not None or args.refiner is not None:
        raise FlowTurboError(f"--model {args.model} is a text bundle: it names its pipeline folder and holds its refiner; "
                             "drop --pipeline / --refiner")
    args.pipeline, args.refiner, args.model = text["pipeline"], text["refiner"], None
    args.text_defaults = text["defaults"]


def check_prompt_flags(args: argparse.Namespace, needed: str | None = None) -> None:
    """``--prompt`` / ``--prompts``: not both, no empty ``--prompt``; ``needed``: the error when neither is given (None:
    prompts are optional)."""
    if needed is not None and args.prompt is None and args.prompts is None:
        raise FlowTurboError(needed)
    if args.prompt is not None and args.prompts is not None:
        raise FlowTurboError("give --prompt or --prompts, not both")
    if args.prompt is not None and not all(p.strip() for p in args.prompt):
        raise FlowTurboError("--prompt is empty; give the text to draw")


def refuse_text_flags(args: argparse.Namespace) -> None:
    """Without ``--pipeline``: the first text-to-image flag given is refused (the model is class-conditional)."""
    text = _given(args, TEXT_FLAGS)
    if text:
        raise FlowTurboError(f"{text[0]} is for text-to-image models: pass --pipeline DIR (a diffusers "
                             "StableDiffusion3Pipeline or FluxPipeline folder); the embedded default, --model "
                             "bundles and --predictor checkpoints are class-conditional (--classes)")


def refuse_model_flags(args: argparse.Namespace) -> None:
    """With ``--pipeline``: the first flag naming another model (``--model``, ``--predictor``, ...) is refused."""
    other = _given(args, MODEL_FLAGS)
    if other:
        raise FlowTurboError(f"--pipeline holds the whole model (with --refiner: a refiner trained for it); drop "
                             f"{other[0]}")


def check_text_args(args: argparse.Namespace) -> None:
    """Refuse text flags that do not fit together, before anything is loaded (one ``error:`` line each)."""
    resolve_text_bundle(args)
    if args.pipeline is None:
        refuse_text_flags(args)
        return
    if args.classes is not None:
        raise FlowTurboError("--classes is for class-conditional models; a --pipeline folder is text-to-image: pass "
                             "--prompt TEXT or --prompts FILE")
    refuse_model_flags(args)
    if args.backend != "pytorch":
        fmt = {"onnxruntime": "onnx", "aoti": "aoti", "cpp": "aoti"}.get(args.backend)
        how = (f"export it first (`flowturbo export --pipeline DIR --schedule S --format {fmt} --out EXPORT`), then "
               f"`flowturbo sample --artifacts EXPORT --backend {args.backend} --prompt ...`"
               if fmt else "text-to-image exports are ONNX or AOTInductor only (TensorRT is not supported for them)")
        raise FlowTurboError(f"--backend {args.backend} runs exported graphs and --pipeline is a diffusers folder: "
                             f"{how}; or drop --backend")
    check_prompt_flags(args, "--pipeline needs prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    if getattr(args, "size", None) is not None:
        ImageSize.parse(args.size)
    requests(args)  # reads --prompts and applies --num-images: a bad file or count fails now


def given_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of ``--prompt`` (repeated) or of the ``--prompts`` file, as given."""
    return list(args.prompt) if args.prompt is not None else read_prompts(args.prompts)


def requests(args: argparse.Namespace) -> list[str]:
    """One prompt per image: the prompts given, cycled to fill ``--num-images`` (never dropped)."""
    prompts = given_prompts(args)
    if args.num_images is None:
        return prompts
    if args.num_images < len(prompts):
        raise FlowTurboError(f"--num-images {args.num_images} leaves some of the {len(prompts)} prompts without an "
                             f"image (prompts are cycled to fill --num-images, never dropped); pass --num-images "
                             f"{len(prompts)} or more")
    return [prompts[i % len(prompts)] for i in range(args.num_images)]


def load_text_sampler(args: argparse.Namespace, schedule_of: Any, check_family: Any = None) -> Any:
    """The :class:`~flowturbo.runtime.sampler.Sampler` of ``--pipeline`` with the execution-path flags. The request
    (size, schedule, CFG, negative prompt, guidance) is checked against the folder's configs before any weights load:
    ``schedule_of(parse)`` gives the schedule the command line asks for, ``parse(spec)`` turning a notation into one
    with the model's default CFG; ``check_family(family)``: a caller's own check there (inpaint / edit: the image's
    size)."""
    from flowturbo.runtime.sampler import Sampler

    size = ImageSize.parse(args.size) if getattr(args, "size", None) is not None else None
    return Sampler.from_pipeline(args.pipeline, device=args.device, dtype=args.dtype, kernel_backend=args.kernels,
                                 max_sequence_length=args.max_sequence_length,
                                 before_weights=request_check(args, size, schedule_of, check_family),
                                 refiner=args.refiner, defaults=getattr(args, "text_defaults", None),
                                 cuda_graph=False if args.no_cuda_graph else None)


def request_check(args: argparse.Namespace, size: ImageSize | None, schedule_of: Any,
                  check_family: Any = None) -> Any:
    """The ``before_weights(family)`` check of a ``--pipeline`` command: the request (size, schedule, CFG, negative
    prompt, guidance) against the folder's configs, before any weights load. ``schedule_of(parse)`` gives the
    schedule the command line asks for, ``parse(spec)`` turning a notation (None: the model's default) into one with
    the model's default CFG (``--cfg`` when given); ``check_family(family)``: a caller's own check there."""
    from flowturbo.schedule import SamplingSchedule

    def check(family: Any) -> None:
        defaults = family.defaults
        schedule = schedule_of(lambda spec: SamplingSchedule.parse(
            spec or defaults.schedule, guidance_scale=defaults.cfg if args.cfg is None else args.cfg,
            guidance_channels=getattr(args, "guidance_channels", None)))
        family.check_request(schedule, size=size, negative=args.negative_prompt, guidance=args.guidance)
        if check_family is not None:
            check_family(family)

    return check


def sample_text(sampler: Any, args: argparse.Namespace, schedule_of: Any, prompts: list[str] | None = None,
                progress: bool | None = None) -> Any:
    """``sample``'s (and ``eval``'s) request for a text model: ``schedule_of(size)`` gives the schedule on the model's
    grid; ``prompts``: one per image (default: :func:`requests`); ``progress`` (default: unless ``--no-progress``)."""
    size = ImageSize.parse(args.size) if args.size is not None else None
    return sampler.sample(prompts=requests(args) if prompts is None else prompts,
                          negative_prompt=args.negative_prompt, guidance=args.guidance, size=size,
                          schedule=schedule_of(size), seed=args.seed, batch_size=args.batch,
                          progress=not args.no_progress if progress is None else progress)


def prompt_names(prompts: list[str]) -> list[str]:
    """File-name parts of prompts: ``a_red_fox_in_the_snow`` (letters and digits, at most 40 characters)."""
    return [re.sub(r"[^0-9A-Za-z]+", "_", prompt).strip("_")[:NAME_CHARS].rstrip("_") or "prompt"
            for prompt in prompts]


__all__ = ["add_text_arguments", "check_text_args", "load_text_sampler", "prompt_names", "read_prompts", "requests",
           "sample_text"]
