"""Exportable wrappers: the predictor / refiner *step* with CFG inside, the decoder, the unrolled schedule.

Every wrapper's ``forward`` parameter names equal its :class:`~flowturbo.export.specs.ModuleSpec` input
names (the dynamo exporter and ``torch.export`` key dynamic shapes by them). The models run with the
reference kernel backend, so exported graphs contain only standard ops (no ``torch.ops.flowturbo.*``),
except AOTInductor CUDA exports with ``kernel_backend="triton"``, which compile our Triton kernels in.

Three schedule specialisations (issue 5, item 2):

* ``time-input``: one graph per module, time is an input (:class:`PredictorStep`, :class:`RefinerStep`; a
  dt-conditioned refiner's graph takes its velocity age ``dt`` as an input too, :class:`DtRefinerStep`).
* ``per-step``: one graph per distinct step time with the time embedding ``t_embedder(t)`` folded into a
  constant (``time=`` given to the step wrappers); a dt-conditioned refiner gets one graph per distinct
  ``(t, dt)`` its calls use, both embeddings folded (:func:`refiner_graph_keys`).
* ``unrolled``: one graph for the whole schedule + decode (:class:`UnrolledSchedule`), times (and dts) folded,
  the weights shared by every step; its loop is the one integrator (``flowturbo.integrator``).

Velocities in and out of the step graphs follow the integrator's layout: (B, C, H, W), or (B, 2C, H, W)
per CFG half under partial guidance in a schedule with R steps (``halves``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from flowturbo.errors import FlowTurboError
from flowturbo.integrator import call_times, carries_halves, integrate, refiner_call_plan
from flowturbo.kernels import SolverOps, cfg_guided_reference
from flowturbo.schedule import SamplingSchedule
from flowturbo.training.decoders import LatentDecoder
from flowturbo.training.encoders import LatentEncoder
from flowturbo.training.models import SiT, VelocityRefiner, refiner_takes_dt

VARIANTS = ("time-input", "per-step", "unrolled")


class _Transformer(nn.Module):
    """A SiT or refiner body run with either a time input or a folded time embedding (and, for a dt-conditioned
    refiner, either a dt input or a folded dt embedding)."""

    def __init__(self, model: SiT | VelocityRefiner, time: float | None, dt: float | None = None) -> None:
        super().__init__()
        # The kernel backend travels with the model: reference (standard ops, every format) or, for
        # AOTInductor CUDA packages only, our Triton custom ops (checked by export.pipeline.ExportRequest).
        self.model = model
        self.time = time
        self.takes_dt = refiner_takes_dt(model)
        if dt is not None and not self.takes_dt:
            raise FlowTurboError("only a dt-conditioned refiner's graph can fold a dt")
        self.dt = dt
        if time is not None:
            self.register_buffer("t_emb", self._fold(model.t_embedder, time), persistent=False)  # (1, D)
        if dt is not None:
            self.register_buffer("dt_emb", self._fold(model.dt_embedder, dt), persistent=False)  # (1, D)

    @staticmethod
    def _fold(embedder: nn.Module, value: float) -> torch.Tensor:
        """The embedding of one scalar as a constant (1, D) in the model's dtype."""
        weight = embedder.mlp[0].weight
        with torch.no_grad():
            emb = embedder(torch.tensor([value], dtype=torch.float32, device=weight.device))  # (1, D)
        return emb.to(weight.dtype)

    def run(self, x: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor,
            dt: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (M, embed_channels, H, W), ``t`` (M,) or None (folded), ``y`` (M,), ``dt`` (M,) or None (folded, or
        no dt conditioning) -> (M, out, H, W).

        Mirrors ``_AdaLNTransformer._run`` with ``c = t_emb + y_emb (+ dt_emb)``.
        """
        m = self.model
        tokens = m.x_embedder(x) + m.pos_embed  # (M, T, D)
        t_emb = self.t_emb if self.time is not None else m.t_embedder(t)  # (1, D) folded or (M, D)
        c = t_emb + m.y_embedder(y)  # (M, D)
        if self.takes_dt:
            c = c + (self.dt_emb if self.dt is not None else m.dt_embedder(dt))  # (1, D) folded or (M, D)
        pending = None
        for block in m.blocks:
            tokens, pending = block.forward_chained(tokens, c, pending, m.kernel_backend)  # (M, T, D)
        return m.unpatchify(m.final_layer(tokens, c, pending, m.kernel_backend))  # (M, out, H, W)


class _GuidedStep(nn.Module):
    """Shared CFG plumbing of the predictor and refiner steps.

    ``halves``: velocities in and out have the per-CFG-half layout (B, 2C, H, W) of
    :mod:`flowturbo.integrator` (partial guidance in a schedule with R steps).
    """

    def __init__(self, model: SiT | VelocityRefiner, guidance_scale: float, guidance_channels: int | None,
                 time: float | None, halves: bool = False, dt: float | None = None) -> None:
        super().__init__()
        self.body = _Transformer(model, time, dt)
        self.channels = model.config.in_channels
        self.null_label = model.config.num_classes
        self.scale = float(guidance_scale)
        self.guidance_channels = guidance_channels
        self.guided = self.scale != 1.0
        self.halves = bool(halves) and self.guided
        if self.guided and not model.y_embedder.has_null_class:
            raise FlowTurboError("guidance needs a model with a null class (class_dropout_prob > 0); export with cfg 1")

    def _double(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return [torch.cat([a, a]) if self.guided else a for a in tensors]

    def _labels(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.cat([labels, torch.full_like(labels, self.null_label)]) if self.guided else labels

    def _combine(self, out: torch.Tensor, batch: int) -> torch.Tensor:
        """The guided velocity (B, C or 2C, H, W) from the raw doubled output: the solver ops' rule."""
        if not self.guided:
            return out[:, : self.channels]
        guided = cfg_guided_reference(out, batch, self.channels, self.scale, self.guidance_channels, self.halves)
        return guided.to(out.dtype)

    def time_rows(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else self._double(t)[0]


class PredictorStep(_GuidedStep):
    """``(latents (B,C,H,W), t (B,), labels (B,)) -> guided velocity (B,C,H,W)``; t absent when folded."""

    def __init__(self, predictor: SiT, guidance_scale: float, guidance_channels: int | None = None,
                 time: float | None = None, halves: bool = False) -> None:
        super().__init__(predictor, guidance_scale, guidance_channels, time, halves)

    def raw(self, latents: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """The model output on the CFG-doubled batch: (M, C_out, H, W), M = 2B with guidance."""
        (xx,) = self._double(latents)  # (M, C, H, W)
        return self.body.run(xx, self.time_rows(t), self._labels(labels))

    def velocity(self, latents: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        return self._combine(self.raw(latents, t, labels), latents.shape[0])

    def forward(self, latents: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.velocity(latents, t, labels)


class FoldedPredictorStep(PredictorStep):
    """Per-step predictor graph: ``(latents, labels) -> velocity`` at the folded time."""

    def forward(self, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.velocity(latents, None, labels)


class RefinerStep(_GuidedStep):
    """``(latents, v, t, labels) -> guided velocity offset``; the refiner sees ``cat(x, v)`` per CFG half.

    ``time`` / ``dt`` fold the time / the velocity age (per-step and unrolled graphs); a dt-conditioned refiner
    with neither folded is :class:`DtRefinerStep` (dt an input).
    """

    def __init__(self, refiner: VelocityRefiner, guidance_scale: float, guidance_channels: int | None = None,
                 time: float | None = None, halves: bool = False, dt: float | None = None) -> None:
        super().__init__(refiner, guidance_scale, guidance_channels, time, halves, dt)

    def raw(self, latents: torch.Tensor, v: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor,
            dt: torch.Tensor | None = None) -> torch.Tensor:
        """The refiner output on the CFG-doubled batch: (M, C_out, H, W); v in either velocity layout."""
        c = self.channels
        if not self.guided:
            xx, vv = latents, v[:, :c]
        elif v.shape[1] == 2 * c:  # per-half velocity: the unconditional rows see their own half
            xx, vv = torch.cat([latents, latents]), torch.cat([v[:, :c], v[:, c:]])
        else:
            xx, vv = torch.cat([latents, latents]), torch.cat([v, v])
        return self.body.run(torch.cat([xx, vv], dim=1), self.time_rows(t), self._labels(labels), self.time_rows(dt))

    def offset(self, latents: torch.Tensor, v: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor,
               dt: torch.Tensor | None = None) -> torch.Tensor:
        return self._combine(self.raw(latents, v, t, labels, dt), latents.shape[0])

    def forward(self, latents: torch.Tensor, v: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.offset(latents, v, t, labels)


class DtRefinerStep(RefinerStep):
    """A dt-conditioned refiner's time-input graph: ``(latents, v, t, dt, labels) -> offset`` (``dt`` (B,) float32:
    the age of ``v``, ``flowturbo.integrator``)."""

    def forward(self, latents: torch.Tensor, v: torch.Tensor, t: torch.Tensor,  # type: ignore[override]
                dt: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.offset(latents, v, t, labels, dt)


class FoldedRefinerStep(RefinerStep):
    """Per-step refiner graph: ``(latents, v, labels) -> offset`` at the folded time (and dt)."""

    def forward(self, latents: torch.Tensor, v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.offset(latents, v, None, labels)


def refiner_step(refiner: VelocityRefiner, guidance_scale: float, guidance_channels: int | None = None,
                 halves: bool = False) -> RefinerStep:
    """The time-input refiner graph for ``refiner``: with a dt input when it is dt-conditioned."""
    cls = DtRefinerStep if refiner_takes_dt(refiner) else RefinerStep
    return cls(refiner, guidance_scale, guidance_channels, halves=halves)


def refiner_graph_keys(schedule: SamplingSchedule, refiner: VelocityRefiner | None) -> list[tuple[float, float | None]]:
    """The distinct folded refiner graphs a schedule needs, sorted: ``(t, None)`` per call time, or ``(t, dt)`` per
    call of a dt-conditioned refiner (:func:`flowturbo.integrator.refiner_call_plan`)."""
    takes_dt = refiner_takes_dt(refiner)
    return sorted({(call.t, call.dt if takes_dt else None) for call in refiner_call_plan(schedule)},
                  key=lambda key: (key[0], -1.0 if key[1] is None else key[1]))


class DecoderStep(nn.Module):
    """``latents (B,C,H,W) -> images (B,C_img,H_img,W_img)`` in [-1, 1]."""

    def __init__(self, decoder: LatentDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode(latents)


class EncoderStep(nn.Module):
    """``images (B,C_img,H_img,W_img) in [-1, 1] -> scaled latents (B,C,H,W)`` (inpainting / editing)."""

    def __init__(self, encoder: LatentEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)  # forward: no value-range check (a host sync) inside the graph


class _UnrolledCalls:
    """:class:`flowturbo.integrator.ModelCalls` over the time-folded step bodies of one label batch."""

    def __init__(self, unrolled: "UnrolledSchedule", labels: torch.Tensor) -> None:
        self.unrolled = unrolled
        self.labels = labels

    def predictor(self, x: torch.Tensor, t: float) -> torch.Tensor:
        u = self.unrolled
        return u.predictor_steps[u.pred_index[t]].raw(x, None, self.labels)

    def refiner(self, x: torch.Tensor, t: float, v: torch.Tensor, dt: float) -> torch.Tensor:
        u = self.unrolled
        return u.refiner_steps[u.ref_index[(t, dt if u.refiner_takes_dt else None)]].raw(x, v, None, self.labels)


class UnrolledSchedule(nn.Module):
    """The whole schedule + decode as one graph: ``(noise, labels) -> (images, latents)``.

    The step loop is :func:`flowturbo.integrator.integrate` traced once, with time-folded model bodies (a
    dt-conditioned refiner's dt folded too, one body per (t, dt)) and the solver ops of the models' kernel backend
    (``triton``: the fused CFG + update kernels compiled into the AOTInductor package); the weights are shared by
    all steps (one copy).
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
        halves = carries_halves(schedule, predictor.config.in_channels)
        pred_times, _ = call_times(schedule)
        ref_keys = refiner_graph_keys(schedule, refiner)
        # Step wrappers share the model modules: the exported graph holds one copy of each weight.
        self.predictor_steps = nn.ModuleList([PredictorStep(predictor, scale, channels, t, halves) for t in pred_times])
        self.refiner_steps = nn.ModuleList([RefinerStep(refiner, scale, channels, t, halves, dt) for t, dt in ref_keys])
        self.pred_index = {t: i for i, t in enumerate(pred_times)}
        self.ref_index = {key: i for i, key in enumerate(ref_keys)}
        self.refiner_takes_dt = refiner_takes_dt(refiner)
        self.ops = SolverOps(scale, channels, halves=halves, backend=predictor.kernel_backend)
        self.decoder = decoder

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        result = integrate(self.schedule, noise, _UnrolledCalls(self, labels), self.ops)  # (B, C, H, W)
        return self.decoder.decode(result.x), result.x


def step_times(schedule: SamplingSchedule) -> list[float]:
    """Distinct times at which the predictor is called (its per-step graphs; the refiner's: :func:`refiner_graph_keys`)."""
    pred, _ = call_times(schedule)
    return list(pred)


__all__ = [
    "VARIANTS",
    "DecoderStep",
    "DtRefinerStep",
    "EncoderStep",
    "FoldedPredictorStep",
    "FoldedRefinerStep",
    "PredictorStep",
    "RefinerStep",
    "UnrolledSchedule",
    "refiner_graph_keys",
    "refiner_step",
    "step_times",
]
