"""The GPU suite's rows: ways of running one schedule, each timed and checked against the reference row (b)
and against a float64 reference path.

(a) fp16-autocast eager (official style), (b) bf16 eager reference, (c) ``torch.compile`` + whole-schedule CUDA
graph, (d) flowturbo's Python fast path (Triton kernels + one CUDA graph), (e) AOTInductor packages in the C++
runner with its CUDA graph, (f) the Python loop over the same packages. In the dry run (CPU) the models are
tiny, float32 replaces bf16, the CUDA graphs are the replay-by-call stand-in, and the packages are CPU ones.

Every row reports how it actually ran *after* its first call (``execution``): a graph row whose capture fell
back to step-by-step execution is recorded as an error, never silently labelled "CUDA graph".
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from suite.faults import Faults, InjectedFault
from suite.preflight import Capabilities
from suite.record import Recorder

SCHEDULE_SPEC, CFG, GUIDANCE_CHANNELS = "H1P5R3", 4.0, 3
SEED = 0
ROWS = {
    "a": "fp16-autocast eager (official style)",
    "b": "bf16 eager reference",
    "c": "torch.compile + CUDA graph",
    "d": "flowturbo fast path (Triton + CUDA graph)",
    "e": "AOTI packages, C++ runner + CUDA graph",
    "f": "AOTI packages, Python loop",
}
GRAPH_ROWS = ("c", "d", "e")
# SiT-XL/2 at 256x256 (latents 4x32x32) and the SD-VAE decoder; the dry run's tiny stand-ins. The dry run's
# width is a preset's (SiT-N: 128 / 4 heads) so its official-layout checkpoint loads by inference too.
GPU_MODEL = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16, num_classes=1000)
DRY_MODEL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=1, num_heads=4, num_classes=10)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=256)
DRY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 16],
               down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
               layers_per_block=1, norm_num_groups=8, sample_size=16)
SD_VAE_LATENT_SCALE = 0.18215
# Our own autoencoder's decoder with the same latent -> image shapes, when diffusers cannot be imported.
SUBSTITUTE_DECODER = dict(image_channels=3, image_size=256, latent_channels=4, base_channels=128,
                          channel_mult=(1, 2, 4, 4), num_res_blocks=2, norm_groups=32)
DRY_SUBSTITUTE_DECODER = dict(image_channels=3, image_size=16, latent_channels=4, base_channels=16,
                              channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)


class RowFallback(RuntimeError):
    """A graph row ran step by step (its capture fell back): measured, but not what the row claims."""


@dataclasses.dataclass
class SuiteModels:
    config: Any
    predictor: Any
    refiner: Any
    decoder: Any
    vae: Any  # the diffusers AutoencoderKL (None when diffusers is unavailable)
    decoder_kind: str


def build_models(dry: bool, device: Any, caps: Capabilities, faults: Faults) -> SuiteModels:
    """Random-weight predictor, refiner and decoder in float32 on ``device`` (seeded: the same in every phase)."""
    import torch

    from flowturbo.training.models import RefinerConfig, SiT, SiTConfig, VelocityRefiner, perturb_zero_initialized

    faults.fire("models")
    torch.manual_seed(SEED)
    config = SiTConfig(**(DRY_MODEL if dry else GPU_MODEL), mlp_ratio=4.0, class_dropout_prob=0.1, learn_sigma=True)
    with torch.device(device):
        predictor = SiT(config)
        refiner = VelocityRefiner(RefinerConfig.for_predictor(config))
    for model in (predictor, refiner):
        perturb_zero_initialized(model, generator=None)  # adaLN-Zero layers non-zero: a non-trivial flow
    vae = None
    if caps.diffusers:
        from diffusers import AutoencoderKL

        from flowturbo.training.decoders import DiffusersVAEDecoder

        with torch.device(device):
            vae = AutoencoderKL(**(DRY_VAE if dry else SD_VAE)).eval()
        decoder, kind = DiffusersVAEDecoder._from_vae(vae, SD_VAE_LATENT_SCALE).to(device), "diffusers AutoencoderKL"
    else:
        from flowturbo.training.autoencoder import AutoencoderConfig, FlowTurboAutoencoderDecoder

        cfg = AutoencoderConfig(**(DRY_SUBSTITUTE_DECODER if dry else SUBSTITUTE_DECODER))
        decoder = FlowTurboAutoencoderDecoder(cfg, variants=("ema",), variant="ema").to(device)
        kind = f"flowturbo autoencoder decoder (substitute: {caps.reasons.get('diffusers')})"
    return SuiteModels(config, predictor.eval(), refiner.eval(), decoder.eval(), vae, kind)


def compile_for_every_batch(module: Any, method: str = "forward") -> None:
    """``torch.compile(module.<method>, dynamic=True)`` as an instance attribute (the module keeps its other
    attributes). One compile serves every batch size of at least 2: the predictor and refiner always see 2B
    rows under CFG, so both batches share one graph each; the decoder sees B, and batch 1 (which dynamo always
    specialises) compiles apart. (Marking the batch axis unbacked instead fails on CPU with a convolution
    layout assertion in torch 2.11-2.13, so it is not used.)"""
    import torch

    setattr(module, method, torch.compile(getattr(module, method), dynamic=True))


def pipeline_for(models: SuiteModels, dtype: Any, kernels: str, device: Any, *, compile_models: bool = False) -> Any:
    """A TorchPipeline over copies of the models in ``dtype`` with ``kernels`` (``compile_models``: the predictor,
    refiner and decoder ``torch.compile``d for every batch size, see :func:`compile_for_every_batch`)."""
    from flowturbo.kernels import KernelBackend
    from flowturbo.runtime.pytorch_backend import TorchPipeline
    from flowturbo.training.bundle import BundleDefaults

    backend = KernelBackend(kernels)
    predictor = copy.deepcopy(models.predictor).to(dtype).set_kernel_backend(backend)
    refiner = copy.deepcopy(models.refiner).to(dtype).set_kernel_backend(backend)
    decoder = copy.deepcopy(models.decoder).to(dtype)  # TorchPipeline makes it channels-last on CUDA
    if compile_models:
        for module, method in ((predictor, "forward"), (refiner, "forward"), (decoder, "decode")):
            compile_for_every_batch(module, method)
    config = models.config
    return TorchPipeline(predictor, refiner, decoder, config.num_classes,
                         (config.in_channels, config.input_size, config.input_size), None,
                         BundleDefaults(schedule=SCHEDULE_SPEC, cfg=CFG, guidance_channels=GUIDANCE_CHANNELS),
                         "gpu_suite random weights", device, dtype, backend)


# ------------------------------------------------------------------------------------------------ rows
@dataclasses.dataclass
class RowRun:
    images: Any
    latents: Any
    replayed: bool | None = None  # graph rows: whether this call replayed a captured graph


class Row:
    """One way of running the schedule: ``run(noise, labels) -> RowRun`` on device tensors.

    ``describe()`` says how the row actually ran (read after its first call); ``fallback()`` is the reason a
    graph row ran step by step, or None."""

    def __init__(self, key: str, run: Callable[[Any, Any], RowRun], *, build_s: float = 0.0, autocast: Any = None,
                 describe: Callable[[], str] = lambda: "", fallback: Callable[[], str | None] = lambda: None) -> None:
        self.key, self.run_fn, self.build_s, self.autocast = key, run, build_s, autocast
        self.describe, self.fallback = describe, fallback

    def __call__(self, noise: Any, labels: Any) -> RowRun:
        import torch

        with torch.inference_mode(), (self.autocast or contextlib.nullcontext()):
            return self.run_fn(noise, labels)


class _FailingCapture:
    """The ``capture`` fault: a graph backend whose captures raise (the sampler falls back, as on a GPU)."""

    def capture(self, fn: Any, inputs: Any, warmup: int) -> Any:
        raise InjectedFault("injected fault 'capture': CUDA-graph capture failed")

    def replay(self, graph: Any) -> None:  # pragma: no cover - never captured
        raise AssertionError


def _graph_backend(device: Any, faults: Faults) -> Any:
    from flowturbo.runtime.cuda_graphs import ReplayByCallBackend

    if "capture" in faults:
        return _FailingCapture()
    return ReplayByCallBackend() if device.type != "cuda" else None


def torch_rows(models: SuiteModels, dry: bool, device: Any, schedule: Any, wanted: str, caps: Capabilities,
               faults: Faults, skip: Callable[[str, str], None]) -> dict[str, Row]:
    """Rows (a)-(d): the PyTorch paths, all through flowturbo's Sampler / integrator."""
    import torch

    from flowturbo.families import ClassConditioning  # the sampler's batches take the family's conditioning
    from flowturbo.runtime.sampler import Sampler

    fast_dtype = torch.float32 if dry else torch.bfloat16  # the interpreter computes bf16 wrongly
    rows: dict[str, Row] = {}
    if "a" in wanted:
        sampler = Sampler(pipeline_for(models, torch.float32, "reference", device), cuda_graph=False)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16 if dry else torch.float16)
        rows["a"] = Row("a", lambda n, y, s=sampler: RowRun(*s._forward(schedule, n, ClassConditioning(y))),
                        autocast=autocast,
                        describe=lambda: "fp32 weights, autocast " + ("bf16 (CPU)" if dry else "fp16"))
    if "b" in wanted:
        sampler = Sampler(pipeline_for(models, fast_dtype, "reference", device), cuda_graph=False)
        rows["b"] = Row("b", lambda n, y, s=sampler: RowRun(*s._forward(schedule, n, ClassConditioning(y))),
                        describe=lambda s=sampler: s.describe_execution())
    for key, kernels, needs in (("c", "reference", ("graph",)), ("d", "triton", ("graph", "triton"))):
        if key not in wanted:
            continue
        reason = caps.why_not(*needs)
        if reason is not None:
            skip(key, reason)
            continue
        pipe = pipeline_for(models, fast_dtype, kernels, device, compile_models=key == "c")
        sampler = Sampler(pipe, cuda_graph=True, graph_backend=_graph_backend(device, faults))

        def run(n: Any, y: Any, s: Sampler = sampler) -> RowRun:
            out = s.graphs.run((schedule.id, n.shape[0]), lambda a, b: s._forward(schedule, a, ClassConditioning(b)),
                                 (n, y))
            return RowRun(out.outputs[0], out.outputs[1], out.replayed)

        def describe(s: Sampler = sampler, key: str = key) -> str:
            text = s.describe_execution()
            if key == "c":
                from torch._dynamo.utils import counters

                text += f" + torch.compile dynamic ({counters['stats']['unique_graphs']} graphs compiled so far)"
            return text

        rows[key] = Row(key, run, describe=describe, fallback=lambda s=sampler: s.graphs.fallback_reason)
    return rows


