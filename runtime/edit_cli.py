"""``flowturbo inpaint`` and ``flowturbo edit``: thin CLIs over ``Sampler.inpaint`` / ``Sampler.edit``.

Both take the model options of ``flowturbo sample`` (or ``--artifacts DIR --backend onnxruntime|aoti|tensorrt``
with an export made ``--with-encoder``), read the image (and mask) before loading any model, check and lock
``--out`` first, and write like ``sample``: ``grid.png`` (input | mask | results), ``input.png``
(``mask.png``), one PNG per result and ``run.json`` (with the task's settings and any conversion notes),
atomically. Method and guarantees: :mod:`flowturbo.runtime.editing`.

``--pipeline DIR --prompt TEXT`` (a diffusers SD3 / FLUX.1 folder, the text flags of ``sample`` without ``--size``):
the results have the input image's size (one the model takes, checked before any weights load), on the family's own
time grid at that size; files are named after the prompts (docs/predictor_protocol.md, "Inpainting and editing").
``--artifacts EXPORT --prompt TEXT`` does the same on a text-to-image export made ``--with-encoder`` (its image size
and recorded grid; the text flags checked as ``sample --artifacts``'s, :mod:`flowturbo.runtime.exported_text_cli`).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import Any

from flowturbo import __version__
from flowturbo.cliargs import GUIDANCE_SCALE, POSITIVE_INT, SEED, Number, input_path, int_in, output_path
from flowturbo.errors import FlowTurboError
from flowturbo.runtime.backends import EXPORTED_BACKENDS
from flowturbo.runtime.text_cli import add_text_arguments, check_text_args
from flowturbo.runtime.cli import (
    MAX_GRID_SCALE,
    MAX_IMAGES,
    MAX_THREADS,
    _add_model_arguments,
    _parse_classes,
    _pipeline_options,
    _print_timings,
    check_sample_args,
)

TASKS = ("inpaint", "edit")
MAX_FEATHER_PX = 64


def _add_common(p: argparse.ArgumentParser) -> None:
    _add_model_arguments(p)
    g = p.add_argument_group("what to generate")
    g.add_argument("--image", required=True, type=input_path("--image"),
                   help="input image (PNG/JPEG) of the model's image size")
    g.add_argument("--classes", default=None,
                   help="comma-separated class ids of the results (cycled); required for class-conditional models")
    g.add_argument("--num-images", type=int_in(1, MAX_IMAGES), default=None,
                   help="number of results, at least one per class (or prompt) given (default: one per class or "
                        "prompt given)")
    g.add_argument("--schedule", default=None, help="schedule notation or preset (default: the model's)")
    g.add_argument("--cfg", type=GUIDANCE_SCALE, default=None, help="guidance scale (default: the model's)")
    g.add_argument("--guidance-channels", type=POSITIVE_INT, default=None,
                   help="guide only the first N latent channels")
    g.add_argument("--seed", type=SEED, default=0, help="noise seed (results do not depend on --batch)")
    g.add_argument("--batch", type=POSITIVE_INT, default=None, help="images per batch")
    g.add_argument("--resize", action="store_true",
                   help="resize an image (bicubic) / mask (nearest) of another size instead of refusing it")
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, type=output_path("--out"),
                   help="output folder (grid.png, input.png, results, run.json); replaced only if it is a "
                        "sample-like output holding nothing but flowturbo's own files")
    o.add_argument("--grid-scale", type=int_in(1, MAX_GRID_SCALE), default=4,
                   help="upscale factor of grid.png for viewing (nearest)")
    o.add_argument("--wait", action="store_true", help="wait for another flowturbo process writing --out")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.add_argument_group("exported artifacts (instead of --model)")
    a.add_argument("--artifacts", default=None, type=input_path("--artifacts"),
                   help="export directory made with `flowturbo export --with-encoder`")
    a.add_argument("--backend", default="pytorch", choices=["pytorch", *EXPORTED_BACKENDS],
                   help="pytorch (default), onnxruntime, aoti or tensorrt (cpp: not supported, says why)")
    a.add_argument("--threads", type=int_in(1, MAX_THREADS), default=None, help="CPU intra-op threads")
    add_text_arguments(p, size=False)  # --pipeline DIR --prompt ...: the output is the input image's size


def add_inpaint_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``flowturbo inpaint``."""
    p = sub.add_parser("inpaint", help="regenerate the white region of a mask in an image with a FlowTurbo schedule")
    _add_common(p)
    g = p.add_argument_group("inpainting")
    g.add_argument("--mask", required=True, type=input_path("--mask"),
                   help="mask image of the input's size: white (>= 50%% gray) = regenerate, black = keep (or, when "
                        "its colour is the same everywhere, opaque alpha = regenerate)")
    g.add_argument("--feather", type=int_in(0, MAX_FEATHER_PX), default=None,
                   help="pixels over which the result fades into the kept input inside the white region (default 2)")
    p.set_defaults(handler=run_task, task="inpaint")


