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
from flowturbo.errors import CheckpointError, FlowTurboError
from flowturbo.runtime.artifacts import BATCH_AXIS, REEXPORT, ArtifactEntry, ArtifactSet
from flowturbo.runtime.exported import ExportedSampler, ModuleFn, StepHook, make_noise


_ORT_ELEMENT_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}
# ONNX Runtime's names of tensor types, by the spec's dtype names.
_ORT_TYPE_NAMES = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)",
                   "int64": "tensor(int64)", "int32": "tensor(int32)"}


def check_graph_against_spec(session: Any, entry: ArtifactEntry, batch: tuple[int, int, int]) -> None:
    """Read the graph's inputs and outputs back and refuse a graph that is not what the manifest says.

    The manifest is sealed, but the check is cheap: each spec tensor must exist in the graph with the spec's
    element type (the export precision), its batch axis must be dynamic — or fixed at the one size of a
    ``batch`` profile (min, opt, max) with min == max — and its other dimensions equal to the spec's. A mismatch means the file is not the one the exporter wrote for
    this manifest.
    """
    graph = {"input": {t.name: t for t in session.get_inputs()}, "output": {t.name: t for t in session.get_outputs()}}
    for kind in ("input", "output"):
        for tensor in entry.spec[f"{kind}s"]:
            found = graph[kind].get(tensor["name"])
            want_type = _ORT_TYPE_NAMES.get(tensor["dtype"], tensor["dtype"])
            problem = None
            if found is None:
                problem = f"has no {kind} {tensor['name']!r} (it has {sorted(graph[kind])})"
            elif found.type != want_type:
                problem = f"{kind} {tensor['name']!r} is {found.type}, the manifest says {want_type}"
            elif len(found.shape) != len(tensor["shape"]):
                problem = f"{kind} {tensor['name']!r} has shape {found.shape}, the manifest says {tensor['shape']}"
            else:
                for got, want in zip(found.shape, tensor["shape"]):
                    fixed_batch = want == BATCH_AXIS and isinstance(got, int) and not batch[0] == got == batch[2]
                    if fixed_batch or (want != BATCH_AXIS and got != int(want)):
                        problem = (f"{kind} {tensor['name']!r} has shape {found.shape}, the manifest says "
                                   f"{tensor['shape']} ({BATCH_AXIS!r} = a dynamic axis)")
                        break
            if problem:
                raise CheckpointError(f"{entry.path.name}: the graph does not match its manifest: {problem}; {REEXPORT}")


class _OrtModule:
    """One ONNX Runtime session called with torch CPU tensors through IO binding."""

    def __init__(self, entry: ArtifactEntry, options: Any, providers: Sequence[str],
                 batch: tuple[int, int, int]) -> None:
        import numpy as np
        import onnxruntime as ort

        self.entry = entry
        self.session = ort.InferenceSession(str(entry.path), options, providers=list(providers))
        check_graph_against_spec(self.session, entry, batch)
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
        return _OrtModule(entry, self._options, self._providers, self.artifacts.batch)


__all__ = ["ExportedSampler", "ModuleFn", "OnnxRuntimeSampler", "StepHook", "make_noise"]
