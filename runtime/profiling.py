"""Per-step profiling: where every step of a schedule (and the decode) spends its time.

The report is a :class:`RunProfile`: one :class:`StepProfile` per schedule step (kind, ``t_k -> t_k+1``,
predictor/refiner calls from :meth:`SamplingSchedule.step_calls`, milliseconds, and — for PyTorch-based
backends — the top kernels/ops by self time), the decode time, and the measured total.

How it is measured (DESIGN.md §7 "Benchmarks"):

* ``warmup`` untimed runs, then ``repeats`` timed runs of one batch (schedule + decode). In each run a
  :class:`StepTimer` marks every step boundary — ``time.perf_counter`` on CPU, CUDA events on a GPU (plus
  an NVTX range per step for Nsight) — and the *total* is measured independently as the wall-clock time of
  the whole run (``perf_counter`` around it, with a device synchronise at both ends).
* The reported run is the one with the median total; its steps and decode are reported (so the rows add up
  to the total of one real run), and every step's median over all runs is kept as ``ms_median``.
  ``steps + decode`` is checked against the measured total; more than :data:`CONSISTENCY_TOLERANCE` apart
  is reported in the table and in ``profile.json`` (``consistency.within_tolerance``), never hidden.
* Kernels: one extra run under ``torch.profiler`` with a ``record_function`` range per step attributes
  every op to its step (walking the op's CPU parents). On CUDA these are GPU kernels (device time); on CPU
  they are aten ops (self CPU time) and say so (``kernel_source``). That run is not one of the timed ones.

Nothing here is on the normal sampling path: ``Sampler.sample`` carries no timer, and
``ExportedSampler.step_hook`` is ``None`` unless a profile is running (one attribute test per step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from flowturbo.errors import FlowTurboError
from flowturbo.families import ImageSize
from flowturbo.fileio import OutputFolder, check_replaceable, check_writable_target, json_text
from flowturbo.schedule import SamplingSchedule, StepKind

PROFILE_FORMAT = "flowturbo.profile/1"
PROFILE_FILE = "profile.json"
TRACE_FILE = "trace.json"  # our Chrome Trace Event file: one complete event per step + decode
TORCH_TRACE_FILE = "torch_trace.json"  # torch.profiler's own trace of the kernel run (when kernels were profiled)
CHART_FILE = "steps.png"
TABLE_FILE = "table.txt"
CONSISTENCY_TOLERANCE = 0.05  # steps + decode must be within 5% of the measured total (the issue's contract)
TOP_KERNELS = 5  # kernels/ops kept per step in profile.json
TABLE_KERNELS = 3  # ... and shown in the printed table
STEP_RANGE = "flowturbo.step"  # record_function / NVTX range names: "flowturbo.step.<k> <kind>"
DECODE_RANGE = "flowturbo.decode"
OUTSIDE_OPS = "(outside aten ops)"  # step time in no recorded op: Python (eager) or compiled code (AOTI)
KERNEL_SOURCE_CUDA = "cuda kernels (GPU time)"
KERNEL_SOURCE_CPU = "cpu ops (aten, self CPU time)"
KIND_COLOURS = {"E": "#7f7f7f", "H": "#1f77b4", "P": "#ff7f0e", "R": "#2ca02c", "decode": "#9467bd"}


# ------------------------------------------------------------------------------------------- report
@dataclasses.dataclass(frozen=True)
class KernelTime:
    """One kernel (CUDA) or op (CPU) within a step: summed time and number of launches/calls."""

    name: str
    ms: float
    calls: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ms": self.ms, "calls": self.calls}


@dataclasses.dataclass(frozen=True)
class StepProfile:
    """One schedule step: what it is (kind, times, calls) and what it cost (ms, kernels where known)."""

    index: int  # 0-based position in the schedule
    kind: StepKind
    t_start: float
    t_end: float
    predictor_calls: int
    refiner_calls: int
    ms: float  # in the reported (median-total) run
    kernels: tuple[KernelTime, ...] | None = None  # None: not known for this backend / not profiled
    ms_median: float | None = None  # this step's median over all timed runs

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": self.kind.value,
            "kind_label": self.kind.label,
            "t_start": self.t_start,
            "t_end": self.t_end,
            "predictor_calls": self.predictor_calls,
            "refiner_calls": self.refiner_calls,
            "ms": self.ms,
            "ms_median": self.ms_median,
            "kernels": None if self.kernels is None else [k.to_json() for k in self.kernels],
        }


@dataclasses.dataclass(frozen=True)
class RunProfile:
    """A whole profiled run: per-step times, decode time and the independently measured total (ms)."""

    backend: str
    schedule: SamplingSchedule
    batch: int  # images (rows = 2x with guidance)
    device: str
    total_ms: float
    decode_ms: float
    steps: tuple[StepProfile, ...]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    warmup: int = 0
    repeats: int = 1
    decode_kernels: tuple[KernelTime, ...] | None = None
    kernel_source: str | None = None  # what `kernels` are: KERNEL_SOURCE_CUDA / KERNEL_SOURCE_CPU / None

    @property
    def steps_ms(self) -> float:
        return sum(s.ms for s in self.steps)

    @property
    def sum_ms(self) -> float:
        """Steps + decode: what the rows of the table add up to."""
        return self.steps_ms + self.decode_ms

    @property
    def discrepancy(self) -> float:
        """``(steps + decode - total) / total``; within +-CONSISTENCY_TOLERANCE for a consistent report."""
        return (self.sum_ms - self.total_ms) / self.total_ms if self.total_ms > 0 else math.inf

    @property
    def consistent(self) -> bool:
        return abs(self.discrepancy) <= CONSISTENCY_TOLERANCE

    def to_json(self) -> dict[str, Any]:
        """The content of profile.json."""
        schedule = self.schedule
        return {
            "format": PROFILE_FORMAT,
            "backend": self.backend,
            "device": self.device,
            "batch": self.batch,
            "schedule": schedule.describe(),
            "schedule_notation": schedule.notation,
            "schedule_id": schedule.id,
            "predictor_calls": schedule.predictor_calls,
            "refiner_calls": schedule.refiner_calls,
            "warmup": self.warmup,
            "repeats": self.repeats,
            "statistic": f"the run with the median total of {self.repeats} timed run(s) after {self.warmup} "
                         "warm-up run(s); ms_median: each step's median over the timed runs",
            "total_ms": self.total_ms,
            "decode_ms": self.decode_ms,
            "steps_ms": self.steps_ms,
            "ms_per_image": self.total_ms / self.batch,
            "consistency": {
                "steps_plus_decode_ms": self.sum_ms,
                "total_ms": self.total_ms,
                "relative_difference": self.discrepancy,
                "tolerance": CONSISTENCY_TOLERANCE,
                "within_tolerance": self.consistent,
            },
            "kernel_source": self.kernel_source,
            "steps": [s.to_json() for s in self.steps],
            "decode_kernels": None if self.decode_kernels is None else [k.to_json() for k in self.decode_kernels],
            "extra": self.extra,
        }


def _step_range_name(index: int, kind: StepKind) -> str:
    return f"{STEP_RANGE}.{index} {kind.value}"


# -------------------------------------------------------------------------------------------- timer
class StepTimer:
    """Times consecutive named intervals of one run: ``perf_counter`` on CPU, CUDA events on a GPU.

    On CUDA every interval is also an NVTX range (visible in Nsight Systems). With ``record_functions``
    each interval is also a ``torch.profiler.record_function`` range, so the profiler can attribute ops to
    steps. Nothing syncs until :meth:`intervals_ms` (CUDA events are read after one synchronise).
    """

    def __init__(self, device: torch.device | str, *, record_functions: bool = False) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.record_functions = record_functions
        self._marks: list[tuple[Any, Any]] = []  # (start, end) marks per interval
        self._names: list[str] = []
        self._open: tuple[str, Any, Any] | None = None  # (name, start mark, record_function or None)

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self, name: str) -> None:
        if self._open is not None:
            raise RuntimeError(f"StepTimer: interval {self._open[0]!r} is still open")
        if self.cuda:
            torch.cuda.nvtx.range_push(name)
        rf = None
        if self.record_functions:
            rf = torch.profiler.record_function(name)
            rf.__enter__()
        self._open = (name, self._mark(), rf)

    def stop(self) -> None:
        if self._open is None:
            raise RuntimeError("StepTimer: stop() without start()")
        end = self._mark()
        name, begin, rf = self._open
        self._open = None
        if rf is not None:
            rf.__exit__(None, None, None)
        if self.cuda:
            torch.cuda.nvtx.range_pop()
        self._marks.append((begin, end))
        self._names.append(name)

    def close(self) -> None:
        """Close a range left open by an exception (NVTX / record_function stay balanced)."""
        if self._open is not None:
            self.stop()

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def intervals_ms(self) -> list[float]:
        """Milliseconds of every closed interval, in order."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return [float(begin.elapsed_time(end)) for begin, end in self._marks]
        return [1000.0 * (end - begin) for begin, end in self._marks]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass(frozen=True)
