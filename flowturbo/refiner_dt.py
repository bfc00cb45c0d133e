"""The step sizes a velocity refiner is trained on, and the refiner calls of a schedule that lie beyond them.

A refiner corrects a carried velocity of a given *age* ``dt`` (:mod:`flowturbo.integrator`, *The refiner's dt*;
``docs/refiner_dt.md``): training draws ``x' = x_t + dt v_t`` and asks for the teacher's velocity at ``t + dt``.
:class:`DtDistribution` is how ``flowturbo train refiner`` draws dt; it is recorded with the weights (the refiner
file's metadata and the bundle's ``config.json`` under :data:`REFINER_DT_KEY`, an export's manifest), and its
``max_dt`` is the *trained range*. A schedule whose refiner calls need a larger dt asks the refiner to
extrapolate: ``flowturbo tune`` flags such candidates and sampling warns once (:class:`RangeWarnings`), never
silently. A refiner without a record (an official FlowTurbo refiner, a bundle written before the record existed)
is taken to have the paper's range, ``dt <= 0.12`` (App. C), and the messages say it was assumed.

Torch-free: every layer (training, export, runtime) reads the same record with the same rule.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from flowturbo.errors import FlowTurboError, FlowTurboWarning
from flowturbo.integrator import RefinerCall, refiner_call_plan
from flowturbo.schedule import SamplingSchedule

PAPER_MAX_DT = 0.12  # FlowTurbo App. C: dt ~ U(0, 0.12] (the official refiners; the assumed range without a record)
REFINER_DT_KEY = "refiner_dt"  # bundle config.json / refiner file metadata / manifest "model" entry
RANGE_SLACK = 1e-9  # grid differences carry float noise: 0.5 - 0.25 vs a recorded 0.25 is inside


class RefinerRangeWarning(FlowTurboWarning):
    """A schedule asks the refiner for steps longer than it was trained on (one ``warning:`` line)."""


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


@dataclasses.dataclass(frozen=True)
class DtDistribution:
    """How training draws the velocity age dt: exactly 0 with probability ``zero_share``, ``U(0, small_max]``
    with probability ``small_share``, else ``U(0, max_dt]``. ``max_dt`` is the trained range.

    The share at small dt keeps the short steps (the first R call after an H/P step has dt = 0, the second the
    step size) well trained when ``max_dt`` is long; the paper's recipe is ``U(0, 0.12]`` alone.
    """

    max_dt: float = PAPER_MAX_DT
    small_share: float = 0.0
    small_max: float = 0.05
    zero_share: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_dt", "small_share", "small_max", "zero_share"):
            if not _number(getattr(self, name)):
                raise FlowTurboError(f"dt distribution: {name} must be a finite number, got {getattr(self, name)!r}")
            object.__setattr__(self, name, float(getattr(self, name)))
        if not 0.0 < self.max_dt <= 1.0:
            raise FlowTurboError(f"dt distribution: max_dt (--max-dt) must be in (0, 1], got {self.max_dt}")
        if not 0.0 < self.small_max or (self.small_share > 0 and self.small_max > self.max_dt):
            raise FlowTurboError(f"dt distribution: small_max (--dt-small-max) must be in (0, max_dt = {self.max_dt}], "
                                 f"got {self.small_max}")
        for name in ("small_share", "zero_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FlowTurboError(f"dt distribution: {name} must be in [0, 1], got {getattr(self, name)}")
        if self.small_share + self.zero_share > 1.0:
            raise FlowTurboError(f"dt distribution: small_share + zero_share must be <= 1, got "
                                 f"{self.small_share} + {self.zero_share}")

    def describe(self) -> str:
        """``'dt ~ 0 (p 0.05) | U(0, 0.1] (p 0.3) | U(0, 0.5]'``."""
        parts = []
        if self.zero_share:
            parts.append(f"0 (p {self.zero_share:g})")
        if self.small_share:
            parts.append(f"U(0, {self.small_max:g}] (p {self.small_share:g})")
        parts.append(f"U(0, {self.max_dt:g}]")
        return "dt ~ " + " | ".join(parts)

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DtDistribution":
        if not isinstance(data, Mapping):
            raise FlowTurboError(f"a refiner dt record must be an object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise FlowTurboError(f"unknown keys {unknown} in a refiner dt record; valid keys: {sorted(names)}")
        if "max_dt" not in data:
            raise FlowTurboError("a refiner dt record needs max_dt (the longest step size it was trained on)")
        return cls(**dict(data))


def read_dt_record(data: Any) -> DtDistribution | None:
    """The :class:`DtDistribution` of a JSON record (None stays None: no record)."""
    return None if data is None else DtDistribution.from_dict(data)


def trained_range(trained: DtDistribution | None) -> tuple[float, str]:
    """``(max_dt, how it is known)``: the recorded range, or the paper's when there is no record."""
    if trained is None:
        return PAPER_MAX_DT, f"the paper's dt <= {PAPER_MAX_DT:g} (assumed: the refiner records no trained range)"
    return trained.max_dt, f"its trained range dt <= {trained.max_dt:g}"


