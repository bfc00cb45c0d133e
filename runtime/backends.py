"""Open an export directory with one of the exported backends (imports only the backend asked for).

The PyTorch backend lives in :mod:`flowturbo.runtime.sampler` (it builds the models); this module does
not import it, so ``flowturbo sample --artifacts`` and ``flowturbo profile --artifacts`` never load the
training code.
"""

from __future__ import annotations

import os
from typing import Any

from flowturbo.errors import FlowTurboError

EXPORTED_BACKENDS = ("onnxruntime", "aoti", "tensorrt", "cpp")


def load_exported_sampler(folder: str | os.PathLike[str], backend: str = "onnxruntime", *, device: str | None = None,
                          threads: int | None = None, expect: dict[str, Any] | None = None) -> Any:
    """A sampler over an export directory: ``backend`` is onnxruntime | aoti | tensorrt | cpp.

    ``device`` picks cpu/cuda where the backend can choose (aoti, cpp); ``threads`` sets ONNX Runtime's
    intra-op threads; ``expect`` lists manifest values the directory must have (e.g. ``schedule_id``).
    """
    if backend == "onnxruntime":
        from flowturbo.runtime.onnx_backend import OnnxRuntimeSampler

        return OnnxRuntimeSampler.from_artifacts(folder, expect=expect, threads=threads)
    if backend == "aoti":
        from flowturbo.runtime.aoti_backend import AotiSampler

        return AotiSampler.from_artifacts(folder, expect=expect, device=device)
    if backend == "tensorrt":
        from flowturbo.runtime.tensorrt_backend import TensorRTSampler

        return TensorRTSampler.from_artifacts(folder, expect=expect)
    if backend == "cpp":
        from flowturbo.runtime.cpp_backend import CppSampler

        return CppSampler.from_artifacts(folder, expect=expect, device=device)
    raise FlowTurboError(f"unknown backend {backend!r} for artifacts; choose {', '.join(EXPORTED_BACKENDS)}")


__all__ = ["EXPORTED_BACKENDS", "load_exported_sampler"]
