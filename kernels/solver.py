"""Solver updates with classifier-free guidance fused in: one pass from the raw model output to the new state.

Every step kind of DESIGN.md §2 is a sequence of two updates after a model call on the doubled batch
``[x; x]`` with labels ``[y; null]``. The model output ``raw`` is (2B, C_out, H, W): rows ``:B``
conditional (``c``), rows ``B:`` unconditional (``u``); only the first C channels are velocity
(C_out = 2C for ``learn_sigma`` checkpoints). The guided velocity is

    g = u + s * (c - u)   on channels  < guidance_channels   (all channels when None)
    g = c                 on channels >= guidance_channels

Unguided channels take the *conditional* value. This is what the official code computes:
SiT ``models.py::forward_with_cfg`` and FlowTurbo ``models_assemble.py`` (``forward_with_cfg`` and
``VelocityRefinerBlock._forward``) guide ``model_out[:, :3]`` and concatenate ``rest = model_out[:, 3:]``
of the whole doubled batch; the sampler keeps the first (conditional) half, so its channel 3 moves with
the conditional velocity (the sigma channels are dropped before guidance by ``x.chunk(2, dim=1)``).
A ``raw`` of only B rows means "no guidance" (the model was run on the conditional batch): g = c.

The two ops (``h`` = step size, ``s`` = guidance scale):

* ``cfg_predict(raw, x, h, s, G, base=None) -> (d, x_pred)``: ``d = base + g``, ``x_pred = x + h d``
  (Euler step; Heun / pseudo-corrector predictor half; refiner first call with ``base = v``).
* ``cfg_correct(raw, x, d, h, s, G, base=None) -> (x_new, d2)``: ``d2 = base + g``,
  ``x_new = x + h/2 (d + d2)`` (Heun / pseudo-corrector corrector; refiner second call with ``base = d``).

One kernel with constexpr flags serves both. Arithmetic is float64 for float64 inputs, else float32;
outputs have x's dtype. ``h`` and ``s`` are Python floats: a fixed schedule has constant steps, so they
are baked into a CUDA graph / specialised by ``torch.compile``, which is what we want (no host syncs).

Layout contract of the Triton path: ``x``, ``d``, ``base`` contiguous (B, C, H, W); ``raw`` with any batch
and channel strides but contiguous (H, W) planes (so ``raw[:, :C]`` views are fine). One dtype for all.
"""

from __future__ import annotations

import torch

from flowturbo.errors import FlowTurboError
from flowturbo.kernels._common import (
    ELEMENTWISE_BLOCK,
    ELEMENTWISE_WARPS,
    SOLVER_DTYPES,
    check_out,
    check_shape,
    check_tensors,
    is_interpreted,
    launchable,
    register_op,
    require_triton,
    split_float,
    tl,
    triton,
)
from flowturbo.kernels.backend import KernelBackend


@triton.jit
def _to_compute(value, WIDE: tl.constexpr):
    """Cast a tensor or scalar to the arithmetic dtype: float64 when WIDE, else float32."""
    if WIDE:
        return tl.cast(value, tl.float64)
    else:
        return tl.cast(value, tl.float32)


