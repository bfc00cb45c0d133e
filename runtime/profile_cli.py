"""``flowturbo profile``: time every schedule step and the decode; write profile.json, traces and a chart.

Registered by ``flowturbo.runtime.cli`` through ``_SUBCOMMAND_MODULES`` (``add_profile_parser``). Start-up
stays light: torch and the models are imported inside the handler.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from flowturbo.cliargs import (
    GUIDANCE_SCALE,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    SEED,
    input_path,
    int_in,
    output_path,
)
from flowturbo.errors import FlowTurboError
from flowturbo.runtime.backends import EXPORTED_BACKENDS
from flowturbo.runtime.cli import MAX_THREADS

BACKENDS = ("pytorch", *EXPORTED_BACKENDS)


def add_profile_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``flowturbo profile``."""
    p = sub.add_parser("profile", help="time every schedule step (+ decode): table, profile.json, trace, chart")
    m = p.add_argument_group("what to profile (default: the embedded default model, PyTorch eager)")
    m.add_argument("--model", default=None, type=input_path("--model"),
                   help="bundle folder (default: the embedded default model)")
    m.add_argument("--refiner", default=None, type=input_path("--refiner"),
                   help="with --pipeline: a token refiner trained for the folder (schedules with R steps)")
    m.add_argument("--artifacts", default=None, type=input_path("--artifacts"),
                   help="export directory (`flowturbo export`) for --backend onnxruntime|aoti|tensorrt|cpp")
    m.add_argument("--backend", default="pytorch", choices=BACKENDS,
                   help="pytorch (default) runs the bundle eagerly; the others run --artifacts")
    m.add_argument("--schedule", default=None, help="schedule notation or preset (default: the model's / the "
                                                    "exported one; with --artifacts it must equal the exported one)")
    m.add_argument("--cfg", type=GUIDANCE_SCALE, default=None,
                   help="guidance scale (default: the model's / the exported one)")
    m.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto (default)")
    m.add_argument("--dtype", default=None, help="pytorch backend: float32 | float16 | bfloat16 | float64 (default: "
                                                 "bfloat16 on CUDA, float32 on CPU)")
    m.add_argument("--kernels", default="auto", choices=["auto", "reference", "triton"],
                   help="pytorch backend: fused Triton kernels (CUDA default) or the reference ops (CPU default)")
    from flowturbo.runtime.text_cli import add_text_arguments

    add_text_arguments(p)  # --pipeline DIR --prompt TEXT: a text-to-image model, PyTorch eager
    r = p.add_argument_group("how")
    r.add_argument("--batch", type=POSITIVE_INT, default=1, help="images per batch (default 1; CFG doubles the rows)")
    r.add_argument("--seed", type=SEED, default=0, help="noise seed in [0, 2^63)")
    r.add_argument("--warmup", type=NON_NEGATIVE_INT, default=2, help="untimed runs first (default 2)")
    r.add_argument("--repeats", type=POSITIVE_INT, default=5,
                   help="timed runs; the median-total run is reported (default 5)")
    r.add_argument("--threads", type=int_in(1, MAX_THREADS), default=None,
                   help="CPU intra-op threads (torch / ONNX Runtime)")
    r.add_argument("--no-kernels", action="store_true", help="skip the torch.profiler run (no per-step kernels)")
    r.add_argument("--out", required=True, type=output_path("--out"),
                   help="output folder (profile.json, trace.json, steps.png, table.txt; written atomically; replaced "
                        "only if it is a sample-like output holding nothing but flowturbo's own files)")
    r.add_argument("--wait", action="store_true",
                   help="if another flowturbo process is writing --out, wait for it instead of failing at once")
    p.set_defaults(handler=run_profile)


