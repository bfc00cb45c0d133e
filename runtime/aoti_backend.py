"""The ``aoti`` backend: runs an export directory's AOTInductor packages (``.pt2``) with the shared loop."""

from __future__ import annotations

from typing import Any

import torch

from flowturbo.errors import CheckpointError
from flowturbo.runtime.artifacts import ArtifactEntry, ArtifactSet
from flowturbo.runtime.exported import ExportedSampler, ModuleFn


class _AotiModule:
    """One loaded package, called with keyword tensors in spec input order."""

    def __init__(self, entry: ArtifactEntry, device: str) -> None:
        self.names = [t["name"] for t in entry.spec["inputs"]]
        try:
            self.runner = torch._inductor.aoti_load_package(str(entry.path))
        except (RuntimeError, OSError) as exc:
            raise CheckpointError(f"cannot load AOTInductor package {entry.path}: {exc}; re-export it") from exc
        self.device = torch.device(device)

    def __call__(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        out = self.runner(*(inputs[name].to(self.device) for name in self.names))  # no copy when already there
        return list(out) if isinstance(out, (tuple, list)) else [out]  # on the package's device: the loop stays there


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

    def run_batch(self, noise: torch.Tensor, labels: torch.Tensor, task: Any = None,
                  rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        if self.device.type != "cuda":
            return super().run_batch(noise, labels, task, rows)
        torch.cuda.synchronize(self.device)  # stage times measure the GPU work
        out = super().run_batch(noise.to(self.device), labels.to(self.device), task, rows)
        torch.cuda.synchronize(self.device)
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": self._device}


__all__ = ["AotiSampler"]
