"""flowturbo: fast FlowTurbo sampling for flow-based image generators.

Layers (imports flow one way, left to right):
``flowturbo.kernels`` -> ``flowturbo.training`` -> ``flowturbo.export`` -> ``flowturbo.runtime``.
``flowturbo.schedule`` and ``flowturbo.errors`` are pure data / pure Python and importable from every layer.
"""

__version__ = "0.1.0"

from flowturbo.errors import FlowTurboError  # noqa: E402
from flowturbo.schedule import SamplingSchedule, StepKind  # noqa: E402

__all__ = ["FlowTurboError", "SamplingSchedule", "StepKind", "__version__"]