class _Run:
    steps_ms: list[float]
    decode_ms: float
    total_ms: float


def _timed_run(device: torch.device, num_steps: int, body: Callable[[StepTimer], None],
               record_functions: bool = False) -> _Run:
    """One run of ``body`` (which must time ``num_steps`` step intervals, then the decode)."""
    timer = StepTimer(device, record_functions=record_functions)
    _sync(device)
    begin = time.perf_counter()
    try:
        body(timer)
    finally:
        timer.close()
    _sync(device)
    total_ms = 1000.0 * (time.perf_counter() - begin)
    intervals = timer.intervals_ms()
    if len(intervals) != num_steps + 1 or timer.names[-1] != DECODE_RANGE:
        raise FlowTurboError(
            f"the profiled run timed {len(intervals)} intervals ({timer.names}); expected {num_steps} steps + decode"
        )
    return _Run(intervals[:num_steps], intervals[num_steps], total_ms)


def _median_run(runs: Sequence[_Run]) -> _Run:
    order = sorted(range(len(runs)), key=lambda i: runs[i].total_ms)
    return runs[order[(len(runs) - 1) // 2]]


def _check_counts(batch: int, warmup: int, repeats: int) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise FlowTurboError(f"--batch must be a positive number of images, got {batch!r}")
    if warmup < 0:
        raise FlowTurboError(f"--warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise FlowTurboError(f"--repeats must be >= 1, got {repeats}")


# ------------------------------------------------------------------------------- kernel attribution
def _attribute_kernels(
    events: Sequence[Any], names: Sequence[str], cuda: bool, top: int = TOP_KERNELS
) -> dict[str, tuple[KernelTime, ...]]:
    """Sum kernel (CUDA) or op self (CPU) time per ``record_function`` range named in ``names``.

    An op belongs to the range found by walking its CPU parents; nested ops count only their self time on
    CPU (so nothing is counted twice), and on CUDA each kernel is attached to exactly one launching op.
    """
    wanted = set(names)
    totals: dict[str, dict[str, list[float]]] = {name: {} for name in names}  # range -> op -> [us, calls]

    def owner(event: Any) -> str | None:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name in wanted:
                return parent.name
            parent = parent.cpu_parent
        return None

    for event in events:
        if getattr(event, "device_type", None) != torch.autograd.DeviceType.CPU:
            continue  # device-side copies of events; kernels are read from their launching CPU op
        if event.name in wanted:
            if not cuda:  # time of the step range not spent inside any op: Python and glue
                slot = totals[event.name].setdefault(OUTSIDE_OPS, [0.0, 0])
                slot[0] += float(event.self_cpu_time_total)
                slot[1] += 1
            continue
        if getattr(event, "is_user_annotation", False):
            continue
        range_name = owner(event)
        if range_name is None:
            continue
        table = totals[range_name]
        if cuda:
            for kernel in event.kernels:
                if kernel.name in wanted:
                    continue  # the GPU-side copy of our own annotation, not a kernel
                slot = table.setdefault(kernel.name, [0.0, 0])
                slot[0] += float(kernel.duration)
                slot[1] += 1
        else:
            slot = table.setdefault(event.name, [0.0, 0])
            slot[0] += float(event.self_cpu_time_total)
            slot[1] += 1
    result = {}
    for name, table in totals.items():
        ranked = sorted(table.items(), key=lambda item: item[1][0], reverse=True)[:top]
        result[name] = tuple(KernelTime(op, us / 1000.0, int(calls)) for op, (us, calls) in ranked)
    return result


def _profiled_run(device: torch.device, num_steps: int, body: Callable[[StepTimer], None],
                  trace_path: str | os.PathLike[str] | None,
                  top: int = TOP_KERNELS) -> tuple[dict[str, tuple[KernelTime, ...]], list[str]]:
    """One extra run under torch.profiler; returns top kernels per range and the range names in order."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    names: list[str] = []

    def traced(timer: StepTimer) -> None:
        body(timer)
        names.extend(timer.names)

    with profile(activities=activities) as prof:
        _timed_run(device, num_steps, traced, record_functions=True)
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
    return _attribute_kernels(prof.events(), names, device.type == "cuda", top), names


def _build_profile(
    *, backend: str, schedule: SamplingSchedule, batch: int, device: torch.device, runs: Sequence[_Run],
    warmup: int, kernels: dict[str, tuple[KernelTime, ...]] | None, names: Sequence[str] | None,
    extra: dict[str, Any],
) -> RunProfile:
    chosen = _median_run(runs)
    steps = []
    for k, (kind, (pred, ref)) in enumerate(zip(schedule.steps, schedule.step_calls())):
        step_kernels = None if kernels is None or names is None else kernels.get(names[k], ())
        steps.append(StepProfile(
            index=k, kind=kind, t_start=schedule.timesteps[k], t_end=schedule.timesteps[k + 1],
            predictor_calls=pred, refiner_calls=ref, ms=chosen.steps_ms[k], kernels=step_kernels,
            ms_median=statistics.median(r.steps_ms[k] for r in runs),
        ))
    source = None if kernels is None else (KERNEL_SOURCE_CUDA if device.type == "cuda" else KERNEL_SOURCE_CPU)
    extra = {**extra, "total_ms_runs": [r.total_ms for r in runs]}
    return RunProfile(
        backend=backend, schedule=schedule, batch=batch, device=str(device), total_ms=chosen.total_ms,
        decode_ms=chosen.decode_ms, steps=tuple(steps), extra=extra, warmup=warmup, repeats=len(runs),
        decode_kernels=None if kernels is None else kernels.get(DECODE_RANGE, ()), kernel_source=source,
    )


def _environment(device: torch.device) -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"torch_version": torch.__version__, "host": platform.node()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = platform.processor() or platform.machine()
        info["cpu_threads"] = torch.get_num_threads()
    return info


# --------------------------------------------------------------------------------------- backends
def profile_pytorch(
    pipeline: Any,
    schedule: SamplingSchedule,
    batch: int,
    seed: int = 0,
    warmup: int = 2,
    repeats: int = 5,
    kernels: bool = True,
    *,
    kernel_trace: str | os.PathLike[str] | None = None,
    top_kernels: int = TOP_KERNELS,
    prompts: Sequence[str] | None = None,
    negative_prompt: str | None = None,
    guidance: float | None = None,
    size: ImageSize | None = None,
) -> RunProfile:
    """Profile ``schedule`` on a :class:`~flowturbo.runtime.pytorch_backend.TorchPipeline` (eager PyTorch).

    ``batch`` images with classes ``0, 1, ...`` (cycled) — or, for a text-to-image model, ``prompts`` cycled (with
    ``negative_prompt``, ``guidance`` and ``size`` as ``Sampler.sample`` takes them; the prompts are encoded once,
    outside the timed runs) — and noise from ``seed``: the same work ``Sampler.sample`` does for one batch (the
    schedule through the model family's calls with a per-step ``callback``, then the decode). ``kernel_trace``: where
    to write torch.profiler's Chrome trace of the kernel run; ``top_kernels``: kernels/ops kept per step (by self
    time).
    """
    from flowturbo.runtime.pytorch_backend import make_noise, run_schedule

    _check_counts(batch, warmup, repeats)
    pipe = pipeline
    family = pipe.family
    if schedule.uses_refiner and pipe.refiner is None:
        raise FlowTurboError(
            f"schedule {schedule.notation} has R steps but this model has no refiner; profile a schedule without "
            "R (e.g. 'H8') or a model with a refiner"
        )
    device = torch.device(pipe.device)
    if prompts is None:
        conditioning = family.condition([i % pipe.num_classes for i in range(batch)], schedule)
    else:
        conditioning = family.condition([prompts[i % len(prompts)] for i in range(batch)], schedule,
                                        negative=negative_prompt, guidance=guidance)
    calls = family.model_calls(conditioning, schedule)
    latent_shape = pipe.latent_shape if size is None else family.latent_shape(size)
    noise = make_noise(batch, latent_shape, seed, dtype=pipe.state_dtype, device=device)  # (B, C, H, W)
    n = schedule.num_steps

    def body(timer: StepTimer) -> None:
        def on_step(k: int, kind: StepKind, t0: float, t1: float, x: torch.Tensor) -> None:
            timer.stop()
            if k + 1 < n:
                timer.start(_step_range_name(k + 1, schedule.steps[k + 1]))

        timer.start(_step_range_name(0, schedule.steps[0]))
        result = run_schedule(schedule, noise, calls, callback=on_step, check_finite=False,
                              kernel_backend=pipe.kernel_backend)
        timer.start(DECODE_RANGE)
        family.decode(result.latents)  # (B, C_img, H_img, W_img)
        timer.stop()

    with torch.inference_mode():
        for _ in range(warmup):
            _timed_run(device, n, body)
        runs = [_timed_run(device, n, body) for _ in range(repeats)]
        found, names = _profiled_run(device, n, body, kernel_trace, top_kernels) if kernels else (None, None)
    extra = {"source": pipe.source, "dtype": str(pipe.dtype).removeprefix("torch."), "seed": seed,
             "kernels": pipe.kernel_backend.value,
             "cuda_graph": False,  # steps are timed one by one; `flowturbo sample` replays them as one graph on CUDA
             "rows_per_call": batch * (2 if schedule.guidance_scale != 1.0 else 1),
             "timer": "cuda events" if device.type == "cuda" else "time.perf_counter",
             **_environment(device)}
    return _build_profile(backend="pytorch", schedule=schedule, batch=batch, device=device, runs=runs,
                          warmup=warmup, kernels=found, names=names, extra=extra)


class _TimerHook:
    """Adapts :class:`StepTimer` to ``ExportedSampler.step_hook``."""

    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def step_start(self, index: int, kind: StepKind, t_start: float, t_end: float) -> None:
        self.timer.start(_step_range_name(index, kind))

    def step_end(self, index: int, kind: StepKind, t_start: float, t_end: float) -> None:
        self.timer.stop()

    def decode_start(self) -> None:
        self.timer.start(DECODE_RANGE)

    def decode_end(self) -> None:
        self.timer.stop()


TORCH_BASED_EXPORTED = ("aoti",)  # exported backends whose ops torch.profiler sees


def profile_exported(
    sampler: Any,
    batch: int,
    seed: int = 0,
    warmup: int = 2,
    repeats: int = 5,
    kernels: bool = True,
    *,
    kernel_trace: str | os.PathLike[str] | None = None,
    top_kernels: int = TOP_KERNELS,
    prompts: Sequence[str] | None = None,
    negative_prompt: str | None = None,
    guidance: float | None = None,
) -> RunProfile:
    """Profile an :class:`~flowturbo.runtime.onnx_backend.ExportedSampler` (onnxruntime, aoti) on one batch.

    A text-to-image export takes ``prompts`` (cycled over the batch; encoded once, outside the timed runs, with the
    folder's text encoders) and its ``negative_prompt`` / ``guidance``; a class export classes ``0, 1, ...``.
    Steps are timed through the sampler's ``step_hook``; kernels are profiled only for PyTorch-based
    backends (aoti) — ONNX Runtime's nodes are invisible to torch.profiler, so its steps have no kernels.
    """
    from flowturbo.runtime.exported import make_noise
    from flowturbo.runtime.text_exported import TextRequest, text_graph_inputs

    _check_counts(batch, warmup, repeats)
    if sampler.variant == "unrolled":
        raise FlowTurboError(
            "these artifacts use the 'unrolled' variant: the whole schedule and decode run as one graph, so steps "
            "cannot be timed one by one; re-export with --variant time-input (or per-step) to profile steps"
        )
    sampler.artifacts.check_batch(batch)
    schedule: SamplingSchedule = sampler.schedule
    device = torch.device(sampler.describe().get("device", "cpu"))
    if sampler.takes_prompts:
        if prompts is None:
            raise FlowTurboError(f"{sampler.artifacts.root} is a text-to-image export: profile it with --prompt TEXT")
        request = TextRequest([prompts[i % len(prompts)] for i in range(batch)], negative_prompt, guidance)
        labels, _ = text_graph_inputs(sampler.artifacts, request, sampler.prompt_encoder, dtype=sampler.dtype,
                                      device=sampler.device)  # the graphs' conditioning inputs, by name
    elif prompts is not None or negative_prompt is not None or guidance is not None:
        raise FlowTurboError(f"{sampler.artifacts.root} is conditioned on class ids: drop --prompt / "
                             "--negative-prompt / --guidance")
    else:
        labels = torch.tensor([i % sampler.num_classes for i in range(batch)], dtype=torch.long)
    noise = make_noise(batch, sampler.latent_shape, seed, sampler.dtype).contiguous()  # (B, C, H, W)
    n = schedule.num_steps

    def body(timer: StepTimer) -> None:
        sampler.step_hook = _TimerHook(timer)
        try:
            sampler.run_batch(noise, labels)
        finally:
            sampler.step_hook = None

    # The exported modules return CPU tensors (they sync), so wall-clock marks are exact there too.
    timer_device = device if sampler.backend in TORCH_BASED_EXPORTED else torch.device("cpu")
    with torch.inference_mode():
        for _ in range(warmup):
            _timed_run(timer_device, n, body)
        runs = [_timed_run(timer_device, n, body) for _ in range(repeats)]
        profiled = kernels and sampler.backend in TORCH_BASED_EXPORTED
        found, names = (_profiled_run(timer_device, n, body, kernel_trace, top_kernels) if profiled
                        else (None, None))
    extra = {"source": str(sampler.artifacts.root), "variant": sampler.variant,
             "precision": sampler.artifacts.precision, "seed": seed,
             "timer": "cuda events" if timer_device.type == "cuda" else "time.perf_counter",
             **_environment(device)}
    if kernels and not profiled:
        extra["kernels_note"] = f"per-step kernels are not available for the {sampler.backend} backend"
    return _build_profile(backend=sampler.backend, schedule=schedule, batch=batch, device=device, runs=runs,
                          warmup=warmup, kernels=found, names=names, extra=extra)


def profile_from_runner(
    data: Mapping[str, Any], *, schedule: SamplingSchedule, backend: str, batch: int, warmup: int, repeats: int,
    extra: dict[str, Any] | None = None,
) -> RunProfile:
    """Turn the dict a native runner's ``profile_batch`` returns into a :class:`RunProfile`, checking it.

    Expected keys: ``total_ms``, ``decode_ms``, ``device`` and ``steps`` (one per schedule step, each with
    kind, t_start, t_end, predictor_calls, refiner_calls, ms); any other keys go to ``extra``.
    """
    try:
        raw_steps = list(data["steps"])
        total_ms, decode_ms = float(data["total_ms"]), float(data["decode_ms"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FlowTurboError(f"the {backend} runner returned a malformed profile ({exc!r}); rebuild the extension")
    if len(raw_steps) != schedule.num_steps:
        raise FlowTurboError(f"the {backend} runner timed {len(raw_steps)} steps but schedule {schedule.notation} "
                             f"has {schedule.num_steps}")
    steps = []
    for k, (raw, kind, (pred, ref)) in enumerate(zip(raw_steps, schedule.steps, schedule.step_calls())):
        got = (str(raw.get("kind")), int(raw.get("predictor_calls", -1)), int(raw.get("refiner_calls", -1)))
        if got != (kind.value, pred, ref) or not math.isclose(float(raw.get("t_start", math.nan)),
                                                               schedule.timesteps[k], abs_tol=1e-9):
            raise FlowTurboError(f"the {backend} runner's step {k + 1} is {got} at t={raw.get('t_start')}, but "
                                 f"schedule {schedule.notation} has {(kind.value, pred, ref)} at "
                                 f"t={schedule.timesteps[k]}; its artifacts were built for another schedule")
        steps.append(StepProfile(k, kind, schedule.timesteps[k], schedule.timesteps[k + 1], pred, ref,
                                 float(raw["ms"]), None, None))
    rest = {key: value for key, value in data.items() if key not in ("steps", "total_ms", "decode_ms", "device")}
    return RunProfile(backend=backend, schedule=schedule, batch=batch, device=str(data.get("device", "unknown")),
                      total_ms=total_ms, decode_ms=decode_ms, steps=tuple(steps), extra={**rest, **(extra or {})},
                      warmup=warmup, repeats=repeats)


# ---------------------------------------------------------------------------------------- writers
def _fmt_kernels(kernels: tuple[KernelTime, ...] | None, width: int = 34) -> str:
    if kernels is None:
        return "-"
    if not kernels:
        return "(none recorded)"
    parts = []
    for k in kernels[:TABLE_KERNELS]:
        name = k.name if len(k.name) <= width else k.name[: width - 3] + "..."
        parts.append(f"{name} {k.ms:.2f}")
    return ", ".join(parts)


def consistency_line(profile: RunProfile) -> str:
    pct = 100.0 * profile.discrepancy
    if profile.consistent:
        return (f"steps + decode = {profile.sum_ms:.2f} ms, {pct:+.1f}% from the measured total "
                f"(within {100 * CONSISTENCY_TOLERANCE:.0f}%)")
    return (f"WARNING: steps + decode = {profile.sum_ms:.2f} ms is {pct:+.1f}% off the measured total "
            f"{profile.total_ms:.2f} ms (more than {100 * CONSISTENCY_TOLERANCE:.0f}%): time was spent outside "
            "the timed steps, or the machine was busy; rerun with more --repeats")


def format_table(profile: RunProfile) -> str:
    """The table ``flowturbo profile`` prints: one row per step, the decode, the sum and the total."""
    total = profile.total_ms
    what = {KERNEL_SOURCE_CUDA: "top kernels, GPU ms (profiler run)",
            KERNEL_SOURCE_CPU: "top ops, self-CPU ms (profiler run)"}
    kernel_header = what.get(profile.kernel_source or "", "top kernels")
    head = (f"{'step':>4}  {'kind':<18} {'t_k':>6} -> {'t_k+1':<6} {'pred':>4} {'ref':>4} {'ms':>9} "
            f"{'% total':>8}  {kernel_header}")
    lines = [head, "-" * len(head)]
    for s in profile.steps:
        lines.append(f"{s.index + 1:>4}  {s.kind.value} {s.kind.label:<16} {s.t_start:>6.4f} -> {s.t_end:<6.4f} "
                     f"{s.predictor_calls:>4} {s.refiner_calls:>4} {s.ms:>9.2f} {100 * s.ms / total:>7.1f}%  "
                     f"{_fmt_kernels(s.kernels)}")
    pred = sum(s.predictor_calls for s in profile.steps)
    ref = sum(s.refiner_calls for s in profile.steps)
    blank = " " * 25
    lines.append(f"{'':>4}  {'decode':<18} {blank}{profile.decode_ms:>9.2f} "
                 f"{100 * profile.decode_ms / total:>7.1f}%  {_fmt_kernels(profile.decode_kernels)}")
    lines.append("-" * len(head))
    lines.append(f"{'':>4}  {'steps + decode':<18} {'':>6}    {'':<6} {pred:>4} {ref:>4} {profile.sum_ms:>9.2f} "
                 f"{100 * profile.sum_ms / total:>7.1f}%")
    lines.append(f"{'':>4}  {'measured total':<18} {blank}{total:>9.2f} {100.0:>7.1f}%  "
                 f"({total / profile.batch:.2f} ms/image)")
    lines.append(consistency_line(profile))
    return "\n".join(lines)


def describe_run(profile: RunProfile) -> str:
    """The one-line header printed above the table."""
    extra = profile.extra
    dtype = extra.get("dtype") or extra.get("precision") or ""
    stat = (f"median-total run of {profile.repeats} after {profile.warmup} warm-up"
            if profile.repeats > 1 or profile.warmup else "1 run")
    return (f"flowturbo profile: {profile.schedule}, batch {profile.batch}, backend {profile.backend}, "
            f"{profile.device} {dtype}".rstrip() + f", {stat}, timer {extra.get('timer', 'runner')}")


def chrome_trace(profile: RunProfile) -> dict[str, Any]:
    """Chrome Trace Event format: one complete ('X') event per step and one for the decode, laid end to end
    in the reported run's order, plus the measured total on a second track. Times in microseconds."""
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": 0, "tid": 0,
         "args": {"name": f"flowturbo {profile.backend} {profile.schedule.notation} batch {profile.batch}"}},
        {"name": "thread_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "steps + decode"}},
        {"name": "thread_name", "ph": "M", "pid": 0, "tid": 1, "args": {"name": "measured total"}},
    ]
    ts = 0.0
    for s in profile.steps:
        events.append({
            "name": f"step {s.index + 1} {s.kind.value}", "cat": "step", "ph": "X", "pid": 0, "tid": 0,
            "ts": ts, "dur": 1000.0 * s.ms,
            "args": {"kind": s.kind.label, "t_start": s.t_start, "t_end": s.t_end,
                     "predictor_calls": s.predictor_calls, "refiner_calls": s.refiner_calls, "ms": s.ms},
        })
        ts += 1000.0 * s.ms
    events.append({"name": "decode", "cat": "decode", "ph": "X", "pid": 0, "tid": 0, "ts": ts,
                   "dur": 1000.0 * profile.decode_ms, "args": {"ms": profile.decode_ms}})
    events.append({"name": "total", "cat": "total", "ph": "X", "pid": 0, "tid": 1, "ts": 0.0,
                   "dur": 1000.0 * profile.total_ms, "args": {"ms": profile.total_ms}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"schedule_id": profile.schedule.id, "device": profile.device}}


def plot_steps(profile: RunProfile, path: str | os.PathLike[str]) -> None:
    """A bar chart of per-step ms coloured by kind, with the decode as the last bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    labels = [f"{s.index + 1}{s.kind.value}" for s in profile.steps] + ["decode"]
    values = [s.ms for s in profile.steps] + [profile.decode_ms]
    colours = [KIND_COLOURS[s.kind.value] for s in profile.steps] + [KIND_COLOURS["decode"]]
    figure = Figure(figsize=(max(6.0, 0.45 * len(values) + 2), 4.0), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    ax.bar(range(len(values)), values, color=colours)
    ax.set_xticks(range(len(values)), labels, rotation=90 if len(values) > 24 else 0, fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title(f"{profile.backend} {profile.schedule.notation}, batch {profile.batch}, {profile.device}: "
                 f"total {profile.total_ms:.1f} ms", fontsize=10)
    kinds = sorted({s.kind.value for s in profile.steps}, key="EHPR".index)
    handles = [Patch(color=KIND_COLOURS[k], label=StepKind(k).label) for k in kinds]
    handles.append(Patch(color=KIND_COLOURS["decode"], label="decode"))
    ax.legend(handles=handles, fontsize=8)
    figure.tight_layout()
    figure.savefig(os.fspath(path), format="png")


def check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Refuse an output path flowturbo could not write or may not replace (see :class:`flowturbo.fileio.OutputFolder`)."""
    out = check_writable_target(out_dir)
    check_replaceable(out, "flowturbo profile output")
    return out


def write_profile(
    profile: RunProfile, out_dir: str | os.PathLike[str] | OutputFolder, *,
    extra_files: Mapping[str, str | os.PathLike[str]] = {},
) -> Path:
    """Write profile.json, trace.json, steps.png and table.txt (+ ``extra_files``, moved in) into ``out_dir``.

    Everything is built in a staging folder that replaces ``out_dir`` only when complete, and an existing
    ``out_dir`` is replaced only when everything in it is flowturbo's own (:class:`flowturbo.fileio.OutputFolder`;
    pass an entered one, as ``flowturbo profile`` does, to check and lock ``--out`` before profiling).
    """
    if not isinstance(out_dir, OutputFolder):
        with OutputFolder(check_out_dir(out_dir), command="profile", what="profile output") as folder:
            return write_profile(profile, folder, extra_files=extra_files)
    with out_dir.staging() as staging:
        for name, source in extra_files.items():
            shutil.move(os.fspath(source), staging / name)
        write_profile_files(profile, staging)
    return out_dir.target


def write_profile_files(profile: RunProfile, folder: Path) -> list[str]:
    """Write profile.json, trace.json, steps.png and table.txt into ``folder`` (a staging folder: the one
    place that lays out a profile output, for :func:`write_profile` and ``flowturbo profile``); returns their
    names. profile.json comes last and is :func:`flowturbo.fileio.json_text`."""
    (folder / TRACE_FILE).write_text(json.dumps(chrome_trace(profile)) + "\n")
    plot_steps(profile, folder / CHART_FILE)
    (folder / TABLE_FILE).write_text(describe_run(profile) + "\n" + format_table(profile) + "\n")
    (folder / PROFILE_FILE).write_text(json_text(profile.to_json()))
    return [PROFILE_FILE, TRACE_FILE, CHART_FILE, TABLE_FILE]


__all__ = [
    "CONSISTENCY_TOLERANCE",
    "KernelTime",
    "RunProfile",
    "StepProfile",
    "StepTimer",
    "check_out_dir",
    "chrome_trace",
    "format_table",
    "plot_steps",
    "profile_exported",
    "profile_from_runner",
    "profile_pytorch",
    "write_profile",
    "write_profile_files",
]
