"""``flowturbo tune``: which schedule should I run for this model and this latency budget?

The search (:class:`Tuner`), in order:

1. **Candidates** (:class:`SearchSpace`): step strings ``H{a}P{b}R{c}`` in the paper's order (Heun-only and
   FlowTurbo), Euler ``E{n}``, optionally every valid general string up to a few steps, each on every time
   grid of a small family (:class:`Grid`: uniform, a power warp ``t = u^g``, a shift ``t = s u / (1 + (s-1) u)``),
   plus the seed report's velocity-norm rule ``dt = C/||f||`` for a few C. R steps longer than the refiner's
   training range (``dt <= 0.12``) are allowed and flagged. A model without a refiner drops R (said once).
2. **Prices** (:class:`CallCosts`): the per-call cost of the predictor (CFG batch), the refiner, the decode
   and the solver update of one step, measured once on the chosen device at ``latency_batch`` images; a
   candidate's price is ``(P c_pred + R c_ref + N c_step + c_decode) / batch`` from its exact call counts
   (the velocity-norm rule: from the calls it made). Candidates above the budget are not searched.
3. **Successive halving**: every candidate is scored on the first ``n_0`` images, the best ``1/eta`` (by
   non-dominated sorting on (price, FID), so the whole front survives, plus each family's best) go on to
   ``eta`` times more images, up to ``num_samples``. All candidates see identical noise (image i from seed
   ``seed + i``) and classes (``i mod K``), so their FIDs are paired. ``search="exhaustive"`` scores every
   candidate on ``num_samples`` (for comparison).
4. **Front**: the Pareto front (price vs FID) of the candidates scored on ``num_samples``; its members' real
   latency is measured at the end (both shown); the recommendation is the lowest FID whose price fits the
   budget.

Per-image features (and class predictions, and the rule's calls) are cached per candidate id (the schedule
id, or a hash of the rule's settings) under the cache folder, keyed by everything they depend on; a killed
tune continues with ``resume=True`` from its state file (settings must match: the differing fields are named).
Under torchrun the images of every candidate are split over the processes, features gathered on rank 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from flowturbo import __version__
from flowturbo.errors import FlowTurboError
from flowturbo.fileio import atomic_write_bytes, atomic_write_json, crash_point
from flowturbo.noise import make_noise
from flowturbo.runtime.distributed import Ranks
from flowturbo.runtime.pytorch_backend import TorchPipeline
from flowturbo.schedule import SamplingSchedule, StepKind, parse_steps
from flowturbo.training.sampling import (
    CFGModelCalls,
    sample_schedule,
    sample_velocity_norm_rule,
    solver_ops_for,
)

TUNE_FORMAT = "flowturbo.tune/1"
STATE_FORMAT = "flowturbo.tune-state/1"
REFINER_TRAINING_DT = 0.12  # the refiner is trained on dt ~ U(0, 0.12] (DESIGN.md §2): longer R steps are flagged
VNORM_DT_MIN, VNORM_DT_MAX = 0.02, 0.25  # the rule's clip (as bench/quality_study.py)
FAMILIES = ("flowturbo", "heun", "euler", "general", "velocity-norm")


# ----------------------------------------------------------------------------------------------- grids
@dataclasses.dataclass(frozen=True)
class Grid:
    """A time grid family member: ``uniform``, ``power:g`` (``t_k = (k/N)^g``; g > 1 puts more steps near the
    noise end t = 0) or ``shift:s`` (``t_k = s u / (1 + (s - 1) u)``, u = k/N; s > 1 puts more near t = 1)."""

    kind: str
    value: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "Grid":
        text = text.strip().lower()
        if text == "uniform":
            return cls("uniform")
        kind, _, value = text.partition(":")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if kind not in ("power", "shift") or not (math.isfinite(number) and number > 0):
            raise FlowTurboError(f"unknown grid {text!r}; use uniform, power:G or shift:S with a number > 0 "
                                 "(e.g. power:1.5, shift:2)")
        return cls(kind, number)

    @property
    def name(self) -> str:
        return "uniform" if self.kind == "uniform" else f"{self.kind}:{self.value:g}"

    def timesteps(self, num_steps: int) -> tuple[float, ...]:
        """``0 = t_0 < ... < t_N = 1`` exactly (both ends are exact in float64)."""
        u = [k / num_steps for k in range(num_steps + 1)]
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

    @property
    def flags(self) -> list[str]:
        """Warnings that do not exclude the candidate (R steps beyond the refiner's training range)."""
        if self.schedule is None:
            return []
        grid = self.schedule.timesteps
        longest = max((grid[k + 1] - grid[k] for k, kind in enumerate(self.schedule.steps) if kind is StepKind.REFINER),
                      default=0.0)
        if longest > REFINER_TRAINING_DT + 1e-12:
            return [f"R step of dt {longest:.3f} > {REFINER_TRAINING_DT} (the refiner's training range)"]
        return []


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
                   baselines: Sequence[str] = ()) -> tuple[list[Candidate], list[str]]:
        """Every valid candidate (schedules on every grid, the rule's Cs, baselines) and notes for the user."""
        notes: list[str] = []
        strings = self.step_strings()
        if not has_refiner and any("R" in s for s in strings):
            notes.append("this model has no refiner: R steps are left out, tuning without R")
            strings = [s for s in strings if "R" not in s]
        out: dict[str, Candidate] = {}
        for text in strings:
            try:
                steps = parse_steps(text)
                base = SamplingSchedule(steps, tuple(Grid("uniform").timesteps(len(steps))), cfg, guidance_channels)
            except FlowTurboError:  # e.g. R first or after E: not a valid schedule
                continue
            for grid_name in self.grids:
                grid = Grid.parse(grid_name)
                schedule = dataclasses.replace(base, timesteps=grid.timesteps(len(steps)))
                cand = Candidate(f"{base.notation}@{grid.name}", _family(steps), schedule)
                out.setdefault(cand.id, cand)
        for c in self.vnorm_c:
            cand = Candidate(f"vnorm-C{c:g}", "velocity-norm", c=c)
            out.setdefault(cand.id, cand)
        for spec in baselines:
            name, _, grid_name = spec.partition("@")
            schedule = SamplingSchedule.parse(name, guidance_scale=cfg, guidance_channels=guidance_channels)
            if schedule.uses_refiner and not has_refiner:
                raise FlowTurboError(f"baseline {spec} has R steps but this model has no refiner")
            grid = Grid.parse(grid_name or "uniform")
            schedule = dataclasses.replace(schedule, timesteps=grid.timesteps(schedule.num_steps))
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


