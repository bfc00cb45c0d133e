"""What every exported backend shares: :class:`ExportedSampler`.

It holds the manifest (schedule, variant, batch profile, class count), the noise (:func:`flowturbo.noise.make_noise`:
image ``i`` from its own seed ``seed + i``, as every backend), batching within the exported profile, and runs the ``time-input`` / ``per-step`` graphs through the
one step loop :func:`flowturbo.integrator.integrate` (the ``unrolled`` variant runs the whole schedule +
decode as one call). Subclasses load the modules of one format: ONNX Runtime (``onnx_backend``),
AOTInductor (``aoti_backend``), TensorRT (``tensorrt_backend``). Its :meth:`~ExportedSampler.sample`
returns the same :class:`~flowturbo.runtime.results.Samples` as the PyTorch sampler.

The step graphs return the *guided* velocity (CFG inside the graph), so the loop's solver ops add and
update only (:class:`flowturbo.kernels.SolverOps` on B-row inputs), in the per-CFG-half velocity layout
when the schedule needs it (:func:`flowturbo.integrator.carries_halves`). A dt-conditioned refiner's graphs
take the velocity age ``dt`` the integrator passes as an input (time-input) or fold it (per-step: one graph per
``(t, dt)``); the manifest says which (``refiner_dt_conditioning``), checked against the graphs at load.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from flowturbo.dtypes import torch_dtype
from flowturbo.errors import CheckpointError, FlowTurboError, SamplingError
from flowturbo.integrator import IntegratorState, StepHooks, StepInfo, carries_halves, integrate
from flowturbo.kernels import SolverOps, default_kernel_backend
from flowturbo.noise import make_noise  # the one per-image noise rule, re-exported for the backends
from flowturbo.refiner_dt import RangeWarnings
from flowturbo.runtime.artifacts import DT_INPUT, ArtifactEntry, ArtifactSet, load_artifacts
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
from flowturbo.runtime.results import Samples, StageTimes
from flowturbo.runtime.text_exported import (
    POOLED,
    PromptEncoder,
    TextRequest,
    asks_for_text,
    prompt_labels,
    requested_rows,
    text_graph_inputs,
)
from flowturbo.schedule import SamplingSchedule, StepKind

# A module call: keyword tensors in (spec input names), output tensors out (spec order).
ModuleFn = Callable[..., list[torch.Tensor]]


class StepHook(Protocol):
    """Optional observer of the loop (the profiler installs one): called at each step's start and end and
    around the decode. Unset (``ExportedSampler.step_hook = None``) it costs one attribute test per step."""

    def step_start(self, index: int, kind: StepKind, t_start: float, t_end: float) -> None: ...

    def step_end(self, index: int, kind: StepKind, t_start: float, t_end: float) -> None: ...

    def decode_start(self) -> None: ...

    def decode_end(self) -> None: ...


class _ObserverHooks(StepHooks):
    """Adapts a :class:`StepHook` (profiler) to the integrator's per-step hooks."""

    def __init__(self, hook: StepHook) -> None:
        self.hook = hook

    def before_step(self, step: StepInfo, state: IntegratorState) -> None:
        self.hook.step_start(step.index, step.kind, step.t_start, step.t_end)

    def after_step(self, step: StepInfo, state: IntegratorState) -> None:
        self.hook.step_end(step.index, step.kind, step.t_start, step.t_end)


