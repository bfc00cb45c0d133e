"""Sampling from an export directory: the shared schedule loop, and the ONNX Runtime backend (IO binding).

:class:`ExportedSampler` holds what every exported backend shares: the manifest (schedule, variant, batch
profile, class count), the noise (same semantics as the reference ``make_noise``: float32 CPU generator
seeded with ``seed``, drawn for all images at once, then cast), batching within the exported profile, and
the E/H/P/R loop of DESIGN.md §2 for the ``time-input`` and ``per-step`` variants (the ``unrolled`` variant
runs the whole schedule + decode as one call). Its :meth:`~ExportedSampler.sample` returns the same
:class:`~flowturbo.runtime.sampler.Samples` as the PyTorch sampler, so the CLI can switch backends.

:class:`OnnxRuntimeSampler` runs the ``.onnx`` graphs with ONNX Runtime, binding torch CPU tensors as
inputs and preallocated outputs (shapes from the spec) so no copies happen between calls.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from flowturbo.errors import FlowTurboError, SamplingError
from flowturbo.runtime.artifacts import ArtifactEntry, ArtifactSet, load_artifacts
from flowturbo.runtime.results import Samples, StageTimes
from flowturbo.schedule import SamplingSchedule, StepKind

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
FLOAT_DTYPE_OF_PRECISION = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# A module call: keyword tensors in (spec input names), output tensors out (spec order).
ModuleFn = Callable[..., list[torch.Tensor]]


class StepHook(Protocol):
    """Optional observer of the loop (the profiler installs one): called at each step's start and end and
    around the decode. Unset (``ExportedSampler.step_hook = None``) it costs one attribute test per step."""

    def step_start(self, index: int, kind: StepKind, t_start: float, t_end: float) -> None: ...

    def step_end(self, index: int, kind: StepKind, t_start: float, t_end: float) -> None: ...

    def decode_start(self) -> None: ...

    def decode_end(self) -> None: ...


def make_noise(batch: int, latent_shape: Sequence[int], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """x_0 ~ N(0, I) of shape (batch, C, H, W): float32 CPU generator seeded with ``seed``, then cast.

    The same draw as ``flowturbo.training.sampling.make_noise`` (re-implemented: runtime does not import
    training), so a seed gives the same images on every backend.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn((batch, *latent_shape), generator=generator, dtype=torch.float32)
    return noise.to(dtype=dtype)