@torch.inference_mode()
def measure_call_costs(pipe: TorchPipeline, batch: int, cfg: float, guidance_channels: int | None, *,
                       repeats: int = 7, warmup: int = 2) -> CallCosts:
    """Time one predictor call, one refiner call, one decode and one step's solver update at ``batch`` images."""
    noise = make_noise(batch, pipe.latent_shape, 0, dtype=pipe.state_dtype, device=pipe.device)  # (B, C, H, W)
    labels = (torch.arange(batch) % pipe.num_classes).to(pipe.device)
    guided = cfg != 1.0
    calls = CFGModelCalls(pipe.predictor, pipe.refiner, labels, pipe.num_classes, guided)
    schedule = SamplingSchedule.parse("H1P1R1" if pipe.refiner is not None else "H2", guidance_scale=cfg,
                                      guidance_channels=guidance_channels)
    ops = solver_ops_for(schedule, noise.shape[1], pipe.kernel_backend)
    raw = calls.predictor(noise, 0.5)
    d, x_pred = ops.predict(raw, noise, 0.1)
    predictor_ms = _median_ms(lambda: calls.predictor(noise, 0.5), pipe.device, repeats, warmup)
    refiner_ms = None
    if pipe.refiner is not None:
        refiner_ms = _median_ms(lambda: calls.refiner(noise, 0.5, d), pipe.device, repeats, warmup)
    decode_ms = _median_ms(lambda: pipe.decoder.decode(noise), pipe.device, repeats, warmup)
    step_ms = _median_ms(lambda: (ops.predict(raw, noise, 0.1), ops.correct(raw, noise, d, 0.1)), pipe.device,
                         repeats, warmup)
    return CallCosts(batch, predictor_ms, refiner_ms, decode_ms, step_ms, str(pipe.device))


