"""``flowturbo tune``: which schedule should I run for this model and this latency budget?

The search (:class:`Tuner`), in order:

1. **Candidates** (:class:`SearchSpace`): step strings ``H{a}P{b}R{c}`` in the paper's order (Heun-only and
   FlowTurbo), Euler ``E{n}``, optionally every valid general string up to a few steps, each on every time
   grid of a small family (:class:`Grid`: uniform, a power warp ``t = u^g``, a shift ``t = s u / (1 + (s-1) u)``),
   plus the seed report's velocity-norm rule ``dt = C/||f||`` for a few C. R steps whose refiner calls need a
   dt (the age of the velocity the refiner corrects, ``flowturbo.integrator``) beyond the refiner's trained
   range (the bundle's ``refiner_dt`` record; the paper's ``dt <= 0.12`` when it has none) are allowed and
   flagged (:func:`flowturbo.refiner_dt.range_excess`). A model without a refiner tunes with R = 0 (any
   refiner counts asked for are mapped to 0, said once).
2. **Prices** (:class:`CallCosts`): the per-call cost of the predictor (CFG batch), the refiner, the decode
   and the solver update of one step, measured once on the chosen device at ``latency_batch`` images with the
   PyTorch backend, eagerly (one call at a time); a candidate's price is
   ``(P c_pred + R c_ref + N c_step + c_decode) / batch`` from its exact call counts (the velocity-norm rule:
   from the calls it made; before it ran, from its fewest possible calls, ``ceil(1/dt_max)`` steps). Candidates
   above the budget are not searched; if none can fit, the tune is refused naming the cheapest and its cost.
   Under torchrun only rank 0 measures, while the others wait in a collective (which does not use the CPU),
   with the CPU threads a single process uses (torchrun pins every process to one thread; ``--threads``
   overrides), and every rank prices with rank 0's costs: the prices do not depend on the number of processes.
3. **Successive halving**: every candidate is scored on the first ``n_0`` images, the best ``ceil(n/eta)`` of
   the ``n`` alive (by non-dominated sorting on (price, FID): the front first, so the whole front survives
   only while it has at most ``ceil(n/eta)`` members, then the next layers), plus each family's best, go on to
   ``eta`` times more images, up to ``num_samples``. All candidates see identical noise (image i from seed
   ``seed + i``) and classes (``i mod K``), so their FIDs are paired. ``search="exhaustive"`` scores every
   candidate on ``num_samples`` (for comparison).
4. **Front**: the Pareto front (price vs FID) of the candidates scored on ``num_samples``; the recommendation is
   the lowest FID whose price fits the budget (none fits: refused, naming the cheapest). Then the real latency
   of the front's members (and each family's front, the baselines, the recommendations) is measured (both
   shown): on CPU eagerly as priced; on CUDA on the path ``flowturbo sample`` runs by default (the schedule and
   the decode as one CUDA graph; eager with ``cuda_graph=False`` / ``--no-cuda-graph``, and always for the
   velocity-norm rule, which cannot be captured). With a ``budget_ms``, a recommendation whose *measured*
   latency exceeds the budget is reported loudly (``latency_check`` in the report, a warning in the summary)
   and replaced by the lowest-FID measured candidate whose measured latency fits, if there is one.

**Text-to-image models** (``flowturbo tune --pipeline DIR --prompts FILE``, :class:`TuneRequests`): image i is
conditioned on prompt ``i mod P`` (and the negative prompt, distilled guidance value and size asked for), the model
family's own calls run every candidate (the step loop ``flowturbo sample --pipeline`` runs), the ``model`` grid is
the family's shifted grid for that size, and the velocity-norm rule is left out (class models only). The default
metric there is ``fine-grid``: the RMS over all latent elements of the final latents' distance to the model's own
``H{fine_steps}`` solution on its grid from the same noise and prompt (cached per image beside the candidates) — it
needs no reference and no decode, and measures the solver's error, not image quality. ``inception-fid`` compares
decoded images with ``--reference`` (a statistics .npz or a folder of images, :func:`folder_reference`). Whatever the
metric, each candidate's value is in its ``score`` field (lower is better; ``scores``: per rung).

Per-image features (and class predictions, and the rule's calls) are cached per candidate id (the schedule
id, or a hash of the rule's settings) under the cache folder, keyed by everything they depend on; a killed
tune continues with ``resume=True`` from its state file (settings, including a digest of every model weight,
must match: the differing fields are named).
Under torchrun the images of every candidate are split over the processes, features gathered on rank 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from flowturbo import __version__
from flowturbo.errors import FlowTurboError
from flowturbo.families import ImageSize
from flowturbo.fileio import atomic_write_bytes, atomic_write_json, crash_point
from flowturbo.noise import make_noise
from flowturbo.refiner_dt import DtDistribution, range_excess
from flowturbo.runtime.cuda_graphs import CaptureBackend
from flowturbo.runtime.distributed import Ranks
from flowturbo.runtime.pytorch_backend import TorchPipeline
from flowturbo.schedule import SamplingSchedule, StepKind, parse_steps
from flowturbo.training.evaluation.reference_stats import folder_reference
from flowturbo.training.sampling import (
    run_schedule,
    sample_velocity_norm_rule,
    solver_ops_for,
)

TUNE_FORMAT = "flowturbo.tune/2"  # /2: the metric value is "score" (was "fid"), per rung "scores"
STATE_FORMAT = "flowturbo.tune-state/2"
VNORM_DT_MIN, VNORM_DT_MAX = 0.02, 0.25  # the rule's clip (as bench/quality_study.py)
VNORM_MIN_STEPS = math.ceil(1 / VNORM_DT_MAX - 1e-9)  # the rule's fewest steps (it lands exactly on t = 1)
FAMILIES = ("flowturbo", "heun", "euler", "general", "velocity-norm")
DEFAULT_FINE_STEPS = 64  # the fine-grid metric's reference: H64 on the model's own grid
ModelGrid = Callable[[int], "Sequence[float] | None"]


# ----------------------------------------------------------------------------------------------- grids
@dataclasses.dataclass(frozen=True)
class Grid:
    """A time grid family member: ``uniform``, ``power:g`` (``t_k = (k/N)^g``; g > 1 puts more steps near the
    noise end t = 0), ``shift:s`` (``t_k = s u / (1 + (s - 1) u)``, u = k/N; s > 1 puts more near t = 1) or
    ``model``: the model family's own grid for the image size (SD3's static shift, FLUX's resolution-dependent one:
    what ``flowturbo sample --pipeline`` runs; for a family without one, such as SiT, it is the uniform grid)."""

    kind: str
    value: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "Grid":
        text = text.strip().lower()
        if text in ("uniform", "model"):
            return cls(text)
        kind, _, value = text.partition(":")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if kind not in ("power", "shift") or not (math.isfinite(number) and number > 0):
            raise FlowTurboError(f"unknown grid {text!r}; use uniform, model, power:G or shift:S with a number > 0 "
                                 "(e.g. power:1.5, shift:2)")
        return cls(kind, number)

    @property
    def name(self) -> str:
        return self.kind if self.kind in ("uniform", "model") else f"{self.kind}:{self.value:g}"

    def timesteps(self, num_steps: int, model_grid: ModelGrid | None = None) -> tuple[float, ...]:
        """``0 = t_0 < ... < t_N = 1`` exactly (both ends are exact in float64). ``model_grid(N)``: the model's own
        grid (None where the model has none: uniform), which the ``model`` kind needs."""
        u = [k / num_steps for k in range(num_steps + 1)]
        if self.kind == "model":
            own = None if model_grid is None else model_grid(num_steps)
            return tuple(u) if own is None else tuple(float(t) for t in own)
        if self.kind == "uniform":
            return tuple(u)
        if self.kind == "power":
            return tuple(x ** self.value for x in u)
        s = self.value
        return tuple(s * x / (1.0 + (s - 1.0) * x) for x in u)


# ------------------------------------------------------------------------------------------ candidates
@dataclasses.dataclass(frozen=True)
class Candidate:
    """One thing to score: a fixed schedule on a grid, or the velocity-norm rule with one C."""

    name: str  # "H2P4R2@uniform", "vnorm-C0.3"
    family: str
    schedule: SamplingSchedule | None = None
    c: float | None = None  # the velocity-norm rule's C
    baseline: bool = False  # always scored on every sample, never dropped, shown apart

    @property
    def id(self) -> str:
        if self.schedule is not None:
            return self.schedule.id
        text = json.dumps({"rule": "velocity-norm", "c": self.c, "dt_min": VNORM_DT_MIN, "dt_max": VNORM_DT_MAX},
                          sort_keys=True)
        return "vnorm-" + hashlib.sha256(text.encode()).hexdigest()[:11]

    def flags(self, refiner_dt: DtDistribution | None) -> list[str]:
        """Warnings that do not exclude the candidate: refiner calls beyond the refiner's trained dt range
        (``refiner_dt``: its record; None: the paper's range, assumed)."""
        excess = None if self.schedule is None else range_excess(self.schedule, refiner_dt)
        if excess is None:
            return []
        return [f"R step(s) {','.join(map(str, excess.steps))} call the refiner at dt up to {excess.longest:.3f}, "
                f"beyond {excess.known}"]


def _family(steps: Sequence[StepKind]) -> str:
    kinds = set(steps)
    if kinds == {StepKind.EULER}:
        return "euler"
    if kinds == {StepKind.HEUN}:
        return "heun"
    if StepKind.EULER in kinds:
        return "general"
    order = {StepKind.HEUN: 0, StepKind.PSEUDO: 1, StepKind.REFINER: 2}
    ranks = [order[k] for k in steps]
    return "flowturbo" if ranks == sorted(ranks) else "general"


def _int_range(text: str, flag: str) -> tuple[int, ...]:
    """``"0:3"`` -> (0, 1, 2, 3); ``"4,6,8"`` -> (4, 6, 8); ``""`` -> ()."""
    text = text.strip()
    if not text:
        return ()
    try:
        if ":" in text:
            lo, hi = (int(v) for v in text.split(":"))
            if lo > hi:
                raise FlowTurboError(f"{flag} {text} is a reversed range (it would hold no count); write {hi}:{lo}")
            values = tuple(range(lo, hi + 1))
        else:
            values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise FlowTurboError(f"{flag} must be LO:HI or comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise FlowTurboError(f"{flag} counts must be >= 0, got {text!r}")
    return values


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """What is searched. Counts are inclusive ranges; ``general_max_steps`` > 0 adds every valid E/H/P/R string
    of at most that many steps (cheap: few candidates), ``max_steps`` bounds every schedule."""

    heun: tuple[int, ...] = (0, 1, 2, 3)
    pseudo: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
    refiner: tuple[int, ...] = (0, 1, 2, 3)
    euler: tuple[int, ...] = (4, 6, 8, 10)
    grids: tuple[str, ...] = ("uniform", "power:1.5", "power:0.75", "shift:2", "shift:0.5")
    vnorm_c: tuple[float, ...] = (0.2, 0.3, 0.4, 0.6)
    general_max_steps: int = 0
    max_steps: int = 12

    @classmethod
    def from_text(cls, *, heun: str = "0:3", pseudo: str = "0:6", refiner: str = "0:3", euler: str = "4,6,8,10",
                  grids: str = "uniform,power:1.5,power:0.75,shift:2,shift:0.5", vnorm_c: str = "0.2,0.3,0.4,0.6",
                  general_max_steps: int = 0, max_steps: int = 12) -> "SearchSpace":
        try:
            cs = tuple(float(v) for v in vnorm_c.split(",") if v.strip())
        except ValueError:
            raise FlowTurboError(f"--vnorm-c must be comma-separated numbers, got {vnorm_c!r}") from None
        if any(not (math.isfinite(c) and c > 0) for c in cs):
            raise FlowTurboError(f"--vnorm-c values must be > 0, got {vnorm_c!r}")
        grid_names = tuple(Grid.parse(g).name for g in grids.split(",") if g.strip())
        if not grid_names:
            raise FlowTurboError("--grids is empty; give at least 'uniform'")
        if not 1 <= max_steps <= 64 or not 0 <= general_max_steps <= 6:
            raise FlowTurboError(f"--max-steps must be in [1, 64] and --general-max-steps in [0, 6], got {max_steps} "
                                 f"and {general_max_steps}")
        return cls(_int_range(heun, "--heun"), _int_range(pseudo, "--pseudo"), _int_range(refiner, "--refiner-steps"),
                   _int_range(euler, "--euler"), grid_names, cs, general_max_steps, max_steps)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def step_strings(self) -> list[str]:
        strings: list[str] = []
        for a, b, c in itertools.product(self.heun, self.pseudo, self.refiner):
            n = a + b + c
            if a + b == 0 or n > self.max_steps:  # nothing carried into R / empty
                continue
            strings.append("H" * a + "P" * b + "R" * c)
        strings += ["E" * n for n in self.euler if 1 <= n <= self.max_steps]
        for n in range(1, min(self.general_max_steps, self.max_steps) + 1):
            for letters in itertools.product("EHPR", repeat=n):
                strings.append("".join(letters))
        # A P with nothing carried (first, or after E) evaluates its own d: it *is* an H step. Keep one spelling.
        strings = [t for t in strings if not t.startswith("P") and "EP" not in t]
        return list(dict.fromkeys(strings))

    def candidates(self, *, cfg: float, guidance_channels: int | None, has_refiner: bool,
                   baselines: Sequence[str] = (), model_grid: ModelGrid | None = None,
                   rule: bool = True) -> tuple[list[Candidate], list[str]]:
        """Every valid candidate (schedules on every grid, the rule's Cs, baselines) and notes for the user.
        ``model_grid(N)``: the model's own N-step grid (the ``model`` grid); ``rule``: whether the model can run the
        velocity-norm rule (class-conditional models only)."""
        notes: list[str] = []
        if self.vnorm_c and not rule:
            notes.append("the velocity-norm rule runs on class-conditional models only: its candidates (--vnorm-c) "
                         "are left out")
        strings = self.step_strings()
        if not has_refiner and any("R" in s for s in strings):
            asked = ", ".join(str(r) for r in self.refiner if r) or "R in general strings"
            notes.append(f"this model has no refiner: R steps are left out (refiner counts {asked} -> 0), "
                         "tuning without R")
            # every H/P combination with R = 0 (an explicit --refiner-steps 1:2 would otherwise leave nothing)
            strings = [s for s in dataclasses.replace(self, refiner=(0,)).step_strings() if "R" not in s]
        out: dict[str, Candidate] = {}
        for text in strings:
            try:
                steps = parse_steps(text)
                base = SamplingSchedule(steps, tuple(Grid("uniform").timesteps(len(steps))), cfg, guidance_channels)
            except FlowTurboError:  # e.g. R first or after E: not a valid schedule
                continue
            for grid_name in self.grids:
                grid = Grid.parse(grid_name)
                schedule = dataclasses.replace(base, timesteps=grid.timesteps(len(steps), model_grid))
                cand = Candidate(f"{base.notation}@{grid.name}", _family(steps), schedule)
                out.setdefault(cand.id, cand)
        for c in self.vnorm_c if rule else ():
            cand = Candidate(f"vnorm-C{c:g}", "velocity-norm", c=c)
            out.setdefault(cand.id, cand)
        for spec in baselines:
            name, _, grid_name = spec.partition("@")
            schedule = SamplingSchedule.parse(name, guidance_scale=cfg, guidance_channels=guidance_channels)
            if schedule.uses_refiner and not has_refiner:
                raise FlowTurboError(f"baseline {spec} has R steps but this model has no refiner")
            grid = Grid.parse(grid_name or ("uniform" if model_grid is None else "model"))
            schedule = dataclasses.replace(schedule, timesteps=grid.timesteps(schedule.num_steps, model_grid))
            cand = Candidate(f"{schedule.notation}@{grid.name}", _family(schedule.steps), schedule, baseline=True)
            out[cand.id] = cand
        return list(out.values()), notes


# ------------------------------------------------------------------------------------------------ costs
@dataclasses.dataclass(frozen=True)
class CallCosts:
    """Measured milliseconds per call at ``batch`` images (CFG doubling included) on one device/backend."""

    batch: int
    predictor_ms: float
    refiner_ms: float | None
    decode_ms: float
    step_ms: float  # the solver update of one step (the arithmetic around the calls)
    device: str
    backend: str = "pytorch"
    path: str = "eager"  # each call timed on its own (no CUDA graph)
    threads: int | None = None  # CPU threads of torch while measuring (None: not on the CPU)

    def price(self, predictor_calls: float, refiner_calls: float, steps: float) -> float:
        """Milliseconds per image."""
        total = (predictor_calls * self.predictor_ms + refiner_calls * (self.refiner_ms or 0.0)
                 + steps * self.step_ms + self.decode_ms)
        return total / self.batch

    def calls_equivalent(self, predictor_calls: float, refiner_calls: float) -> float:
        """Predictor-call equivalents: a refiner call counts ``refiner_ms / predictor_ms``."""
        return predictor_calls + refiner_calls * (self.refiner_ms or 0.0) / self.predictor_ms


def _median_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


@dataclasses.dataclass(frozen=True)
class TuneRequests:
    """What image ``i`` of a tune is conditioned on: class ``i mod K`` (class-conditional models, ``prompts`` None)
    or prompt ``i mod P`` (text-to-image), with a text model's negative prompt, distilled guidance value and image
    size. Every candidate sees the same requests, so their scores are paired."""

    prompts: tuple[str, ...] | None = None
    negative_prompt: str | None = None
    guidance: float | None = None
    size: ImageSize | None = None

    def for_images(self, pipe: TorchPipeline, lo: int, hi: int) -> list[Any]:
        """The requests of images ``[lo, hi)``."""
        if self.prompts is None:
            return [i % pipe.num_classes for i in range(lo, hi)]
        return [self.prompts[i % len(self.prompts)] for i in range(lo, hi)]

    def cycle(self, pipe: TorchPipeline, schedule: SamplingSchedule) -> Any:
        """The family's conditioning of one cycle of requests: row j = class j (K rows) or prompt j (P rows), each
        prompt encoded once; image i's is row ``i mod`` its length (:func:`cycle_rows`)."""
        if self.prompts is None:
            return pipe.family.condition(list(range(pipe.num_classes)), schedule)
        return pipe.family.condition(list(self.prompts), schedule, negative=self.negative_prompt,
                                     guidance=self.guidance)

    def sample_kwargs(self, pipe: TorchPipeline, lo: int, hi: int) -> dict[str, Any]:
        """``Sampler.sample``'s request arguments for images ``[lo, hi)``."""
        if self.prompts is None:
            return {"classes": self.for_images(pipe, lo, hi)}
        return {"prompts": self.for_images(pipe, lo, hi), "negative_prompt": self.negative_prompt,
                "guidance": self.guidance, "size": self.size}

    def latent_shape(self, pipe: TorchPipeline) -> tuple[int, int, int]:
        return tuple(pipe.latent_shape) if self.size is None else tuple(pipe.family.latent_shape(self.size))

    def model_grid(self, pipe: TorchPipeline) -> ModelGrid | None:
        """The model's own N-step grid for this size (None: the family has none, e.g. SiT: uniform)."""
        if self.prompts is None:
            return None
        shape = self.latent_shape(pipe)
        return lambda num_steps: pipe.family.timesteps(num_steps, shape)

    def describe(self) -> dict[str, Any]:
        """What the caches and ``resume`` key on (the prompts by digest)."""
        if self.prompts is None:
            return {"classes": "i mod K"}
        digest = hashlib.sha256(json.dumps(list(self.prompts)).encode()).hexdigest()
        return {"prompts": f"i mod P, P = {len(self.prompts)}", "prompts_sha256": digest,
                "negative_prompt": self.negative_prompt, "guidance": self.guidance,
                "size": None if self.size is None else str(self.size)}


def cycle_rows(cycle: Any, lo: int, hi: int) -> Any:
    """Images ``[lo, hi)``'s conditioning from a :meth:`TuneRequests.cycle`: rows ``i mod len(cycle)``."""
    device = cycle.tensors()[0].device
    return cycle.rows(torch.arange(lo, hi, device=device) % len(cycle))


@torch.inference_mode()
def measure_call_costs(pipe: TorchPipeline, batch: int, cfg: float, guidance_channels: int | None,
                       requests: TuneRequests = TuneRequests(), *, repeats: int = 7, warmup: int = 2) -> CallCosts:
    """Time one predictor call, one refiner call, one decode and one step's solver update at ``batch`` images, through
    the model family's calls (CFG doubling included) on ``requests``' first ``batch`` images."""
    noise = make_noise(batch, requests.latent_shape(pipe), 0, dtype=pipe.state_dtype,
                       device=pipe.device)  # (B, C, H, W)
    schedule = SamplingSchedule.parse("H1P1R1" if pipe.refiner is not None else "H2", guidance_scale=cfg,
                                      guidance_channels=guidance_channels)
    calls = pipe.family.model_calls(cycle_rows(requests.cycle(pipe, schedule), 0, batch), schedule)
    ops = solver_ops_for(schedule, noise.shape[1], pipe.kernel_backend)
    raw = calls.predictor(noise, 0.5)
    d, x_pred = ops.predict(raw, noise, 0.1)
    predictor_ms = _median_ms(lambda: calls.predictor(noise, 0.5), pipe.device, repeats, warmup)
    refiner_ms = None
    if pipe.refiner is not None:
        refiner_ms = _median_ms(lambda: calls.refiner(noise, 0.5, d, 0.1), pipe.device, repeats, warmup)
    decode_ms = _median_ms(lambda: pipe.family.decode(noise), pipe.device, repeats, warmup)
    step_ms = _median_ms(lambda: (ops.predict(raw, noise, 0.1), ops.correct(raw, noise, d, 0.1)), pipe.device,
                         repeats, warmup)
    threads = torch.get_num_threads() if pipe.device.type == "cpu" else None
    return CallCosts(batch, predictor_ms, refiner_ms, decode_ms, step_ms, str(pipe.device), threads=threads)


@functools.lru_cache(maxsize=1)
def single_process_threads() -> int:
    """The CPU threads torch uses in a plain single process on this machine (``flowturbo sample`` without
    torchrun): its default without ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, which torchrun sets to 1 in every
    process it starts. Asked of a fresh interpreter (torch's default is fixed at start-up), once per process
    (the costs and the front's latencies are both timed with it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             capture_output=True, text=True, timeout=120, env=env, check=True)
        return max(1, int(out.stdout.split()[-1]))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run the block with ``threads`` CPU threads of torch (None: unchanged), restoring the count after."""
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ sample counts
def check_metric_samples(n: int, metric: str, *, allow_small_sample: bool, flag: str = "--num-samples",
                         feature_dim: int | None = None) -> str | None:
    """The evaluation's sample-count rule (:func:`flowturbo.training.evaluation.check_sample_count`) for ``metric``:
    ``inception-fid`` (2048-d features) needs at least 2049. ``feature_dim``: the extractor's (default: known for
    inception-fid only; the domain features are far smaller than the general minimum). ``fine-grid`` has no
    minimum. Returns the warning of an allowed small sample."""
    from flowturbo.training.evaluation import check_sample_count
    from flowturbo.training.evaluation.features import INCEPTION_DIM

    if metric == "fine-grid":  # a distance per image, averaged: no covariance to estimate, no minimum
        return None

    dim = feature_dim if feature_dim is not None else (INCEPTION_DIM if metric == "inception-fid" else None)
    return check_sample_count(n, allow_small_sample=allow_small_sample, flag=flag, feature_dim=dim,
                              what=f"--metric {metric}")


# ---------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """Everything a tune's results depend on (a resumed tune must have the same; see :meth:`settings`)."""

    model: str  # bundle folder / "embedded default" / official checkpoint description
    metric: str = "domain-fid"  # domain-fid | inception-fid | fine-grid (tune_cli.METRICS)
    num_samples: int = 1000
    min_samples: int = 100
    eta: int = 3
    search: str = "halving"  # halving | exhaustive
    batch: int = 100  # images per generation batch (the rule's RMS is per batch)
    latency_batch: int = 16  # images per batch for the call costs and the latency re-measurement
    seed: int = 0
    cfg: float = 1.5
    guidance_channels: int | None = None
    budget_ms: float | None = None
    budget_calls: float | None = None
    space: SearchSpace = SearchSpace()
    baselines: tuple[str, ...] = ()
    device: str = "cpu"
    dtype: str = "float32"
    num_reference: int = 10000
    reference: str | None = None
    allow_small_sample: bool = False
    latency_repeats: int = 3
    fine_steps: int = DEFAULT_FINE_STEPS  # the fine-grid metric's reference: H{fine_steps} on the model's own grid

    def settings(self) -> dict[str, Any]:
        """The fields that define a tune's results (what ``--resume`` compares)."""
        data = dataclasses.asdict(self)
        data["space"] = self.space.to_dict()
        data["baselines"] = list(self.baselines)
        data.pop("latency_repeats")
        return data

    def rung_sizes(self) -> list[int]:
        """Samples per rung, smallest first: ``num_samples / eta^k`` down to ``min_samples``, whole batches."""
        if self.search == "exhaustive":
            return [self.num_samples]
        sizes = [self.num_samples]
        while True:
            smaller = math.ceil(sizes[-1] / self.eta / self.batch) * self.batch
            if smaller < self.min_samples or smaller >= sizes[-1]:
                break
            sizes.append(smaller)
        return sizes[::-1]


def settings_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Names of the fields that differ (nested dicts with dotted names)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return out


# -------------------------------------------------------------------------------------------- the search
@dataclasses.dataclass
class Scored:
    """A candidate's numbers at one sample count."""

    num_samples: int
    score: float  # the metric's value (FID, or the fine-grid RMS); lower is better
    class_accuracy: float | None
    predictor_calls: float  # the rule: the mean over its batches
    refiner_calls: float
    steps: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Names of the non-dominated ``(name, cost, score)`` points (lower is better in both), by cost."""
    front, best = [], math.inf
    for name, cost, score in sorted(points, key=lambda p: (p[1], p[2])):
        if score < best:
            front.append(name)
            best = score
    return front


def nondominated_order(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Names sorted by Pareto layer (front first), then FID within a layer."""
    left, order = list(points), []
    while left:
        layer = set(pareto_front(left))
        order += [p[0] for p in sorted((p for p in left if p[0] in layer), key=lambda p: p[2])]
        left = [p for p in left if p[0] not in layer]
    return order


def weights_digest(pipe: TorchPipeline) -> str:
    """SHA-256 of every weight of the predictor, the refiner and the decoder (and a text-to-image model's text
    encoders; names, dtypes, shapes and all bytes): the caches and ``resume`` must never mix two models. Hashing
    runs at ~1 GB/s, seconds even for large models, nothing next to a tune."""
    digest = hashlib.sha256()
    modules = [("predictor", pipe.predictor), ("refiner", pipe.refiner), ("decoder", pipe.decoder)]
    loaded = getattr(pipe.family_adapter, "pipe", None)  # a text-to-image pipeline: its text encoders condition too
    for name, component in sorted(getattr(loaded, "components", {}).items()):
        if name.startswith("text_encoder"):
            modules.append((name, component))
    for role, module in modules:
        if module is None or not hasattr(module, "state_dict"):
            digest.update(f"{role}:none".encode())
            continue
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{role}.{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    return digest.hexdigest()


def apply_measured_budget(report: dict[str, Any]) -> None:
    """Hold the recommendations to the budget by their *measured* latency, not only their price.

    With a budget in ms/image, a recommendation (``recommended``, ``recommended_fixed``) whose measured latency
    exceeds it is replaced by the lowest-FID candidate measured within the budget (the latency re-measurement
    covers the front, each family's front and the baselines; for ``recommended_fixed`` only fixed schedules), if
    there is one; either way a warning says so. Writes ``report["latency_check"]``: ``checked``, ``budget_ms``,
    ``within_budget`` (of the final recommendation), ``replaced`` (role -> {priced, measured_ms_per_image,
    replaced_by}) and ``warnings``; and each measured row's ``measured_within_budget``. A budget in
    predictor-call equivalents is not a latency: nothing is checked then.
    """
    budget = report["budget"]
    check: dict[str, Any] = {"checked": False, "budget_ms": None, "within_budget": None, "replaced": {},
                             "warnings": []}
    report["latency_check"] = check
    if budget["unit"] != "ms/image":
        return
    limit = float(budget["value"])
    check.update(checked=True, budget_ms=limit)
    rows = {r["name"]: r for r in report["candidates"]}
    final = report["rungs"][-1]
    for r in report["candidates"]:
        measured = r.get("measured_ms_per_image")
        r["measured_within_budget"] = None if measured is None else measured <= limit
    fits = [r for r in report["candidates"] if r["measured_within_budget"] and r["score"] is not None
            and r["num_samples"] == final]
    for role, label in (("recommended", "the recommended"), ("recommended_fixed", "the best fixed (exportable)")):
        name = report.get(role)
        if name is None or rows[name].get("measured_ms_per_image") is None:
            continue
        measured = rows[name]["measured_ms_per_image"]
        if measured <= limit:
            continue
        pool = fits if role == "recommended" else [r for r in fits if r["schedule"] is not None]
        better = min(pool, key=lambda r: (r["score"], r["measured_ms_per_image"])) if pool else None
        text = (f"{label} schedule {name} is priced at {rows[name]['price_ms_per_image']:.2f} ms/image but measured "
                f"{measured:.2f} ms/image, over the budget of {limit:g} ms/image")
        if better is not None:
            text += (f"; recommending {better['name']} instead ({better['measured_ms_per_image']:.2f} ms/image "
                     f"measured, {report['metric']} {better['score']:.3f})")
            report[role] = better["name"]
        else:
            text += "; no measured candidate fits the budget: raise it, or expect the recommendation to run over"
        check["replaced"][role] = {"priced": name, "measured_ms_per_image": measured,
                                   "replaced_by": None if better is None else better["name"]}
        check["warnings"].append(text)
    rec = rows[report["recommended"]] if report.get("recommended") else None
    check["within_budget"] = None if rec is None else rec.get("measured_within_budget")


class Tuner:
    """Runs one tune (see the module docstring). ``ranks`` splits the images over torchrun processes.

    ``requests``: what each image is conditioned on (classes, or a text model's prompts; :class:`TuneRequests`).
    ``extractor``: the FID metrics' feature extractor (None for ``fine-grid``, which compares latents to the model's
    own fine solution and needs no images).

    ``measure_threads``: CPU threads of torch while rank 0 measures the call costs and the latencies (the CLI's
    ``--threads``); None: unchanged in a single process, a single process's default under torchrun (see
    :func:`single_process_threads`). ``cuda_graph``: the latency re-measurement's path on CUDA (None: the
    sampler's default, a CUDA graph; False: eager); ``graph_backend``: a capture stand-in (tests, CPU dry runs).
    """

    def __init__(self, config: TuneConfig, pipe: TorchPipeline, extractor: Any, *, classifier: Any = None,
                 cache_dir: Path, ranks: Ranks | None = None, progress: bool = True,
                 state_path: Path | None = None, resume: bool = False, log: Callable[[str], None] = print,
                 measure_threads: int | None = None, cuda_graph: bool | None = None,
                 graph_backend: CaptureBackend | None = None, requests: TuneRequests = TuneRequests()) -> None:
        self.config = config
        self.pipe = pipe
        self.requests = requests
        self.latent_shape = requests.latent_shape(pipe)
        self.extractor = extractor  # None with the fine-grid metric (no images are decoded)
        self._cycle: Any = None  # the requests' conditioning, one row per distinct request (made once)
        self.classifier = classifier
        self.ranks = ranks or Ranks()
        self.progress = progress and self.ranks.is_main
        self.log = log if self.ranks.is_main else (lambda text: None)
        self.measure_threads = measure_threads
        self.cuda_graph = cuda_graph
        self.graph_backend = graph_backend
        self.weights_digest = weights_digest(pipe)
        self.cache = cache_dir / self._context_key()
        self.state_path = state_path
        self.resume = resume
        self.state: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.evaluations = 0  # candidate x rung evaluations done in this process
        self.images_generated = 0

    # ----------------------------------------------------------------------------------- cache keys
    def _context_key(self) -> str:
        """Everything a candidate's cached features depend on besides the candidate itself."""
        c = self.config
        fields = {"weights": self.weights_digest, "features": self._metric_identity(), "seed": c.seed,
                  "batch": c.batch, "cfg": c.cfg, "guidance_channels": c.guidance_channels, "device": c.device,
                  "dtype": c.dtype, "noise": "per-image seed + index (flowturbo.noise)", **self.requests.describe()}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]

    def _metric_identity(self) -> str:
        if self.config.metric == "fine-grid":
            return f"fine-grid:H{self.config.fine_steps}@model:rms-latents:v1"
        return self.extractor.identity()

    def _cache_file(self, cand: Candidate) -> Path:
        return self.cache / f"{cand.id}.npz"

    def _load_cached(self, cand: Candidate) -> dict[str, np.ndarray] | None:
        path = self._cache_file(cand)
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError):  # a damaged cache entry is recomputed, never trusted
            return None

    def _save_cached(self, cand: Candidate, data: dict[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **data)
        atomic_write_bytes(self._cache_file(cand), buffer.getvalue())

    # ------------------------------------------------------------------------------------ generation
    @torch.inference_mode()
    def _generate(self, cand: Candidate, start: int, stop: int) -> dict[str, np.ndarray]:
        """Features, predictions and calls of images ``[start, stop)`` (whole generation batches)."""
        pipe, c = self.pipe, self.config
        feats, preds, calls = [], [], []
        for lo in range(start, stop, c.batch):
            hi = min(lo + c.batch, stop, c.num_samples)
            noise = self._noise(lo, hi)
            if cand.schedule is not None:
                result = self._run(cand.schedule, noise, lo, hi)
                steps = cand.schedule.num_steps
            else:
                labels = torch.as_tensor(self.requests.for_images(pipe, lo, hi), device=pipe.device)
                result = sample_velocity_norm_rule(noise, labels, pipe.predictor, num_classes=pipe.num_classes,
                                                   c=float(cand.c), dt_min=VNORM_DT_MIN, dt_max=VNORM_DT_MAX,
                                                   guidance_scale=c.cfg, guidance_channels=c.guidance_channels)
                steps = len(result.timesteps) - 1
            if c.metric == "fine-grid":  # per-image mean squared distance to the fine solution: (b, 1)
                error = (result.latents.float() - self._fine_latents(lo, hi)).pow(2).flatten(1).mean(1, keepdim=True)
                feats.append(error.cpu().numpy().astype(np.float64))
            else:
                images = pipe.family.decode(result.latents).float().clamp(-1, 1)  # (b, C, H, W)
                feats.append(self.extractor.extract(images, progress=False).numpy())
                if self.classifier is not None:
                    preds.append(self.classifier.predict(images).numpy())
            calls.append([result.predictor_calls, result.refiner_calls, steps, hi - lo])
            self.images_generated += hi - lo
        empty = np.zeros((0, 1 if c.metric == "fine-grid" else self.extractor.dim), np.float32)
        return {"features": np.concatenate(feats) if feats else empty,
                "predicted": np.concatenate(preds) if preds else np.zeros(0, np.int64),
                "calls": np.asarray(calls, np.float64).reshape(-1, 4)}

    def _noise(self, lo: int, hi: int) -> torch.Tensor:
        """Images ``[lo, hi)``'s starting noise (b, C, h, w): image i from seed ``seed + i``."""
        return make_noise(hi - lo, self.latent_shape, self.config.seed, dtype=self.pipe.state_dtype,
                          device=self.pipe.device, first_index=lo)

    def _condition(self, lo: int, hi: int, schedule: SamplingSchedule) -> Any:
        """The conditioning of images ``[lo, hi)``: rows of the requests' cycle, encoded once for the whole tune (every
        candidate shares the CFG scale, and so the negative prompts' embeddings)."""
        if self._cycle is None:
            self._cycle = self.requests.cycle(self.pipe, schedule)
        return cycle_rows(self._cycle, lo, hi)

    def _run(self, schedule: SamplingSchedule, noise: torch.Tensor, lo: int, hi: int,
             check_finite: bool = True) -> Any:
        """``schedule`` from ``noise`` for images ``[lo, hi)`` through the model family's calls (the step loop
        ``flowturbo sample`` runs): the final latents and the calls made."""
        pipe = self.pipe
        calls = pipe.family.model_calls(self._condition(lo, hi, schedule), schedule)
        return run_schedule(schedule, noise, calls, check_finite=check_finite, kernel_backend=pipe.kernel_backend)

    def fine_schedule(self) -> SamplingSchedule:
        """The fine-grid metric's reference: ``H{fine_steps}`` on the model's own grid, at the tune's guidance."""
        c = self.config
        schedule = SamplingSchedule.parse(f"H{c.fine_steps}", guidance_scale=c.cfg,
                                          guidance_channels=c.guidance_channels)
        grid = Grid("model").timesteps(c.fine_steps, self.requests.model_grid(self.pipe))
        return dataclasses.replace(schedule, timesteps=grid)

    def _fine_latents(self, lo: int, hi: int) -> torch.Tensor:
        """The fine solution's final latents of images ``[lo, hi)`` (b, C, h, w) float32, from the per-image cache
        (``fine-H{n}/{i}.npy`` beside the candidates'), computed for the whole range when one is missing."""
        folder = self.cache / f"fine-H{self.config.fine_steps}"
        paths = [folder / f"{i}.npy" for i in range(lo, hi)]
        cached = []
        for path in paths:
            try:
                cached.append(np.load(path))
            except (OSError, ValueError):  # missing or damaged: recomputed, never trusted
                break
        if len(cached) == len(paths):
            return torch.from_numpy(np.stack(cached)).to(self.pipe.device)
        latents = self._run(self.fine_schedule(), self._noise(lo, hi), lo, hi).latents.float()
        for path, row in zip(paths, latents.cpu().numpy()):
            buffer = io.BytesIO()
            np.save(buffer, row)
            atomic_write_bytes(path, buffer.getvalue())
        self.images_generated += hi - lo
        return latents

    def _features(self, cand: Candidate, n: int) -> dict[str, np.ndarray] | None:
        """Features of images ``[0, n)`` on rank 0 (None elsewhere), generating what the cache lacks."""
        have = self._load_cached(cand) if self.ranks.is_main else None  # always a prefix [0, have_n)
        have_n = self.ranks.broadcast(0 if have is None else len(have["features"]), "sharing the cache state")
        if have_n >= n:
            return None if have is None else {k: v[:n] if k != "calls" else v for k, v in have.items()}
        lo, hi = self.ranks.shard_range(have_n, n, self.config.batch)
        mine = self.ranks.run_all(lambda: self._generate(cand, lo, hi), f"sampling {cand.name}")
        parts = self.ranks.gather(mine, "gathering features")
        if not self.ranks.is_main:
            return None
        assert parts is not None
        merged = {k: np.concatenate(([have[k]] if have is not None else []) + [p[k] for p in parts])
                  for k in ("features", "predicted", "calls")}
        self._save_cached(cand, merged)
        crash_point("tune:cached")
        return merged

    def _score(self, cand: Candidate, n: int) -> Scored | None:
        from flowturbo.training.evaluation import score_features

        data = self._features(cand, n)
        if not self.ranks.is_main:
            return None
        assert data is not None
        if self.config.metric == "fine-grid":  # RMS over every latent element of the n images
            score, accuracy = math.sqrt(float(data["features"][:n, 0].mean())), None
        else:
            labels = np.arange(n) % self.pipe.num_classes
            predicted = data["predicted"][:n] if self.classifier is not None else None
            result = score_features(data["features"][:n], features=self.extractor,
                                    labels=labels if predicted is not None else None, predicted=predicted,
                                    reference=self.reference, progress=False, allow_small_sample=True)
            score, accuracy = float(result["fid"]), result.get("class_accuracy")
        calls = data["calls"]
        covered = calls[np.cumsum(calls[:, 3]) <= n] if len(calls) else calls
        weights = covered[:, 3] / covered[:, 3].sum()
        self.evaluations += 1
        return Scored(n, score, accuracy, float(weights @ covered[:, 0]),
                      float(weights @ covered[:, 1]), float(weights @ covered[:, 2]))

    # ---------------------------------------------------------------------------------------- state
    def _save_state(self) -> None:
        if self.ranks.is_main and self.state_path is not None:
            atomic_write_json(self.state_path, self.state)

    def settings(self) -> dict[str, Any]:
        """The config's settings plus the digest of the model's weights and the requests (the prompts by digest):
        what ``resume`` compares."""
        return {**self.config.settings(), "weights": self.weights_digest, "requests": self.requests.describe()}

    def _load_or_start_state(self, costs: CallCosts | None) -> None:
        settings = self.settings()
        state = None
        if self.ranks.is_main and self.resume:
            if self.state_path is None or not self.state_path.is_file():
                raise FlowTurboError(f"--resume: there is no interrupted tune to resume ({self.state_path} does not "
                                     "exist); run without --resume")
            state = json.loads(self.state_path.read_text())
            if state.get("format") != STATE_FORMAT:
                what = "an older flowturbo's tune state" if str(state.get("format", "")).startswith(
                    "flowturbo.tune-state/") else "not a flowturbo tune state"
                raise FlowTurboError(f"--resume: {self.state_path} is {what}; run without --resume")
            differing = settings_difference(state["settings"], settings)
            if differing:
                raise FlowTurboError("--resume: the interrupted tune used other settings: " + "; ".join(differing)
                                     + "; run with the same settings, or without --resume to start over")
        self.state = state or {"format": STATE_FORMAT, "settings": settings, "costs": None, "scores": {}}

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """The whole tune; returns the report (on rank 0; other ranks get None-filled parts)."""
        c, started = self.config, time.perf_counter()
        warning = check_metric_samples(c.num_samples, c.metric, allow_small_sample=c.allow_small_sample,
                                       feature_dim=getattr(self.extractor, "dim", None))
        if warning:
            self.log(f"flowturbo tune: {warning}")
        self.ranks.run_all(lambda: self._load_or_start_state(None), "reading the tune state")
        candidates, notes = c.space.candidates(cfg=c.cfg, guidance_channels=c.guidance_channels,
                                               has_refiner=self.pipe.refiner is not None, baselines=c.baselines,
                                               model_grid=self.requests.model_grid(self.pipe),
                                               rule=self.requests.prompts is None)
        for note in notes:
            self.log(f"flowturbo tune: warning: {note}")
        if not candidates:
            raise FlowTurboError("the search space holds no valid schedule"
                                 + (" (" + "; ".join(notes) + ")" if notes else "")
                                 + "; widen --heun / --pseudo / --euler or give --vnorm-c")
        t0 = time.perf_counter()
        costs = self._call_costs()
        self.timings["measure_costs_s"] = time.perf_counter() - t0
        searched, priced = self._within_budget(candidates, costs)
        self.reference = self.ranks.run_all(lambda: self._reference() if self.ranks.is_main else None,
                                            "computing the reference statistics")
        rungs = c.rung_sizes()
        alive = searched
        scores: dict[str, dict[str, Any]] = self.state["scores"]  # id -> {str(n): Scored json}
        history = []
        for r, n in enumerate(rungs):
            final = r == len(rungs) - 1
            todo = alive + ([cand for cand in candidates if cand.baseline and cand not in alive] if final else [])
            bar = tqdm(todo, desc=f"rung {r + 1}/{len(rungs)}: {n} images", unit="cand", disable=not self.progress,
                       leave=False)
            for cand in bar:
                entry = scores.setdefault(cand.id, {}) if self.ranks.is_main else {}
                done = self.ranks.broadcast(str(n) in entry, "sharing the tune state")
                if not done:
                    scored = self._score(cand, n)
                    if self.ranks.is_main:
                        entry[str(n)] = scored.to_json()
                        self._save_state()
                        crash_point("tune:scored")
                if self.ranks.is_main:
                    bar.set_postfix_str(f"{cand.name} {c.metric} {entry[str(n)]['score']:.3f}")
            history.append({"num_samples": n, "candidates": [cand.name for cand in todo]})
            if not final:
                alive = self.ranks.broadcast(self._survivors(alive, n, costs) if self.ranks.is_main else None,
                                             "sharing the survivors")
        self.timings["search_s"] = time.perf_counter() - t0 - self.timings["measure_costs_s"]
        report = self.ranks.run_all(
            lambda: self._report(candidates, priced, scores, rungs, costs, history) if self.ranks.is_main else None,
            "choosing the front")
        report = self.ranks.broadcast(report, "sharing the front")
        t1 = time.perf_counter()

        def measure_latencies() -> None:  # rank 0 alone (the others wait in run_all's collective)
            if self.ranks.is_main:
                with torch_threads(self._measuring_threads()):
                    self._measure_latencies(report, candidates)
                apply_measured_budget(report)  # warnings in report["latency_check"] (the CLI prints them)

        self.ranks.run_all(measure_latencies, "measuring the front's latency")
        self.timings["latency_s"] = time.perf_counter() - t1
        self.timings["total_s"] = time.perf_counter() - started
        if self.ranks.is_main:
            report["timings"] = dict(self.timings, evaluations=self.evaluations, images_generated=self.images_generated)
        return report

    def _measuring_threads(self) -> int | None:
        """CPU threads for timing (None: leave torch's count as it is); see the class docstring."""
        if self.pipe.device.type != "cpu":
            return None
        if self.measure_threads is not None:
            return self.measure_threads
        return single_process_threads() if self.ranks.distributed else None

    def _call_costs(self) -> CallCosts:
        """Rank 0's call costs on every rank: rank 0 measures (or reads them from the resumed state) alone, with
        a single process's threads, while the others wait; then they are broadcast."""
        c = self.config

        def measure() -> CallCosts | None:
            if not self.ranks.is_main:
                return None
            if self.state.get("costs"):
                return CallCosts(**self.state["costs"])
            with torch_threads(self._measuring_threads()):
                return measure_call_costs(self.pipe, c.latency_batch, c.cfg, c.guidance_channels, self.requests)

        costs = self.ranks.run_all(measure, "measuring the call costs")
        costs = self.ranks.broadcast(costs, "sharing the call costs")
        self.state["costs"] = dataclasses.asdict(costs)
        return costs

    def _reference(self) -> Any:
        from flowturbo.training.evaluation import fashion_mnist_reference, load_reference_npz

        if self.config.metric == "fine-grid":
            return None  # the fine solution is each image's own reference
        if self.config.reference:
            if Path(self.config.reference).is_dir():
                size = self.pipe.family.image_size(self.latent_shape)
                return folder_reference(self.config.reference, self.extractor, size, progress=self.progress)
            return load_reference_npz(self.config.reference)
        if self.requests.prompts is not None:
            raise FlowTurboError(f"--metric {self.config.metric} on a text-to-image model needs --reference: a "
                                 "folder of reference images or a statistics .npz (Fashion-MNIST says nothing "
                                 "about these images); or use --metric fine-grid")
        return fashion_mnist_reference(self.extractor, num_samples=self.config.num_reference, progress=False)

    def _price(self, cand: Candidate, costs: CallCosts, scored: dict[str, Any] | None = None) -> float | None:
        if cand.schedule is not None:
            s = cand.schedule
            return costs.price(s.predictor_calls, s.refiner_calls, s.num_steps)
        if scored is None:
            return None
        return costs.price(scored["predictor_calls"], scored["refiner_calls"], scored["steps"])

    def _cost(self, cand: Candidate, costs: CallCosts, scored: dict[str, Any] | None = None) -> float | None:
        """The budget's unit: ms per image (--budget-ms) or predictor-call equivalents (--budget-calls)."""
        if self.config.budget_calls is None:
            return self._price(cand, costs, scored)
        if cand.schedule is not None:
            return costs.calls_equivalent(cand.schedule.predictor_calls, cand.schedule.refiner_calls)
        if scored is None:
            return None
        return costs.calls_equivalent(scored["predictor_calls"], scored["refiner_calls"])

    @property
    def budget(self) -> float:
        c = self.config
        return float(c.budget_calls if c.budget_calls is not None else c.budget_ms)

    def _unit(self) -> str:
        return "predictor-call equivalents" if self.config.budget_calls is not None else "ms/image"

    def _floor_cost(self, cand: Candidate, costs: CallCosts) -> float:
        """The least a candidate can cost: a fixed schedule's exact cost; the velocity-norm rule's with its fewest
        possible steps (``ceil(1/dt_max)``, one call each plus the first)."""
        if cand.schedule is not None:
            return float(self._cost(cand, costs))
        steps = VNORM_MIN_STEPS
        if self.config.budget_calls is not None:
            return costs.calls_equivalent(steps + 1, 0)
        return costs.price(steps + 1, 0, steps)

    def _within_budget(self, candidates: list[Candidate], costs: CallCosts) -> tuple[list[Candidate], dict[str, float]]:
        priced = {cand.id: self._cost(cand, costs) for cand in candidates if cand.schedule is not None}
        searchable = [cand for cand in candidates if not cand.baseline]
        floors = {cand.id: self._floor_cost(cand, costs) for cand in searchable}
        if searchable and not any(floors[cand.id] <= self.budget for cand in searchable):
            cheapest = min(searchable, key=lambda cand: (floors[cand.id], cand.schedule is None))
            if cheapest.schedule is not None:
                what = (f"{floors[cheapest.id]:.2f} {self._unit()} ({cheapest.schedule.predictor_calls} predictor + "
                        f"{cheapest.schedule.refiner_calls} refiner calls on {costs.device})")
            else:
                what = (f"{floors[cheapest.id]:.2f} {self._unit()} or more (the rule takes at least "
                        f"{VNORM_MIN_STEPS} steps, {VNORM_MIN_STEPS + 1} predictor calls, as dt <= {VNORM_DT_MAX}, on "
                        f"{costs.device})")
            raise FlowTurboError(
                f"the budget of {self.budget:g} {self._unit()} is below the cheapest candidate, {cheapest.name} at "
                f"{what}; raise the budget, or add cheaper candidates (fewer steps: --heun, --pseudo, --euler)")
        searched = [cand for cand in searchable if floors[cand.id] <= self.budget]
        return searched, priced

    def _survivors(self, alive: list[Candidate], n: int, costs: CallCosts) -> list[Candidate]:
        scores = self.state["scores"]
        points = []
        for cand in alive:
            scored = scores[cand.id][str(n)]
            cost = self._cost(cand, costs, scored)
            points.append((cand.id, cost, scored["score"]))
        keep = max(1, math.ceil(len(alive) / self.config.eta))
        chosen = set(nondominated_order(points)[:keep])
        by_id = {cand.id: cand for cand in alive}
        for family in FAMILIES:  # each family's best goes on, so the families can be compared at the end
            members = [p for p in points if by_id[p[0]].family == family]
            if members:
                chosen.add(min(members, key=lambda p: p[2])[0])
        return [cand for cand in alive if cand.id in chosen]

    # -------------------------------------------------------------------------------------- report
    def _report(self, candidates: list[Candidate], priced: dict[str, float], scores: dict[str, Any],
                rungs: list[int], costs: CallCosts, history: list[dict[str, Any]]) -> dict[str, Any]:
        c, final = self.config, str(rungs[-1])
        rows = []
        for cand in candidates:
            entry = scores.get(cand.id, {})
            last = max(entry, key=int) if entry else None
            scored = entry.get(last) if last else None
            rows.append({
                "name": cand.name, "id": cand.id, "family": cand.family, "baseline": cand.baseline,
                "schedule": cand.schedule.describe() if cand.schedule is not None else None,
                "rule": None if cand.c is None else {"name": "velocity-norm", "c": cand.c, "dt_min": VNORM_DT_MIN,
                                                      "dt_max": VNORM_DT_MAX},
                "flags": cand.flags(self.pipe.refiner_dt),
                "price_ms_per_image": self._price(cand, costs, scored),
                "cost": self._cost(cand, costs, scored),
                "within_budget": None if self._cost(cand, costs, scored) is None
                else self._cost(cand, costs, scored) <= self.budget,
                "searched": scored is not None,
                "num_samples": None if scored is None else scored["num_samples"],
                "score": None if scored is None else scored["score"],
                "class_accuracy": None if scored is None else scored["class_accuracy"],
                "predictor_calls": (cand.schedule.predictor_calls if cand.schedule is not None else
                                    (None if scored is None else scored["predictor_calls"])),
                "refiner_calls": (cand.schedule.refiner_calls if cand.schedule is not None else
                                  (None if scored is None else scored["refiner_calls"])),
                "scores": {k: v["score"] for k, v in sorted(entry.items(), key=lambda kv: int(kv[0]))},
            })
        finals = [r for r in rows if r["num_samples"] == int(final)]
        front = pareto_front([(r["name"], r["cost"], r["score"]) for r in finals])
        for r in rows:
            r["on_front"] = r["name"] in front
        family_fronts = {}
        for family in FAMILIES:
            members = [(r["name"], r["cost"], r["score"]) for r in finals if r["family"] == family]
            if members:
                family_fronts[family] = pareto_front(members)
        eligible = [r for r in finals if r["within_budget"]]
        if not eligible:  # e.g. only velocity-norm candidates, which took more calls than their fewest
            scored = [r for r in rows if r["cost"] is not None and r["score"] is not None]
            cheapest = min(scored, key=lambda r: r["cost"]) if scored else None
            raise FlowTurboError(
                f"no candidate fits the budget of {self.budget:g} {self._unit()}"
                + (f": the cheapest scored, {cheapest['name']}, costs {cheapest['cost']:.2f} {self._unit()} "
                   f"({cheapest['predictor_calls']:.3g} predictor + {cheapest['refiner_calls']:.3g} refiner calls "
                   f"on {costs.device})" if cheapest else "")
                + "; raise the budget, or add cheaper candidates (fixed schedules with fewer steps: --heun, --pseudo, "
                "--euler; larger --vnorm-c values take longer, fewer steps)")
        recommended = min(eligible, key=lambda r: (r["score"], r["cost"]))
        fixed = [r for r in eligible if r["schedule"] is not None]
        best_fixed = min(fixed, key=lambda r: (r["score"], r["cost"])) if fixed else None
        return {
            "format": TUNE_FORMAT, "flowturbo_version": __version__, "settings": self.settings(),
            "budget": {"value": self.budget, "unit": self._unit()},
            "costs": dataclasses.asdict(costs), "rungs": rungs, "history": history,
            "refiner_dt": None if self.pipe.refiner_dt is None else self.pipe.refiner_dt.to_dict(),
            "metric": c.metric, "num_candidates": len(candidates), "candidates": rows, "front": front,
            "family_fronts": family_fronts,
            "recommended": recommended["name"],
            "recommended_fixed": None if best_fixed is None else best_fixed["name"],
            "device": c.device, "host": platform.node(), "torch_version": torch.__version__,
            "cpu_count": os.cpu_count(), "world_size": self.ranks.world_size,
        }

    @torch.inference_mode()
    def _measure_latencies(self, report: dict[str, Any], candidates: list[Candidate]) -> None:
        """Real ms/image (sample + decode at ``latency_batch``) of the front, the recommendation, the baselines
        and each family's front."""
        by_name = {cand.name: cand for cand in candidates}
        names = set(report["front"]) | {n for f in report["family_fronts"].values() for n in f}
        names |= {r["name"] for r in report["candidates"] if r["baseline"] and r["score"] is not None}
        names |= {n for n in (report["recommended"], report["recommended_fixed"]) if n}
        pipe, c = self.pipe, self.config
        noise = self._noise(0, c.latency_batch)
        labels = torch.as_tensor(self.requests.for_images(pipe, 0, c.latency_batch), device=pipe.device) \
            if self.requests.prompts is None else None
        use_graph = pipe.device.type == "cuda" if self.cuda_graph is None else bool(self.cuda_graph)
        sampler = None
        if use_graph:  # the path `flowturbo sample` runs by default on CUDA: schedule + decode in one CUDA graph
            from flowturbo.runtime.sampler import Sampler

            sampler = Sampler(pipe, cuda_graph=True, graph_backend=self.graph_backend, graph_batch=c.latency_batch)
        measured, paths = {}, {}
        for name in tqdm(sorted(names), desc="latency of the front", disable=not self.progress, leave=False):
            cand = by_name[name]
            if sampler is not None and cand.schedule is not None:
                measured[name], paths[name] = self._graph_latency(sampler, cand.schedule)
                continue
            paths[name] = "eager"

            def run(cand: Candidate = cand) -> None:
                if cand.schedule is not None:
                    out = self._run(cand.schedule, noise, 0, c.latency_batch, check_finite=False)
                else:
                    out = sample_velocity_norm_rule(noise, labels, pipe.predictor, num_classes=pipe.num_classes,
                                                    c=float(cand.c), dt_min=VNORM_DT_MIN, dt_max=VNORM_DT_MAX,
                                                    guidance_scale=c.cfg, guidance_channels=c.guidance_channels)
                pipe.family.decode(out.latents)

            measured[name] = _median_ms(run, pipe.device, c.latency_repeats, 1) / c.latency_batch
        for r in report["candidates"]:
            r["measured_ms_per_image"] = measured.get(r["name"])
            r["measured_path"] = paths.get(r["name"])

    def _graph_latency(self, sampler: Any, schedule: SamplingSchedule) -> tuple[float, str]:
        """ms/image of ``schedule`` through the sampler's CUDA-graph path (capture excluded, median of
        ``latency_repeats`` replays after the capturing run), and the path that actually ran."""
        c = self.config
        requests = self.requests.sample_kwargs(self.pipe, 0, c.latency_batch)

        def once() -> float:
            out = sampler.sample(**requests, schedule=schedule, seed=c.seed, batch_size=c.latency_batch,
                                 progress=False)
            return 1000 * out.times.total_s / c.latency_batch

        once()  # captures (or falls back to eager, with the sampler's one-line warning)
        ms = statistics.median(once() for _ in range(max(1, c.latency_repeats)))
        path = "cuda-graph" if sampler.graphs.fallback_reason is None else "eager (CUDA graph capture failed)"
        sampler.graphs.clear()  # one schedule's static buffers at a time
        return ms, path


__all__ = [
    "CallCosts",
    "Candidate",
    "Grid",
    "SearchSpace",
    "TuneConfig",
    "Tuner",
    "apply_measured_budget",
    "check_metric_samples",
    "measure_call_costs",
    "nondominated_order",
    "pareto_front",
    "settings_difference",
    "single_process_threads",
    "weights_digest",
]
