"""``flowturbo sample --artifacts DIR --prompt ...``: the text-to-image flags of ``sample`` on an exported text model.

The ``--pipeline`` flow is :mod:`flowturbo.runtime.text_cli`'s; this module only checks the text flags that go with
``--artifacts`` (the prompts come from the same ``--prompt`` / ``--prompts`` / ``--num-images`` rules, read by
``text_cli.requests``) and asks the export for its prompts' images. ``inpaint`` / ``edit --artifacts`` use the same
checks (``runtime/edit_cli.py``).
"""

from __future__ import annotations

import argparse
from typing import Any

from flowturbo.errors import FlowTurboError
from flowturbo.families import ImageSize


def check_exported_text_args(args: argparse.Namespace) -> None:
    """Refuse text flags that cannot go with ``--artifacts`` before anything loads (one ``error:`` line each)."""
    if getattr(args, "pipeline", None) is not None:
        raise FlowTurboError("--artifacts already holds the model (a text-to-image export records its pipeline "
                             "folder); drop --pipeline")
    from flowturbo.runtime.text_cli import check_prompt_flags

    check_prompt_flags(args)
    if getattr(args, "size", None) is not None:  # (inpaint / edit have no --size)
        ImageSize.parse(args.size)


def wants_text(args: argparse.Namespace) -> bool:
    """Whether the command line asks for text-to-image sampling."""
    return any(getattr(args, name, None) is not None for name in
               ("prompt", "prompts", "negative_prompt", "guidance", "size", "max_sequence_length"))


def exported_text_prompts(sampler: Any, args: argparse.Namespace) -> list[str]:
    """The prompts of the command line for a text-to-image export (one per image: ``text_cli.requests``), after
    refusing the flags it cannot take (``--classes``, another ``--size`` / ``--max-sequence-length``) and a missing
    ``--prompt`` (``sample``, ``inpaint`` and ``edit --artifacts``)."""
    from flowturbo.runtime.text_cli import requests

    model = sampler.artifacts.model
    if args.classes is not None:
        raise FlowTurboError(f"{args.artifacts} is a text-to-image export: pass --prompt TEXT or --prompts FILE "
                             "instead of --classes")
    if args.prompt is None and args.prompts is None:
        raise FlowTurboError(f"{args.artifacts} is a text-to-image export: pass --prompt TEXT (repeatable) or "
                             "--prompts FILE")
    size = getattr(args, "size", None)  # inpaint / edit have none: the image's size is the export's
    if size is not None and str(ImageSize.parse(size)) != model.get("image_size"):
        raise FlowTurboError(f"--size {size}: {args.artifacts} was exported for {model.get('image_size')} "
                             "images; drop --size or re-export with `flowturbo export --pipeline ... --size`")
    if args.max_sequence_length is not None and args.max_sequence_length != model.get("max_sequence_length"):
        raise FlowTurboError(f"--max-sequence-length {args.max_sequence_length}: {args.artifacts} takes "
                             f"{model.get('max_sequence_length')} tokens per prompt; drop the flag or re-export")
    return requests(args)


def exported_text_schedule(sampler: Any, schedule: Any) -> Any:
    """``--schedule`` / ``--cfg`` naming the exported ones mean the export's own schedule (None): its grid is the
    family's, recorded at export, which a notation parsed here (on the uniform grid) is not."""
    exported = sampler.schedule
    if schedule is not None and schedule.steps == exported.steps and \
            schedule.guidance_scale == exported.guidance_scale and schedule.guidance_channels is None:
        return None
    return schedule


def sample_exported_text(sampler: Any, args: argparse.Namespace, schedule: Any) -> tuple[Any, list[str]]:
    """Sample the prompts of the command line on a text-to-image export: (samples, image names)."""
    from flowturbo.runtime.text_cli import prompt_names

    prompts = exported_text_prompts(sampler, args)
    samples = sampler.sample(prompts=prompts, negative_prompt=args.negative_prompt, guidance=args.guidance,
                             schedule=exported_text_schedule(sampler, schedule), seed=args.seed,
                             batch_size=args.batch)
    return samples, prompt_names(samples.prompts)


__all__ = ["check_exported_text_args", "exported_text_prompts", "exported_text_schedule", "sample_exported_text",
           "wants_text"]
