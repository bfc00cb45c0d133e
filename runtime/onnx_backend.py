"""The ONNX Runtime backend: an export directory's ``.onnx`` graphs run with IO binding.

:class:`OnnxRuntimeSampler` runs the graphs with ONNX Runtime, binding torch CPU tensors as inputs and
preallocated outputs (shapes from the spec) so no copies happen between calls. The loop, batching and
noise are :class:`~flowturbo.runtime.exported.ExportedSampler`'s (re-exported here for compatibility).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flowturbo.dtypes import torch_dtype
from flowturbo.errors import FlowTurboError
from flowturbo.runtime.artifacts import ArtifactEntry, ArtifactSet
from flowturbo.runtime.exported import ExportedSampler, ModuleFn, StepHook, make_noise


_ORT_ELEMENT_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}


class _OrtModule:
    """One ONNX Runtime session called with torch CPU tensors through IO binding."""

    def __init__(self, entry: ArtifactEntry, options: Any, providers: Sequence[str]) -> None:
        import numpy as np
        import onnxruntime as ort

        self.entry = entry
        self.session = ort.InferenceSession(str(entry.path), options, providers=list(providers))
        self.outputs = [(o["name"], torch_dtype(o["dtype"])) for o in entry.spec["outputs"]]
        self._np = {dtype: np.dtype(name) for dtype, name in _ORT_ELEMENT_TYPES.items()}

    def __call__(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        binding = self.session.io_binding()
        keep = []  # contiguous inputs must outlive the run
        batch = next(iter(inputs.values())).shape[0]
        for name, tensor in inputs.items():
            tensor = tensor.contiguous()
            keep.append(tensor)
            binding.bind_input(name, "cpu", 0, self._np[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
        outs = []
        for name, dtype in self.outputs:
            buffer = torch.empty(self.entry.output_shape(name, batch), dtype=dtype)  # (batch, ...) from the spec
            binding.bind_output(name, "cpu", 0, self._np[dtype], tuple(buffer.shape), buffer.data_ptr())
            outs.append(buffer)
        self.session.run_with_iobinding(binding)
        return outs


class OnnxRuntimeSampler(ExportedSampler):
    """The ``onnxruntime`` backend: ``OnnxRuntimeSampler.from_artifacts(DIR).sample([0, 1], seed=0)``."""

    backend = "onnxruntime"
    artifact_format = "onnx"

    def __init__(self, artifacts: ArtifactSet, *, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise FlowTurboError("the onnxruntime backend needs ONNX Runtime: pip install onnxruntime") from None
        self._options = ort.SessionOptions()
        self._options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            self._options.intra_op_num_threads = int(threads)
        self._providers = tuple(providers)
        super().__init__(artifacts)

    def _load(self, entry: ArtifactEntry) -> ModuleFn:
        return _OrtModule(entry, self._options, self._providers)


__all__ = ["ExportedSampler", "ModuleFn", "OnnxRuntimeSampler", "StepHook", "make_noise"]
