"""The ``cpp`` backend: the C++ :class:`ScheduleRunner` (``flowturbo._runner``) runs a whole batch per call.

Python validates the request, asks the runner for the initial noise (image i from torch's CPU generator seeded
with ``seed + i``: the same draw as :func:`flowturbo.noise.make_noise`) and hands over one batch at a time; the
E/H/P/R loop, the engine calls, the decode and (on CUDA) the CUDA-graph replay happen in C++. Tensors cross
the boundary as DLPack capsules (no copies).

    >>> sampler = CppSampler.from_artifacts("artifacts/h1p5r3")     # AOTInductor packages of an export
    >>> out = sampler.sample([0, 1, 2], seed=0)                     # Samples, like every backend

Requests for more images than the exported batch profile's max are split into batches of at most that
many images (``batch_size`` picks a smaller size; sizes outside the profile are refused before running).
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from flowturbo.dtypes import torch_dtype
from flowturbo.errors import FlowTurboError, SamplingError
from flowturbo.refiner_dt import RangeWarnings
from flowturbo.runtime.artifacts import ArtifactSet, load_artifacts
from flowturbo.runtime.results import Samples, StageTimes
from flowturbo.runtime.text_exported import (
    PromptEncoder,
    TextRequest,
    asks_for_text,
    prompt_labels,
    text_graph_inputs,
)
from flowturbo.schedule import SamplingSchedule


def cpp_unavailable_reason() -> str | None:
    """None when ``flowturbo._runner`` imports, else why it is missing (from the build's own record)."""
    try:
        import flowturbo._runner  # noqa: F401
    except ImportError as exc:
        try:
            from flowturbo._C import runner_build_status

            status = runner_build_status()
        except ImportError:
            status = "the flowturbo._C extension is not built either"
        return f"the C++ runner (flowturbo._runner) is not available: {status} ({exc})"
    return None


def _runner_module() -> Any:
    reason = cpp_unavailable_reason()
    if reason is not None:
        raise FlowTurboError(reason + "; use --backend aoti or onnxruntime meanwhile")
    import flowturbo._runner as runner

    return runner


def _capsule(tensor: torch.Tensor) -> Any:
    return tensor.contiguous().__dlpack__()


_NO_TASKS = ("{what} is not supported by --backend cpp (the C++ runner has no per-step hooks and walks only the "
             "exported grid); run the same export with --backend aoti (export it --with-encoder), or use the "
             "pytorch backend")


class CppSampler:
    """Samples from an export directory with the C++ runner (AOTInductor packages; TensorRT when built)."""

    backend = "cpp"

    def __init__(self, artifacts: ArtifactSet, *, device: str | None = None, engine_format: str = "aoti",
                 cuda_graph: bool = True, reuse_engine_buffers: bool = False) -> None:
        runner_module = _runner_module()
        built_against = runner_module.build_info()["torch_version"]
        if built_against.split("+")[0] != torch.__version__.split("+")[0]:
            raise FlowTurboError(f"flowturbo._runner was built against torch {built_against} but torch "
                                 f"{torch.__version__} is installed; rebuild it: bash scripts/setup.sh")
        if engine_format == "aoti":
            artifacts.check_torch_version(torch.__version__)
        self.artifacts = artifacts
        self.schedule: SamplingSchedule = artifacts.schedule
        self.takes_prompts = artifacts.takes_prompts  # a text-to-image export: prompt embeddings, not class ids
        self.prompt_encoder = PromptEncoder(artifacts)
        self.num_classes = int(artifacts.model.get("num_classes", 0))
        self.latent_shape = tuple(int(d) for d in artifacts.model["latent_shape"])
        self.class_names = artifacts.model.get("class_names")
        self.variant = artifacts.variant
        self.engine_format = engine_format
        # The runner re-reads the manifest and verifies every file's SHA-256 itself.
        self.runner = runner_module.ScheduleRunner(str(artifacts.root), device=device or "", format=engine_format,
                                                   cuda_graph=cuda_graph, verify_files=True,
                                                   reuse_engine_buffers=reuse_engine_buffers)
        self.range_warnings = RangeWarnings()  # R steps beyond the refiner's trained dt: said once
        if self.runner.schedule_id != self.schedule.id:
            raise FlowTurboError("the C++ runner and Python read different schedules from the manifest (bug)")

    @classmethod
    def from_artifacts(cls, folder: str | os.PathLike[str], *, expect: dict[str, Any] | None = None,
                       **kwargs: Any) -> "CppSampler":
        """Read ``folder``'s manifest (``expect``: values it must have, e.g. a schedule id) and load the runner."""
        _runner_module()  # a missing runner is reported before anything is read
        return cls(load_artifacts(folder, expect=expect, verify=False), **kwargs)

    def describe(self) -> dict[str, Any]:
        return {
            "source": str(self.artifacts.root),
            "backend": self.backend,
            "engine_format": self.engine_format,
            "variant": self.variant,
            "precision": self.artifacts.precision,
            "batch_profile": ":".join(str(b) for b in self.artifacts.batch),
            "device": self.runner.device,
            "cuda_graph": self.runner.graph_fallback_reason or ("on" if self.runner.device.startswith("cuda") else "n/a (cpu)"),
            "engines": list(self.runner.engines),
            "num_classes": self.num_classes,
            "latent_shape": list(self.latent_shape),
            "weights_sha256": self.artifacts.model.get("weights_sha256"),
        }

    def make_noise(self, n: int, seed: int, first_index: int = 0) -> torch.Tensor:
        """x_0 for images ``first_index .. first_index + n - 1`` (n, C, H, W) drawn by the runner: image i from
        seed ``seed + i``, bit for bit :func:`flowturbo.noise.make_noise`."""
        if not 0 <= int(seed) < 2**64:
            raise SamplingError(f"seed must be in [0, 2**64), got {seed}")
        if not 0 <= int(first_index) < 2**64:
            raise SamplingError(f"first_index must be in [0, 2**64), got {first_index}")
        return torch.from_dlpack(self.runner.make_noise(int(n), int(seed), int(first_index)))

    def run_batch(self, noise: torch.Tensor, labels: torch.Tensor, *, profile: bool = False) -> dict[str, Any]:
        """One batch through the runner: images/latents tensors + ``sample_ms``, ``decode_ms``, ``total_ms``, ``steps``."""
        out = self.runner.run_batch(_capsule(noise), _capsule(labels.to(torch.long)), profile)
        out["images"] = torch.from_dlpack(out["images"])
        out["latents"] = torch.from_dlpack(out["latents"])
        return out

    @torch.inference_mode()
    def sample(self, classes: Sequence[int] | None = None, *, prompts: Sequence[str] | None = None,
               negative_prompt: str | Sequence[str] | None = None, guidance: float | None = None,
               prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
               negative_prompt_embeds: torch.Tensor | None = None,
               negative_pooled_prompt_embeds: torch.Tensor | None = None, schedule: SamplingSchedule | None = None,
               seed: int = 0, batch_size: int | None = None, progress: bool = False, first_index: int = 0) -> Samples:
        """One image per class id (the schedule is the exported one; image j from seed ``seed + first_index + j``);
        a text-to-image export takes prompts or prompt embeddings instead, as ``ExportedSampler.sample``;
        ``progress`` is accepted for API parity."""
        text = TextRequest(prompts, negative_prompt, guidance, prompt_embeds, pooled_prompt_embeds,
                           negative_prompt_embeds, negative_pooled_prompt_embeds)
        if asks_for_text(self.artifacts, classes, text):
            return self._sample_text(text, schedule, seed, batch_size, first_index)
        self.artifacts.check_schedule(schedule)
        self.range_warnings.check(self.schedule, self.artifacts.refiner_dt)
        classes = [int(c) for c in classes]
        if not classes:
            raise SamplingError("no classes given: pass at least one class id")
        self.artifacts.check_classes(classes)
        n = len(classes)
        batch = self.artifacts.batch_size_for(n, batch_size)  # refuses before computing anything
        labels = torch.tensor(classes, dtype=torch.long)
        noise = self.make_noise(n, seed, first_index)  # (N, C, H, W)
        images, sample_ms, decode_ms = [], 0.0, 0.0
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            out = self.run_batch(noise[start:stop], labels[start:stop])
            images.append(out["images"].float().cpu())
            sample_ms, decode_ms = sample_ms + out["sample_ms"], decode_ms + out["decode_ms"]
        return Samples(
            images=torch.cat(images),
            labels=classes,
            schedule=self.schedule,
            predictor_calls=self.schedule.predictor_calls,
            refiner_calls=self.schedule.refiner_calls,
            num_batches=math.ceil(n / batch),
            times=StageTimes(sample_ms / 1000, decode_ms / 1000),
        )

    def _sample_text(self, request: TextRequest, schedule: SamplingSchedule | None, seed: int,
                     batch_size: int | None, first_index: int) -> Samples:
        """A text-to-image export through the runner: the prompt embeddings per batch as its conditioning inputs (the
        refiner graph of an export with R steps takes its pooled prompt embeddings from the same inputs)."""
        self.artifacts.check_schedule(schedule)
        self.range_warnings.check(self.schedule, self.artifacts.refiner_dt)
        dtype = torch_dtype(self.artifacts.precision)
        inputs, record = text_graph_inputs(self.artifacts, request, self.prompt_encoder, dtype=dtype,
                                           device=torch.device("cpu"))
        n = int(next(iter(inputs.values())).shape[0])
        batch = self.artifacts.batch_size_for(n, batch_size)  # refuses before computing anything
        noise = self.make_noise(n, seed, first_index)  # (N, C, H, W)
        images, sample_ms, decode_ms = [], 0.0, 0.0
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            rows = {name: _capsule(value[start:stop].contiguous()) for name, value in inputs.items()}
            out = self.runner.run_batch(_capsule(noise[start:stop].contiguous()), None, False, rows)
            images.append(torch.from_dlpack(out["images"]).float().cpu())
            sample_ms, decode_ms = sample_ms + out["sample_ms"], decode_ms + out["decode_ms"]
        labels, prompts = prompt_labels(request, n)
        return Samples(images=torch.cat(images), labels=labels, schedule=self.schedule,
                       predictor_calls=self.schedule.predictor_calls, refiner_calls=self.schedule.refiner_calls,
                       num_batches=math.ceil(n / batch), times=StageTimes(sample_ms / 1000, decode_ms / 1000),
                       prompts=prompts, conditioning=record)

    def inpaint(self, *args: Any, **kwargs: Any) -> Samples:
        """Not supported: the C++ runner has no per-step hooks (use ``--backend aoti`` on the same packages)."""
        raise FlowTurboError(_NO_TASKS.format(what="inpainting"))

    def edit(self, *args: Any, **kwargs: Any) -> Samples:
        """Not supported: the C++ runner walks only the exported grid (use ``--backend aoti``)."""
        raise FlowTurboError(_NO_TASKS.format(what="editing"))

    @torch.inference_mode()
    def profile_batch(self, labels: Sequence[int], seed: int = 0, warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
        """Per-step times of one batch (the median-total run of ``repeats`` after ``warmup``), in profile.json form.

        Returns ``total_ms`` (wall time of the profiled run), ``decode_ms``, ``steps`` (index, kind, t_start,
        t_end, predictor_calls, refiner_calls, ms), ``device`` and ``cuda_graph`` (False: steps are timed
        one by one; graph replay hides them).
        """
        labels = [int(c) for c in labels]
        self.artifacts.check_classes(labels)
        self.artifacts.check_batch(len(labels))
        if repeats < 1 or warmup < 0:
            raise FlowTurboError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
        noise = self.make_noise(len(labels), seed)
        label_tensor = torch.tensor(labels, dtype=torch.long)
        for _ in range(warmup):
            self.run_batch(noise, label_tensor, profile=True)
        runs = [self.run_batch(noise, label_tensor, profile=True) for _ in range(repeats)]
        # Report one real run (the one with the median total) so its steps + decode add up to its total;
        # each step's median over all runs rides along as ms_median.
        shown = sorted(runs, key=lambda run: run["total_ms"])[(len(runs) - 1) // 2]
        steps = [{**step, "ms_median": statistics.median(run["steps"][k]["ms"] for run in runs)}
                 for k, step in enumerate(shown["steps"])]
        return {
            "total_ms": shown["total_ms"],
            "decode_ms": shown["decode_ms"],
            "steps": steps,
            "device": self.runner.device,
            "cuda_graph": False,
        }


__all__ = ["CppSampler", "cpp_unavailable_reason"]