class ExportedSampler:
    """Runs the schedule an export directory was built for; subclasses load the modules of one format."""

    backend = "exported"
    artifact_format = ""
    step_hook: StepHook | None = None  # set on an instance by flowturbo.runtime.profiling; None: no cost

    def __init__(self, artifacts: ArtifactSet) -> None:
        self.artifacts = artifacts
        self.schedule: SamplingSchedule = artifacts.schedule
        model = artifacts.model
        self.num_classes = int(model["num_classes"])
        self.latent_shape = tuple(int(d) for d in model["latent_shape"])
        self.class_names = model.get("class_names")
        self.dtype = FLOAT_DTYPE_OF_PRECISION[artifacts.precision]
        self.variant = artifacts.variant
        entries = artifacts.entries(self.artifact_format)
        self._predict: dict[float | None, ModuleFn] = {}
        self._refine: dict[float | None, ModuleFn] = {}
        self._decode: ModuleFn | None = None
        self._unrolled: ModuleFn | None = None
        for entry in entries:
            fn = self._load(entry)
            if entry.role == "predictor":
                self._predict[entry.time] = fn
            elif entry.role == "refiner":
                self._refine[entry.time] = fn
            elif entry.role == "decoder":
                self._decode = fn
            elif entry.role == "unrolled":
                self._unrolled = fn
            else:
                raise FlowTurboError(f"{entry.path.name}: unknown artifact role {entry.role!r}")

    @classmethod
    def from_artifacts(cls, folder: str | os.PathLike[str], *, expect: dict[str, Any] | None = None,
                       **kwargs: Any) -> "ExportedSampler":
        """Load and verify ``folder`` (checksums; ``expect`` values, e.g. a schedule id), then the modules."""
        return cls(load_artifacts(folder, expect=expect), **kwargs)

    # ------------------------------------------------------------------------------- backend hooks
    def _load(self, entry: ArtifactEntry) -> ModuleFn:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {
            "source": str(self.artifacts.root),
            "backend": self.backend,
            "variant": self.variant,
            "precision": self.artifacts.precision,
            "batch_profile": ":".join(str(b) for b in self.artifacts.batch),
            "num_classes": self.num_classes,
            "latent_shape": list(self.latent_shape),
            "weights_sha256": self.artifacts.model.get("weights_sha256"),
        }

    # ---------------------------------------------------------------------------------- the loop
    def _call(self, table: dict[float | None, ModuleFn], t: float, what: str, **inputs: torch.Tensor) -> torch.Tensor:
        fn = table.get(None)
        if fn is not None:  # time-input graph
            inputs["t"] = torch.full((inputs["labels"].shape[0],), t, dtype=torch.float32)
        else:  # per-step graph with time folded
            fn = table.get(t)
            if fn is None:
                raise SamplingError(f"the export has no {what} graph for t={t!r}; it was built for another schedule")
        return fn(**inputs)[0]

    def _velocity(self, x: torch.Tensor, t: float, labels: torch.Tensor) -> torch.Tensor:
        return self._call(self._predict, t, "predictor", latents=x, labels=labels)

    def _offset(self, x: torch.Tensor, v: torch.Tensor, t: float, labels: torch.Tensor) -> torch.Tensor:
        return self._call(self._refine, t, "refiner", latents=x, v=v, labels=labels)

    def _integrate(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """DESIGN.md §2 E/H/P/R steps over the schedule's grid; (b, C, H, W) -> (b, C, H, W)."""
        schedule, times = self.schedule, self.schedule.timesteps
        x, carried = noise, None
        hook = self.step_hook
        for k, kind in enumerate(schedule.steps):
            t0, t1 = times[k], times[k + 1]
            h = t1 - t0
            if hook is not None:
                hook.step_start(k, kind, t0, t1)
            if kind is StepKind.EULER:
                x = x + h * self._velocity(x, t0, labels)
                carried = None
            elif kind is StepKind.REFINER:
                v = carried
                d = v + self._offset(x, v, t0, labels)
                d_next = d + self._offset(x + h * d, v, t1, labels)
                x = x + 0.5 * h * (d + d_next)
                carried = d
            else:
                d = carried if kind is StepKind.PSEUDO and carried is not None else self._velocity(x, t0, labels)
                d_next = self._velocity(x + h * d, t1, labels)
                x = x + 0.5 * h * (d + d_next)
                carried = d_next
            if hook is not None:
                hook.step_end(k, kind, t0, t1)
        return x

    def run_batch(self, noise: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """One batch: (images, latents, sample seconds, decode seconds)."""
        t0 = time.perf_counter()
        if self._unrolled is not None:
            images, latents = self._unrolled(noise=noise, labels=labels)
            return images, latents, time.perf_counter() - t0, 0.0
        latents = self._integrate(noise, labels)
        t1 = time.perf_counter()
        assert self._decode is not None
        hook = self.step_hook
        if hook is not None:
            hook.decode_start()
        images = self._decode(latents=latents)[0]
        if hook is not None:
            hook.decode_end()
        return images, latents, t1 - t0, time.perf_counter() - t1

    # ----------------------------------------------------------------------------------- public
    @torch.inference_mode()
    def sample(
        self,
        classes: Sequence[int],
        *,
        schedule: SamplingSchedule | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> Samples:
        """One image per class id, like ``Sampler.sample``; the schedule is the exported one.

        Batches hold at most ``batch_size`` images (default: the profile's max) and must fit the exported
        batch profile. ``progress`` is accepted for API compatibility.
        """
        self.artifacts.check_schedule(schedule)
        labels = torch.as_tensor(list(classes), dtype=torch.long)
        n = labels.shape[0]
        if n == 0:
            raise SamplingError("no classes given: pass at least one class id")
        self.artifacts.check_classes(labels.tolist())
        batch = self.artifacts.batch_size_for(n, batch_size)  # refuses before computing anything
        noise = make_noise(n, self.latent_shape, seed, self.dtype)  # (N, C, H, W)
        images, sample_s, decode_s = [], 0.0, 0.0
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            out, _, s, d = self.run_batch(noise[start:stop].contiguous(), labels[start:stop].contiguous())
            if not bool(torch.isfinite(out).all()):
                raise SamplingError("NaN/Inf in the decoded images; try the fp32 export or a lower guidance scale")
            images.append(out.float())
            sample_s, decode_s = sample_s + s, decode_s + d
        pred_calls, ref_calls = self.schedule.predictor_calls, self.schedule.refiner_calls
        return Samples(
            images=torch.cat(images),
            labels=labels.tolist(),
            schedule=self.schedule,
            predictor_calls=pred_calls,
            refiner_calls=ref_calls,
            num_batches=math.ceil(n / batch),
            times=StageTimes(sample_s, decode_s),
        )


_ORT_ELEMENT_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}


class _OrtModule:
    """One ONNX Runtime session called with torch CPU tensors through IO binding."""

    def __init__(self, entry: ArtifactEntry, options: Any, providers: Sequence[str]) -> None:
        import numpy as np
        import onnxruntime as ort

        self.entry = entry
        self.session = ort.InferenceSession(str(entry.path), options, providers=list(providers))
        self.outputs = [(o["name"], TORCH_DTYPES[o["dtype"]]) for o in entry.spec["outputs"]]
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


__all__ = ["ExportedSampler", "OnnxRuntimeSampler", "StepHook", "make_noise"]