def calls_beyond_range(schedule: SamplingSchedule, trained: DtDistribution | None,
                       timesteps: Sequence[float] | None = None) -> tuple[RefinerCall, ...]:
    """The refiner calls of ``schedule`` (on its grid or ``timesteps``) whose dt exceeds the trained range."""
    if not schedule.uses_refiner:
        return ()
    limit, _ = trained_range(trained)
    return tuple(c for c in refiner_call_plan(schedule, timesteps) if c.dt > limit + RANGE_SLACK)


@dataclasses.dataclass(frozen=True)
class RangeExcess:
    """How a schedule goes beyond a refiner's trained range: the R steps (1-based), the largest dt asked for, and
    the range in words (:func:`trained_range`)."""

    steps: tuple[int, ...]
    longest: float
    known: str


def range_excess(schedule: SamplingSchedule, trained: DtDistribution | None,
                 timesteps: Sequence[float] | None = None) -> RangeExcess | None:
    """The R steps of ``schedule`` whose refiner calls exceed the trained range (None: every call is inside)."""
    beyond = calls_beyond_range(schedule, trained, timesteps)
    if not beyond:
        return None
    return RangeExcess(tuple(sorted({c.step + 1 for c in beyond})), max(c.dt for c in beyond), trained_range(trained)[1])


def beyond_range_message(schedule: SamplingSchedule, trained: DtDistribution | None,
                         timesteps: Sequence[float] | None = None) -> str | None:
    """One sentence naming the R steps of ``schedule`` beyond the refiner's trained range and the fix; None when
    every refiner call is inside it."""
    excess = range_excess(schedule, trained, timesteps)
    if excess is None:
        return None
    return (f"schedule {schedule.notation} asks the refiner for dt up to {excess.longest:.3g} in R step(s) "
            f"{', '.join(map(str, excess.steps))}, beyond {excess.known}: those steps extrapolate and may give worse "
            "images; use shorter R steps (more steps, or another grid) or a refiner trained on longer steps "
            "(`flowturbo train refiner --max-dt ...`)")


class RangeWarnings:
    """One :class:`RefinerRangeWarning` per schedule (and grid) a sampler runs beyond its refiner's trained range: the
    first request says it, later requests with the same schedule stay quiet (as a remembered CUDA-graph fallback)."""

    def __init__(self) -> None:
        self._checked: set[tuple[str, tuple[float, ...] | None]] = set()

    def check(self, schedule: SamplingSchedule, trained: DtDistribution | None,
              timesteps: Sequence[float] | None = None) -> None:
        """Warn if ``schedule`` (on its grid or ``timesteps``) goes beyond ``trained`` and was not checked before."""
        key = (schedule.id, None if timesteps is None else tuple(float(t) for t in timesteps))
        if key in self._checked:
            return
        self._checked.add(key)
        message = beyond_range_message(schedule, trained, timesteps)
        if message is not None:
            warnings.warn(message, RefinerRangeWarning, stacklevel=3)


__all__ = [
    "PAPER_MAX_DT",
    "REFINER_DT_KEY",
    "DtDistribution",
    "RangeExcess",
    "RangeWarnings",
    "RefinerRangeWarning",
    "beyond_range_message",
    "calls_beyond_range",
    "range_excess",
    "read_dt_record",
    "trained_range",
]