def add_edit_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``flowturbo edit``."""
    p = sub.add_parser("edit", help="SDEdit-style editing of an image towards given classes (e.g. shirt -> dress) or prompts")
    _add_common(p)
    g = p.add_argument_group("editing")
    g.add_argument("--strength", type=Number(float, low=0, low_open=True, high=1), required=True,
                   help="in (0, 1]: how far from the input (starts at t0 = 1 - strength; 1 = plain sampling)")
    p.set_defaults(handler=run_task, task="edit")


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags before anything is read, loaded or computed (the flags shared with ``sample`` by its check)."""
    from flowturbo.runtime.editing import check_strength

    if args.task == "edit":
        check_strength(args.strength)
    if args.task == "inpaint" and args.feather is not None and not 0 <= args.feather <= MAX_FEATHER_PX:
        raise FlowTurboError(f"--feather must be in [0, {MAX_FEATHER_PX}] pixels, got {args.feather}")
    if args.backend == "cpp":
        from flowturbo.runtime.cpp_backend import _NO_TASKS

        raise FlowTurboError(_NO_TASKS.format(what="inpainting" if args.task == "inpaint" else "editing"))
    if args.artifacts is not None:  # an export: prompts for a text export (its kind is known once it loads)
        from flowturbo.runtime.exported_text_cli import check_exported_text_args

        check_exported_text_args(args)
    else:
        check_text_args(args)  # --pipeline with prompts; text flags without it refused; a text --model bundle resolved
    prompted = args.artifacts is not None and (args.prompt is not None or args.prompts is not None)
    if args.pipeline is None and args.classes is None and not prompted:
        raise FlowTurboError("--classes is required: the class ids of the results (or --pipeline DIR with --prompt "
                             "TEXT for a text-to-image model)")
    check_sample_args(args)


def run_task(args: argparse.Namespace) -> int:
    """``flowturbo inpaint|edit``: check, read inputs, lock --out, load, run, write."""
    from flowturbo.fileio import OutputFolder
    from flowturbo.imageio import open_image

    _check_args(args)
    disk_size = tuple(open_image(args.image, "--image").size)  # unreadable image: refused before anything else
    if args.task == "inpaint":
        open_image(args.mask, "--mask")
    with OutputFolder(args.out, command=args.task, what="output", wait=args.wait) as out:
        return _run(args, out, disk_size)


def _run(args: argparse.Namespace, out_folder: Any, disk_size: tuple[int, int]) -> int:
    import torch

    from flowturbo.runtime.editing import load_image

    t_load = time.perf_counter()
    if args.artifacts is not None:
        from flowturbo.runtime.backends import load_exported_sampler

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        device = None if args.device == "auto" else args.device
        sampler = load_exported_sampler(args.artifacts, args.backend, device=device, threads=args.threads)
        _check_exported_kind(args, sampler)
        _require_exported_encoder(args, sampler)
        if sampler.takes_prompts:  # a text-to-image export: prompts, the export's image size and grid
            return _run_exported_text(args, out_folder, disk_size, sampler, time.perf_counter() - t_load)
        channels, size = int(sampler.artifacts.model["image_shape"][0]), int(sampler.artifacts.model["image_shape"][1])
        schedule, num_classes, class_names = _exported_schedule(args, sampler), sampler.num_classes, sampler.class_names
        model_info: dict[str, Any] = sampler.describe()
    elif args.pipeline is not None:  # a text-to-image pipeline folder: the image's size, the family's grid
        return _run_text(args, out_folder, disk_size, t_load)
    else:
        from flowturbo.runtime.sampler import Sampler

        sampler = Sampler.from_bundle(args.model, **_pipeline_options(args))
        pipe = sampler.pipeline
        channels, size = pipe.decoder.image_channels, pipe.decoder.image_size(pipe.latent_shape[1])
        guidance: Any = "default" if args.guidance_channels is None else args.guidance_channels
        schedule = sampler.default_schedule(args.schedule, args.cfg, guidance, task=args.task)
        num_classes, class_names, model_info = pipe.num_classes, pipe.class_names, pipe.describe()
        # Whatever the mask (an all-black one needs no model call), a model without an encoder is refused.
        pipe.require_encoder("inpainting" if args.task == "inpaint" else "editing")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
    load_s = time.perf_counter() - t_load
    image = load_image(args.image, channels=channels, size=size, resize=args.resize)
    classes = _parse_classes(args.classes, num_classes, args.num_images)
    request = dict(classes=classes, schedule=schedule, seed=args.seed, batch_size=args.batch,
                   progress=not args.no_progress)
    samples, inputs = _run_task(args, sampler, image, size, disk_size, request, channels)
    return _write(args, out_folder, sampler, samples, model_info, class_names, inputs, load_s)


