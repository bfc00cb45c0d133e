"""The one prepared GPU suite: build, correctness against the reference, end-to-end timings, GPU tests.

On a bare lent GPU machine (see BENCHMARKS.md for the exact carry list and command)::

    python3 bench/gpu_suite.py --out "$OUT"          # <= 9 minutes on an H100/H200
    python bench/gpu_suite.py --dry-run --out /tmp/s  # the same code paths on CPU with a tiny config (CI)

What it does, in order, each part skipped with its reason when the time budget (``--budget-s``) runs out:

1. **Build**: make ``import flowturbo`` work (``pip install --no-build-isolation --no-deps -e .`` with the carried
   nlohmann-json / OpenSSL headers; carried wheels such as diffusers on ``sys.path``), so the C++ runner exists.
2. **Models**: SiT-XL/2 shapes with random weights (learn_sigma), a one-block refiner and an SD-VAE-shaped
   diffusers ``AutoencoderKL`` (random weights); H1P5R3, CFG 4.0, guidance on 3 of 4 channels (the per-CFG-half
   carry is exercised); batches 1 and 8.
3. **Rows**, side by side in one run, ms per image (CUDA events, median over ``--replays`` after warm-up),
   build/compile seconds apart, max |final latents - row (b)|:
   (a) fp16-autocast eager (the official code's style), (b) bf16 eager reference, (c) ``torch.compile`` of the
   models + whole-schedule CUDA graph, (d) flowturbo's Python fast path (the ``Sampler`` default on CUDA:
   Triton kernels + one CUDA graph), (e) AOTInductor CUDA packages exported with ``--kernels triton`` run by the
   C++ runner with its CUDA graph, (f) the Python loop over the same packages.
4. **Tests**: the GPU-marked tests and the kernel tests on the device; then a short ``bench_kernels.py``.
5. Full results to ``OUT/gpu_suite.json``; a short table printed last.

``--dry-run`` (CPU): a tiny SiT / refiner / AutoencoderKL, float32 instead of bf16 (Triton's interpreter
computes bf16 wrongly), bf16 CPU autocast for row (a), the CUDA graphs replaced by the replay-by-call stand-in,
AOTInductor CPU packages with the reference ops; every row still runs through the same functions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".devcarry"  # git-ignored; filled by scripts/prepare_gpu_carry.sh
SCHEDULE_SPEC, CFG, GUIDANCE_CHANNELS = "H1P5R3", 4.0, 3
SEED = 0
ROWS = {
    "a": "fp16-autocast eager (official style)",
    "b": "bf16 eager reference",
    "c": "torch.compile + CUDA graph",
    "d": "flowturbo fast path (Triton + CUDA graph)",
    "e": "AOTI --kernels triton, C++ runner + graph",
    "f": "AOTI packages, Python loop",
}
# SiT-XL/2 at 256x256 (latents 4x32x32) and the SD-VAE decoder; the dry run's tiny stand-ins.
GPU_MODEL = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16)
DRY_MODEL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=256)
DRY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 16],
               down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
               layers_per_block=1, norm_num_groups=8, sample_size=16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny config on CPU: the same code paths, no GPU")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "bench" / "results" / "gpu_suite")),
                   help="folder for gpu_suite.json and logs (default: $OUT)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="images per batch (default 1 8; dry 2)")
    p.add_argument("--replays", type=int, default=None, help="timed runs per row (default 20; dry 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per row first (default 3; dry 1)")
    p.add_argument("--rows", default="abcdef", help="which rows to run (default all: abcdef)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip what would not fit in this many seconds (default 510 on a GPU, 1200 for --dry-run)")
    p.add_argument("--skip-build", action="store_true", help="flowturbo is already installed")
    p.add_argument("--skip-tests", action="store_true", help="no pytest run")
    p.add_argument("--skip-kernel-bench", action="store_true", help="no bench_kernels.py run")
    return p.parse_args(argv)


class Budget:
    """Wall-clock budget of the whole suite; parts that would not fit are skipped with the reason."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds

    @property
    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def log(message: str) -> None:
    print(f"[gpu_suite {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------- build
def ensure_importable(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Carried wheels on sys.path, then flowturbo installed (editable, C++ extensions built) unless it imports.

    The wheels are unpacked into a temporary folder (never into ``.devcarry``: what a run leaves there would
    travel with the next carry and count against its 64 MiB)."""
    wheels = sorted((CARRY / "wheels").glob("*.whl")) if (CARRY / "wheels").is_dir() else []
    if wheels:
        site = Path(tempfile.mkdtemp(prefix="gpu_suite_site_"))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *map(str, wheels)], check=True)
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    started = time.perf_counter()
    build: dict[str, Any] = {"skipped": args.skip_build}
    if not args.skip_build and not _flowturbo_runner_ok():
        env = dict(os.environ)
        deb = CARRY / "deb"
        if deb.is_dir():  # headers unpacked from nlohmann-json3-dev / libssl-dev (the image lacks them)
            crypto = next(iter(sorted(deb.glob("usr/lib/*/libcrypto.so*"))), None)
            cmake = [f"-Dnlohmann_json_DIR={deb}/usr/share/cmake/nlohmann_json",
                     f"-DOPENSSL_INCLUDE_DIR={deb}/usr/include"]
            if crypto is not None:
                cmake.append(f"-DOPENSSL_CRYPTO_LIBRARY={crypto}")
            env["CMAKE_ARGS"] = " ".join(cmake)
            env["CPATH"] = os.pathsep.join(str(p) for p in sorted(deb.glob("usr/include/*-linux-gnu")))
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e",
                               str(REPO)], env=env, capture_output=True, text=True)
        build["returncode"] = proc.returncode
        (args.out / "build.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            log(f"build failed (rc {proc.returncode}); see build.log; continuing with the pure-Python layers")
            _link_layers()
    elif not _flowturbo_importable():
        _link_layers()
    build["seconds"] = time.perf_counter() - started
    try:
        import flowturbo._C as C  # after the build
    except ImportError as exc:  # the pure-Python layers still run rows (a)-(d) and (f)
        build["runner_status"] = f"C++ extensions not importable ({exc}); rows needing them are skipped"
    else:
        build["runner_status"] = C.runner_build_status()
    results["build"] = build
    log(f"build: {build}")


def _flowturbo_importable() -> bool:
    return subprocess.run([sys.executable, "-c", "import flowturbo.runtime, flowturbo.kernels"],
                          capture_output=True).returncode == 0


def _flowturbo_runner_ok() -> bool:
    return subprocess.run([sys.executable, "-c", "import flowturbo._runner, flowturbo.runtime"],
                          capture_output=True).returncode == 0


def _link_layers() -> None:
    """Without a build: make the pure-Python layers importable from this (throw-away) tree."""
    for layer in ("kernels", "training", "export", "runtime"):
        link = REPO / "flowturbo" / layer
        if not link.exists():
            link.symlink_to(REPO / layer)
    sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------------------------ models
def build_models(dry: bool, device: Any) -> dict[str, Any]:
    """Random-weight predictor, refiner and AutoencoderKL decoder in float32 on ``device``."""
    import torch
    from diffusers import AutoencoderKL

    from flowturbo.training.decoders import DiffusersVAEDecoder
    from flowturbo.training.models import RefinerConfig, SiT, SiTConfig, VelocityRefiner, perturb_zero_initialized

    config = SiTConfig(**(DRY_MODEL if dry else GPU_MODEL), mlp_ratio=4.0, num_classes=1000 if not dry else 10,
                       class_dropout_prob=0.1, learn_sigma=True)
    with torch.device(device):
        predictor = SiT(config)
        refiner = VelocityRefiner(RefinerConfig.for_predictor(config))
        vae = AutoencoderKL(**(DRY_VAE if dry else SD_VAE))
    for model in (predictor, refiner):
        perturb_zero_initialized(model, generator=None)  # adaLN-Zero layers non-zero: a non-trivial flow
    decoder = DiffusersVAEDecoder._from_vae(vae, 0.18215).to(device)
    return {"config": config, "predictor": predictor.eval(), "refiner": refiner.eval(), "decoder": decoder.eval()}


def pipeline_for(models: dict[str, Any], dtype: Any, kernels: str, device: Any, *, compile_models: bool = False) -> Any:
    """A TorchPipeline over copies of the models in ``dtype`` with ``kernels`` (optionally torch.compile'd)."""
    import copy

    import torch

    from flowturbo.kernels import KernelBackend
    from flowturbo.runtime.pytorch_backend import TorchPipeline
    from flowturbo.training.bundle import BundleDefaults

    backend = KernelBackend(kernels)
    predictor = copy.deepcopy(models["predictor"]).to(dtype).set_kernel_backend(backend)
    refiner = copy.deepcopy(models["refiner"]).to(dtype).set_kernel_backend(backend)
    decoder = copy.deepcopy(models["decoder"]).to(dtype)  # TorchPipeline makes it channels-last on CUDA
    if compile_models:
        predictor, refiner = torch.compile(predictor), torch.compile(refiner)
        decoder.decoder = torch.compile(decoder.decoder)
    config = models["config"]
    return TorchPipeline(predictor, refiner, decoder, config.num_classes,
                         (config.in_channels, config.input_size, config.input_size), None,
                         BundleDefaults(schedule=SCHEDULE_SPEC, cfg=CFG, guidance_channels=GUIDANCE_CHANNELS),
                         "gpu_suite random weights", device, dtype, backend)


# ------------------------------------------------------------------------------------------- rows
class Row:
    """One way of running the schedule: ``run(noise, labels) -> (images, latents)`` on device tensors."""

    def __init__(self, key: str, run: Callable[[Any, Any], tuple[Any, Any]], build_s: float = 0.0,
                 note: str = "", autocast: Any = None) -> None:
        self.key, self.run_fn, self.build_s, self.note, self.autocast = key, run, build_s, note, autocast

    def __call__(self, noise: Any, labels: Any) -> tuple[Any, Any]:
        import contextlib

        import torch

        with torch.inference_mode(), (self.autocast or contextlib.nullcontext()):
            return self.run_fn(noise, labels)


def torch_rows(models: dict[str, Any], dry: bool, device: Any, schedule: Any, wanted: str) -> dict[str, Row]:
    """Rows (a)-(d): the PyTorch paths, all through flowturbo's Sampler / integrator."""
    import torch

    from flowturbo.runtime.cuda_graphs import ReplayByCallBackend
    from flowturbo.runtime.sampler import Sampler

    fast_dtype = torch.float32 if dry else torch.bfloat16  # the interpreter computes bf16 wrongly
    graph_backend = ReplayByCallBackend() if device.type != "cuda" else None
    rows: dict[str, Row] = {}
    if "a" in wanted:
        sampler = Sampler(pipeline_for(models, torch.float32, "reference", device), cuda_graph=False)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16 if dry else torch.float16)
        rows["a"] = Row("a", lambda n, y, s=sampler: s._forward(schedule, n, y), autocast=autocast,
                        note="fp32 weights, autocast " + ("bf16 (CPU)" if dry else "fp16"))
    if "b" in wanted:
        sampler = Sampler(pipeline_for(models, fast_dtype, "reference", device), cuda_graph=False)
        rows["b"] = Row("b", lambda n, y, s=sampler: s._forward(schedule, n, y), note=f"{fast_dtype}".split(".")[1])
    for key, kernels, compiled in (("c", "reference", True), ("d", "triton", False)):
        if key not in wanted:
            continue
        sampler = Sampler(pipeline_for(models, fast_dtype, kernels, device, compile_models=compiled),
                          cuda_graph=True, graph_backend=graph_backend)

        def run(n: Any, y: Any, s: Sampler = sampler) -> tuple[Any, Any]:
            out = s.graphs.run((schedule.id, n.shape[0]), lambda a, b: s._forward(schedule, a, b), (n, y)).outputs
            return out[0], out[1]

        rows[key] = Row(key, run, note=sampler.describe_execution())
        rows[key].sampler = sampler  # type: ignore[attr-defined]
    return rows


def aoti_rows(models: dict[str, Any], dry: bool, device: Any, schedule: Any, batches: list[int], wanted: str,
              workdir: Path, results: dict[str, Any]) -> dict[str, Row]:
    """Rows (e)/(f): export AOTInductor packages (``--kernels triton`` on CUDA) and run them two ways."""
    import copy

    import torch

    from flowturbo.export.pipeline import ExportRequest, export_bundle
    from flowturbo.export.specs import BatchProfile
    from flowturbo.runtime.aoti_backend import AotiSampler
    from flowturbo.runtime.cpp_backend import CppSampler, cpp_unavailable_reason
    from flowturbo.training.bundle import Bundle, BundleDefaults

    precision, kernels = ("fp32", "reference") if dry else ("bf16", "triton")
    dtype = torch.float32 if dry else torch.bfloat16
    bundle = Bundle(copy.deepcopy(models["predictor"]).to(dtype).set_kernel_backend(kernels),
                    copy.deepcopy(models["refiner"]).to(dtype).set_kernel_backend(kernels),
                    copy.deepcopy(models["decoder"]).to(dtype), None,
                    BundleDefaults(schedule=SCHEDULE_SPEC, cfg=CFG, guidance_channels=GUIDANCE_CHANNELS))
    profile = BatchProfile(min(batches), max(batches), max(batches))
    request = ExportRequest(schedule, profile, ("aoti",), precision, "time-input", device=device.type,
                            kernel_backend=kernels)
    started = time.perf_counter()
    export = export_bundle(bundle, request, workdir / "aoti", source="gpu_suite random weights", command="gpu_suite")
    build_s = time.perf_counter() - started
    results["aoti_export"] = {"seconds": build_s, "path": str(export.path), "kernels": kernels, "precision": precision}
    rows: dict[str, Row] = {}
    if "e" in wanted:
        reason = cpp_unavailable_reason()
        if reason is None:
            cpp = CppSampler.from_artifacts(export.path, device=device.type)

            def run_cpp(n: Any, y: Any, s: CppSampler = cpp) -> tuple[Any, Any]:
                out = s.run_batch(n, y)
                return out["images"], out["latents"]

            rows["e"] = Row("e", run_cpp, build_s, note=f"cuda graph: {cpp.describe()['cuda_graph']}")
        else:
            results.setdefault("skipped", {})["e"] = reason
    if "f" in wanted:
        aoti = AotiSampler.from_artifacts(export.path, device=device.type)

        def run_python(n: Any, y: Any, s: AotiSampler = aoti) -> tuple[Any, Any]:
            images, latents, _, _ = s.run_batch(n.to(s.dtype), y)
            return images, latents

        rows["f"] = Row("f", run_python, build_s, note="python loop over the same packages")
    return rows


def float64_reference(models: dict[str, Any], device: Any, schedule: Any,
                      inputs: dict[int, tuple[Any, Any]]) -> dict[int, Any]:
    """Final latents (CPU, float64) of the float64 reference path per batch: float64 copies of the models,
    reference ops, eager, float64 state — what every row is also checked against (``max_abs_diff_vs_f64``)."""
    import torch

    from flowturbo.runtime.sampler import Sampler

    sampler = Sampler(pipeline_for(models, torch.float64, "reference", device), cuda_graph=False)
    with torch.inference_mode():
        out = {batch: sampler._forward(schedule, noise.double(), labels)[1].cpu()
               for batch, (noise, labels) in inputs.items()}
    del sampler
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def time_row(row: Row, noise: Any, labels: Any, warmup: int, replays: int, device: Any) -> dict[str, Any]:
    """Build (first call), then warm-up, then ``replays`` timed runs: median ms per image, final latents."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    started = time.perf_counter()
    images, latents = row(noise, labels)  # first use: compiles / captures / JIT-compiles kernels
    sync()
    first_s = time.perf_counter() - started
    for _ in range(warmup):
        row(noise, labels)
    times = []
    for _ in range(replays):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            images, latents = row(noise, labels)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            images, latents = row(noise, labels)
            times.append(1e3 * (time.perf_counter() - t0))
    batch = noise.shape[0]
    return {"ms_per_image": statistics.median(times) / batch, "ms_runs": times, "first_call_s": first_s,
            "latents": latents.float().cpu(), "images_finite": bool(torch.isfinite(images).all())}


def run_rows(args: argparse.Namespace, results: dict[str, Any], budget: Budget) -> None:
    import torch

    from flowturbo.runtime.pytorch_backend import make_noise
    from flowturbo.schedule import SamplingSchedule

    dry = args.dry_run
    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    batches = args.batches or ([2] if dry else [1, 8])
    replays = args.replays or (1 if dry else 20)
    warmup = args.warmup if args.warmup is not None else (1 if dry else 3)
    schedule = SamplingSchedule.parse(SCHEDULE_SPEC, guidance_scale=CFG, guidance_channels=GUIDANCE_CHANNELS)
    results["config"] = {"schedule": schedule.describe(), "batches": batches, "replays": replays, "warmup": warmup,
                         "device": str(device), "model": "tiny (dry run)" if dry else "SiT-XL/2 random weights"}
    started = time.perf_counter()
    models = build_models(dry, device)
    log(f"models built in {time.perf_counter() - started:.1f} s")
    config = models["config"]
    inputs = {}
    for batch in batches:
        labels = torch.tensor([(7 * k + 3) % config.num_classes for k in range(batch)], device=device)
        noise = make_noise(batch, (config.in_channels, config.input_size, config.input_size), SEED,
                           dtype=torch.float32, device=device)
        inputs[batch] = (noise, labels)
    table: dict[str, dict[str, Any]] = {}
    references: dict[int, Any] = {}
    started = time.perf_counter()
    reference64 = float64_reference(models, device, schedule, inputs)
    results["float64_reference_s"] = time.perf_counter() - started

    def measure(rows: dict[str, Row]) -> None:
        for batch, (noise, labels) in inputs.items():
            for key in sorted(rows, key=lambda k: (k != "b", k)):  # the reference row (b) first
                if budget.left < 20:
                    results.setdefault("skipped", {})[f"{key}@{batch}"] = "time budget"
                    continue
                try:
                    measured = time_row(rows[key], noise, labels, warmup, replays, device)
                except Exception as exc:  # noqa: BLE001 - one broken row must not hide the others
                    results.setdefault("errors", {})[f"{key}@{batch}"] = f"{type(exc).__name__}: {exc}"
                    (args.out / f"row_{key}_{batch}.log").write_text(traceback.format_exc())
                    log(f"row {key} batch {batch} failed: {exc}")
                    continue
                latents = measured.pop("latents")
                if key == "b":
                    references[batch] = latents
                entry = {"row": ROWS[key], "batch": batch, "note": rows[key].note,
                         "build_s": rows[key].build_s or measured["first_call_s"], **measured}
                if batch in references:
                    entry["max_abs_diff_vs_b"] = float((latents - references[batch]).abs().max())
                    entry["ref_max_abs"] = float(references[batch].abs().max())
                entry["max_abs_diff_vs_f64"] = float((latents.double() - reference64[batch]).abs().max())
                table[f"{key}@{batch}"] = entry
                log(f"row {key} batch {batch}: {measured['ms_per_image']:.3f} ms/img")

    measure(torch_rows(models, dry, device, schedule, args.rows))  # (a)-(d): cheap builds first
    if set("ef") & set(args.rows):
        if budget.left > (60 if dry else 240):
            workdir = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
            try:
                measure(aoti_rows(models, dry, device, schedule, batches, args.rows, workdir, results))
            except Exception as exc:  # noqa: BLE001 - report, keep the other rows
                results.setdefault("errors", {})["aoti"] = f"{type(exc).__name__}: {exc}"
                (args.out / "aoti_error.log").write_text(traceback.format_exc())
                log(f"AOTI rows failed: {exc}")
        else:
            results.setdefault("skipped", {})["ef"] = f"not enough time left ({budget.left:.0f} s)"
    results["rows"] = table
    results["ratios"] = _ratios(table, batches)


def _ratios(table: dict[str, dict[str, Any]], batches: list[int]) -> dict[str, Any]:
    """The issue's targets as numbers: d/c, b/d, e/d per batch (None where a row is missing)."""
    def ms(key: str, batch: int) -> float | None:
        entry = table.get(f"{key}@{batch}")
        return None if entry is None else entry["ms_per_image"]

    out: dict[str, Any] = {}
    for batch in batches:
        d, c, b, e = ms("d", batch), ms("c", batch), ms("b", batch), ms("e", batch)
        out[str(batch)] = {
            "d_over_c": None if None in (d, c) else d / c,        # target <= 0.9
            "b_over_d": None if None in (b, d) else b / d,        # target >= 1.6 at batch 8
            "e_over_d": None if None in (e, d) else e / d,        # target <= 1 at batch 1
        }
    return out


# ------------------------------------------------------------------------------------------- tests
def run_tests(args: argparse.Namespace, results: dict[str, Any], budget: Budget) -> None:
    if args.skip_tests or budget.left < 60:
        results["tests"] = {"skipped": "--skip-tests" if args.skip_tests else "time budget"}
        return
    if args.dry_run:
        selection = ["tests/runtime/test_fast_path.py", "-k", "cuda_only or graph_cache"]  # fast, CPU-safe subset
    else:
        selection = ["tests/kernels", "tests/runtime/test_fast_path.py", "tests/runtime/test_cpp_runner.py",
                     "tests/training/test_models.py", "-m", "gpu or not slow"]
    command = [sys.executable, "-m", "pytest", "-q", "-x", "--timeout", str(int(max(60, budget.left - 30))),
               *selection]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=max(60, budget.left - 20))
    (args.out / "gpu_tests.log").write_text(proc.stdout + proc.stderr)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    results["tests"] = {"command": " ".join(command[2:]), "returncode": proc.returncode, "summary": summary}
    log(f"tests: {summary}")


def run_kernel_bench(args: argparse.Namespace, results: dict[str, Any], budget: Budget) -> None:
    if args.skip_kernel_bench or budget.left < 60:
        results["kernel_bench"] = {"skipped": "--skip-kernel-bench" if args.skip_kernel_bench else "time budget"}
        return
    out = args.out / "kernels.json"
    # On the GPU with the torch.compile (Inductor) variants: the solver kernels' target is "<= Inductor".
    command = [sys.executable, str(REPO / "bench" / "bench_kernels.py"), "--out", str(out), "--skip-model"] + \
        (["--dry-run", "--no-compile"] if args.dry_run else [])
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=max(60, budget.left - 10))
    (args.out / "bench_kernels.log").write_text(proc.stdout + proc.stderr)
    results["kernel_bench"] = {"returncode": proc.returncode, "table": proc.stdout.strip().splitlines()[-12:]}


