"""What a sampling run returns, shared by every backend (PyTorch, ONNX Runtime, AOTInductor, ...)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from flowturbo.schedule import SamplingSchedule


@dataclasses.dataclass(frozen=True)
class StageTimes:
    """Wall-clock seconds of each stage of a sampling run (CUDA work synchronised at stage ends).

    ``decode_fused``: the decode ran inside the same CUDA graph as the schedule, so ``sample_s`` covers both
    and ``decode_s`` is 0. ``capture_s``: one-time CUDA-graph capture (warm-up included), not in the others.
    """

    sample_s: float
    decode_s: float
    capture_s: float = 0.0
    decode_fused: bool = False

    @property
    def total_s(self) -> float:
        """Sampling + decoding (capture excluded: it happens once per batch size, not per request)."""
        return self.sample_s + self.decode_s


@dataclasses.dataclass(frozen=True)
class Samples:
    """Decoded images (N, C, H, W) in [-1, 1], their labels (class ids, or indices into ``prompts``), and what it
    cost."""

    images: torch.Tensor
    labels: list[int]
    schedule: SamplingSchedule
    predictor_calls: int  # per batch (every batch runs the same schedule)
    refiner_calls: int
    num_batches: int
    times: StageTimes
    execution: dict[str, Any] | None = None  # which path ran (kernels, CUDA graph, dtypes), when the backend says
    task: dict[str, Any] | None = None  # inpainting / editing: what was done (runtime.editing tasks' describe())
    prompts: list[str] | None = None  # text-to-image: the distinct prompts; image i's label indexes them
    conditioning: dict[str, Any] | None = None  # text-to-image: negative prompt, guidance, image size, ...

    @property
    def ms_per_image(self) -> float:
        return 1000 * self.times.total_s / max(len(self.labels), 1)

    def record(self) -> dict[str, Any]:
        """The JSON-ready summary written to run.json."""
        n = max(len(self.labels), 1)
        seconds = {"sample": self.times.sample_s, "decode": self.times.decode_s, "total": self.times.total_s}
        if self.times.capture_s:
            seconds["cuda_graph_capture"] = self.times.capture_s
        record = {
            "schedule": self.schedule.describe(),
            "num_images": len(self.labels),
            "labels": self.labels,
            "num_batches": self.num_batches,
            "predictor_calls_per_batch": self.predictor_calls,
            "refiner_calls_per_batch": self.refiner_calls,
            "seconds": seconds,
            "seconds_per_image": self.times.total_s / n,
        }
        if self.times.decode_fused:
            record["decode_in_sample_graph"] = True
        if self.execution is not None:
            record["execution"] = dict(self.execution)
        if self.task is not None:
            record["task"] = dict(self.task)
        if self.prompts is not None:
            record["prompts"] = list(self.prompts)
        if self.conditioning is not None:
            record["conditioning"] = dict(self.conditioning)
        return record
