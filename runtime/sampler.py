"""The sampler API: classes or prompts + seed + schedule in, images + call counts + timings out.

Backends behind one interface; this module holds the PyTorch one. Exported backends (ONNX Runtime,
AOTInductor, TensorRT, the C++ runner) plug in through ``Sampler.from_artifacts``.

Every model is reached through its family's adapter (:mod:`flowturbo.families`, ``pipeline.family``): the
conditioning of a request (class ids, or prompts encoded once each), the model calls the step loop runs, the time
grid of a schedule named by its notation, the latent shape of an image size and the decode. Class-conditional
bundles and official checkpoints are the SiT family (``Sampler.from_bundle``); diffusers text-to-image pipeline
folders (SD3, FLUX.1) load with ``Sampler.from_pipeline``.

**The fast path is the default on CUDA**: bfloat16 models with a float32 solver state, our Triton kernels
(adaLN fusions inside the models, the fused CFG + solver update in the step loop), and the whole schedule
plus the decode captured into one CUDA graph per (schedule, batch size) — warm-up on a side stream, static
buffers, replay per request (:mod:`flowturbo.runtime.cuda_graphs`). Opt-outs: ``kernel_backend="reference"``
(``--kernels reference``), ``cuda_graph=False`` (``--no-cuda-graph``), ``dtype=...``. A capture that fails
falls back to step-by-step execution with a one-line warning naming the cause. On CPU everything runs
eagerly with the reference ops in float32 (per-step NaN checks). :meth:`Sampler.execution` says which path
runs; ``run.json`` records it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from flowturbo.dtypes import dtype_name
from flowturbo.errors import FlowTurboError, SamplingError
from flowturbo.families import ConditioningKind, ImageSize, conditioning_mismatch
from flowturbo.refiner_dt import RangeWarnings
from flowturbo.runtime.backends import load_exported_sampler
from flowturbo.runtime.cuda_graphs import CaptureBackend, GraphCache
from flowturbo.runtime.editing import (
    DEFAULT_FEATHER_PX,
    EditTask,
    ImageInput,
    InpaintTask,
    check_strength,
    check_task_inputs,
    input_only_samples,
    warn_nothing_to_regenerate,
)
from flowturbo.runtime.pytorch_backend import (
    TorchPipeline,
    load_pipeline,
    load_text_pipeline,
    make_noise,
    run_schedule,
    text_bundle_settings,
)
from flowturbo.runtime.results import Samples, StageTimes
from flowturbo.schedule import SamplingSchedule


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Sampler:
    """Runs FlowTurbo schedules on a loaded model.

    >>> sampler = Sampler.from_bundle()            # the embedded default
    >>> out = sampler.sample([0, 1, 2], seed=0)    # schedule and cfg from the model's defaults
    >>> sd3 = Sampler.from_pipeline("stable-diffusion-3.5-medium")   # a diffusers pipeline folder
    >>> out = sd3.sample(prompts=["a red fox"], schedule="H2P6", cfg=4.5, size=ImageSize(1024, 1024))

    ``cuda_graph``: capture schedule + decode per batch size (default: on for CUDA pipelines; refused on CPU
    unless a ``graph_backend`` stand-in is given, as the tests and the GPU suite's dry run do).
    """

    backend = "pytorch"
    GRAPH_BATCH = 16  # default images per captured graph: larger requests are split into graphs of this size

    def __init__(self, pipeline: TorchPipeline, *, cuda_graph: bool | None = None,
                 graph_backend: CaptureBackend | None = None, graph_batch: int | None = None) -> None:
        self.pipeline = pipeline
        self.graph_batch = int(graph_batch or self.GRAPH_BATCH)
        on_cuda = pipeline.device.type == "cuda"
        use_graph = on_cuda if cuda_graph is None else bool(cuda_graph)
        if use_graph and not on_cuda and graph_backend is None:
            raise FlowTurboError("CUDA graphs need a CUDA device; drop --cuda-graph or use --device cuda")
        self.graphs: GraphCache | None = GraphCache(graph_backend) if use_graph else None
        self.range_warnings = RangeWarnings()  # R steps beyond the refiner's trained dt: said once per schedule

    @classmethod
    def from_bundle(cls, model: str | None = None, *, cuda_graph: bool | None = None,
                    graph_backend: CaptureBackend | None = None, graph_batch: int | None = None,
                    **kwargs: Any) -> "Sampler":
        """Load a bundle folder (None: the embedded default) or official checkpoints; see ``load_pipeline``
        (``device``, ``dtype``, ``kernel_backend``, ``checkpoint_entry``, ...)."""
        text = text_bundle_settings(model)
        if text is not None:  # a refiner packaged for a diffusers pipeline folder: that folder + the refiner
            return cls.from_pipeline(text["pipeline"], cuda_graph=cuda_graph, graph_backend=graph_backend,
                                     graph_batch=graph_batch, refiner=text["refiner"], defaults=text["defaults"],
                                     **kwargs)
        return cls(load_pipeline(model, **kwargs), cuda_graph=cuda_graph, graph_backend=graph_backend,
                   graph_batch=graph_batch)

    @classmethod
    def from_pipeline(cls, folder: str, *, cuda_graph: bool | None = None,
                      graph_backend: CaptureBackend | None = None, graph_batch: int | None = None,
                      **kwargs: Any) -> "Sampler":
        """Load a diffusers flow-matching text-to-image pipeline folder as the Hub downloads it (the pipeline classes
        :mod:`flowturbo.training.families` registers: SD3 / SD3.5, FLUX.1); see ``load_text_pipeline`` (``device``,
        ``dtype``, ``kernel_backend``, ``max_sequence_length``, ``refiner``: a token refiner trained for this folder,
        which schedules with R steps need). Sample with ``sample(prompts=[...])``.

        ``cuda_graph`` defaults to off here: capturing a diffusers transformer in a CUDA graph has not been verified
        on a GPU yet (pass ``cuda_graph=True`` to try; a failed capture falls back step by step with a warning)."""
        return cls(load_text_pipeline(folder, **kwargs), cuda_graph=bool(cuda_graph), graph_backend=graph_backend,
                   graph_batch=graph_batch)

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
                         guidance_channels: int | None | str = "default",
                         size: ImageSize | None = None, task: str = "sample") -> SamplingSchedule:
        """Parse ``spec`` (or the model's default schedule for ``task``: ``sample``, ``inpaint``, ``edit``; a bundle
        may name its own for inpainting) with guidance settings (or the model's), on the model's time grid for images
        of ``size`` (families with a time shift: SD3, FLUX; others: the schedule's own)."""
        family = self.pipeline.family
        defaults = family.defaults
        channels = defaults.guidance_channels if guidance_channels == "default" else guidance_channels
        schedule = SamplingSchedule.parse(
            spec or defaults.schedule_for(task),
            guidance_scale=defaults.cfg if cfg is None else cfg,
            guidance_channels=channels,
        )
        grid = family.timesteps(schedule.num_steps, family.latent_shape(size))
        return schedule if grid is None else dataclasses.replace(schedule, timesteps=grid)

    def execution(self) -> dict[str, Any]:
        """Which path runs: device, model and state dtypes, kernels, CUDA graph (and why not, if it fell back)."""
        pipe = self.pipeline
        graph = self.graphs is not None and self.graphs.fallback_reason is None
        described: dict[str, Any] = {
            "device": str(pipe.device),
            "dtype": dtype_name(pipe.dtype),
            "state_dtype": dtype_name(pipe.state_dtype),
            "kernels": pipe.kernel_backend.value,
            "cuda_graph": graph,
        }
        if self.graphs is not None and self.graphs.fallback_reason is not None:
            described["cuda_graph_fallback"] = self.graphs.fallback_reason
        return described

    def describe_execution(self) -> str:
        """One line for the CLI: ``triton kernels + CUDA graph, bfloat16 (state float32)``."""
        e = self.execution()
        parts = [f"{e['kernels']} kernels"]
        if e["cuda_graph"]:
            parts.append("CUDA graph")
        text = " + ".join(parts) + f", {e['dtype']}"
        if e["state_dtype"] != e["dtype"]:
            text += f" (state {e['state_dtype']})"
        if "cuda_graph_fallback" in e:
            text += f"; {e['cuda_graph_fallback']}"
        return text

    # ------------------------------------------------------------------------------------------ batches
    def _integrate(self, schedule: SamplingSchedule, x0: torch.Tensor, conditioning: Any,
                   extra: Sequence[torch.Tensor], task: Any, check_finite: bool) -> torch.Tensor:
        """The schedule from ``x0`` through the family's model calls: final latents (b, C, h, w). ``task``
        (inpainting / editing, :mod:`flowturbo.runtime.editing`) adds its per-step hooks (over the ``extra`` inputs)
        and its time grid."""
        pipe = self.pipeline
        return run_schedule(schedule, x0, pipe.family.model_calls(conditioning, schedule), check_finite=check_finite,
                            kernel_backend=pipe.kernel_backend, hooks=task.hooks(*extra) if task is not None else (),
                            timesteps=task.timesteps if task is not None else None).latents

    def _forward(self, schedule: SamplingSchedule, x0: torch.Tensor, conditioning: Any, *extra: torch.Tensor,
                 task: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Schedule + decode for one batch without host syncs (what a CUDA graph captures); the task's pixel-space
        post-processing runs outside, in :meth:`_run_batch`."""
        latents = self._integrate(schedule, x0, conditioning, extra, task, check_finite=False)
        return self.pipeline.family.decode(latents), latents  # (b, C_img, H, W), (b, C, h, w)

    def _locate_non_finite(self, schedule: SamplingSchedule, x0: torch.Tensor, conditioning: Any,
                           extra: tuple[torch.Tensor, ...] = (), task: Any = None) -> None:
        """Re-run a batch step by step with NaN checks: raises naming the first bad step (or the decoder)."""
        self._integrate(schedule, x0, conditioning, extra, task, check_finite=True)
        raise SamplingError("NaN/Inf in the decoded images (the latents were finite): the decoder overflowed; "
                            "try --dtype float32")

    def _run_batch(self, schedule: SamplingSchedule, noise: torch.Tensor, conditioning: Any,
                   task: Any = None, rows: slice = slice(None)) -> tuple[torch.Tensor, float, float, float]:
        """(images, sample s, decode s, capture s) for one batch (results ``rows``) on the configured path."""
        pipe = self.pipeline
        x0, extra = task.prepare(noise, conditioning, rows) if task is not None else (noise, ())
        if self.graphs is not None:
            _sync(pipe.device)
            started = time.perf_counter()
            key = (task.key if task is not None else ("sample",), schedule.id, noise.shape[0], tuple(noise.shape[1:]),
                   conditioning.static_key())
            tensors = conditioning.tensors()

            def forward(x: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                given = conditioning.with_tensors(inputs[:len(tensors)])
                return self._forward(schedule, x, given, *inputs[len(tensors):], task=task)

            run = self.graphs.run(key, forward, (x0, *tensors, *extra))
            images = run.outputs[0]
            _sync(pipe.device)
            elapsed = time.perf_counter() - started - run.capture_s
            if not bool(torch.isfinite(images).all()):
                self._locate_non_finite(schedule, x0, conditioning, extra, task)
            return (task.finish(images, rows) if task is not None else images), elapsed, 0.0, run.capture_s
        per_step_checks = pipe.device.type != "cuda"  # a host sync per step costs nothing on CPU
        _sync(pipe.device)
        t0 = time.perf_counter()
        latents = self._integrate(schedule, x0, conditioning, extra, task, check_finite=per_step_checks)
        _sync(pipe.device)
        t1 = time.perf_counter()
        images = pipe.family.decode(latents)  # (b, C_img, H_img, W_img) in [-1, 1]
        if task is not None:
            images = task.finish(images, rows)
        _sync(pipe.device)
        t2 = time.perf_counter()
        if not bool(torch.isfinite(images).all()):
            if not per_step_checks:
                self._locate_non_finite(schedule, x0, conditioning, extra, task)
            raise SamplingError("NaN/Inf in the decoded images; the decoder's weights or dtype are bad")
        return images, t1 - t0, t2 - t1, 0.0

    def _largest_batch_that_fits(self, schedule: SamplingSchedule, noise: torch.Tensor, conditioning: Any) -> int:
        """The largest batch (< the failed one) whose step-by-step run fits in GPU memory, by bisection over
        [0, n) (about log2(n) trial runs); 0: not even one image."""
        fits, fails = 0, noise.shape[0]  # invariant: ``fits`` images run (0 trivially), ``fails`` images do not
        while fails - fits > 1:
            size = (fits + fails) // 2
            if self.pipeline.device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                self._forward(schedule, noise[:size], conditioning.rows(slice(0, size)))
                _sync(self.pipeline.device)
                fits = size
            except torch.OutOfMemoryError:
                fails = size
        return fits

    def _out_of_memory(self, schedule: SamplingSchedule, noise: torch.Tensor, conditioning: Any) -> SamplingError:
        if self.graphs is not None:
            self.graphs.clear()
        if self.pipeline.device.type == "cuda":
            torch.cuda.empty_cache()
        fits = self._largest_batch_that_fits(schedule, noise, conditioning)
        free = ""
        if self.pipeline.device.type == "cuda":
            free_b, total_b = torch.cuda.mem_get_info(self.pipeline.device)
            free = f" ({free_b / 2**30:.1f} of {total_b / 2**30:.1f} GiB free)"
        hint = f"the largest batch that fits is {fits}: pass --batch {fits}" if fits else \
            "not even one image fits: free GPU memory or use --dtype bfloat16"
        return SamplingError(f"a batch of {noise.shape[0]} images does not fit in GPU memory{free}; {hint}")

    # ------------------------------------------------------------------------------------------ public
    @torch.inference_mode()
    def sample(
        self,
        classes: Sequence[int] | None = None,
        *,
        prompts: Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        guidance: float | None = None,
        size: ImageSize | None = None,
        schedule: SamplingSchedule | str | None = None,
        cfg: float | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = True,
        first_index: int = 0,
    ) -> Samples:
        """Generate one image per entry of ``classes`` (class-conditional models) or of ``prompts`` (text-to-image).

        Image ``j`` starts from its own noise, seeded ``seed + first_index + j``
        (:func:`flowturbo.noise.make_noise`; ``first_index`` is the global index of the first image when a request
        is split over processes), so results do not depend on ``batch_size`` or on the number of processes. The
        work is split into batches of at most ``batch_size`` images (default: all at
        once; with CUDA graphs: at most ``graph_batch`` = 16 images); with CUDA graphs, each distinct batch size
        is captured once and replayed afterwards (a 40-image request runs graphs of 16, 16 and 8).

        ``schedule``: a :class:`SamplingSchedule` (its grid as given) or notation (on the model's time grid, with
        ``cfg`` or the model's CFG scale); None: the model's default. Text-to-image only: ``negative_prompt`` (one, or
        one per image; used with CFG, default ``""`` where the model's CFG wants one), ``guidance`` (the distilled
        guidance value of guidance-distilled models such as FLUX.1-dev), ``size`` (default: the model's); each
        distinct prompt is encoded once.
        """
        requests = self._requests(classes, prompts)
        schedule = self._resolve_schedule(schedule, cfg, size)
        return self._generate(requests, schedule, seed, batch_size, progress, None, first_index,
                              negative=negative_prompt, guidance=guidance, size=size)

    @torch.inference_mode()
    def inpaint(
        self,
        image: ImageInput | torch.Tensor,
        mask: torch.Tensor,
        classes: Sequence[int] | None = None,
        *,
        prompts: Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        guidance: float | None = None,
        schedule: SamplingSchedule | str | None = None,
        cfg: float | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = True,
        feather: int = DEFAULT_FEATHER_PX,
        mask_notes: Sequence[str] = (),
    ) -> Samples:
        """Regenerate the white region of ``mask`` in ``image``, once per entry of ``classes`` (class-conditional
        models) or of ``prompts`` (text-to-image: ``negative_prompt`` and ``guidance`` as in :meth:`sample`).

        image: (1, C, H, W) in [-1, 1] (or an :class:`~flowturbo.runtime.editing.ImageInput`), or one image per
        result (N, C, H, W); mask: (1 or N, 1, H, W) or (H, W) in {0, 1}, 1 = regenerate. A text model samples at
        the image's size (one it can take; else refused naming the nearest valid ones), on its own time grid for
        that size. Method and guarantees: :mod:`flowturbo.runtime.editing` (kept pixels are exactly the input's; an
        all-white mask is plain sampling; an all-black one returns the input).
        """
        image = image if isinstance(image, ImageInput) else ImageInput(image.float())
        mask = mask.float().reshape(-1, 1, *mask.shape[-2:])
        requests, size, latent_size = self._task_request(classes, prompts, image, mask)
        schedule = self._resolve_schedule(schedule, cfg, size, task="inpaint")
        pipe = self.pipeline
        pipe.require_encoder("inpainting")  # a model without one is refused even when nothing is regenerated
        if not bool(mask.any()):
            warn_nothing_to_regenerate()
            if size is None:
                return input_only_samples(image, requests, schedule, pipe.num_classes, mask_notes)
            return input_only_samples(image, requests, schedule, 0, mask_notes, prompts=True)
        known = self._encode(image, "inpainting")
        task = InpaintTask(image, mask, known, latent_size, feather=feather, mask_notes=mask_notes)
        return self._generate(requests, schedule, seed, batch_size, progress, task, negative=negative_prompt,
                              guidance=guidance, size=size)

    @torch.inference_mode()
    def edit(
        self,
        image: ImageInput | torch.Tensor,
        strength: float,
        classes: Sequence[int] | None = None,
        *,
        prompts: Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        guidance: float | None = None,
        schedule: SamplingSchedule | str | None = None,
        cfg: float | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = True,
    ) -> Samples:
        """SDEdit-style editing of ``image`` towards each class in ``classes`` or each prompt in ``prompts``
        (strength in (0, 1]; 1 = sample).

        Starts at ``t0 = 1 - strength`` on the linear path between fresh noise and the encoded image and runs the
        schedule's steps on its grid (a text model's: its own shifted grid at the image's size) rescaled onto
        ``[t0, 1]`` (same call counts); see :mod:`flowturbo.runtime.editing`.
        """
        image = image if isinstance(image, ImageInput) else ImageInput(image.float())
        strength = check_strength(strength)
        requests, size, _ = self._task_request(classes, prompts, image, None)
        schedule = self._resolve_schedule(schedule, cfg, size)
        known = self._encode(image, "editing")
        return self._generate(requests, schedule, seed, batch_size, progress, EditTask(image, known, strength, schedule),
                              negative=negative_prompt, guidance=guidance, size=size)

    def _requests(self, classes: Sequence[int] | None, prompts: Sequence[str] | str | None) -> list[Any]:
        """One request per image: the prompts (text-to-image) or the class ids, of the kind the model takes (the wrong
        kind, both kinds or none is one clear error)."""
        family = self.pipeline.family
        if prompts is not None and classes is not None:
            raise FlowTurboError("give class ids or prompts, not both")
        given = ConditioningKind.PROMPTS if prompts is not None else ConditioningKind.CLASSES
        if given is not family.conditioning_kind:
            raise conditioning_mismatch(family, given)
        if prompts is not None:
            return [prompts] if isinstance(prompts, str) else list(prompts)
        if classes is None:
            raise FlowTurboError("no classes given: pass at least one class id")
        return list(classes)

    def _task_request(self, classes: Sequence[int] | None, prompts: Sequence[str] | None, image: ImageInput,
                      mask: torch.Tensor | None) -> tuple[list[Any], ImageSize | None, int | tuple[int, int]]:
        """(requests, image size, latent size) of an inpaint / edit request, its image (and mask) checked against the
        model: class ids and the model's one image size (size None), or prompts and the image's own size (a size the
        model takes; the latent size is then (h, w))."""
        requests = self._requests(classes, prompts)
        if prompts is None:
            _check_task_image(image, mask, self.pipeline, len(requests))
            return requests, None, self.pipeline.latent_shape[1]
        family = self.pipeline.family
        if not requests:
            raise FlowTurboError("no prompts given: pass at least one prompt")
        pixels = image.pixels
        if pixels.dim() != 4:
            raise FlowTurboError(f"the image must be (N, C, H, W) in [-1, 1], got {tuple(pixels.shape)}")
        size = ImageSize(int(pixels.shape[-1]), int(pixels.shape[-2]))
        _, h, w = check_text_image_size(family, size)  # (C, h, w)
        check_task_inputs(image, mask, (3, size.height, size.width), len(requests))
        return requests, size, (h, w)

    def _resolve_schedule(self, schedule: SamplingSchedule | str | None, cfg: float | None,
                       size: ImageSize | None, task: str = "sample") -> SamplingSchedule:
        """A schedule object as given, or a notation (None: the model's default for ``task``) on the model's grid at
        ``size`` (with ``cfg``, which a schedule object refuses: it carries its own guidance)."""
        if schedule is None or isinstance(schedule, str):
            return self.default_schedule(schedule, cfg, size=size, task=task)
        if cfg is not None:
            raise FlowTurboError("cfg applies to a schedule given by notation; a SamplingSchedule carries its own "
                                 "guidance (use schedule.with_guidance)")
        return schedule

    def _encode(self, image: ImageInput, what: str) -> torch.Tensor:
        """x_1 = E(image): (1, C, h, w) in the solver state's dtype, on the device (a text model's: its VAE encoder with
        the scale and shift, ``TorchPipeline.require_encoder``)."""
        pipe = self.pipeline
        encoder = pipe.require_encoder(what)
        weight = next(encoder.parameters())
        return encoder.encode(image.pixels.to(device=pipe.device, dtype=weight.dtype)).to(pipe.state_dtype)

    def _generate(self, requests: Sequence[Any], schedule: SamplingSchedule | None, seed: int,
                  batch_size: int | None, progress: bool, task: Any, first_index: int = 0, *,
                  negative: str | Sequence[str] | None = None, guidance: float | None = None,
                  size: ImageSize | None = None) -> Samples:
        """``requests``: class ids or prompts, one per image (the family conditions them)."""
        pipe = self.pipeline
        family = pipe.family
        latent_shape = family.latent_shape(size)  # (C, h, w); a size the model cannot take is refused here
        schedule = schedule or self.default_schedule(size=size)
        family.check_schedule(schedule)
        self.range_warnings.check(schedule, pipe.refiner_dt, task.timesteps if task is not None else None)
        conditioning = family.condition(requests, schedule, negative=negative, guidance=guidance)
        n = len(conditioning)
        default_batch = min(n, self.graph_batch) if self.graphs is not None else n
        batch = default_batch if batch_size is None else int(batch_size)
        if batch < 1:
            raise FlowTurboError(f"batch size must be >= 1, got {batch_size}")
        noise = make_noise(n, latent_shape, seed, dtype=pipe.state_dtype, device=pipe.device,
                           first_index=first_index)  # (N, C, H, W)
        num_batches = math.ceil(n / batch)
        images, sample_s, decode_s, capture_s = [], 0.0, 0.0, 0.0
        what = task.name if task is not None else "sampling"
        bar = tqdm(total=n, unit="img", desc=f"{what} {schedule.notation}",
                   disable=not progress or num_batches == 1, leave=False)
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            chunk_noise, chunk_conditioning = noise[start:stop], conditioning.rows(slice(start, stop))
            try:
                decoded, s, d, c = self._run_batch(schedule, chunk_noise, chunk_conditioning, task,
                                                   slice(start, stop))
            except torch.OutOfMemoryError:
                raise self._out_of_memory(schedule, chunk_noise, chunk_conditioning) from None
            images.append(decoded.float().cpu())
            sample_s, decode_s, capture_s = sample_s + s, decode_s + d, capture_s + c
            bar.update(stop - start)
        bar.close()
        labels, prompts = _labels_of(requests, family)
        return Samples(
            images=torch.cat(images),
            labels=labels,
            schedule=schedule,
            predictor_calls=schedule.predictor_calls,
            refiner_calls=schedule.refiner_calls,
            num_batches=num_batches,
            times=StageTimes(sample_s, decode_s, capture_s, decode_fused=self.graphs is not None
                             and self.graphs.fallback_reason is None),
            execution=self.execution(),
            task=task.describe() if task is not None else None,
            prompts=prompts,
            conditioning=None if prompts is None else _text_record(conditioning, negative, family, latent_shape),
        )


def check_text_image_size(family: Any, size: ImageSize) -> tuple[int, int, int]:
    """The latent shape (C, h, w) of a text model's inpaint / edit input of ``size`` (the output's size); a size the
    model cannot take is refused naming the nearest valid ones."""
    try:
        return family.latent_shape(size)
    except FlowTurboError as exc:  # "--size WxH is not a multiple of ...; the nearest valid sizes are ..."
        raise FlowTurboError(f"--image {str(exc).removeprefix('--size ')} (the input image's size is the results': "
                             "resize it to one the model takes)") from None


def _labels_of(requests: Sequence[Any], family: Any) -> tuple[list[int], list[str] | None]:
    """(labels, prompts) of a request: class ids and None, or each image's index among the distinct prompts and
    those prompts (first-seen order)."""
    if family.conditioning_kind is ConditioningKind.CLASSES:
        return [int(r) for r in requests], None
    prompts = list(dict.fromkeys(requests))
    index = {prompt: i for i, prompt in enumerate(prompts)}
    return [index[r] for r in requests], prompts


def _text_record(conditioning: Any, negative: str | Sequence[str] | None, family: Any,
                 latent_shape: tuple[int, int, int]) -> dict[str, Any]:
    """What run.json says about a text-to-image request beyond its prompts."""
    return {"family": family.name, "image_size": str(family.image_size(latent_shape)),
            "negative_prompt": negative if negative is None or isinstance(negative, str) else list(negative),
            "guidance": conditioning.guidance, "max_sequence_length": getattr(family, "max_sequence_length", None)}


def _check_task_image(image: ImageInput, mask: torch.Tensor | None, pipe: TorchPipeline,
                      num_results: int) -> None:
    """Refuse images (or masks) that do not fit the model's image shape, naming both shapes: one image for all
    results, or one per result."""
    size = pipe.decoder.image_size(pipe.latent_shape[1])
    check_task_inputs(image, mask, (pipe.decoder.image_channels, size, size), num_results)
