"""The sampling schedule: pure data, the contract shared by every layer and mirrored in C++.

A schedule is a sequence of step kinds over a time grid ``t_0 = 0 < t_1 < ... < t_N = 1`` plus the
classifier-free-guidance settings. It never holds a "current step": samplers walk its arrays.

Step kinds (DESIGN.md §2):

* ``E`` Euler, 1 predictor call; carries no velocity.
* ``H`` Heun, 2 predictor calls; carries ``d'`` (velocity at the predicted point).
* ``P`` pseudo corrector, 1 predictor call reusing the carried ``d'`` (2 calls when nothing is carried).
* ``R`` refiner, 2 refiner calls, no predictor call; needs a carried velocity; carries ``d``.

Notation: a letter optionally followed by a count, repeated: ``H1P5R3`` == ``HPPPPPRRR``; ``E8`` is
eight Euler steps. The C++ struct ``flowturbo._C.Schedule`` parses the same notation and the same JSON
and produces the byte-identical canonical JSON and id (tests/test_schedule_cpp.py checks it).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import numbers
from collections.abc import Sequence
from typing import Any

from flowturbo.errors import ScheduleError

SCHEDULE_FORMAT = "flowturbo.schedule/1"
MAX_STEPS = 4096  # a sanity bound so 'H99999999' fails clearly instead of allocating forever

PRESETS: dict[str, str] = {
    # Paper schedules (FlowTurbo Tables 1-2) and plain baselines, as named data.
    "flowturbo-fast": "H1P5R3",
    "flowturbo-balanced": "H2P4R2",
    "flowturbo-quality": "H8P9R5",
    "heun8": "H8",
    "heun24": "H24",
    "euler50": "E50",
}


class StepKind(str, enum.Enum):
    """One step of a schedule; the value is its notation letter."""

    EULER = "E"
    HEUN = "H"
    PSEUDO = "P"
    REFINER = "R"

    @property
    def label(self) -> str:
        return {"E": "Euler", "H": "Heun", "P": "pseudo corrector", "R": "refiner"}[self.value]

    @property
    def carries_velocity(self) -> bool:
        """True when a step of this kind carries a velocity into the next step (H, P, R do; E carries none):
        the one rule deciding where an R step may stand and whether a P step costs 1 or 2 predictor calls."""
        return self is not StepKind.EULER


_LETTERS = "".join(kind.value for kind in StepKind)
_LETTER_HELP = "E (Euler), H (Heun), P (pseudo corrector), R (refiner)"


def parse_steps(spec: str) -> tuple[StepKind, ...]:
    """Parse ``H1P5R3`` / ``HHPPPPPRRR`` notation into step kinds (not validated for carries)."""
    if not isinstance(spec, str):
        raise ScheduleError(f"schedule spec must be a string like 'H1P5R3', got {type(spec).__name__}")
    text = spec.strip().upper()
    if not text:
        raise ScheduleError("empty schedule spec: write step letters with optional counts, e.g. 'H1P5R3'")
    steps: list[StepKind] = []
    pos = 0
    while pos < len(text):
        letter = text[pos]
        if letter not in _LETTERS:
            raise ScheduleError(
                f"unknown step letter {spec.strip()[pos]!r} at position {pos} of schedule {spec!r}; "
                f"use {_LETTER_HELP}, each optionally followed by a count, e.g. 'H1P5R3' or 'HPPPPPRRR'"
            )
        pos += 1
        start = pos
        while pos < len(text) and text[pos].isdigit():
            pos += 1
        count = int(text[start:pos]) if pos > start else 1
        if len(steps) + count > MAX_STEPS:
            raise ScheduleError(f"schedule {spec!r} has more than {MAX_STEPS} steps")
        steps.extend([StepKind(letter)] * count)
    if not steps:
        raise ScheduleError(f"schedule {spec!r} has zero steps; give at least one step, e.g. 'H8'")
    return tuple(steps)


def steps_to_notation(steps: Sequence[StepKind]) -> str:
    """Run-length notation of a step sequence: ``(H, P, P, R)`` -> ``'H1P2R1'``."""
    parts: list[str] = []
    i = 0
    while i < len(steps):
        j = i
        while j < len(steps) and steps[j] == steps[i]:
            j += 1
        parts.append(f"{steps[i].value}{j - i}")
        i = j
    return "".join(parts)


def uniform_timesteps(num_steps: int) -> tuple[float, ...]:
    """``t_k = k / N`` for ``k = 0..N`` in float64 (the C++ struct computes the same doubles)."""
    if num_steps < 1:
        raise ScheduleError(f"a schedule needs at least one step, got {num_steps}")
    return tuple(k / num_steps for k in range(num_steps + 1))


def is_schedule_file(spec: str | None) -> bool:
    """True when a ``--schedule`` value names a schedule JSON file rather than notation or a preset."""
    return isinstance(spec, str) and spec.strip().lower().endswith(".json")


def _validate_steps(steps: Sequence[StepKind]) -> None:
    carried = False
    for index, kind in enumerate(steps):
        if kind is StepKind.REFINER and not carried:
            previous = "it is the first step" if index == 0 else "the step before it is E (Euler), which carries none"
            raise ScheduleError(
                f"step {index + 1} is R (refiner) but no velocity is carried into it ({previous}); "
                "a refiner step corrects the velocity carried from a preceding H or P step: start with H or P, "
                "e.g. 'H1P5R3'"
            )
        carried = kind.carries_velocity


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _validate_timesteps(timesteps: Sequence[float], num_steps: int) -> tuple[float, ...]:
    if isinstance(timesteps, (str, bytes)) or not all(_is_number(t) for t in timesteps):
        raise ScheduleError("timesteps must be a sequence of numbers")
    grid = tuple(float(t) for t in timesteps)
    if len(grid) != num_steps + 1:
        raise ScheduleError(
            f"a schedule of {num_steps} steps needs {num_steps + 1} timesteps (both ends included), got {len(grid)}"
        )
    if not all(math.isfinite(t) for t in grid):
        raise ScheduleError("timesteps must be finite numbers")
    if grid[0] != 0.0 or grid[-1] != 1.0:
        raise ScheduleError(f"timesteps must start at 0 and end at 1 exactly, got {grid[0]!r} ... {grid[-1]!r}")
    for k in range(num_steps):
        if not grid[k + 1] > grid[k]:
            raise ScheduleError(
                f"timesteps must be strictly increasing: t[{k}] = {grid[k]!r} >= t[{k + 1}] = {grid[k + 1]!r}"
            )
    return grid


@dataclasses.dataclass(frozen=True)
class SamplingSchedule:
    """A fixed sampling schedule: step kinds, time grid and guidance settings.

    ``guidance_channels=None`` guides all latent channels; an integer ``c`` guides only the first ``c``
    (the official SiT/FlowTurbo checkpoints use 3 of 4). ``guidance_scale=1.0`` means no guidance.
    """

    steps: tuple[StepKind, ...]
    timesteps: tuple[float, ...]
    guidance_scale: float = 1.0
    guidance_channels: int | None = None

    def __post_init__(self) -> None:
        steps = tuple(StepKind(s) for s in self.steps)
        if not steps:
            raise ScheduleError("a schedule needs at least one step")
        if len(steps) > MAX_STEPS:
            raise ScheduleError(f"a schedule has at most {MAX_STEPS} steps, got {len(steps)}")
        _validate_steps(steps)
        grid = _validate_timesteps(self.timesteps, len(steps))
        if not _is_number(self.guidance_scale):
            raise ScheduleError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
        scale = float(self.guidance_scale)
        if not math.isfinite(scale) or scale < 0:
            raise ScheduleError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
        channels = self.guidance_channels
        if channels is not None:
            if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
                raise ScheduleError(f"guidance_channels must be a positive integer or None (all), got {channels!r}")
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "timesteps", grid)
        object.__setattr__(self, "guidance_scale", scale)

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def parse(
        cls,
        spec: str,
        *,
        guidance_scale: float = 1.0,
        guidance_channels: int | None = None,
        timesteps: Sequence[float] | None = None,
    ) -> "SamplingSchedule":
        """Build from notation (``'H1P5R3'``, ``'HPPPPPRRR'``, ``'E8'``) or a preset name (see PRESETS)."""
        text = PRESETS.get(spec.strip().lower(), spec) if isinstance(spec, str) else spec
        steps = parse_steps(text)
        grid = uniform_timesteps(len(steps)) if timesteps is None else timesteps
        return cls(steps, tuple(grid), guidance_scale, guidance_channels)

    def with_guidance(self, scale: float, channels: int | None = None) -> "SamplingSchedule":
        """The same steps and grid with other guidance settings."""
        return dataclasses.replace(self, guidance_scale=scale, guidance_channels=channels)

    # ------------------------------------------------------------------------------------- derived facts
    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def step_string(self) -> str:
        """Plain step string, e.g. ``'HPPPPPRRR'``."""
        return "".join(kind.value for kind in self.steps)

    @property
    def notation(self) -> str:
        """Run-length notation, e.g. ``'H1P5R3'``."""
        return steps_to_notation(self.steps)

    def step_calls(self) -> tuple[tuple[int, int], ...]:
        """``(predictor_calls, refiner_calls)`` of each step, counting as DESIGN.md §2 does."""
        calls: list[tuple[int, int]] = []
        carried = False
        for kind in self.steps:
            if kind is StepKind.EULER:
                calls.append((1, 0))
            elif kind is StepKind.HEUN:
                calls.append((2, 0))
            elif kind is StepKind.PSEUDO:
                calls.append((1 if carried else 2, 0))
            else:
                calls.append((0, 2))
            carried = kind.carries_velocity
        return tuple(calls)

    @property
    def predictor_calls(self) -> int:
        return sum(p for p, _ in self.step_calls())

    @property
    def refiner_calls(self) -> int:
        return sum(r for _, r in self.step_calls())

    @property
    def uses_refiner(self) -> bool:
        return StepKind.REFINER in self.steps

    # -------------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """The canonical content (what the id hashes): no derived fields."""
        return {
            "format": SCHEDULE_FORMAT,
            "steps": self.step_string,
            "timesteps": list(self.timesteps),
            "guidance_scale": self.guidance_scale,
            "guidance_channels": self.guidance_channels,
        }

    def canonical_json(self) -> str:
        """Sorted keys, no whitespace, floats as Python ``repr`` (shortest round trip)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @property
    def id(self) -> str:
        """First 16 hex digits of the SHA-256 of the canonical JSON."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """Canonical content plus derived fields (notation, call counts, id): what the CLI prints."""
        info = self.to_dict()
        info.update(
            notation=self.notation,
            num_steps=self.num_steps,
            predictor_calls=self.predictor_calls,
            refiner_calls=self.refiner_calls,
            id=self.id,
        )
        return info

    def to_json(self, *, indent: int | None = None) -> str:
        return json.dumps(self.describe(), sort_keys=True, indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplingSchedule":
        """Inverse of :meth:`to_dict` / :meth:`describe`; derived fields, when present, must agree."""
        if not isinstance(data, dict):
            raise ScheduleError(f"a schedule JSON must be an object, got {type(data).__name__}")
        fmt = data.get("format", SCHEDULE_FORMAT)
        if fmt != SCHEDULE_FORMAT:
            raise ScheduleError(f"unsupported schedule format {fmt!r}; this flowturbo reads {SCHEDULE_FORMAT!r}")
        known = {"format", "steps", "timesteps", "guidance_scale", "guidance_channels",
                 "notation", "num_steps", "predictor_calls", "refiner_calls", "id"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ScheduleError(f"unknown keys in schedule JSON: {unknown}")
        if "steps" not in data:
            raise ScheduleError("schedule JSON has no 'steps'")
        steps = parse_steps(data["steps"])
        timesteps = data.get("timesteps")
        schedule = cls(
            steps,
            tuple(uniform_timesteps(len(steps)) if timesteps is None else timesteps),
            data.get("guidance_scale", 1.0),
            data.get("guidance_channels"),
        )
        derived = schedule.describe()
        for key in ("notation", "num_steps", "predictor_calls", "refiner_calls", "id"):
            if key in data and data[key] != derived[key]:
                raise ScheduleError(
                    f"schedule JSON says {key}={data[key]!r} but its steps/timesteps give {derived[key]!r}; "
                    "the file was edited inconsistently"
                )
        return schedule

    @classmethod
    def from_json(cls, text: str) -> "SamplingSchedule":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ScheduleError(f"schedule JSON does not parse: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str) -> "SamplingSchedule":
        """Read a schedule JSON file (what :meth:`to_json` writes, e.g. ``flowturbo tune``'s
        ``recommended_schedule.json``), custom time grid included."""
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise ScheduleError(f"cannot read schedule file {path}: {exc.strerror or exc}") from None
        return cls.from_json(text)

    def __str__(self) -> str:
        guidance = "" if self.guidance_scale == 1.0 else f", cfg={self.guidance_scale:g}"
        return f"{self.notation} ({self.predictor_calls} predictor + {self.refiner_calls} refiner calls{guidance})"
