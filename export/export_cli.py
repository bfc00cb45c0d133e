"""``flowturbo export``: a model + a fixed schedule in, a verified artifact directory out.

Registered by ``flowturbo.runtime.cli`` through ``_SUBCOMMAND_MODULES`` (``add_export_parser``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from flowturbo.cliargs import GUIDANCE_SCALE, POSITIVE_INT, input_path, int_in, output_path
from flowturbo.errors import FlowTurboError

DEFAULT_MODEL_SUBDIR = ("assets", "default_model")  # the embedded default, inside the runtime package folder


def default_model_dir() -> Path:
    """The embedded default bundle (located as package data; no runtime code is imported)."""
    spec = importlib.util.find_spec("flowturbo.runtime")
    if spec is None or not spec.submodule_search_locations:
        raise FlowTurboError("flowturbo.runtime is not installed, so there is no embedded default: pass --model")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*DEFAULT_MODEL_SUBDIR)


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``flowturbo export``."""
    from flowturbo.export.modules import VARIANTS
    from flowturbo.export.onnx_export import DEFAULT_OPSET
    from flowturbo.export.pipeline import DEFAULT_VARIANT
    from flowturbo.export.specs import PRECISIONS
    from flowturbo.export.tensorrt_export import DEFAULT_OPTIMIZATION_LEVEL

    p = sub.add_parser("export", help="export a model + schedule to ONNX / AOTInductor / TensorRT with a manifest")
    g = p.add_argument_group("what to export")
    g.add_argument("--model", default=None, type=input_path("--model"),
                   help="bundle folder (default: the embedded default model)")
    g.add_argument("--schedule", default=None, type=input_path("--schedule", suffix=".json"),
                   help="schedule notation, preset, or a schedule JSON file such as flowturbo tune's "
                        "recommended_schedule.json (default: the model's)")
    g.add_argument("--timesteps", default=None, help="custom time grid: comma-separated, increasing, from 0 to 1")
    g.add_argument("--cfg", type=GUIDANCE_SCALE, default=None, help="guidance scale (default: the model's)")
    g.add_argument("--guidance-channels", type=POSITIVE_INT, default=None,
                   help="guide only the first N latent channels")
    add_text_export_arguments(p)
    o = p.add_argument_group("how")
    o.add_argument("--batch", default="1:1:16", help="batch profile MIN:OPT:MAX in images (default 1:1:16)")
    o.add_argument("--format", "--formats", dest="format", default="onnx",
                   help="comma-separated: onnx, aoti, tensorrt (default onnx)")
    o.add_argument("--precision", default="fp32", choices=PRECISIONS)
    o.add_argument("--variant", default=DEFAULT_VARIANT, choices=VARIANTS,
                   help=f"schedule specialisation (default {DEFAULT_VARIANT}; see BENCHMARKS.md)")
    o.add_argument("--opset", type=POSITIVE_INT, default=DEFAULT_OPSET)
    o.add_argument("--device", default="cpu", help="cpu or cuda (AOTInductor / TensorRT build device)")
    o.add_argument("--kernels", default="reference", choices=["reference", "triton"],
                   help="reference: standard ops (every format); triton: our fused kernels compiled into "
                        "AOTInductor CUDA packages (--format aoti --device cuda)")
    o.add_argument("--trt-opt-level", type=int_in(0, 5), default=DEFAULT_OPTIMIZATION_LEVEL,
                   help="TensorRT builder level 0..5")
    o.add_argument("--with-encoder", action="store_true",
                   help="also export the image encoder (for `flowturbo inpaint` / `edit --artifacts`)")
    o.add_argument("--no-validate", action="store_true", help="skip the parity check against eager PyTorch")
    o.add_argument("--out", required=True, type=output_path("--out"),
                   help="export directory (written atomically, sealed manifest.json last)")
    o.add_argument("--overwrite", action="store_true",
                   help="replace an export directory built for something else (only an export directory holding "
                        "nothing but flowturbo's own files; never a bundle, a training run or another output)")
    o.add_argument("--wait", action="store_true",
                   help="if another flowturbo process is writing --out, wait for it instead of failing at once")
    p.set_defaults(handler=run_export)