def _run_text(args: argparse.Namespace, out_folder: Any, disk_size: tuple[int, int], t_load: float) -> int:
    """``--pipeline DIR --prompt ...``: the results have the input image's size (one the model takes), on the
    family's own time grid at that size; files are named after the prompts, as ``sample``'s."""
    from flowturbo.families import ImageSize
    from flowturbo.runtime.cli import schedule_from_args
    from flowturbo.runtime.editing import load_image
    from flowturbo.runtime.sampler import check_text_image_size
    from flowturbo.runtime.text_cli import load_text_sampler, prompt_names, requests

    size = ImageSize(*disk_size)
    sampler = load_text_sampler(args, lambda parse: schedule_from_args(args, parse),
                                check_family=lambda family: check_text_image_size(family, size))
    pipe = sampler.pipeline
    pipe.require_encoder("inpainting" if args.task == "inpaint" else "editing")
    load_s = time.perf_counter() - t_load
    channels: Any = "default" if args.guidance_channels is None else args.guidance_channels
    schedule = schedule_from_args(args, lambda spec: sampler.default_schedule(spec, args.cfg, channels, size,
                                                                              task=args.task))
    image = load_image(args.image, channels=3, size=disk_size)
    text = dict(prompts=requests(args), negative_prompt=args.negative_prompt, guidance=args.guidance,
                schedule=schedule, seed=args.seed, batch_size=args.batch, progress=not args.no_progress)
    samples, inputs = _run_task(args, sampler, image, disk_size, disk_size, text, 3)
    return _write(args, out_folder, sampler, samples, pipe.describe(), prompt_names(samples.prompts), inputs, load_s)


def _run_task(args: argparse.Namespace, sampler: Any, image: Any, size: int | tuple[int, int],
              disk_size: tuple[int, int], request: dict[str, Any], channels: int) -> tuple[Any, dict[str, Any]]:
    """``args.task`` on ``image`` (the model's ``size``) with ``request`` (classes or prompts, schedule, seed, ...; any
    sampler: PyTorch or an export): the samples, and the input PNGs (``channels`` each) to write beside them."""
    from flowturbo.runtime.editing import DEFAULT_FEATHER_PX, load_mask
    from flowturbo.runtime.images import to_uint8

    inputs = {"input.png": to_uint8(image.pixels)[0]}
    if args.task == "inpaint":
        mask, notes = load_mask(args.mask, size=size, image_size=disk_size, resize=args.resize)
        feather = DEFAULT_FEATHER_PX if args.feather is None else args.feather
        samples = sampler.inpaint(image, mask, feather=feather, mask_notes=notes, **request)
        inputs["mask.png"] = _mask_png(mask, channels)
    else:
        samples = sampler.edit(image, args.strength, **request)
    return samples, inputs


def _check_exported_kind(args: argparse.Namespace, sampler: Any) -> None:
    """Prompts for a class export are refused as ``sample --artifacts`` refuses them (class ids for a text export:
    :func:`~flowturbo.runtime.exported_text_cli.exported_text_prompts`)."""
    from flowturbo.runtime.exported_text_cli import wants_text

    if not getattr(sampler, "takes_prompts", False) and wants_text(args):
        raise FlowTurboError(f"{args.artifacts} is conditioned on class ids, not text prompts: pass --classes, or "
                             "export a text-to-image model with `flowturbo export --pipeline DIR --with-encoder`")


def _run_exported_text(args: argparse.Namespace, out_folder: Any, disk_size: tuple[int, int], sampler: Any,
                       load_s: float) -> int:
    """``--artifacts TEXT_EXPORT --prompt ...``: the results have the export's image size (an image of another size
    is refused unless ``--resize``), on its recorded grid (editing: rescaled onto [1 - strength, 1]); files are named
    after the prompts, as ``sample``'s."""
    from flowturbo.runtime.editing import load_image
    from flowturbo.runtime.exported_text_cli import exported_text_prompts, exported_text_schedule
    from flowturbo.runtime.text_cli import prompt_names

    prompts = exported_text_prompts(sampler, args)
    schedule = exported_text_schedule(sampler, _exported_schedule(args, sampler))
    _, height, width = (int(d) for d in sampler.artifacts.model["image_shape"])
    image = load_image(args.image, channels=3, size=(width, height), resize=args.resize)
    text = dict(prompts=prompts, negative_prompt=args.negative_prompt, guidance=args.guidance, schedule=schedule,
                seed=args.seed, batch_size=args.batch, progress=not args.no_progress)
    samples, inputs = _run_task(args, sampler, image, (width, height), disk_size, text, 3)
    return _write(args, out_folder, sampler, samples, sampler.describe(), prompt_names(samples.prompts), inputs, load_s)


