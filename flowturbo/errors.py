"""The one exception type users see for foreseeable mistakes.

Every user-facing error in flowturbo (bad schedule string, wrong checkpoint keys, class id out of range,
missing files, NaN during sampling, ...) is a :class:`FlowTurboError` whose message names the fix.
Subclasses exist only so callers can catch a narrower family; they never change the message contract.
"""

from __future__ import annotations


class FlowTurboError(Exception):
    """A foreseeable user mistake or an unusable input; the message says what to change."""


class ScheduleError(FlowTurboError, ValueError):
    """A sampling schedule that cannot be parsed or executed."""


class CheckpointError(FlowTurboError):
    """A checkpoint / bundle / VAE folder that is missing, unreadable or fits no known architecture."""


class SamplingError(FlowTurboError):
    """Sampling failed: bad class ids, NaN/Inf produced at a named step, impossible request."""


class FlowTurboWarning(UserWarning):
    """Something worth knowing that still gives a correct result (a fallback, an input that was adjusted).

    The command line prints these as one ``warning:`` line.
    """