BATCH_SYNTAX = re.compile(r"^\s*\d+\s*:\s*\d+\s*:\s*\d+\s*$")
DEVICE_SYNTAX = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_export_args(args: argparse.Namespace) -> None:
    """Refuse malformed flags and an unusable --out before the model loads (one `error:` line each)."""
    from flowturbo.fileio import check_replaceable, check_writable_target

    if not BATCH_SYNTAX.match(args.batch):
        raise FlowTurboError(f"--batch {args.batch!r} is not MIN:OPT:MAX (three integers, e.g. 1:4:16; a static "
                             "batch of 8 is 8:8:8)")
    if not DEVICE_SYNTAX.match(args.device):
        raise FlowTurboError(f"unknown --device {args.device!r}; use cpu, cuda or cuda:N")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise FlowTurboError(f"--device {args.device}: this machine has no CUDA GPU (or this torch has no CUDA); "
                                 "export with --device cpu, or run on a GPU machine")
    check_writable_target(args.out)
    check_replaceable(args.out, "export directory", command="export")


def _parse_timesteps(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FlowTurboError(f"--timesteps must be comma-separated numbers, got {text!r}") from None


def run_export(args: argparse.Namespace) -> int:

    from flowturbo.dtypes import torch_dtype
    from flowturbo.export.pipeline import ExportRequest, export_bundle
    from flowturbo.schedule import SamplingSchedule, is_schedule_file
    from flowturbo.training.bundle import load_bundle

    check_export_args(args)
    if args.pipeline is not None:
        return run_text_export(args)
    text = [flag for flag, value in (("--size", args.size), ("--guidance", args.guidance),
                                     ("--max-sequence-length", args.max_sequence_length)) if value is not None]
    if text:
        raise FlowTurboError(f"{text[0]} is for text-to-image models: pass --pipeline DIR (a diffusers pipeline "
                             "folder)")
    folder = Path(args.model) if args.model else default_model_dir()
    bundle = load_bundle(folder, device=args.device, dtype=torch_dtype(args.precision), kernel_backend=args.kernels)
    if args.with_encoder and bundle.encoder is None:  # none declared, or declared but not loadable: say which
        from flowturbo.training.encoders import missing_encoder_error

        raise missing_encoder_error(folder, "--with-encoder")
    defaults = bundle.defaults
    if is_schedule_file(args.schedule):  # steps, grid and guidance from the file; flags override
        schedule = SamplingSchedule.from_file(args.schedule)
        if args.cfg is not None or args.guidance_channels is not None:
            schedule = schedule.with_guidance(schedule.guidance_scale if args.cfg is None else args.cfg,
                                              schedule.guidance_channels if args.guidance_channels is None
                                              else args.guidance_channels)
        if args.timesteps is not None:
            schedule = dataclasses.replace(schedule, timesteps=tuple(_parse_timesteps(args.timesteps)))
    else:
        schedule = SamplingSchedule.parse(
            args.schedule or defaults.schedule,
            guidance_scale=defaults.cfg if args.cfg is None else args.cfg,
            guidance_channels=defaults.guidance_channels if args.guidance_channels is None else args.guidance_channels,
            timesteps=None if args.timesteps is None else _parse_timesteps(args.timesteps),
        )
    request = ExportRequest(
        schedule=schedule, batch=args.batch, formats=tuple(f.strip() for f in args.format.split(",") if f.strip()),
        precision=args.precision, variant=args.variant, opset=args.opset, device=args.device,
        validate=not args.no_validate, tensorrt_optimization_level=args.trt_opt_level, kernel_backend=args.kernels,
        with_encoder=args.with_encoder,
    )
    source = "embedded default" if args.model is None else str(folder.resolve())  # re-export hints run anywhere
    result = export_bundle(bundle, request, args.out, source=source,
                           command=" ".join(["flowturbo", *sys.argv[1:]]), overwrite=args.overwrite, wait=args.wait)
    manifest = result.manifest
    state = "up to date (reused)" if result.reused else "written"
    print(f"flowturbo export: {schedule} -> {result.path} [{state}], key {manifest['key']}, "
          f"variant {manifest['variant']}, {manifest['precision']}, batch {request.batch.describe()}")
    for a in manifest["artifacts"]:
        err = a.get("max_abs_error")
        err_text = "" if err is None else f"  max|err| {err:.2e}"
        print(f"  {a['format']:<9}{a['file']:<34}{a['build_seconds']:>7.1f} s{err_text}")
    return 0


def add_text_export_arguments(p: argparse.ArgumentParser) -> None:
    """``export``'s text-to-image group (a diffusers pipeline folder instead of --model)."""
    from flowturbo.cliargs import Number, int_in

    g = p.add_argument_group("text-to-image (a diffusers flow-matching pipeline folder instead of --model)")
    g.add_argument("--pipeline", default=None, type=input_path("--pipeline"),
                   help="a diffusers text-to-image pipeline folder (as for flowturbo sample --pipeline); its "
                        "transformer step and VAE decoder are exported, its text encoders stay in PyTorch")
    g.add_argument("--size", default=None, help="image size WIDTHxHEIGHT the graphs are built for (default: the "
                                                  "model's); the family's time grid for it is baked into the schedule")
    g.add_argument("--guidance", type=Number(float, low=0), default=None,
                   help="default distilled guidance value recorded for guidance-distilled models (a graph input: "
                        "sampling may pass another)")
    g.add_argument("--max-sequence-length", type=int_in(1, 512), default=None,
                   help="T5 tokens per prompt the graphs take (default: the pipeline's)")
    g.add_argument("--refiner", default=None, type=input_path("--refiner"),
                   help="a refiner trained for this pipeline (`train refiner --teacher DIR --prompts FILE` run): "
                        "schedules with R steps export its graph too")


def run_text_export(args: argparse.Namespace) -> int:
    """``flowturbo export --pipeline DIR``: the request checked against the folder's configs before any weights load,
    then :func:`flowturbo.export.text_export.export_text_pipeline`."""
    from flowturbo.dtypes import torch_dtype
    from flowturbo.export.pipeline import ExportRequest
    from flowturbo.export.text_export import TextExport, check_text_request, export_text_pipeline, text_schedule
    from flowturbo.families import GuidanceRule, ImageSize
    from flowturbo.schedule import is_schedule_file
    from flowturbo.training.families import load_family

    if args.model is not None:
        raise FlowTurboError("--pipeline holds the whole model; drop --model")
    if args.timesteps is not None or is_schedule_file(args.schedule):
        raise FlowTurboError("text-to-image exports run on the model's own time grid: give --schedule as a notation "
                             "(e.g. E4 or H2P2), without --timesteps or a schedule file")
    if args.guidance_channels is not None:
        raise FlowTurboError("--guidance-channels is the official SiT checkpoints' rule; text-to-image models guide "
                             "every latent channel")
    size = ImageSize.parse(args.size) if args.size is not None else None
    plan: dict[str, Any] = {}  # size, schedule and request, checked before the weights load

    def check(family: Any) -> None:  # before any weights load: size, schedule, guidance
        chosen = size or family.default_size()
        plan["size"] = chosen
        plan["schedule"] = text_schedule(family, args.schedule, args.cfg, chosen)
        request = ExportRequest(
            schedule=plan["schedule"], batch=args.batch,
            formats=tuple(f.strip() for f in args.format.split(",") if f.strip()), precision=args.precision,
            variant=args.variant, opset=args.opset, device=args.device, validate=not args.no_validate,
            kernel_backend=args.kernels, with_encoder=args.with_encoder)
        check_text_request(family, request)
        if args.guidance is not None and family.guidance_rule is not GuidanceRule.EMBEDDED:
            raise FlowTurboError(f"--guidance {args.guidance:g}: {family.description} has no guidance embedding; "
                                 "use --cfg S (classifier-free guidance)")
        plan["request"] = request

    trained = None
    if args.refiner is not None:
        from flowturbo.training.token_refiner import read_token_refiner

        trained = read_token_refiner(args.refiner)

    def check_with_refiner(family: Any) -> None:
        if trained is not None:
            family.expect_refiner(trained, source=f"--refiner {args.refiner}")
        check(family)

    family = load_family(args.pipeline, device=args.device, dtype=torch_dtype(args.precision),
                         max_sequence_length=args.max_sequence_length, before_weights=check_with_refiner)
    if trained is not None:
        family.attach_refiner(trained, source=f"--refiner {args.refiner}")
    options = TextExport(plan["size"], family.max_sequence_length, args.guidance)
    result = export_text_pipeline(family, plan["request"], options, args.out,
                                  source=str(Path(args.pipeline).resolve()),
                                  command=" ".join(["flowturbo", *sys.argv[1:]]), overwrite=args.overwrite,
                                  wait=args.wait)
    manifest = result.manifest
    state = "up to date (reused)" if result.reused else "written"
    print(f"flowturbo export: {family.description} {plan['schedule']} at {options.size} -> {result.path} [{state}], "
          f"key {manifest['key']}, {manifest['precision']}, batch {plan['request'].batch.describe()}")
    print("  grid t = " + ", ".join(f"{t:.4f}" for t in plan["schedule"].timesteps))
    for a in manifest["artifacts"]:
        err = a.get("max_abs_error")
        err_text = "" if err is None else f"  max|err| {err:.2e}"
        print(f"  {a['format']:<9}{a['file']:<34}{a['build_seconds']:>7.1f} s{err_text}")
    print(f"  prompts are encoded by the text encoders of {manifest['model']['pipeline']} (PyTorch)")
    return 0


__all__ = ["add_export_parser", "default_model_dir", "run_export", "run_text_export"]