def _mask_png(mask: Any, channels: int) -> Any:
    """(1, 1, H, W) in {0, 1} -> (H, W, channels) uint8 for ``mask.png``."""
    import numpy as np

    mask_pixels = (mask[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)  # (H, W, 1)
    return np.repeat(mask_pixels, channels, axis=2)


def _write(args: argparse.Namespace, out_folder: Any, sampler: Any, samples: Any, model_info: dict[str, Any],
           names: list[str] | None, inputs: dict[str, Any], load_s: float) -> int:
    """Write the output folder (results, inputs, run.json) and print the summary."""
    import torch

    from flowturbo.runtime.images import to_uint8, write_sample_folder

    t_write = time.perf_counter()
    record: dict[str, Any] = {
        "flowturbo_version": __version__, "command": " ".join(["flowturbo", *sys.argv[1:]]),
        "backend": sampler.backend, "model": model_info, "seed": args.seed, "image": str(args.image),
        "mask": str(args.mask) if args.task == "inpaint" else None, "torch_version": torch.__version__,
        "host": platform.node(), "seconds_load": load_s, **samples.record(),
    }
    out = write_sample_folder(out_folder, to_uint8(samples.images), samples.labels, record, names,
                              grid_scale=args.grid_scale, inputs=inputs)
    write_s, n = time.perf_counter() - t_write, len(samples.labels)
    task = samples.task or {}
    what = (f"strength {args.strength} (t0 = {task.get('t0', 0):.3g})" if args.task == "edit"
            else f"{100 * task.get('regenerated_fraction', 0):.1f}% of the pixels regenerated")
    print(f"flowturbo {args.task}: {_schedule_line(samples)}, {n} images, {what}, backend {sampler.backend}")
    for note in task.get("notes", []):
        print(f"note: {note}")
    if samples.num_batches:
        _print_timings(load_s, samples, write_s, "load model" if args.artifacts is None else "load artifacts")
    print(f"wrote {out / 'grid.png'}, {n} PNGs, {', '.join(inputs)} and {out / 'run.json'}")
    return 0


def _require_exported_encoder(args: argparse.Namespace, sampler: Any) -> None:
    """An export without the encoder graph is refused with the command that rebuilds it with one, in full (its
    manifest's settings, --with-encoder, a new --out)."""
    from flowturbo.runtime.artifacts import export_command, new_export_folder

    manifest = sampler.artifacts.manifest
    if manifest.get("with_encoder"):
        return
    out = new_export_folder(args.artifacts, "with-encoder")
    command = export_command(sampler.schedule, {**manifest, "with_encoder": True}, out=out)
    what = "inpainting" if args.task == "inpaint" else "editing"
    raise FlowTurboError(f"the export {args.artifacts} has no encoder graph, which {what} needs: export one with "
                         f"`{command}` and pass --artifacts {out}")


def _schedule_line(samples: Any) -> str:
    """``H1P5R3 (3 predictor + 3 refiner calls, cfg=1.5)`` with the calls really made (0 for an all-black mask)."""
    schedule = samples.schedule
    guidance = "" if schedule.guidance_scale == 1.0 else f", cfg={schedule.guidance_scale:g}"
    return (f"{schedule.notation} ({samples.predictor_calls} predictor + {samples.refiner_calls} refiner calls"
            f"{guidance})")


def _exported_schedule(args: argparse.Namespace, sampler: Any) -> Any:
    """The exported schedule (``--schedule`` / ``--cfg`` must equal it, as for ``sample --artifacts``)."""
    from flowturbo.schedule import SamplingSchedule

    base = sampler.schedule
    if not (args.schedule or args.cfg is not None or args.guidance_channels is not None):
        return None
    scale = base.guidance_scale if args.cfg is None else args.cfg
    channels = base.guidance_channels if args.guidance_channels is None else args.guidance_channels
    return (SamplingSchedule.parse(args.schedule, guidance_scale=scale, guidance_channels=channels)
            if args.schedule else base.with_guidance(scale, channels))


__all__ = ["add_edit_parser", "add_inpaint_parser", "run_task"]