@triton.jit
def _cfg_step_kernel(
    RAW, X, D_PREV, BASE, D_OUT, X_OUT,  # D_PREV unused unless IS_CORRECT, BASE unless HAS_BASE
    n_elements, chw, hw, raw_stride_b, raw_stride_c, uncond_offset, guidance_channels,
    h_hi, h_lo, s_hi, s_lo,
    HAS_UNCOND: tl.constexpr, HAS_BASE: tl.constexpr, IS_CORRECT: tl.constexpr, WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Elementwise over the (B, C, H, W) state; gathers c (and u) from the strided raw output."""
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)  # flat index into (B, C, H, W)
    mask = offsets < n_elements
    batch = offsets // chw
    channel = (offsets - batch * chw) // hw
    pixel = offsets - batch * chw - channel * hw
    raw_offsets = batch * raw_stride_b + channel * raw_stride_c + pixel  # conditional row of raw

    velocity = _to_compute(tl.load(RAW + raw_offsets, mask=mask, other=0.0), WIDE)  # c
    if HAS_UNCOND:
        guided = mask & (channel < guidance_channels)
        uncond = _to_compute(tl.load(RAW + uncond_offset + raw_offsets, mask=guided, other=0.0), WIDE)
        s = _to_compute(s_hi, WIDE) + _to_compute(s_lo, WIDE)
        velocity = tl.where(guided, uncond + s * (velocity - uncond), velocity)
    if HAS_BASE:
        velocity = _to_compute(tl.load(BASE + offsets, mask=mask, other=0.0), WIDE) + velocity

    h = _to_compute(h_hi, WIDE) + _to_compute(h_lo, WIDE)
    x = _to_compute(tl.load(X + offsets, mask=mask, other=0.0), WIDE)
    if IS_CORRECT:
        d_prev = _to_compute(tl.load(D_PREV + offsets, mask=mask, other=0.0), WIDE)
        x_new = x + (h * 0.5) * (d_prev + velocity)
    else:
        x_new = x + h * velocity
    tl.store(D_OUT + offsets, velocity.to(D_OUT.dtype.element_ty), mask=mask)
    tl.store(X_OUT + offsets, x_new.to(X_OUT.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- references


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cfg_guided_reference(
    raw: torch.Tensor, batch: int, channels: int, scale: float, guidance_channels: int | None = None
) -> torch.Tensor:
    """The guided velocity (B, C, H, W) from a raw model output of 2B rows (CFG) or B rows (no guidance).

    raw: (2B or B, C_out >= C, H, W). float64 math for float64 ``raw``, else float32; returns a new
    tensor in that compute dtype.
    """
    _check_raw_rows("cfg_guided_reference", raw, batch)
    compute = _compute_dtype(raw.dtype)
    guided = channels if guidance_channels is None else guidance_channels
    cond = raw[:batch, :channels].to(compute, copy=True)  # (B, C, H, W)
    if raw.shape[0] == batch or guided == 0:
        return cond
    uncond = raw[batch:, :guided].to(compute)  # (B, G, H, W)
    cond[:, :guided] = uncond + scale * (cond[:, :guided] - uncond)  # eq. u + s (c - u)
    return cond


def cfg_predict_reference(
    raw: torch.Tensor,
    x: torch.Tensor,
    h: float,
    scale: float,
    guidance_channels: int | None = None,
    base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``d = base + g(raw)``, ``x_pred = x + h d``; returns ``(d, x_pred)`` in x.dtype.

    raw: (2B or B, C_out, H, W); x, base: (B, C, H, W). float64 math for float64 x, else float32.
    """
    compute = _compute_dtype(x.dtype)
    d = cfg_guided_reference(raw, x.shape[0], x.shape[1], scale, guidance_channels).to(compute)
    if base is not None:
        d = base.to(compute) + d
    x_pred = x.to(compute) + h * d
    return d.to(x.dtype), x_pred.to(x.dtype)


def cfg_correct_reference(
    raw: torch.Tensor,
    x: torch.Tensor,
    d: torch.Tensor,
    h: float,
    scale: float,
    guidance_channels: int | None = None,
    base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``d2 = base + g(raw)``, ``x_new = x + h/2 (d + d2)``; returns ``(x_new, d2)`` in x.dtype.

    raw: (2B or B, C_out, H, W); x, d, base: (B, C, H, W). float64 math for float64 x, else float32.
    """
    compute = _compute_dtype(x.dtype)
    d2 = cfg_guided_reference(raw, x.shape[0], x.shape[1], scale, guidance_channels).to(compute)
    if base is not None:
        d2 = base.to(compute) + d2
    x_new = x.to(compute) + (h / 2) * (d.to(compute) + d2)
    return x_new.to(x.dtype), d2.to(x.dtype)


# --------------------------------------------------------------------------- checks and launchers


def _check_raw_rows(op: str, raw: torch.Tensor, batch: int) -> None:
    if raw.dim() != 4 or raw.shape[0] not in (batch, 2 * batch):
        raise FlowTurboError(
            f"{op}: raw must be (2B, C_out, H, W) with B = {batch} (conditional rows first, then "
            f"unconditional) or (B, C_out, H, W) without guidance; got shape {tuple(raw.shape)}"
        )


def _resolve_guidance(op: str, channels: int, guidance_channels: int | None) -> int:
    if guidance_channels is None:
        return channels
    if not 0 <= guidance_channels <= channels:
        raise FlowTurboError(
            f"{op}: guidance_channels must be in [0, {channels}] or None (all), got {guidance_channels}"
        )
    return guidance_channels


def _check_inputs(
    op: str, raw: torch.Tensor, x: torch.Tensor, guidance_channels: int | None, state: dict[str, torch.Tensor]
) -> int:
    """Validate shapes/dtypes/layouts (FlowTurboError); returns the resolved number of guided channels."""
    if x.dim() != 4:
        raise FlowTurboError(f"{op}: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    _check_raw_rows(op, raw, batch)
    if raw.shape[1] < channels or tuple(raw.shape[2:]) != (height, width):
        raise FlowTurboError(
            f"{op}: raw must be (2B, C_out >= {channels}, {height}, {width}) to match x {tuple(x.shape)}, "
            f"got {tuple(raw.shape)}"
        )
    for name, t in state.items():
        if name != "x":
            check_shape(op, name, t, tuple(x.shape), "(B, C, H, W) like x")
    check_tensors(op, {"x": x, "raw": raw, **{k: v for k, v in state.items() if k != "x"}}, SOLVER_DTYPES,
                  contiguous=[n for n in state])
    if (width > 1 and raw.stride(3) != 1) or (height > 1 and raw.stride(2) != width):
        raise FlowTurboError(
            f"{op}: raw must have contiguous (H, W) planes (strides {tuple(raw.stride())}); call .contiguous()"
        )
    return _resolve_guidance(op, channels, guidance_channels)


def _run(
    raw: torch.Tensor,
    x: torch.Tensor,
    d_prev: torch.Tensor | None,
    h: float,
    scale: float,
    guidance_channels: int | None,
    base: torch.Tensor | None,
    d_out: torch.Tensor | None,
    x_out: torch.Tensor | None,
    traceable: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check, allocate, launch; returns ``(new velocity, new state)``. ``d_prev is None``: predict."""
    op = "cfg_predict" if d_prev is None else "cfg_correct"
    require_triton(op, _cfg_step_kernel, x.device)
    state = {"x": x} if d_prev is None else {"x": x, "d": d_prev}
    if base is not None:
        state["base"] = base
    guided = _check_inputs(op, raw, x, guidance_channels, state)
    d_out = check_out(op, "d_out", d_out, x)
    x_out = check_out(op, "x_out", x_out, x)
    n_elements = x.numel()
    if n_elements == 0:
        return d_out, x_out
    batch, channels, height, width = x.shape
    wide = x.dtype == torch.float64
    h_hi, h_lo = split_float(h, wide)
    s_hi, s_lo = split_float(scale, wide)
    grid = (triton.cdiv(n_elements, ELEMENTWISE_BLOCK),)
    launchable(_cfg_step_kernel, traceable)[grid](
        raw, x, x if d_prev is None else d_prev, x if base is None else base, d_out, x_out,  # x: placeholders
        n_elements, channels * height * width, height * width, raw.stride(0), raw.stride(1),
        batch * raw.stride(0), guided, h_hi, h_lo, s_hi, s_lo,
        HAS_UNCOND=bool(raw.shape[0] == 2 * batch), HAS_BASE=base is not None, IS_CORRECT=d_prev is not None,
        WIDE=wide, BLOCK=ELEMENTWISE_BLOCK, num_warps=ELEMENTWISE_WARPS,
    )
    return d_out, x_out


def cfg_predict_triton(
    raw: torch.Tensor,
    x: torch.Tensor,
    h: float,
    scale: float,
    guidance_channels: int | None = None,
    base: torch.Tensor | None = None,
    *,
    d_out: torch.Tensor | None = None,
    x_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher of :func:`cfg_predict_reference`; returns ``(d, x_pred)`` (into the buffers if given).

    A direct eager launch (not traceable by make_fx/export: use :func:`cfg_predict` for that).
    """
    return _run(raw, x, None, h, scale, guidance_channels, base, d_out, x_out, traceable=False)


def cfg_correct_triton(
    raw: torch.Tensor,
    x: torch.Tensor,
    d: torch.Tensor,
    h: float,
    scale: float,
    guidance_channels: int | None = None,
    base: torch.Tensor | None = None,
    *,
    x_out: torch.Tensor | None = None,
    d_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher of :func:`cfg_correct_reference`; returns ``(x_new, d2)`` (into the buffers if given)."""
    d2, x_new = _run(raw, x, d, h, scale, guidance_channels, base, d_out, x_out, traceable=False)
    return x_new, d2


# --------------------------------------------------------------------------- custom ops
# The op schema takes guidance_channels as a resolved int (the dispatchers map None -> C). Each op body
# is its CUDA kernel, its fake (meta) implementation and, under torch.compile, the decomposition
# Inductor sees: the Triton launch on CUDA, the checked reference elsewhere. Eager CPU calls go to the
# registered CPU kernel: the interpreter when active, else the reference.


def _concrete(*scalars: object) -> bool:
    """True for plain Python numbers. A tracer may hand the op symbolic floats (``torch.compile`` with
    dynamic float inputs); Triton gets constants only, so such a trace uses the reference decomposition
    (which Inductor fuses by itself) instead of the hand-written kernel."""
    return all(isinstance(s, (int, float)) for s in scalars)


def _predict_op(
    raw: torch.Tensor, x: torch.Tensor, h: float, scale: float, guidance_channels: int, base: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.device.type == "cuda" and _concrete(h, scale):
        return _run(raw, x, None, h, scale, guidance_channels, base, None, None, traceable=True)
    _check_inputs("cfg_predict", raw, x, guidance_channels, {"x": x} if base is None else {"x": x, "base": base})
    return cfg_predict_reference(raw, x, h, scale, guidance_channels, base)


def _predict_cpu(
    raw: torch.Tensor, x: torch.Tensor, h: float, scale: float, guidance_channels: int, base: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if is_interpreted(_cfg_step_kernel):
        return cfg_predict_triton(raw, x, h, scale, guidance_channels, base)
    return _predict_op(raw, x, h, scale, guidance_channels, base)


def _correct_op(
    raw: torch.Tensor, x: torch.Tensor, d: torch.Tensor, h: float, scale: float, guidance_channels: int,
    base: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.device.type == "cuda" and _concrete(h, scale):
        d2, x_new = _run(raw, x, d, h, scale, guidance_channels, base, None, None, traceable=True)
        return x_new, d2
    state = {"x": x, "d": d} if base is None else {"x": x, "d": d, "base": base}
    _check_inputs("cfg_correct", raw, x, guidance_channels, state)
    return cfg_correct_reference(raw, x, d, h, scale, guidance_channels, base)


def _correct_cpu(
    raw: torch.Tensor, x: torch.Tensor, d: torch.Tensor, h: float, scale: float, guidance_channels: int,
    base: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if is_interpreted(_cfg_step_kernel):
        return cfg_correct_triton(raw, x, d, h, scale, guidance_channels, base)
    return _correct_op(raw, x, d, h, scale, guidance_channels, base)


cfg_predict_op = register_op("cfg_predict", _predict_op, _predict_cpu)
cfg_correct_op = register_op("cfg_correct", _correct_op, _correct_cpu)


# --------------------------------------------------------------------------- dispatchers


def cfg_predict(
    raw: torch.Tensor,
    x: torch.Tensor,
    h: float,
    scale: float,
    guidance_channels: int | None = None,
    base: torch.Tensor | None = None,
    backend: KernelBackend | str = KernelBackend.REFERENCE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictor update with fused CFG: ``d = base + g(raw)``, ``x_pred = x + h d``; returns ``(d, x_pred)``.

    raw: (2B, C_out, H, W) model output on ``[x; x]`` with labels ``[y; null]`` (or B rows: no guidance);
    x, base: (B, C, H, W); ``guidance_channels`` None guides all C channels. ``backend`` as in
    :func:`flowturbo.kernels.layernorm_modulate`.
    """
    if KernelBackend.coerce(backend) is KernelBackend.REFERENCE:
        if x.dim() == 4:
            _resolve_guidance("cfg_predict", x.shape[1], guidance_channels)
        return cfg_predict_reference(raw, x, h, scale, guidance_channels, base)
    require_triton("cfg_predict", _cfg_step_kernel, x.device)
    if x.dim() != 4:
        raise FlowTurboError(f"cfg_predict: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    guided = _resolve_guidance("cfg_predict", x.shape[1], guidance_channels)
    return cfg_predict_op(raw, x, float(h), float(scale), guided, base)


def cfg_correct(
    raw: torch.Tensor,
    x: torch.Tensor,
    d: torch.Tensor,
    h: float,
    scale: float,
    guidance_channels: int | None = None,
    base: torch.Tensor | None = None,
    backend: KernelBackend | str = KernelBackend.REFERENCE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrector update with fused CFG: ``d2 = base + g(raw)``, ``x_new = x + h/2 (d + d2)``; returns
    ``(x_new, d2)``.

    raw: (2B, C_out, H, W) (or B rows: no guidance); x, d, base: (B, C, H, W). Backends as
    :func:`cfg_predict`.
    """
    if KernelBackend.coerce(backend) is KernelBackend.REFERENCE:
        if x.dim() == 4:
            _resolve_guidance("cfg_correct", x.shape[1], guidance_channels)
        return cfg_correct_reference(raw, x, d, h, scale, guidance_channels, base)
    require_triton("cfg_correct", _cfg_step_kernel, x.device)
    if x.dim() != 4:
        raise FlowTurboError(f"cfg_correct: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    guided = _resolve_guidance("cfg_correct", x.shape[1], guidance_channels)
    return cfg_correct_op(raw, x, d, float(h), float(scale), guided, base)