def _check_args(args: argparse.Namespace) -> None:
    """Refuse impossible requests before loading anything."""
    from flowturbo.runtime.cli import MAX_IMAGES, check_device, check_seed

    _check_text_args(args)
    check_seed(args.seed)
    check_device(args.device)
    if not 1 <= args.batch <= MAX_IMAGES:
        raise FlowTurboError(f"--batch must be in [1, {MAX_IMAGES}] images, got {args.batch}")
    if args.warmup < 0:
        raise FlowTurboError(f"--warmup must be >= 0, got {args.warmup}")
    if args.repeats < 1:
        raise FlowTurboError(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise FlowTurboError(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
    if args.backend in EXPORTED_BACKENDS:
        if args.artifacts is None:
            raise FlowTurboError(f"--backend {args.backend} runs an export directory: pass --artifacts DIR (a "
                                 "directory made by flowturbo export), or drop --backend to profile the bundle")
        if args.model is not None:
            raise FlowTurboError("--artifacts already holds the model; drop --model")
        if args.dtype is not None:
            raise FlowTurboError("--dtype is fixed when exporting (flowturbo export --precision); drop --dtype")
    elif args.artifacts is not None:
        raise FlowTurboError("--artifacts needs --backend onnxruntime, aoti, tensorrt or cpp (pytorch runs --model)")


def _check_text_args(args: argparse.Namespace) -> None:
    """``--pipeline`` (or a text bundle as ``--model``): the PyTorch backend, prompts; else no text flags."""
    from flowturbo.families import ImageSize
    from flowturbo.runtime.text_cli import (
        _given,
        check_prompt_flags,
        given_prompts,
        refuse_text_flags,
        resolve_text_bundle,
    )

    resolve_text_bundle(args)  # --model TEXT_BUNDLE -> its --pipeline folder + --refiner + defaults
    args.profile_prompts = None
    if args.pipeline is None and args.refiner is not None:
        raise FlowTurboError("--refiner goes with --pipeline (a refiner trained for that folder); a bundle or an "
                             "export holds its own")
    if args.pipeline is None and args.artifacts is not None:  # a text export takes prompts (checked when loaded)
        fixed = _given(args, ("--size", "--max-sequence-length"))
        if fixed:
            raise FlowTurboError(f"{fixed[0]} was fixed when exporting; drop it")
        check_prompt_flags(args)
        if args.prompt is not None or args.prompts is not None:
            args.profile_prompts = given_prompts(args)
        return
    if args.pipeline is None:
        refuse_text_flags(args)
        return
    if args.model is not None or args.artifacts is not None or args.backend != "pytorch":
        raise FlowTurboError("--pipeline is profiled on the PyTorch backend; drop --model / --artifacts / --backend "
                             "(export it first and profile the export with --artifacts)")
    check_prompt_flags(args, "profile --pipeline needs a prompt: pass --prompt TEXT (repeatable; cycled over "
                             "--batch) or --prompts FILE")
    if args.size is not None:
        ImageSize.parse(args.size)
    args.profile_prompts = given_prompts(args)


def _profile_pytorch(args: argparse.Namespace, trace: Path | None) -> Any:
    from flowturbo.families import ImageSize
    from flowturbo.runtime.profiling import profile_pytorch
    from flowturbo.runtime.sampler import Sampler
    from flowturbo.runtime.text_cli import request_check

    common = dict(device=args.device, dtype=args.dtype, kernel_backend=args.kernels,
                  cuda_graph=False)  # steps are timed one by one
    if args.pipeline is None:
        sampler = Sampler.from_bundle(args.model, **common)
        schedule = sampler.default_schedule(args.schedule, args.cfg)
        return profile_pytorch(sampler.pipeline, schedule, args.batch, args.seed, args.warmup, args.repeats,
                               kernels=not args.no_kernels, kernel_trace=trace)
    size = ImageSize.parse(args.size) if args.size is not None else None
    sampler = Sampler.from_pipeline(args.pipeline, max_sequence_length=args.max_sequence_length, refiner=args.refiner,
                                    defaults=args.text_defaults,
                                    before_weights=request_check(args, size, lambda parse: parse(args.schedule)),
                                    **common)
    schedule = sampler.default_schedule(args.schedule, args.cfg, size=size)
    return profile_pytorch(sampler.pipeline, schedule, args.batch, args.seed, args.warmup, args.repeats,
                           kernels=not args.no_kernels, kernel_trace=trace, prompts=args.profile_prompts,
                           negative_prompt=args.negative_prompt, guidance=args.guidance, size=size)


def _expect_schedule(args: argparse.Namespace, exported: Any, sampler: Any = None) -> None:
    """--schedule/--cfg given with --artifacts must name the exported schedule (the hint re-exports ``sampler``'s
    artifacts for the wanted one)."""
    from flowturbo.runtime.artifacts import reexport_hint
    from flowturbo.schedule import SamplingSchedule

    if args.schedule is None and args.cfg is None:
        return
    scale = exported.guidance_scale if args.cfg is None else args.cfg
    wanted = (SamplingSchedule.parse(args.schedule, guidance_scale=scale,
                                     guidance_channels=exported.guidance_channels)
              if args.schedule else exported.with_guidance(scale, exported.guidance_channels))
    if wanted.id != exported.id:
        raise FlowTurboError(
            f"{args.artifacts} was exported for schedule {exported} (id {exported.id}), not {wanted} (id {wanted.id}); "
            f"re-export with {reexport_hint(wanted, _manifest_of(sampler), args.artifacts)}, or drop --schedule/--cfg"
        )


def _manifest_of(sampler: Any) -> dict[str, Any] | None:
    artifacts = getattr(sampler, "artifacts", None)
    manifest = getattr(artifacts, "manifest", None)
    return manifest if isinstance(manifest, dict) else None


def _profile_exported(args: argparse.Namespace, trace: Path | None) -> Any:
    from flowturbo.runtime.profiling import profile_exported

    from flowturbo.runtime.backends import load_exported_sampler

    device = None if args.device == "auto" else args.device
    if args.backend == "onnxruntime" and device not in (None, "cpu"):
        raise FlowTurboError(f"the onnxruntime backend runs on the CPU here; drop --device {args.device}")
    sampler = load_exported_sampler(args.artifacts, args.backend, device=device, threads=args.threads)
    _expect_schedule(args, sampler.schedule, sampler)
    return profile_exported(sampler, args.batch, args.seed, args.warmup, args.repeats,
                            kernels=not args.no_kernels, kernel_trace=trace, prompts=args.profile_prompts,
                            negative_prompt=args.negative_prompt, guidance=args.guidance)


def _profile_cpp(args: argparse.Namespace) -> Any:
    from flowturbo.runtime.profiling import profile_from_runner

    try:
        from flowturbo.runtime.cpp_backend import CppSampler
    except ImportError as exc:
        raise FlowTurboError(
            f"the cpp backend is not available in this install (flowturbo.runtime.cpp_backend.CppSampler: {exc}); "
            "build the C++ extension (scripts/setup.sh) or use --backend onnxruntime|aoti"
        ) from None
    sampler = CppSampler.from_artifacts(args.artifacts, device=None if args.device == "auto" else args.device)
    if sampler.artifacts.takes_prompts:
        raise FlowTurboError(f"{args.artifacts} is a text-to-image export: the C++ runner's per-step profile takes class "
                             "ids only for now; profile it with --backend aoti or onnxruntime (and --prompt)")
    schedule, num_classes = sampler.schedule, sampler.num_classes
    _expect_schedule(args, schedule, sampler)
    labels = [i % num_classes for i in range(args.batch)]
    data = sampler.profile_batch(labels, seed=args.seed, warmup=args.warmup, repeats=args.repeats)
    extra = {"source": str(args.artifacts), "seed": args.seed, "timer": "runner (C++)"}
    return profile_from_runner(data, schedule=schedule, backend="cpp", batch=args.batch, warmup=args.warmup,
                               repeats=args.repeats, extra=extra)


def run_profile(args: argparse.Namespace) -> int:
    _check_args(args)
    from flowturbo.fileio import OutputFolder
    from flowturbo.runtime.profiling import TORCH_TRACE_FILE, describe_run, format_table, write_profile_files

    # --out is checked, created and locked before anything loads: a bad path costs no profiling.
    with OutputFolder(args.out, command="profile", what="profile output", wait=args.wait) as out:
        import torch

        threads = torch.get_num_threads()
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        try:
            with out.staging() as staging:
                trace = None if args.no_kernels else staging / TORCH_TRACE_FILE
                if args.backend == "pytorch":
                    profile = _profile_pytorch(args, trace)
                elif args.backend == "cpp":
                    profile = _profile_cpp(args)
                else:
                    profile = _profile_exported(args, trace)
                profile.extra["command"] = " ".join(["flowturbo", *sys.argv[1:]])
                extra_files = [TORCH_TRACE_FILE] if trace is not None and trace.is_file() else []
                written = write_profile_files(profile, staging) + extra_files
        finally:
            torch.set_num_threads(threads)
    target = out.target
    print(describe_run(profile))
    print(format_table(profile))
    print(f"wrote {', '.join(str(target / name) for name in written)}")
    return 0


__all__ = ["add_profile_parser", "run_profile"]