def export_kernels(dry: bool, caps: Capabilities) -> str:
    """The kernels compiled into the packages: ours (``--kernels triton``) on a GPU where Triton works."""
    return "triton" if (not dry and caps.triton) else "reference"


def export_packages(models: SuiteModels, dry: bool, device: Any, schedule: Any, batches: list[int], workdir: Path,
                    kernels: str, faults: Faults, before_module: Callable[[str, int, int], None],
                    rec: Recorder) -> Path:
    """AOTInductor packages of the schedule with ``kernels``, time-input variant; a failing check against eager
    is recorded, not fatal (``on_validation_failure="record"``)."""
    import torch

    from flowturbo.export.pipeline import ExportRequest, export_bundle
    from flowturbo.export.specs import BatchProfile
    from flowturbo.training.bundle import Bundle, BundleDefaults

    faults.fire("export")
    precision, dtype = ("fp32", torch.float32) if dry else ("bf16", torch.bfloat16)
    bundle = Bundle(copy.deepcopy(models.predictor).to(dtype).set_kernel_backend(kernels),
                    copy.deepcopy(models.refiner).to(dtype).set_kernel_backend(kernels),
                    copy.deepcopy(models.decoder).to(dtype), None,
                    BundleDefaults(schedule=SCHEDULE_SPEC, cfg=CFG, guidance_channels=GUIDANCE_CHANNELS))
    if "export-check" in faults:  # a check that cannot pass: the export must still come out, failure recorded
        import flowturbo.export.pipeline as pipeline

        pipeline.VALIDATION_ATOL = {k: -1.0 for k in pipeline.VALIDATION_ATOL}
    request = ExportRequest(schedule, BatchProfile(min(batches), max(batches), max(batches)), ("aoti",), precision,
                            "time-input", device=device.type, kernel_backend=kernels, on_validation_failure="record")
    started = time.perf_counter()
    export = export_bundle(bundle, request, workdir / f"aoti-{kernels}", source="gpu_suite random weights",
                           command="gpu_suite", progress=False, before_module=before_module)
    failures = export.manifest.get("validation_failures") or []
    rec.set("aoti_export", {"seconds": time.perf_counter() - started, "path": str(export.path), "kernels": kernels,
                            "precision": precision, "reused": export.reused, "validation_failures": failures})
    for failure in failures:
        rec.error("aoti_export:check", failure)
    return export.path