class _GraphCalls:
    """:class:`flowturbo.integrator.ModelCalls` over an export's step graphs for one batch.

    ``conditioning``: the graphs' conditioning inputs of the batch (``labels`` (B,), or a text export's prompt
    embeddings). The graphs take B images and return the guided velocity / offset (CFG inside), i.e. B-row "raw"
    outputs.
    """

    def __init__(self, sampler: "ExportedSampler", conditioning: dict[str, torch.Tensor]) -> None:
        self.sampler = sampler
        self.conditioning = conditioning

    def predictor(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return self.sampler._call(self.sampler._predict, t, {"t": t}, "predictor", latents=x, **self.conditioning)

    def refiner(self, x: torch.Tensor, t: float, v: torch.Tensor, dt: float) -> torch.Tensor:
        # A text export's refiner reads the prompts' pooled embeddings only (its graph's one conditioning input).
        conditioning = ({POOLED: self.conditioning[POOLED]} if self.sampler.takes_prompts else self.conditioning)
        if not self.sampler.refiner_dt_conditioning:  # the official refiner's calls: dt is not an input
            return self.sampler._call(self.sampler._refine, (t, None), {"t": t}, "refiner", latents=x, v=v,
                                      **conditioning)
        return self.sampler._call(self.sampler._refine, (t, dt), {"t": t, DT_INPUT: dt}, "refiner", latents=x, v=v,
                                  **conditioning)


def _conditioning(labels: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch's graph inputs besides latents and times: ``{"labels": labels}`` or a text export's inputs as given."""
    return dict(labels) if isinstance(labels, dict) else {"labels": labels}


class ExportedSampler:
    """Runs the schedule an export directory was built for; subclasses load the modules of one format."""

    backend = "exported"
    artifact_format = ""
    step_hook: StepHook | None = None  # set on an instance by flowturbo.runtime.profiling; None: no cost
    device = torch.device("cpu")  # where the loop's tensors live (subclasses running on a GPU set theirs)

    def __init__(self, artifacts: ArtifactSet) -> None:
        self.artifacts = artifacts
        self.schedule: SamplingSchedule = artifacts.schedule
        model = artifacts.model
        self.takes_prompts = artifacts.takes_prompts  # a text-to-image export: prompt embeddings, not class ids
        self.num_classes = int(model.get("num_classes", 0))
        self.prompt_encoder = PromptEncoder(artifacts)  # the pipeline folder's text encoders, loaded on first use
        self.latent_shape = tuple(int(d) for d in model["latent_shape"])
        self.class_names = model.get("class_names")
        self.dtype = torch_dtype(artifacts.precision)
        self.variant = artifacts.variant
        entries = artifacts.entries(self.artifact_format)
        self.halves = self._velocity_layout(entries)
        self.refiner_dt_conditioning = artifacts.refiner_dt_conditioning
        self.refiner_dt = artifacts.refiner_dt  # the trained range (None: not recorded)
        self.range_warnings = RangeWarnings()  # R steps beyond it: said once per grid (editing rescales it)
        # The graphs return guided velocities: the loop adds and updates only, fused into one Triton kernel
        # per update on CUDA (when Triton is installed), plain torch ops elsewhere.
        self.ops = SolverOps(halves=self.halves, backend=default_kernel_backend(self.device))
        # Time-input graphs under the key None; per-step graphs under their folded time (the refiner's under
        # (t, dt), dt None unless the refiner is dt-conditioned).
        self._predict: dict[Any, ModuleFn] = {}
        self._refine: dict[Any, ModuleFn] = {}
        self._decode: ModuleFn | None = None
        self._unrolled: ModuleFn | None = None
        self._encoder: ModuleFn | None = None
        for entry in entries:
            fn = self._load(entry)
            if entry.role == "predictor":
                self._predict[entry.time] = fn
            elif entry.role == "refiner":
                self._refine[None if entry.time is None else (entry.time, entry.dt)] = fn
            elif entry.role == "decoder":
                self._decode = fn
            elif entry.role == "unrolled":
                self._unrolled = fn
            elif entry.role == "encoder":
                self._encoder = fn
            else:
                raise FlowTurboError(f"{entry.path.name}: unknown artifact role {entry.role!r}")

    def _velocity_layout(self, entries: Sequence[ArtifactEntry]) -> bool:
        """True when the step graphs exchange per-CFG-half velocities (B, 2C, H, W).

        Read from the graphs' specs; a schedule that needs the per-half carry (partial guidance with R steps,
        :func:`flowturbo.integrator.carries_halves`) refuses graphs without it (exported by an older flowturbo).
        """
        channels = self.latent_shape[0]
        widths = {int(entry.spec["outputs"][0]["shape"][1]) for entry in entries
                  if entry.role in ("predictor", "refiner") and entry.spec.get("outputs")}
        if not widths:
            return False
        if len(widths) > 1 or not widths <= {channels, 2 * channels}:
            raise CheckpointError(f"the step graphs of {self.artifacts.root} return velocities of {sorted(widths)} "
                                  f"channels for {channels}-channel latents; re-export the directory")
        halves = widths == {2 * channels}
        if carries_halves(self.schedule, channels) and not halves:
            raise CheckpointError(
                f"schedule {self.schedule.notation} guides {self.schedule.guidance_channels} of {channels} channels and "
                "has R steps, so the velocity is carried per CFG half, but these step graphs return one half: they "
                "were exported by an older flowturbo; re-export the directory"
            )
        return halves

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
            "solver_ops": self.ops.describe(),
        }

    # ---------------------------------------------------------------------------------- the loop
    def _call(self, table: dict[Any, ModuleFn], key: Any, scalars: dict[str, float], what: str,
              **inputs: torch.Tensor) -> torch.Tensor:
        """Run the time-input graph of ``table`` with ``scalars`` (t, and a dt-conditioned refiner's dt) as (b,)
        float32 inputs, or the per-step graph folded at ``key``."""
        fn = table.get(None)
        if fn is not None:  # time-input graph
            for name, value in scalars.items():
                inputs[name] = torch.full((inputs["latents"].shape[0],), value, dtype=torch.float32,
                                          device=inputs["latents"].device)
        else:  # per-step graph with time (and dt) folded
            fn = table.get(key)
            if fn is None:
                at = ", ".join(f"{name}={value!r}" for name, value in scalars.items())
                raise SamplingError(f"the export has no {what} graph for {at}; it was built for another schedule")
        return fn(**inputs)[0]

    def _integrate(self, noise: torch.Tensor, labels: torch.Tensor | dict[str, torch.Tensor], *,
                   hooks: Sequence[StepHooks] = (), timesteps: Sequence[float] | None = None) -> torch.Tensor:
        """DESIGN.md §2 steps over the schedule's grid through the one integrator; (b, C, H, W) -> (b, C, H, W)."""
        all_hooks = list(hooks)
        if self.step_hook is not None:
            all_hooks.insert(0, _ObserverHooks(self.step_hook))
        result = integrate(self.schedule, noise, _GraphCalls(self, _conditioning(labels)), self.ops, hooks=all_hooks,
                           timesteps=timesteps)
        return result.x

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The export's decoder graph: (b, C, H, W) latents -> images in [-1, 1]."""
        if self._decode is None:
            raise SamplingError("this export has no separate decoder graph (the unrolled variant decodes inside)")
        return self._decode(latents=latents)[0]

    def run_batch(self, noise: torch.Tensor, labels: torch.Tensor | dict[str, torch.Tensor], task: Any = None,
                  rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """One batch: (images, latents, sample seconds, decode seconds); ``task``: inpainting / editing."""
        t0 = time.perf_counter()
        if self._unrolled is not None:
            if task is not None:
                raise FlowTurboError(f"{task.name} needs the loop in Python between steps, but this is an 'unrolled' "
                                     "export (one graph for the whole schedule): export --variant time-input")
            images, latents = self._unrolled(noise=noise, labels=labels)
            return images, latents, time.perf_counter() - t0, 0.0
        if task is None:
            latents = self._integrate(noise, labels)
        else:
            x0, extra = task.prepare(noise, labels, rows)
            latents = self._integrate(x0, labels, hooks=task.hooks(*extra), timesteps=task.timesteps)
        t1 = time.perf_counter()
        hook = self.step_hook
        if hook is not None:
            hook.decode_start()
        images = self.decode(latents)
        if task is not None:
            images = task.finish(images, rows)
        if hook is not None:
            hook.decode_end()
        return images, latents, t1 - t0, time.perf_counter() - t1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The export's encoder graph (``flowturbo export --with-encoder``): images (n, C, H, W) in [-1, 1] ->
        latents (n, C, h, w), contiguous.

        The graph takes batches of the export's profile MIN..MAX only, so the images go through it in chunks
        of at most MAX; a chunk below MIN (e.g. the one input image of a 2:2:2 export) is padded by repeating
        its last image, and the padding rows' latents are dropped (the encoder works image by image).
        """
        encoder = self._require_encoder()
        low, _, high = self.artifacts.batch
        images = images.to(device=self.device, dtype=self.dtype)
        latents = []
        for start in range(0, images.shape[0], high):
            chunk = images[start:start + high]
            n = chunk.shape[0]
            if n < low:
                chunk = torch.cat([chunk, chunk[-1:].expand(low - n, *chunk.shape[1:])])
            self.artifacts.check_batch(chunk.shape[0])
            latents.append(encoder(images=chunk.contiguous())[0][:n])
        # Contiguous: an AOTInductor encoder package returns channels-last latents (the VAE's convolutions), which an
        # edit's starting point t0 x_1 + (1 - t0) z would inherit, and a package reads its inputs as contiguous.
        return torch.cat(latents).contiguous()

    def _require_encoder(self) -> ModuleFn:
        """The encoder graph, or the error naming the fix (checked before anything runs, whatever the mask)."""
        if self._encoder is None:
            raise FlowTurboError(f"the export {self.artifacts.root} has no encoder graph, which inpainting and editing "
                                 "need: re-export with `flowturbo export --with-encoder ...`")
        return self._encoder

    def _check_task_request(self, image: ImageInput, mask: torch.Tensor | None, classes: Sequence[int] | None,
                            text: TextRequest | None, schedule: SamplingSchedule | None,
                            batch_size: int | None) -> int | None:
        """Refuse, before the image is encoded, what the task's generation would refuse: an image (mask) of another
        shape, a missing encoder graph, another schedule, class ids outside the model, batches outside the profile
        (e.g. fewer results than its MIN). ``text``: a text export's request (its rows counted from the prompts or
        embeddings given; None when they are missing, which :func:`text_graph_inputs` refuses). Returns the number of
        results (None: not known yet)."""
        n = len(classes or ()) if text is None else requested_rows(text)
        if text is None or n:
            self._check_task_image(image, mask, int(n or 0))
        self._require_encoder()
        self.artifacts.check_schedule(schedule)
        if text is None:
            self.artifacts.check_classes(list(classes or ()))
        if n:
            self.artifacts.batch_size_for(n, batch_size)
        return n

    # ----------------------------------------------------------------------------------- public
    @torch.inference_mode()
    def sample(
        self,
        classes: Sequence[int] | None = None,
        *,
        prompts: Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        guidance: float | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        schedule: SamplingSchedule | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
        first_index: int = 0,
    ) -> Samples:
        """One image per class id, like ``Sampler.sample`` (image j from seed ``seed + first_index + j``); the
        schedule is the exported one.

        A text-to-image export (``flowturbo export --pipeline``) takes ``prompts`` instead (encoded with the text
        encoders of the pipeline folder its manifest records; ``negative_prompt``, ``guidance`` as
        ``Sampler.sample``), or the embeddings directly: ``prompt_embeds`` (N, L, D) and ``pooled_prompt_embeds``
        (N, P), plus ``negative_prompt_embeds`` / ``negative_pooled_prompt_embeds`` for a CFG export
        (:mod:`flowturbo.runtime.text_exported`).

        Batches hold at most ``batch_size`` images (default: the profile's max) and must fit the exported
        batch profile. ``progress`` is accepted for API compatibility.
        """
        text = TextRequest(prompts, negative_prompt, guidance, prompt_embeds, pooled_prompt_embeds,
                           negative_prompt_embeds, negative_pooled_prompt_embeds)
        if asks_for_text(self.artifacts, classes, text):
            return self._generate_text(text, schedule, seed, batch_size, first_index)
        return self._generate(classes, schedule, seed, batch_size, None, first_index)

    def _generate_text(self, request: TextRequest, schedule: SamplingSchedule | None, seed: int,
                       batch_size: int | None, first_index: int = 0, task: Any = None) -> Samples:
        """A text-to-image export's sampling (``task``: inpainting / editing): the conditioning inputs per image,
        batches within the profile."""
        self.artifacts.check_schedule(schedule)
        self.range_warnings.check(self.schedule, self.refiner_dt, task.timesteps if task is not None else None)
        inputs, record = text_graph_inputs(self.artifacts, request, self.prompt_encoder, dtype=self.dtype,
                                           device=self.device)
        n = int(next(iter(inputs.values())).shape[0])
        images, times, num_batches = self._run_batches(n, inputs, seed, batch_size, task, first_index)
        labels, prompts = prompt_labels(request, n)
        return self._samples(images, labels, times, num_batches, task, prompts=prompts, conditioning=record)

    @torch.inference_mode()
    def inpaint(self, image: Any, mask: torch.Tensor, classes: Sequence[int] | None = None, *,
                prompts: Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None,
                guidance: float | None = None, prompt_embeds: torch.Tensor | None = None,
                pooled_prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                negative_pooled_prompt_embeds: torch.Tensor | None = None, schedule: SamplingSchedule | None = None,
                seed: int = 0, batch_size: int | None = None, progress: bool = False,
                feather: int = DEFAULT_FEATHER_PX, mask_notes: Sequence[str] = ()) -> Samples:
        """``Sampler.inpaint`` on the exported graphs (needs ``--with-encoder``; not the unrolled variant): one result
        per class id, or on a text-to-image export per prompt (``prompts`` / embeddings, ``negative_prompt``,
        ``guidance`` as :meth:`sample`), at the export's image size and on its recorded grid."""
        image = image if isinstance(image, ImageInput) else ImageInput(image.float())
        mask = mask.float().reshape(-1, 1, *mask.shape[-2:])
        text = self._text_request(classes, prompts, negative_prompt, guidance, prompt_embeds, pooled_prompt_embeds,
                                  negative_prompt_embeds, negative_pooled_prompt_embeds)
        self._check_task_request(image, mask, classes, text, schedule, batch_size)
        if not bool(mask.any()):
            warn_nothing_to_regenerate()
            return self._input_only(image, classes, text, mask_notes)
        known = self.encode(image.pixels)
        task = InpaintTask(image, mask, known, tuple(self.latent_shape[1:]), feather=feather, mask_notes=mask_notes)
        return self._generate_task(classes, text, schedule, seed, batch_size, task)

    @torch.inference_mode()
    def edit(self, image: Any, strength: float, classes: Sequence[int] | None = None, *,
             prompts: Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None,
             guidance: float | None = None, prompt_embeds: torch.Tensor | None = None,
             pooled_prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
             negative_pooled_prompt_embeds: torch.Tensor | None = None, schedule: SamplingSchedule | None = None,
             seed: int = 0, batch_size: int | None = None, progress: bool = False) -> Samples:
        """``Sampler.edit`` on the exported graphs (needs ``--with-encoder`` and the time-input variant; text exports
        are always time-input): classes, or prompts / embeddings on a text-to-image export, as :meth:`inpaint`."""
        image = image if isinstance(image, ImageInput) else ImageInput(image.float())
        strength = check_strength(strength)
        text = self._text_request(classes, prompts, negative_prompt, guidance, prompt_embeds, pooled_prompt_embeds,
                                  negative_prompt_embeds, negative_pooled_prompt_embeds)
        self._check_task_request(image, None, classes, text, schedule, batch_size)
        if self.variant == "per-step" and strength != 1.0:
            raise FlowTurboError("editing walks the schedule on a grid rescaled onto [1 - strength, 1], but a per-step "
                                 "export folds only the schedule's own times into its graphs: export --variant "
                                 "time-input")
        known = self.encode(image.pixels)
        return self._generate_task(classes, text, schedule, seed, batch_size,
                                   EditTask(image, known, strength, self.schedule))

    def _text_request(self, classes: Sequence[int] | None, *given: Any) -> TextRequest | None:
        """A task's text-to-image request (a text export), or None for class ids (a class export); the wrong kind for
        the export is one clear error (:func:`asks_for_text`)."""
        text = TextRequest(*given)
        return text if asks_for_text(self.artifacts, classes, text) else None

    def _generate_task(self, classes: Sequence[int] | None, text: TextRequest | None,
                       schedule: SamplingSchedule | None, seed: int, batch_size: int | None, task: Any) -> Samples:
        if text is not None:
            return self._generate_text(text, schedule, seed, batch_size, task=task)
        return self._generate(list(classes or ()), schedule, seed, batch_size, task)

    def _input_only(self, image: ImageInput, classes: Sequence[int] | None, text: TextRequest | None,
                    mask_notes: Sequence[str]) -> Samples:
        """An all-black mask's result (the input, no model call), labelled as the request's results would be."""
        if text is None:
            return input_only_samples(image, list(classes or ()), self.schedule, self.num_classes, mask_notes)
        if text.prompts is not None:
            prompts = [text.prompts] if isinstance(text.prompts, str) else list(text.prompts)
            return input_only_samples(image, prompts, self.schedule, 0, mask_notes, prompts=True)
        # Embeddings given directly: checked as sampling would (cheap), results labelled 0..n-1 as sample's.
        inputs, _ = text_graph_inputs(self.artifacts, text, self.prompt_encoder, dtype=self.dtype, device=self.device)
        n = int(next(iter(inputs.values())).shape[0])
        return input_only_samples(image, list(range(n)), self.schedule, n, mask_notes)

    def _check_task_image(self, image: ImageInput, mask: torch.Tensor | None, num_results: int) -> None:
        check_task_inputs(image, mask, tuple(int(d) for d in self.artifacts.model["image_shape"]), num_results)

    def _generate(self, classes: Sequence[int], schedule: SamplingSchedule | None, seed: int,
                  batch_size: int | None, task: Any, first_index: int = 0) -> Samples:
        self.artifacts.check_schedule(schedule)
        self.range_warnings.check(self.schedule, self.refiner_dt, task.timesteps if task is not None else None)
        labels = torch.as_tensor(list(classes), dtype=torch.long)
        n = labels.shape[0]
        if n == 0:
            raise SamplingError("no classes given: pass at least one class id")
        self.artifacts.check_classes(labels.tolist())
        images, times, num_batches = self._run_batches(n, labels.to(self.device), seed, batch_size, task, first_index)
        return self._samples(images, labels.tolist(), times, num_batches, task)

    def _samples(self, images: torch.Tensor, labels: list[int], times: StageTimes, num_batches: int, task: Any,
                 **text: Any) -> Samples:
        """The exported schedule's :class:`Samples` (``text``: a text request's ``prompts`` and ``conditioning``)."""
        return Samples(images=images, labels=labels, schedule=self.schedule,
                       predictor_calls=self.schedule.predictor_calls, refiner_calls=self.schedule.refiner_calls,
                       num_batches=num_batches, times=times, task=task.describe() if task is not None else None,
                       **text)

    def _run_batches(self, n: int, conditioning: torch.Tensor | dict[str, torch.Tensor], seed: int,
                     batch_size: int | None, task: Any, first_index: int) -> tuple[torch.Tensor, StageTimes, int]:
        """The ``n`` results in batches within the profile (class and text exports alike): image j from seed
        ``seed + first_index + j``; ``conditioning``: the labels (n,) or a text export's graph inputs (n rows each);
        ``task``: inpainting / editing or None. (images on the CPU, stage times, number of batches)."""
        batch = self.artifacts.batch_size_for(n, batch_size)  # refuses before computing anything
        noise = make_noise(n, self.latent_shape, seed, self.dtype, first_index=first_index).to(self.device)
        images, sample_s, decode_s = [], 0.0, 0.0
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            rows = ({name: value[start:stop].contiguous() for name, value in conditioning.items()}
                    if isinstance(conditioning, dict) else conditioning[start:stop].contiguous())
            out, _, s, d = self.run_batch(noise[start:stop].contiguous(), rows, task, slice(start, stop))
            if not bool(torch.isfinite(out).all()):
                raise SamplingError("NaN/Inf in the decoded images; try the fp32 export or a lower guidance scale")
            images.append(out.float().cpu())
            sample_s, decode_s = sample_s + s, decode_s + d
        return torch.cat(images), StageTimes(sample_s, decode_s), math.ceil(n / batch)


__all__ = ["ExportedSampler", "ModuleFn", "StepHook", "make_noise"]
