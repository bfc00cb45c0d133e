"""The ``aoti`` backend: runs an export directory's AOTInductor packages (``.pt2``) with the shared loop."""

from __future__ import annotations

from typing import Any

import torch

from flowturbo.dtypes import torch_dtype
from flowturbo.errors import CheckpointError
from flowturbo.runtime.artifacts import REEXPORT, ArtifactEntry, ArtifactSet
from flowturbo.runtime.exported import ExportedSampler, ModuleFn


class _AotiModule:
    """One loaded package, called with keyword tensors in spec input order.

    A package does not expose its input types before it runs, so its first call reads the outputs back: their
    number, dtypes (the export precision) and shapes must be the manifest spec's, or the package is refused.
    """

    def __init__(self, entry: ArtifactEntry, device: str) -> None:
        self.entry = entry
        self.names = [t["name"] for t in entry.spec["inputs"]]
        self._checked = False
        try:
            # One model instance without per-call CUDA-event bookkeeping: capturable into a CUDA graph, and
            # no host wait on the previous call (the loop calls one module at a time from one thread).
            self.runner = torch._inductor.aoti_load_package(str(entry.path), run_single_threaded=True)
        except (RuntimeError, OSError) as exc:
            raise CheckpointError(f"cannot load AOTInductor package {entry.path}: {exc}; re-export it") from exc
        self.device = torch.device(device)

    def __call__(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        # A package reads its inputs as contiguous whatever their strides (a channels-last tensor gives wrong results,
        # silently): no copy when already contiguous and there.
        out = self.runner(*(inputs[name].to(self.device).contiguous() for name in self.names))
        outs = list(out) if isinstance(out, (tuple, list)) else [out]  # on the package's device: the loop stays there
        if not self._checked:
            self._check_outputs(outs, batch=next(iter(inputs.values())).shape[0])
            self._checked = True
        return outs

    def _check_outputs(self, outs: list[torch.Tensor], batch: int) -> None:
        specs = self.entry.spec["outputs"]
        problem = None
        if len(outs) != len(specs):
            problem = f"it returns {len(outs)} outputs, the manifest lists {len(specs)}"
        for tensor, spec in zip(outs, specs):
            want_shape = self.entry.output_shape(spec["name"], batch)
            if problem is None and tensor.dtype != torch_dtype(spec["dtype"]):
                problem = f"output {spec['name']!r} is {tensor.dtype}, the manifest says {spec['dtype']}"
            elif problem is None and tuple(tensor.shape) != want_shape:
                problem = f"output {spec['name']!r} has shape {tuple(tensor.shape)}, the manifest says {want_shape}"
        if problem:
            raise CheckpointError(f"{self.entry.path.name}: the package does not match its manifest: {problem}; "
                                  f"{REEXPORT}")


class AotiSampler(ExportedSampler):
    """``AotiSampler.from_artifacts(DIR).sample([0, 1], seed=0)``."""

    backend = "aoti"
    artifact_format = "aoti"

    def __init__(self, artifacts: ArtifactSet, *, device: str | None = None) -> None:
        exported_on = artifacts.manifest.get("device", "cpu")
        self._device = device or ("cuda" if str(exported_on).startswith("cuda") else "cpu")
        self.device = torch.device(self._device)
        artifacts.check_torch_version(torch.__version__)
        super().__init__(artifacts)

    def _load(self, entry: ArtifactEntry) -> ModuleFn:
        return _AotiModule(entry, self._device)

    def run_batch(self, noise: torch.Tensor, labels: torch.Tensor | dict[str, torch.Tensor], task: Any = None,
                  rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        if self.device.type != "cuda":
            return super().run_batch(noise, labels, task, rows)
        torch.cuda.synchronize(self.device)  # stage times measure the GPU work
        if isinstance(labels, dict):  # a text export's inputs (prompt embeddings, ...)
            labels = {name: value.to(self.device) for name, value in labels.items()}
        else:
            labels = labels.to(self.device)
        out = super().run_batch(noise.to(self.device), labels, task, rows)
        torch.cuda.synchronize(self.device)
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": self._device}


__all__ = ["AotiSampler"]