def aoti_rows(export_path: Path, device: Any, wanted: str, caps: Capabilities, skip: Callable[[str, str], None],
              build_s: float) -> dict[str, Row]:
    """Rows (e)/(f) over the exported packages."""
    import warnings

    from flowturbo.runtime.aoti_backend import AotiSampler
    from flowturbo.runtime.cpp_backend import CppSampler

    rows: dict[str, Row] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a recorded export-check failure warns on load: already in the record
        if "e" in wanted:
            reason = caps.why_not("runner")
            if reason is not None:
                skip("e", reason)
            else:
                cpp = CppSampler.from_artifacts(export_path, device=device.type)

                def run_cpp(n: Any, y: Any, s: CppSampler = cpp) -> RowRun:
                    out = s.run_batch(n, y)
                    replayed = bool(out.get("graph_replayed")) if device.type == "cuda" else None
                    return RowRun(out["images"], out["latents"], replayed)

                fallback = (lambda s=cpp: s.runner.graph_fallback_reason) if device.type == "cuda" else (lambda: None)
                rows["e"] = Row("e", run_cpp, build_s=build_s,
                                describe=lambda s=cpp: f"C++ runner, cuda graph: {s.describe()['cuda_graph']}",
                                fallback=fallback)
        if "f" in wanted:
            aoti = AotiSampler.from_artifacts(export_path, device=device.type)

            def run_python(n: Any, y: Any, s: AotiSampler = aoti) -> RowRun:
                images, latents, _, _ = s.run_batch(n.to(s.dtype), y)
                return RowRun(images, latents)

            rows["f"] = Row("f", run_python, build_s=build_s, describe=lambda: "python loop over the same packages")
    return rows