# ------------------------------------------------------------------------------------------- report
def short_table(results: dict[str, Any]) -> str:
    lines = [f"{'row':<46}{'batch':>6}{'ms/img':>10}{'build s':>9}{'max|dz| vs b':>14}{'vs f64':>10}"]
    for key, entry in sorted(results.get("rows", {}).items(), key=lambda kv: (kv[1]["batch"], kv[0])):
        diff, diff64 = entry.get("max_abs_diff_vs_b"), entry.get("max_abs_diff_vs_f64")
        lines.append(f"({key[0]}) {entry['row']:<42}{entry['batch']:>6}{entry['ms_per_image']:>10.3f}"
                     f"{entry['build_s']:>9.1f}{f'{diff:>14.3g}' if diff is not None else ' ' * 14}"
                     f"{'' if diff64 is None else f'{diff64:>10.3g}'}")
    for batch, ratio in results.get("ratios", {}).items():
        text = ", ".join(f"{k}={v:.3f}" for k, v in ratio.items() if v is not None)
        lines.append(f"batch {batch}: {text}   (targets: d_over_c <= 0.9, b_over_d >= 1.6 at 8, e_over_d <= 1 at 1)")
    for what in ("skipped", "errors"):
        for key, reason in results.get(what, {}).items():
            lines.append(f"{what[:-1] if what == 'errors' else 'skipped'} {key}: {reason}")
    tests = results.get("tests", {})
    if tests:
        lines.append(f"tests: {tests.get('summary', tests.get('skipped'))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s if args.budget_s is not None else (1200.0 if args.dry_run else 510.0))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    results: dict[str, Any] = {"suite": "bench/gpu_suite.py", "dry_run": args.dry_run, "argv": sys.argv[1:],
                               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node()}
    ensure_importable(args, results)
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from bench_common import git_commit

    results["environment"] = {
        "commit": git_commit(), "torch": torch.__version__, "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    try:
        import triton

        results["environment"]["triton"] = triton.__version__
    except ImportError:
        results["environment"]["triton"] = None
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: error: no CUDA device here; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    run_rows(args, results, budget)
    run_tests(args, results, budget)
    run_kernel_bench(args, results, budget)
    results["seconds"] = time.perf_counter() - budget.start
    (args.out / "gpu_suite.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
    print(short_table(results))
    failed = bool(results.get("errors")) or results.get("tests", {}).get("returncode", 0) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
