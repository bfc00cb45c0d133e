"""The sampler API: classes + seed + schedule in, images + call counts + timings out.

Backends behind one interface; this module holds the PyTorch one (eager). Exported backends
(ONNX Runtime, AOTInductor, TensorRT, the C++ runner) plug in through ``Sampler.from_artifacts``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from flowturbo.runtime.pytorch_backend import (
    TorchPipeline,
    check_labels,
    load_pipeline,
    make_noise,
    sample_schedule,
)
from flowturbo.runtime.backends import load_exported_sampler
from flowturbo.runtime.results import Samples, StageTimes
from tqdm.auto import tqdm

from flowturbo.errors import FlowTurboError, SamplingError
from flowturbo.schedule import SamplingSchedule


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Sampler:
    """Runs FlowTurbo schedules on a loaded model.

    >>> sampler = Sampler.from_bundle()            # the embedded default
    >>> out = sampler.sample([0, 1, 2], seed=0)    # schedule and cfg from the model's defaults
    """

    backend = "pytorch"

    def __init__(self, pipeline: TorchPipeline) -> None:
        self.pipeline = pipeline

    @classmethod
    def from_bundle(cls, model: str | None = None, **kwargs: Any) -> "Sampler":
        """Load a bundle folder (None: the embedded default) or official checkpoints; see ``load_pipeline``."""
        return cls(load_pipeline(model, **kwargs))

    @staticmethod
    def from_artifacts(folder: str, backend: str = "onnxruntime", *, device: str | None = None,
                       threads: int | None = None, expect: dict[str, Any] | None = None) -> Any:
        """A sampler over an export directory: ``backend`` is onnxruntime | aoti | tensorrt | cpp.

        >>> sampler = Sampler.from_artifacts("artifacts/h1p5r3", backend="cpp")
        >>> out = sampler.sample([0, 1, 2], seed=0)   # Samples, as from a bundle

        See :func:`flowturbo.runtime.backends.load_exported_sampler` (the same, without importing the models).
        """
        return load_exported_sampler(folder, backend, device=device, threads=threads, expect=expect)

    def default_schedule(self, spec: str | None = None, cfg: float | None = None,
                         guidance_channels: int | None | str = "default") -> SamplingSchedule:
        """Parse ``spec`` (or the model's default schedule) with guidance settings (or the model's)."""
        defaults = self.pipeline.defaults
        channels = defaults.guidance_channels if guidance_channels == "default" else guidance_channels
        return SamplingSchedule.parse(
            spec or defaults.schedule,
            guidance_scale=defaults.cfg if cfg is None else cfg,
            guidance_channels=channels,
        )

    @torch.inference_mode()
    def sample(
        self,
        classes: Sequence[int],
        *,
        schedule: SamplingSchedule | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = True,
    ) -> Samples:
        """Generate one image per entry of ``classes``.

        The initial noise of all images is drawn at once from ``seed`` (so results do not depend on
        ``batch_size``) and the work is split into batches of at most ``batch_size`` images.
        """
        pipe = self.pipeline
        schedule = schedule or self.default_schedule()
        if schedule.uses_refiner and pipe.refiner is None:
            raise SamplingError(
                f"schedule {schedule.notation} has R steps but this model has no refiner; "
                "use a schedule without R (e.g. 'H8') or a bundle with a refiner"
            )
        labels = torch.as_tensor(list(classes), dtype=torch.long)
        if labels.numel() == 0:
            raise SamplingError("no classes given: pass at least one class id")
        check_labels(labels, pipe.num_classes, labels.shape[0])
        n = labels.shape[0]
        batch = n if batch_size is None else int(batch_size)
        if batch < 1:
            raise FlowTurboError(f"batch size must be >= 1, got {batch_size}")
        noise = make_noise(n, pipe.latent_shape, seed, dtype=pipe.dtype, device=pipe.device)  # (N, C, H, W)
        labels = labels.to(pipe.device)
        num_batches = math.ceil(n / batch)
        images, sample_s, decode_s = [], 0.0, 0.0
        calls = (0, 0)
        bar = tqdm(total=n, unit="img", desc=f"sampling {schedule.notation}",
                   disable=not progress or num_batches == 1, leave=False)
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            _sync(pipe.device)
            t0 = time.perf_counter()
            result = sample_schedule(schedule, noise[start:stop], labels[start:stop], pipe.predictor, pipe.refiner,
                                     num_classes=pipe.num_classes)
            _sync(pipe.device)
            t1 = time.perf_counter()
            decoded = pipe.decoder.decode(result.latents)  # (b, C_img, H_img, W_img) in [-1, 1]
            _sync(pipe.device)
            t2 = time.perf_counter()
            if not bool(torch.isfinite(decoded).all()):
                raise SamplingError("NaN/Inf in the decoded images; the decoder's weights or dtype are bad")
            images.append(decoded.float().cpu())
            sample_s, decode_s = sample_s + (t1 - t0), decode_s + (t2 - t1)
            calls = (result.predictor_calls, result.refiner_calls)
            bar.update(stop - start)
        bar.close()
        return Samples(
            images=torch.cat(images),
            labels=labels.cpu().tolist(),
            schedule=schedule,
            predictor_calls=calls[0],
            refiner_calls=calls[1],
            num_batches=num_batches,
            times=StageTimes(sample_s, decode_s),
        )
