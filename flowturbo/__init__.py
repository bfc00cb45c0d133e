"""flowturbo: fast FlowTurbo sampling for flow-based image generators.

Layers (imports flow one way, left to right):
``flowturbo.kernels`` -> ``flowturbo.training`` -> ``flowturbo.export`` -> ``flowturbo.runtime``.
The torch-free root modules are importable from every layer: ``flowturbo.schedule`` (the schedule as data),
``flowturbo.errors``, ``flowturbo.integrator`` (the one step loop), ``flowturbo.dtypes`` (the dtype table) and
``flowturbo.fileio`` (atomic writes, output folders, locks, sealed manifests).
"""

__version__ = "0.1.0"

from flowturbo import _source_tree  # noqa: E402

_source_tree.install()  # run from the repository: its layer folders must not shadow installed packages (kernels)

from flowturbo.errors import FlowTurboError  # noqa: E402
from flowturbo.schedule import SamplingSchedule, StepKind  # noqa: E402

__all__ = ["FlowTurboError", "SamplingSchedule", "StepKind", "__version__"]
