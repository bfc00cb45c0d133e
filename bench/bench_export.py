"""Export benchmark: ms per image of one FlowTurbo schedule on the default model, every backend side by side.

Rows: PyTorch eager, torch.compile, ONNX Runtime per specialisation variant (time-input, per-step,
unrolled), AOTInductor (Python loop over the packages) and the C++ runner (flowturbo._runner, the same
packages with the loop in C++). Export / compile time is reported apart from run time. Each row records device,
commit, schedule id, backend, variant, dtype and batch; ratios are against eager at the same batch.

    .venv/bin/python bench/bench_export.py --batches 1 16 --repeats 5 --out outputs/bench_export.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_common import git_commit
from flowturbo.export.pipeline import ExportRequest, export_bundle
from flowturbo.export.specs import BatchProfile
from flowturbo.runtime.aoti_backend import AotiSampler
from flowturbo.runtime.cpp_backend import CppSampler, cpp_unavailable_reason
from flowturbo.runtime.onnx_backend import OnnxRuntimeSampler
from flowturbo.runtime.pytorch_backend import DEFAULT_BUNDLE_DIR
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.bundle import load_bundle
from flowturbo.training.sampling import make_noise, sample_schedule

WARMUP = 2


def _median_seconds(fn, repeats: int) -> float:
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _eager_fn(bundle, schedule, batch, predictor, refiner, decode):
    labels = torch.arange(batch) % bundle.num_classes
    noise = make_noise(batch, bundle.latent_shape, 0)

    @torch.inference_mode()
    def run():
        result = sample_schedule(schedule, noise, labels, predictor, refiner, num_classes=bundle.num_classes,
                                 check_finite=False)
        return decode(result.latents)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", default="H1P5R3")
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["time-input", "per-step", "unrolled"])
    parser.add_argument("--aoti-variants", nargs="+", default=["time-input"],
                        help="AOTInductor variants ('none' to skip); each also gets a C++ runner row")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--workdir", default=None, help="where to export (default: a temp dir)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads for torch and ONNX Runtime (default 1: a shared 2-core machine "
                             "oversubscribed by OpenMP pools costs ~16 ms per op)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    schedule = SamplingSchedule.parse(args.schedule, guidance_scale=args.cfg)
    bundle = load_bundle(DEFAULT_BUNDLE_DIR)
    profile = BatchProfile(1, max(args.batches), max(args.batches))
    common = {"device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "commit": git_commit(), "schedule": schedule.notation, "schedule_id": schedule.id, "dtype": "fp32"}
    rows = []

    def record(backend, variant, batch, seconds, build_s=None):
        row = {**common, "backend": backend, "variant": variant, "batch": batch,
               "ms_per_image": 1000 * seconds / batch, "build_s": build_s}
        rows.append(row)
        print(json.dumps(row), flush=True)

    for batch in args.batches:
        fn = _eager_fn(bundle, schedule, batch, bundle.predictor, bundle.refiner, bundle.decoder.decode)
        record("pytorch-eager", "-", batch, _median_seconds(fn, args.repeats))
    if not args.no_compile:
        predictor, refiner = torch.compile(bundle.predictor), torch.compile(bundle.refiner)
        decode = torch.compile(bundle.decoder.decode)
        for batch in args.batches:
            fn = _eager_fn(bundle, schedule, batch, predictor, refiner, decode)
            start = time.perf_counter()
            fn()
            compile_s = time.perf_counter() - start
            record("torch.compile", "-", batch, _median_seconds(fn, args.repeats), compile_s)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_export_"))
    jobs = [("onnx", v) for v in args.variants]
    jobs += [("aoti", v) for v in args.aoti_variants if v != "none"]
    for fmt, variant in jobs:
        request = ExportRequest(schedule, profile, (fmt,), "fp32", variant, validate=False)
        result = export_bundle(bundle, request, workdir / f"{fmt}-{variant}", source="default", overwrite=True)
        build_s = sum(a["build_seconds"] for a in result.manifest["artifacts"])
        sampler_cls = OnnxRuntimeSampler if fmt == "onnx" else AotiSampler
        extra = {"threads": args.threads} if fmt == "onnx" else {}
        samplers = [("onnxruntime" if fmt == "onnx" else "aoti", sampler_cls.from_artifacts(result.path, **extra))]
        if fmt == "aoti" and cpp_unavailable_reason() is None:
            samplers.append(("cpp-runner", CppSampler.from_artifacts(result.path)))
        for name, sampler in samplers:
            for batch in args.batches:
                classes = [i % bundle.num_classes for i in range(batch)]
                seconds = _median_seconds(lambda: sampler.sample(classes, seed=0), args.repeats)
                record(name, variant, batch, seconds, build_s)

    eager = {r["batch"]: r["ms_per_image"] for r in rows if r["backend"] == "pytorch-eager"}
    print("\n| backend | variant | batch | ms/image | vs eager | build/compile s |\n|---|---|---|---|---|---|")
    for r in rows:
        build = "-" if r["build_s"] is None else f"{r['build_s']:.1f}"
        print(f"| {r['backend']} | {r['variant']} | {r['batch']} | {r['ms_per_image']:.2f} | "
              f"{eager[r['batch']] / r['ms_per_image']:.2f}x | {build} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