# ------------------------------------------------------------------------------------------ measuring
def float64_reference(models: SuiteModels, device: Any, schedule: Any,
                      inputs: dict[int, tuple[Any, Any]]) -> dict[int, Any]:
    """Final latents (CPU, float64) of the float64 reference path per batch: float64 copies of the models,
    reference ops, eager, float64 state — what every row is also checked against (``max_abs_diff_vs_f64``)."""
    import torch

    from flowturbo.families import ClassConditioning
    from flowturbo.runtime.sampler import Sampler

    sampler = Sampler(pipeline_for(models, torch.float64, "reference", device), cuda_graph=False)
    with torch.inference_mode():
        out = {batch: sampler._forward(schedule, noise.double(), ClassConditioning(labels))[1].cpu()
               for batch, (noise, labels) in inputs.items()}
    del sampler
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def time_row(row: Row, noise: Any, labels: Any, warmup: int, replays: int, device: Any) -> dict[str, Any]:
    """First call (compiles / captures / JIT-compiles), warm-up, then ``replays`` timed runs: the median ms per
    image, how the row ran, and its final latents. Raises :class:`RowFallback` when a graph row did not replay."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    started = time.perf_counter()
    run = row(noise, labels)
    sync()
    first_s = time.perf_counter() - started
    for _ in range(warmup):
        run = row(noise, labels)
    times = []
    for _ in range(replays):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run = row(noise, labels)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run = row(noise, labels)
            times.append(1e3 * (time.perf_counter() - t0))
    batch = noise.shape[0]
    return {"ms_per_image": statistics.median(times) / batch, "ms_runs": times, "first_call_s": first_s,
            "latents": run.latents.float().cpu(), "images_finite": bool(torch.isfinite(run.images).all()),
            "replayed": run.replayed, "execution": row.describe(), "fallback": row.fallback()}


class Bench:
    """The rows' shared inputs (noise, labels per batch), the float64 reference and the row-(b) baselines."""

    def __init__(self, rec: Recorder, models: SuiteModels, device: Any, schedule: Any, batches: list[int],
                 warmup: int, replays: int, faults: Faults, fits: Callable[[str, float], bool]) -> None:
        import torch

        from flowturbo.runtime.pytorch_backend import make_noise

        self.rec, self.models, self.device, self.schedule = rec, models, device, schedule
        self.batches, self.warmup, self.replays, self.faults, self.fits = batches, warmup, replays, faults, fits
        config = models.config
        self.inputs = {}
        for batch in batches:
            labels = torch.tensor([(7 * k + 3) % config.num_classes for k in range(batch)], device=device)
            noise = make_noise(batch, (config.in_channels, config.input_size, config.input_size), SEED,
                               dtype=torch.float32, device=device)
            self.inputs[batch] = (noise, labels)
        self.references: dict[int, Any] = {}
        self.reference64: dict[int, Any] | None = None
        started = time.perf_counter()
        try:
            faults.fire("f64")
            self.reference64 = float64_reference(models, device, schedule, self.inputs)
            rec.set("float64_reference_s", time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - rows still run, without their f64 column
            rec.error("float64_reference", f"{type(exc).__name__}: {exc}", traceback.format_exc())

    def measure(self, rows: dict[str, Row], estimate_s: Callable[[str, int], float]) -> None:
        """Time every row at every batch (the reference row (b) first), recording each as it finishes."""
        for batch, (noise, labels) in self.inputs.items():
            for key in sorted(rows, key=lambda k: (k != "b", k)):
                where = f"{key}@{batch}"
                if not self.fits(where, estimate_s(key, batch)):
                    continue
                try:
                    self.faults.fire(f"row:{where}")
                    measured = time_row(rows[key], noise, labels, self.warmup, self.replays, self.device)
                except Exception as exc:  # noqa: BLE001 - one broken row must not hide the others
                    self.rec.error(f"row:{where}", f"{type(exc).__name__}: {exc}", traceback.format_exc())
                    continue
                self._record(rows[key], key, batch, measured)

    def _record(self, row: Row, key: str, batch: int, measured: dict[str, Any]) -> None:
        latents = measured.pop("latents")
        if key == "b":
            self.references[batch] = latents
        entry = {"row": ROWS[key], "batch": batch, "note": measured["execution"],
                 "build_s": row.build_s or measured["first_call_s"], **measured}
        if batch in self.references:
            entry["max_abs_diff_vs_b"] = float((latents - self.references[batch]).abs().max())
            entry["ref_max_abs"] = float(self.references[batch].abs().max())
        if self.reference64 is not None:
            entry["max_abs_diff_vs_f64"] = float((latents.double() - self.reference64[batch]).abs().max())
        if key in GRAPH_ROWS and (measured["fallback"] or measured["replayed"] is False):
            entry["valid"] = False  # measured, but not the graph path the row claims
            self.rec.error(f"row:{key}@{batch}", f"RowFallback: the CUDA graph fell back to step by step: "
                           f"{measured['fallback']}")
        self.rec.row(f"{key}@{batch}", entry)
        self.rec.log(f"row {key} batch {batch}: {measured['ms_per_image']:.3f} ms/img ({measured['execution']})")


__all__ = ["Bench", "CFG", "GUIDANCE_CHANNELS", "ROWS", "Row", "RowFallback", "RowRun", "SCHEDULE_SPEC",
           "SuiteModels", "aoti_rows", "build_models", "export_kernels", "export_packages", "float64_reference", "pipeline_for",
           "time_row", "torch_rows"]