# ---------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """Everything a tune's results depend on (a resumed tune must have the same; see :meth:`settings`)."""

    model: str  # bundle folder / "embedded default" / official checkpoint description
    metric: str = "domain-fid"  # domain-fid | inception-fid
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
    fid: float
    class_accuracy: float | None
    predictor_calls: float  # the rule: the mean over its batches
    refiner_calls: float
    steps: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Names of the non-dominated ``(name, cost, fid)`` points (lower is better in both), by cost."""
    front, best = [], math.inf
    for name, cost, fid in sorted(points, key=lambda p: (p[1], p[2])):
        if fid < best:
            front.append(name)
            best = fid
    return front


def nondominated_order(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Names sorted by Pareto layer (front first), then FID within a layer."""
    left, order = list(points), []
    while left:
        layer = set(pareto_front(left))
        order += [p[0] for p in sorted((p for p in left if p[0] in layer), key=lambda p: p[2])]
        left = [p for p in left if p[0] not in layer]
    return order


class Tuner:
    """Runs one tune (see the module docstring). ``ranks`` splits the images over torchrun processes."""

    def __init__(self, config: TuneConfig, pipe: TorchPipeline, extractor: Any, *, classifier: Any = None,
                 cache_dir: Path, ranks: Ranks | None = None, progress: bool = True,
                 state_path: Path | None = None, resume: bool = False, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.pipe = pipe
        self.extractor = extractor
        self.classifier = classifier
        self.ranks = ranks or Ranks()
        self.progress = progress and self.ranks.is_main
        self.log = log if self.ranks.is_main else (lambda text: None)
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
        weights = hashlib.sha256()
        for module in (self.pipe.predictor, self.pipe.refiner, self.pipe.decoder):
            if module is None:
                continue
            for name, tensor in sorted(module.state_dict().items()):
                weights.update(name.encode())
                weights.update(tensor.detach().to("cpu", torch.float32).numpy().tobytes()[:4096])
                weights.update(str(tuple(tensor.shape)).encode())
        fields = {"weights": weights.hexdigest(), "features": self.extractor.identity(), "seed": c.seed,
                  "batch": c.batch, "cfg": c.cfg, "guidance_channels": c.guidance_channels, "device": c.device,
                  "dtype": c.dtype, "noise": "per-image seed + index (flowturbo.noise)", "classes": "i mod K"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]

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
            noise = make_noise(hi - lo, pipe.latent_shape, c.seed, dtype=pipe.state_dtype, device=pipe.device,
                               first_index=lo)
            labels = (torch.arange(lo, hi) % pipe.num_classes).to(pipe.device)
            if cand.schedule is not None:
                result = sample_schedule(cand.schedule, noise, labels, pipe.predictor, pipe.refiner,
                                         num_classes=pipe.num_classes, kernel_backend=pipe.kernel_backend)
                steps = cand.schedule.num_steps
            else:
                result = sample_velocity_norm_rule(noise, labels, pipe.predictor, num_classes=pipe.num_classes,
                                                   c=float(cand.c), dt_min=VNORM_DT_MIN, dt_max=VNORM_DT_MAX,
                                                   guidance_scale=c.cfg, guidance_channels=c.guidance_channels)
                steps = len(result.timesteps) - 1
            images = pipe.decoder.decode(result.latents).float().clamp(-1, 1)  # (b, C, H, W)
            feats.append(self.extractor.extract(images, progress=False).numpy())
            if self.classifier is not None:
                preds.append(self.classifier.predict(images).numpy())
            calls.append([result.predictor_calls, result.refiner_calls, steps, hi - lo])
            self.images_generated += hi - lo
        empty = np.zeros((0, self.extractor.dim), np.float32)
        return {"features": np.concatenate(feats) if feats else empty,
                "predicted": np.concatenate(preds) if preds else np.zeros(0, np.int64),
                "calls": np.asarray(calls, np.float64).reshape(-1, 4)}

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
        labels = np.arange(n) % self.pipe.num_classes
        predicted = data["predicted"][:n] if self.classifier is not None else None
        result = score_features(data["features"][:n], features=self.extractor, labels=labels if predicted is not None
                                else None, predicted=predicted, reference=self.reference, progress=False,
                                allow_small_sample=True)
        calls = data["calls"]
        covered = calls[np.cumsum(calls[:, 3]) <= n] if len(calls) else calls
        weights = covered[:, 3] / covered[:, 3].sum()
        self.evaluations += 1
        return Scored(n, float(result["fid"]), result.get("class_accuracy"), float(weights @ covered[:, 0]),
                      float(weights @ covered[:, 1]), float(weights @ covered[:, 2]))

    # ---------------------------------------------------------------------------------------- state
    def _save_state(self) -> None:
        if self.ranks.is_main and self.state_path is not None:
            atomic_write_json(self.state_path, self.state)

    def _load_or_start_state(self, costs: CallCosts | None) -> None:
        settings = self.config.settings()
        state = None
        if self.ranks.is_main and self.resume:
            if self.state_path is None or not self.state_path.is_file():
                raise FlowTurboError(f"--resume: there is no interrupted tune to resume ({self.state_path} does not "
                                     "exist); run without --resume")
            state = json.loads(self.state_path.read_text())
            if state.get("format") != STATE_FORMAT:
                raise FlowTurboError(f"--resume: {self.state_path} is not a flowturbo tune state; run without --resume")
            differing = settings_difference(state["settings"], settings)
            if differing:
                raise FlowTurboError("--resume: the interrupted tune used other settings: " + "; ".join(differing)
                                     + "; run with the same settings, or without --resume to start over")
        self.state = state or {"format": STATE_FORMAT, "settings": settings, "costs": None, "scores": {}}

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """The whole tune; returns the report (on rank 0; other ranks get None-filled parts)."""
        c, started = self.config, time.perf_counter()
        self.ranks.run_all(lambda: self._load_or_start_state(None), "reading the tune state")
        candidates, notes = c.space.candidates(cfg=c.cfg, guidance_channels=c.guidance_channels,
                                               has_refiner=self.pipe.refiner is not None, baselines=c.baselines)
        for note in notes:
            self.log(f"flowturbo tune: warning: {note}")
        if not candidates:
            raise FlowTurboError("the search space holds no valid schedule"
                                 + (" (" + "; ".join(notes) + ")" if notes else "")
                                 + "; widen --heun / --pseudo / --euler or give --vnorm-c")
        t0 = time.perf_counter()
        costs = None
        if self.ranks.is_main:
            costs = (CallCosts(**self.state["costs"]) if self.state.get("costs") else
                     measure_call_costs(self.pipe, c.latency_batch, c.cfg, c.guidance_channels))
            self.state["costs"] = dataclasses.asdict(costs)
        costs = self.ranks.broadcast(costs, "sharing the call costs")
        self.timings["measure_costs_s"] = time.perf_counter() - t0
        searched, priced = self._within_budget(candidates, costs)
        self.reference = self._reference() if self.ranks.is_main else None
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
                    bar.set_postfix_str(f"{cand.name} FID {entry[str(n)]['fid']:.3f}")
            history.append({"num_samples": n, "candidates": [cand.name for cand in todo]})
            if not final:
                alive = self.ranks.broadcast(self._survivors(alive, n, costs) if self.ranks.is_main else None,
                                             "sharing the survivors")
        self.timings["search_s"] = time.perf_counter() - t0 - self.timings["measure_costs_s"]
        report = None
        if self.ranks.is_main:
            report = self._report(candidates, priced, scores, rungs, costs, history)
        report = self.ranks.broadcast(report, "sharing the front")
        t1 = time.perf_counter()
        if self.ranks.is_main:
            self._measure_latencies(report, candidates)
        self.ranks.barrier_all()
        self.timings["latency_s"] = time.perf_counter() - t1
        self.timings["total_s"] = time.perf_counter() - started
        if self.ranks.is_main:
            report["timings"] = dict(self.timings, evaluations=self.evaluations, images_generated=self.images_generated)
        return report

    def _reference(self) -> Any:
        from flowturbo.training.evaluation import fashion_mnist_reference, load_reference_npz

        if self.config.reference:
            return load_reference_npz(self.config.reference)
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

    def _within_budget(self, candidates: list[Candidate], costs: CallCosts) -> tuple[list[Candidate], dict[str, float]]:
        priced = {cand.id: self._cost(cand, costs) for cand in candidates if cand.schedule is not None}
        fixed = [cand for cand in candidates if cand.schedule is not None and not cand.baseline]
        if fixed and not any(priced[cand.id] <= self.budget for cand in fixed):
            cheapest = min(fixed, key=lambda cand: priced[cand.id])
            raise FlowTurboError(
                f"the budget of {self.budget:g} {self._unit()} is below the cheapest candidate, {cheapest.name} at "
                f"{priced[cheapest.id]:.2f} {self._unit()} ({cheapest.schedule.predictor_calls} predictor + "
                f"{cheapest.schedule.refiner_calls} refiner calls on {costs.device}); raise the budget, or add cheaper "
                "candidates (fewer steps: --heun, --pseudo, --euler)")
        searched = [cand for cand in candidates if not cand.baseline
                    and (cand.schedule is None or priced[cand.id] <= self.budget)]
        return searched, priced

    def _survivors(self, alive: list[Candidate], n: int, costs: CallCosts) -> list[Candidate]:
        scores = self.state["scores"]
        points = []
        for cand in alive:
            scored = scores[cand.id][str(n)]
            cost = self._cost(cand, costs, scored)
            points.append((cand.id, cost, scored["fid"]))
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
                "flags": cand.flags,
                "price_ms_per_image": self._price(cand, costs, scored),
                "cost": self._cost(cand, costs, scored),
                "within_budget": None if self._cost(cand, costs, scored) is None
                else self._cost(cand, costs, scored) <= self.budget,
                "searched": scored is not None,
                "num_samples": None if scored is None else scored["num_samples"],
                "fid": None if scored is None else scored["fid"],
                "class_accuracy": None if scored is None else scored["class_accuracy"],
                "predictor_calls": (cand.schedule.predictor_calls if cand.schedule is not None else
                                    (None if scored is None else scored["predictor_calls"])),
                "refiner_calls": (cand.schedule.refiner_calls if cand.schedule is not None else
                                  (None if scored is None else scored["refiner_calls"])),
                "fids": {k: v["fid"] for k, v in sorted(entry.items(), key=lambda kv: int(kv[0]))},
            })
        finals = [r for r in rows if r["num_samples"] == int(final)]
        front = pareto_front([(r["name"], r["cost"], r["fid"]) for r in finals])
        for r in rows:
            r["on_front"] = r["name"] in front
        family_fronts = {}
        for family in FAMILIES:
            members = [(r["name"], r["cost"], r["fid"]) for r in finals if r["family"] == family]
            if members:
                family_fronts[family] = pareto_front(members)
        eligible = [r for r in finals if r["within_budget"]]
        recommended = min(eligible, key=lambda r: (r["fid"], r["cost"])) if eligible else None
        fixed = [r for r in eligible if r["schedule"] is not None]
        best_fixed = min(fixed, key=lambda r: (r["fid"], r["cost"])) if fixed else None
        return {
            "format": TUNE_FORMAT, "flowturbo_version": __version__, "settings": c.settings(),
            "budget": {"value": self.budget, "unit": self._unit()},
            "costs": dataclasses.asdict(costs), "rungs": rungs, "history": history,
            "metric": c.metric, "num_candidates": len(candidates), "candidates": rows, "front": front,
            "family_fronts": family_fronts,
            "recommended": None if recommended is None else recommended["name"],
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
        names |= {r["name"] for r in report["candidates"] if r["baseline"] and r["fid"] is not None}
        names |= {n for n in (report["recommended"], report["recommended_fixed"]) if n}
        pipe, c = self.pipe, self.config
        noise = make_noise(c.latency_batch, pipe.latent_shape, c.seed, dtype=pipe.state_dtype, device=pipe.device)
        labels = (torch.arange(c.latency_batch) % pipe.num_classes).to(pipe.device)
        measured = {}
        for name in tqdm(sorted(names), desc="latency of the front", disable=not self.progress, leave=False):
            cand = by_name[name]

            def run(cand: Candidate = cand) -> None:
                if cand.schedule is not None:
                    out = sample_schedule(cand.schedule, noise, labels, pipe.predictor, pipe.refiner,
                                          num_classes=pipe.num_classes, kernel_backend=pipe.kernel_backend,
                                          check_finite=False)
                else:
                    out = sample_velocity_norm_rule(noise, labels, pipe.predictor, num_classes=pipe.num_classes,
                                                    c=float(cand.c), dt_min=VNORM_DT_MIN, dt_max=VNORM_DT_MAX,
                                                    guidance_scale=c.cfg, guidance_channels=c.guidance_channels)
                pipe.decoder.decode(out.latents)

            measured[name] = _median_ms(run, pipe.device, c.latency_repeats, 1) / c.latency_batch
        for r in report["candidates"]:
            r["measured_ms_per_image"] = measured.get(r["name"])


__all__ = [
    "CallCosts",
    "Candidate",
    "Grid",
    "SearchSpace",
    "TuneConfig",
    "Tuner",
    "measure_call_costs",
    "nondominated_order",
    "pareto_front",
    "settings_difference",
]
