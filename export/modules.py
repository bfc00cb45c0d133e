"""Exportable wrappers: the predictor / refiner *step* with CFG inside, the decoder, the unrolled schedule.

Every wrapper's ``forward`` parameter names equal its :class:`~flowturbo.export.specs.ModuleSpec` input
names (the dynamo exporter and ``torch.export`` key dynamic shapes by them). The models run with the
reference kernel backend, so exported graphs contain only standard ops (no ``torch.ops.flowturbo.*``),
except AOTInductor CUDA exports with ``kernel_backend="triton"``, which compile our Triton kernels in.

Three schedule specialisations (issue 5, item 2):

* ``time-input``: one graph per module, time is an input (:class:`PredictorStep`, :class:`RefinerStep`).
* ``per-step``: one graph per distinct step time with the time embedding ``t_embedder(t)`` folded into a
  constant (``time=`` given to the step wrappers).
* ``unrolled``: one graph for the whole schedule + decode (:class:`UnrolledSchedule`), times folded, the
  weights shared by every step.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from flowturbo.errors import FlowTurboError
from flowturbo.schedule import SamplingSchedule, StepKind
from flowturbo.training.decoders import LatentDecoder
from flowturbo.training.models import SiT, VelocityRefiner

VARIANTS = ("time-input", "per-step", "unrolled")


def _guide(out: torch.Tensor, batch: int, scale: float, channels: int | None) -> torch.Tensor:
    """``u + s (c - u)`` on the first ``channels`` channels of the doubled output ``[c; u]`` (2B, C, H, W).

    Slicing by ``batch`` (not ``chunk(2)``) keeps the batch axis symbolic under ``torch.export``.
    """
    cond, uncond = out[:batch], out[batch:]  # (B, C, H, W) each
    guided = uncond + scale * (cond - uncond)
    if channels is None or channels >= out.shape[1]:
        return guided
    return torch.cat([guided[:, :channels], cond[:, channels:]], dim=1)


class _Transformer(nn.Module):
    """A SiT or refiner body run with either a time input or a folded time embedding."""

    def __init__(self, model: SiT | VelocityRefiner, time: float | None) -> None:
        super().__init__()
        # The kernel backend travels with the model: reference (standard ops, every format) or, for
        # AOTInductor CUDA packages only, our Triton custom ops (checked by export.pipeline.ExportRequest).
        self.model = model
        self.time = time
        if time is not None:
            dtype = model.t_embedder.mlp[0].weight.dtype
            device = model.t_embedder.mlp[0].weight.device
            with torch.no_grad():
                t_emb = model.t_embedder(torch.tensor([time], dtype=torch.float32, device=device))  # (1, D)
            self.register_buffer("t_emb", t_emb.to(dtype), persistent=False)

    def run(self, x: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """``x`` (M, embed_channels, H, W), ``t`` (M,) or None (folded), ``y`` (M,) -> (M, out, H, W).

        Mirrors ``_AdaLNTransformer._run`` with ``c = t_emb + y_emb``.
        """
        m = self.model
        tokens = m.x_embedder(x) + m.pos_embed  # (M, T, D)
        t_emb = self.t_emb if self.time is not None else m.t_embedder(t)  # (1, D) folded or (M, D)
        c = t_emb + m.y_embedder(y)  # (M, D)
        pending = None
        for block in m.blocks:
            tokens, pending = block.forward_chained(tokens, c, pending, m.kernel_backend)  # (M, T, D)
        return m.unpatchify(m.final_layer(tokens, c, pending, m.kernel_backend))  # (M, out, H, W)


class _GuidedStep(nn.Module):
    """Shared CFG plumbing of the predictor and refiner steps."""

    def __init__(self, model: SiT | VelocityRefiner, guidance_scale: float, guidance_channels: int | None,
                 time: float | None) -> None:
        super().__init__()
        self.body = _Transformer(model, time)
        self.channels = model.config.in_channels
        self.null_label = model.config.num_classes
        self.scale = float(guidance_scale)
        self.guidance_channels = guidance_channels
        self.guided = self.scale != 1.0
        if self.guided and not model.y_embedder.has_null_class:
            raise FlowTurboError("guidance needs a model with a null class (class_dropout_prob > 0); export with cfg 1")

    def _double(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return [torch.cat([a, a]) if self.guided else a for a in tensors]

    def _labels(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.cat([labels, torch.full_like(labels, self.null_label)]) if self.guided else labels

    def _combine(self, out: torch.Tensor, batch: int) -> torch.Tensor:
        out = out[:, : self.channels]
        return _guide(out, batch, self.scale, self.guidance_channels) if self.guided else out

    def time_rows(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else self._double(t)[0]


class PredictorStep(_GuidedStep):
    """``(latents (B,C,H,W), t (B,), labels (B,)) -> guided velocity (B,C,H,W)``; t absent when folded."""

    def __init__(self, predictor: SiT, guidance_scale: float, guidance_channels: int | None = None,
                 time: float | None = None) -> None:
        super().__init__(predictor, guidance_scale, guidance_channels, time)

    def velocity(self, latents: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        (xx,) = self._double(latents)  # (M, C, H, W), M = 2B with guidance
        out = self.body.run(xx, self.time_rows(t), self._labels(labels))  # (M, out, H, W)
        return self._combine(out, latents.shape[0])

    def forward(self, latents: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.velocity(latents, t, labels)


class FoldedPredictorStep(PredictorStep):
    """Per-step predictor graph: ``(latents, labels) -> velocity`` at the folded time."""

    def forward(self, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.velocity(latents, None, labels)


class RefinerStep(_GuidedStep):
    """``(latents, v, t, labels) -> guided velocity offset (B,C,H,W)``; the refiner sees ``cat(x, v)``."""

    def __init__(self, refiner: VelocityRefiner, guidance_scale: float, guidance_channels: int | None = None,
                 time: float | None = None) -> None:
        super().__init__(refiner, guidance_scale, guidance_channels, time)

    def offset(self, latents: torch.Tensor, v: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        xx, vv = self._double(latents, v)  # (M, C, H, W) each
        out = self.body.run(torch.cat([xx, vv], dim=1), self.time_rows(t), self._labels(labels))
        return self._combine(out, latents.shape[0])

    def forward(self, latents: torch.Tensor, v: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.offset(latents, v, t, labels)


class FoldedRefinerStep(RefinerStep):
    """Per-step refiner graph: ``(latents, v, labels) -> offset`` at the folded time."""

    def forward(self, latents: torch.Tensor, v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.offset(latents, v, None, labels)


class DecoderStep(nn.Module):
    """``latents (B,C,H,W) -> images (B,C_img,H_img,W_img)`` in [-1, 1]."""

    def __init__(self, decoder: LatentDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode(latents)


class UnrolledSchedule(nn.Module):
    """The whole schedule (DESIGN.md §2 E/H/P/R steps) + decode as one graph: ``(noise, labels) -> (images, latents)``.

    Every predictor/refiner call uses a time-folded body; the weights are shared by all steps (one copy).
    """

    def __init__(self, schedule: SamplingSchedule, predictor: SiT, refiner: VelocityRefiner | None,
                 decoder: LatentDecoder) -> None:
        super().__init__()
        if schedule.uses_refiner and refiner is None:
            raise FlowTurboError(
                f"schedule {schedule.notation} has R steps but the bundle has no refiner; "
                "export a schedule without R (e.g. 'H8') or use a bundle with a refiner"
            )
        self.schedule = schedule
        scale, channels = schedule.guidance_scale, schedule.guidance_channels
        pred_times, ref_times = step_times(schedule)
        # Step wrappers share the model modules: the exported graph holds one copy of each weight.
        self.predictor_steps = nn.ModuleList([PredictorStep(predictor, scale, channels, t) for t in pred_times])
        self.refiner_steps = nn.ModuleList([RefinerStep(refiner, scale, channels, t) for t in ref_times])
        self._pred_index = {t: i for i, t in enumerate(pred_times)}
        self._ref_index = {t: i for i, t in enumerate(ref_times)}
        self.decoder = decoder

    def _v(self, x: torch.Tensor, t: float, labels: torch.Tensor) -> torch.Tensor:
        return self.predictor_steps[self._pred_index[t]].velocity(x, None, labels)

    def _r(self, x: torch.Tensor, v: torch.Tensor, t: float, labels: torch.Tensor) -> torch.Tensor:
        return self.refiner_steps[self._ref_index[t]].offset(x, v, None, labels)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = noise  # (B, C, H, W)
        carried: torch.Tensor | None = None
        times = self.schedule.timesteps
        for k, kind in enumerate(self.schedule.steps):
            t0, t1 = times[k], times[k + 1]
            h = t1 - t0
            if kind is StepKind.EULER:
                x = x + h * self._v(x, t0, labels)
                carried = None
            elif kind is StepKind.REFINER:
                assert carried is not None  # schedule validation guarantees a carried velocity
                v = carried
                d = v + self._r(x, v, t0, labels)
                d_next = d + self._r(x + h * d, v, t1, labels)
                x = x + 0.5 * h * (d + d_next)
                carried = d
            else:
                d = carried if kind is StepKind.PSEUDO and carried is not None else self._v(x, t0, labels)
                d_next = self._v(x + h * d, t1, labels)
                x = x + 0.5 * h * (d + d_next)
                carried = d_next
        return self.decoder.decode(x), x


def step_times(schedule: SamplingSchedule) -> tuple[list[float], list[float]]:
    """Distinct times at which the predictor / refiner is called (the per-step graphs to build)."""
    times = schedule.timesteps
    pred, ref = set(), set()
    carried = False
    for k, kind in enumerate(schedule.steps):
        if kind is StepKind.REFINER:
            ref.update((times[k], times[k + 1]))
        elif kind is StepKind.EULER:
            pred.add(times[k])
        else:
            if not (kind is StepKind.PSEUDO and carried):
                pred.add(times[k])
            pred.add(times[k + 1])
        carried = kind is not StepKind.EULER
    return sorted(pred), sorted(ref)


__all__ = [
    "VARIANTS",
    "DecoderStep",
    "FoldedPredictorStep",
    "FoldedRefinerStep",
    "PredictorStep",
    "RefinerStep",
    "UnrolledSchedule",
    "step_times",
]
